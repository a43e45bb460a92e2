"""The one owner of every guest page's engine state (the bits: ``pagebits``).

Per page two bytes: ``age`` (uint8) and ``state`` (uint8). The low two bits of ``state``
are the page's *kind*:

- ``RESIDENT`` (0): in guest memory as far as the engine knows (or never touched).
  ``age`` counts consecutive cold intervals (saturating at 255). Bit 2 ``ONCE``: evicted
  at some point since it was last known empty, so on anonymous memory an absent page is
  *not* zero memory. Bits 3..7: a refault hold (extra cold intervals before it may be
  evicted again).
- ``EVICTED`` (1): its record is committed and the page is gone from memory; a fault is
  served from the store. ``age`` is the cycle (mod 256) it was evicted in. Bit 2
  ``EXPIRED``: evicted longer ago than the refault window (so the cycle byte can wrap).
  Bit 3 ``ZERO``: the record is a zero page. Bits 4..7: half the refault hold the page
  had served before this eviction, so that a page that keeps coming back (read-hot
  pages under the wp strategy, whose reads are invisible) gets a hold that doubles each
  time (refault_hold, 2x, 4x ... up to 31 intervals) instead of cycling through the
  store at the same pace; a page not refaulted within the window starts over.
- ``BACK`` (3 = EVICTED | 2): a fault served it back from the store; the policy hears in
  bulk at the next :meth:`PageTable.flush` (one numpy pass per burst, not per fault).
- ``POISONED`` (2): its content could not be recovered. *Every* fault on it gets
  UFFDIO_POISON again, whatever happened to the PTE marker meanwhile (the engine's own
  MADV_DONTNEED, an RFC DEACTIVATE zap on shmem, a punch or an unregister all drop it).
  Only a guest discard (:meth:`discarded`) makes it new, zero memory again.

Pages in flight (detached from the guest, record not committed yet) stay ``RESIDENT`` in
the byte and are listed in ``inflight``; a fault on one takes it back (:meth:`reclaimed`).

Every transition is a method here; the fault path, the eviction path and the restore path
change page state only through them. The order constraints between them live here too:
``take_deletes`` flushes first and never returns a page that is evicted (its record is
live), so a delete can never destroy the record of a page that was evicted again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..settings import TrackingSettings
from . import policy
from .pagebits import (
    BACK,
    EVICTED,
    EXPIRED,
    HOLD_MAX,
    HOLD_SHIFT,
    KIND,
    LEVEL_MAX,
    LEVEL_SHIFT,
    ONCE,
    POISONED,
    RESIDENT,
    ZERO,
)

if TYPE_CHECKING:
    from .trace import PageTrace

FEW = 64  # up to this many pages served back, flush is scalar (cheaper than numpy)


@dataclass(eq=False)
class Batch:
    """Pages detached from the guest whose records are not committed yet."""

    pages: np.ndarray  # uint64 page indexes, ascending
    staging: int  # anon: address of slot 0 (slot i holds pages[i]); memfd: 0
    reclaimed: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))


@dataclass
class Transitions:
    """Counts of what happened to pages (read by the region's stats and metrics)."""

    evicted: int = 0
    refaults: int = 0
    poisoned: int = 0


class PageTable:
    def __init__(self, npages: int, tracking: TrackingSettings, page_size: int = 4096) -> None:
        self.npages = npages
        self.page_size = page_size
        self.age = np.zeros(npages, dtype=np.uint8)
        self.state = np.zeros(npages, dtype=np.uint8)
        self.view = self.state.data  # scalar access, ~10x cheaper than numpy indexing
        self.agev = self.age.data
        self.params = policy.Params.of(tracking)
        self.cycle = 0  # observations so far
        self.inflight: dict[int, tuple[Batch, int]] = {}
        self.back: list[int] = []  # BACK pages the policy has not heard of
        self._deletes: list[int] = []  # records to delete once their page is not EVICTED
        self.counts = Transitions()
        self._evicted = 0  # pages of kind EVICTED (BACK ones are in memory already)
        self._poisoned = 0
        self._present = 0  # resident pages present in memory (from the last scan, live)
        self._ws = self._cold = 0
        self._carry = 0.0  # fraction of a page of byte budget left from the last select
        self.trace: PageTrace | None = None  # debug: every transition is noted there

    def set_tracking(self, tracking: TrackingSettings) -> None:
        """Live reload: used from the next observe/select on."""
        self.params = policy.Params.of(tracking)

    # ---- scalar reads (the fault path) -------------------------------------------------
    def kind(self, p: int) -> int:
        return self.view[p] & KIND

    def once(self, p: int) -> bool:
        """Evicted at some point since it was last known empty (or evicted now)."""
        s = self.view[p]
        return s & KIND != RESIDENT or bool(s & ONCE)

    def evicted_with(self, p: int, n: int) -> tuple[int, int]:
        """[lo, hi): the run around EVICTED page ``p`` of adjacent pages evicted in the
        same cycle (pages that left together tend to be wanted together), at most ``n``
        pages, forward first (guests walk memory upwards more often than not)."""
        st, age, last = self.view, self.agev, self.npages - 1
        a = age[p]
        lo = hi = p
        while hi < last and hi - lo + 1 < n and st[hi + 1] & KIND == EVICTED \
                and age[hi + 1] == a:
            hi += 1
        while lo > 0 and hi - lo + 1 < n and st[lo - 1] & KIND == EVICTED \
                and age[lo - 1] == a:
            lo -= 1
        return lo, hi + 1

    # ---- the fault path ----------------------------------------------------------------
    def served_back(self, p: int) -> None:
        """An EVICTED page was copied back from its record: BACK until the next flush."""
        self.view[p] |= BACK
        self.back.append(p)
        self._present += 1
        self._evicted -= 1
        if self.trace is not None:
            self.trace.note("served_back", p)

    def zero_filled(self) -> None:
        """A never-evicted page was populated with zeros by a MISSING fault."""
        self._present += 1

    def reclaimed(self, p: int) -> Batch:
        """A fault took an in-flight page back before its commit: it stays resident and
        its record, once committed, is deleted."""
        batch, i = self.inflight.pop(p)
        batch.reclaimed[i] = True
        if self.trace is not None:
            self.trace.note("reclaimed", p, (i, 1) if batch.staging else None)
        return batch

    def poisoned(self, p: int) -> bool:
        """The page's content is unrecoverable (bad or missing record). Returns False if
        it was poisoned already."""
        s = self.view[p]
        k = s & KIND
        if k == POISONED:
            return False
        if k == EVICTED:
            self._evicted -= 1
        elif k == BACK:
            self.back.remove(p)
        self.view[p] = POISONED
        self._poisoned += 1
        if self.trace is not None:
            self.trace.note("poisoned", p, detail=f"was kind {k}")
        self.counts.poisoned += 1
        self._deletes.append(p)  # the bad record, if any, goes
        return True

    def flush(self) -> int:
        """BACK pages become RESIDENT: refaults (back within the refault window of their
        eviction) get a hold. Their records become deletable. Returns the refaults."""
        back = self.back
        if not back:
            return 0
        self.back = []
        if self.trace is not None:
            self.trace.note("flushed", np.asarray(back, dtype=np.uint64))
        if len(back) <= FEW:
            n = self._flush_few(back)
        else:
            n = self._to_resident(np.asarray(back, dtype=np.int64))
        self._deletes.extend(back)
        self.counts.refaults += n
        return n

    def _flush_few(self, pages: list[int]) -> int:
        st, age = self.view, self.age.data
        now, window, base = self.cycle & 0xFF, self.params.window, self.params.hold
        n = 0
        for p in pages:
            s = st[p]
            if s & KIND != BACK:  # poisoned or discarded since
                continue
            if not s & EXPIRED and (now - age[p]) & 0xFF <= window:
                held = min(HOLD_MAX, max(base, (s >> LEVEL_SHIFT) << 2)) if base else 0
                st[p] = held << HOLD_SHIFT | ONCE
                n += 1
            else:
                st[p] = ONCE
            age[p] = 0
        return n

    def _to_resident(self, pages: np.ndarray) -> int:
        """BACK pages among ``pages`` become RESIDENT (refault accounting)."""
        p = np.unique(pages)
        st = self.state[p]
        ev = (st & KIND) == BACK
        p, st = p[ev], st[ev]
        since = np.uint8(self.cycle & 0xFF) - self.age[p]
        refault = ((st & EXPIRED) == 0) & (since <= self.params.window)
        base = self.params.hold
        held = (np.minimum(np.maximum((st >> LEVEL_SHIFT).astype(np.uint16) << 2, base),
                           HOLD_MAX).astype(np.uint8) if base else np.zeros_like(st))
        self.state[p] = np.where(refault, (held << HOLD_SHIFT) | np.uint8(ONCE),
                                 np.uint8(ONCE))
        self.age[p] = 0
        return int(np.count_nonzero(refault))

    # ---- the eviction path --------------------------------------------------------------
    def detached(self, pages: np.ndarray, staging: int) -> Batch:
        """``pages`` (ascending) left the guest's page tables; their records are not
        committed yet. Anon: slot i of ``staging`` holds pages[i]."""
        batch = Batch(pages, staging, np.zeros(len(pages), dtype=bool))
        if self.trace is not None:
            self.trace.detached(pages, staging)
        self.inflight.update(zip(pages.tolist(), ((batch, i) for i in range(len(pages))),
                                 strict=True))
        return batch

    def returned(self, batch: Batch, pages: np.ndarray | None = None) -> None:
        """In-flight pages of ``batch`` (all, or ``pages``) are back where they were,
        uncommitted (a failed store, a rollback): no longer in flight."""
        pages = batch.pages if pages is None else pages
        if self.trace is not None:
            self.trace.note("returned", pages)
        self._leave(batch, pages)

    def _leave(self, batch: Batch, pages: np.ndarray) -> None:
        for p in pages.tolist():
            ent = self.inflight.get(p)
            if ent is not None and ent[0] is batch:
                del self.inflight[p]

    def committed(self, batch: Batch, zero: np.ndarray) -> np.ndarray:
        """The batch's records are committed. Pages nobody reclaimed meanwhile are gone
        from memory now (EVICTED); the records of reclaimed ones are deleted. Returns the
        evicted pages."""
        self._leave(batch, batch.pages)
        keep = ~batch.reclaimed
        ev = batch.pages[keep].astype(np.int64)
        st = self.state[ev]
        # a page poisoned or discarded while in flight can't be: the fault path only
        # reclaims in-flight pages, and discarded() reclaims them too. Half the refault
        # hold it served is kept: a refault soon after doubles it (see LEVEL_SHIFT).
        level = np.minimum((st >> HOLD_SHIFT) >> 1, LEVEL_MAX).astype(np.uint8) << LEVEL_SHIFT
        self.state[ev] = np.where(zero[keep], np.uint8(EVICTED | ZERO), np.uint8(EVICTED)) | level
        self.age[ev] = self.cycle & 0xFF
        self._evicted += int(np.count_nonzero((st & KIND) == RESIDENT))
        self._present = max(0, self._present - len(ev))
        self.counts.evicted += len(ev)
        self._deletes.extend(batch.pages[batch.reclaimed].tolist())
        if self.trace is not None:
            self.trace.note("committed", ev.astype(np.uint64))
            if batch.reclaimed.any():
                self.trace.note("committed reclaimed", batch.pages[batch.reclaimed])
        return ev.astype(np.uint64)

    def take_deletes(self) -> np.ndarray:
        """Records to delete now: flushed BACK pages, reclaimed and poisoned pages,
        discarded ones; never a page that is EVICTED (evicted again: its record lives)."""
        self.flush()
        if not self._deletes:
            return np.zeros(0, dtype=np.uint64)
        pages = np.unique(np.asarray(self._deletes, dtype=np.uint64))
        self._deletes = []
        pages = pages[(self.state[pages] & KIND) != EVICTED]
        if self.trace is not None:
            self.trace.note("record deletes", pages)
        return pages

    # ---- the guest and restarts ---------------------------------------------------------
    def discarded(self, first: int, last: int) -> int:
        """The guest discarded pages [first, last) (REMOVE, UNMAP): they are new memory
        now and read as zero. In-flight pages there are reclaimed (their records are
        deleted after the commit), records of evicted ones and poisoned states go.
        Returns how many evicted or poisoned pages that dropped."""
        if self.trace is not None:
            self.trace.note("discarded", (first, last - first))
        for p in ([p for p in self.inflight if first <= p < last]
                  if len(self.inflight) < last - first else range(first, last)):
            if p in self.inflight:
                self.reclaimed(p)
        self.flush()
        sl = self.state[first:last]
        k = sl & KIND
        ev = k != RESIDENT
        n = int(np.count_nonzero(ev))
        if n:
            self._evicted -= int(np.count_nonzero(k == EVICTED))
            self._poisoned -= int(np.count_nonzero(k == POISONED))
            self._deletes.extend((np.flatnonzero(ev) + first).tolist())
        sl[:] = 0
        self.age[first:last] = 0
        return n

    def adopt(self, pages: np.ndarray, zero: np.ndarray) -> None:
        """Restart: the store holds records for ``pages`` (absent from memory) of a
        region this instance takes over. They are EVICTED, long ago (no refaults)."""
        p = pages.astype(np.int64)
        if self.trace is not None:
            self.trace.note("adopted", pages.astype(np.uint64))
        self.state[p] = np.where(zero, np.uint8(EVICTED | ZERO | EXPIRED),
                                 np.uint8(EVICTED | EXPIRED))
        self._evicted += len(p)

    def forget_records(self, pages: np.ndarray) -> None:
        """Restart: records of ``pages`` are stale (the pages are in memory): delete."""
        self._deletes.extend(pages.tolist())

    # ---- tracking ------------------------------------------------------------------------
    def observe(self, cold: np.ndarray, present: np.ndarray) -> None:
        """One interval's tracking result: ``cold`` = present and not accessed since the
        interval began; ``present`` = mapped in memory now (bool[npages] each)."""
        if cold.shape != (self.npages,) or present.shape != (self.npages,):
            raise ValueError(f"observe: masks of shape {cold.shape}/{present.shape}, "
                             f"want ({self.npages},)")
        self.flush()
        self.cycle += 1
        policy.observe(self.age, self.state, cold, self.cycle, self.params,
                       any_evicted=bool(self._evicted or self._poisoned))
        resident = (self.state & KIND) == RESIDENT
        cold = cold & resident
        self._present = int(np.count_nonzero(present & resident))
        self._cold = int(np.count_nonzero(cold))
        self._ws = self._present - self._cold

    def select(self, interval_s: float) -> np.ndarray:
        """Sorted uint64 victims (see policy.select); never a page in flight."""
        victims, self._carry = policy.select(self.age, self.state, self.params, interval_s,
                                             self._carry, self.resident_pages, self.page_size)
        return self.evictable(victims)

    def evictable(self, pages: np.ndarray) -> np.ndarray:
        """The RESIDENT pages among ``pages`` that are not in flight. Anything else must
        never be detached: an evicted or poisoned page is a hole, and reading a hole of a
        memfd gives zeros that would overwrite its record (or its poison)."""
        pages = pages[(self.state[pages] & KIND) == RESIDENT]
        if self.inflight and len(pages):  # a failed rollback left pages in staging
            busy = np.fromiter(self.inflight, dtype=np.uint64, count=len(self.inflight))
            pages = pages[~np.isin(pages, busy)]
        return pages

    # ---- masks and counts ------------------------------------------------------------------
    def evicted_mask(self, pages: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Pages whose faults are served from the store (kind EVICTED)."""
        return (self.state[pages] & KIND) == EVICTED

    def evicted_pages_array(self) -> np.ndarray:
        return np.flatnonzero(self.evicted_mask()).astype(np.uint64)

    @property
    def evicted_pages(self) -> int:
        return self._evicted

    @property
    def poisoned_pages(self) -> int:
        """Pages poisoned now (a guest discard clears them)."""
        return self._poisoned

    @property
    def resident_pages(self) -> int:
        """Pages really in memory: present at the last scan, plus those faulted in since,
        minus those evicted since. Never-touched memory is not resident."""
        return self._present

    @property
    def working_set_pages(self) -> int:
        """Resident pages accessed (wp strategy: written) in the last interval."""
        return self._ws

    @property
    def cold_pages(self) -> int:
        """Resident pages present but not accessed in the last interval."""
        return self._cold

    @property
    def zero_pages(self) -> int:
        """Evicted pages whose record is a zero page."""
        st = self.state
        return int(np.count_nonzero(((st & KIND) == EVICTED) & ((st & ZERO) != 0)))

    @property
    def metadata_bytes_per_page(self) -> float:
        return (self.age.nbytes + self.state.nbytes) / max(self.npages, 1)
