"""Which pages to evict: per-page ages and states in two bytes, pure numpy.

Per page: ``age`` (uint8) and ``state`` (uint8).
- resident page: ``age`` = consecutive cold intervals (saturating at 255); ``state`` bits
  3..7 hold a refault hold (extra intervals it must stay cold before it is a victim).
- evicted page: ``age`` = the cycle number (mod 256) it was evicted in, so a fault within
  ``refault_window`` cycles counts as a refault. ``observe`` sets EXPIRED once the window
  has passed, so the mod-256 cycle number never aliases.
The engine's per-page state lives in the same byte, in bits unused in each case:
- OUT (bit 3, evicted pages only: holds are cleared on eviction): the record is committed
  and the page is gone from memory; cleared by ``back_one`` the moment a fault brought it
  back, while the policy hears (``mark_resident``) in bulk.
- ONCE (bit 2, resident pages only: EXPIRED is evicted-only): evicted since it was last
  known empty, so an absent page is NOT zero memory. Every evicted page counts as ONCE.
No trio, no kernel, and no Python loop over pages.
"""

from __future__ import annotations

import numpy as np

from ..settings import TrackingSettings

EVICTED = 0x01
ZERO = 0x02  # page known to be all zeros (cleared when it is accessed or faulted in)
EXPIRED_SHIFT = 2
EXPIRED = 1 << EXPIRED_SHIFT  # evicted longer ago than refault_window
ONCE = EXPIRED  # on resident pages (see above)
HOLD_SHIFT = 3
OUT = 1 << HOLD_SHIFT  # on evicted pages (see above)
GONE = EVICTED | OUT
HOLD_MAX = 0xFF >> HOLD_SHIFT  # 31 intervals
WINDOW_MAX = 254  # the window must close before the cycle byte wraps
FEW_RANGES = 32


class PagePolicy:
    def __init__(self, npages: int, tracking: TrackingSettings, page_size: int = 4096) -> None:
        self.npages = npages
        self.page_size = page_size
        self.age = np.zeros(npages, dtype=np.uint8)
        self.state = np.zeros(npages, dtype=np.uint8)
        self.view = self.state.data  # of state: scalar access ~10x cheaper than numpy
        self.cycle = 0  # observe() calls so far
        self.refaults_total = 0
        self._evicted = 0
        self._carry = 0.0  # fraction of a page of byte budget left from the last select
        self._version = 0
        self._cache: tuple[int, int, int, int, int] | None = None
        self.set_tracking(tracking)

    def set_tracking(self, tracking: TrackingSettings) -> None:
        """Live reload: used from the next observe/select/mark call on."""
        self.tracking = tracking
        self.min_age = min(max(tracking.min_age, 0), 255)
        self.window = min(max(tracking.refault_window, 0), WINDOW_MAX)
        self.hold = min(max(tracking.refault_hold, 0), HOLD_MAX)
        self._version += 1

    @staticmethod
    def ranges_to_mask(regions: np.ndarray, base: int, npages: int,
                       page_size: int = 4096, clear: np.ndarray | None = None
                       ) -> np.ndarray:
        """bool[npages]: pages covered by PAGEMAP_SCAN ``regions`` ((n, 3): start, end, cat).
        With ``clear`` (bool[npages]): set the covered pages False in it and return it
        (``clear & ~mask`` without building the mask where that is cheaper)."""
        r = np.asarray(regions, dtype=np.uint64).reshape(-1, 3)
        out = np.zeros(npages, dtype=bool) if clear is None else clear
        val = clear is None
        if not len(r):
            return out
        # user addresses are < 2**63: an int64 view is exact, and >> floors like //
        lo = r[:, 0].view(np.int64) - base
        hi = r[:, 1].view(np.int64) - (base - page_size + 1)  # ceil
        if page_size & (page_size - 1):
            lo //= page_size
            hi //= page_size
        else:
            shift = page_size.bit_length() - 1
            lo >>= shift
            hi >>= shift
        if int(lo.min()) < 0 or int(hi.max()) > npages:
            np.clip(lo, 0, npages, out=lo)
            np.clip(hi, 0, npages, out=hi)
        if len(lo) <= FEW_RANGES:  # e.g. PAGE_IS_PRESENT: a few long runs
            for a, b in zip(lo.tolist(), hi.tolist(), strict=True):
                out[a:b] = val
            return out
        keep = hi > lo
        if not keep.all():
            lo, hi = lo[keep], hi[keep]
        lens = hi - lo
        total = int(lens.sum())
        if total * 3 < npages:  # sparse: set each page, cheaper than a scan of npages
            out[np.arange(total, dtype=np.int64) + np.repeat(lo - (np.cumsum(lens) - lens),
                                                              lens)] = val
            return out
        if bool(np.all(lo[1:] >= hi[:-1])):  # sorted, disjoint: as returned
            edges = np.zeros(npages + 1, dtype=np.int8)
            edges[lo] = 1
            edges[hi] -= 1  # a range may start where the previous one ends
            m = np.cumsum(edges[:-1], dtype=np.int8).view(bool)
        else:
            edges32 = np.bincount(lo, minlength=npages + 1).astype(np.int32)
            edges32 -= np.bincount(hi, minlength=npages + 1).astype(np.int32)
            m = np.cumsum(edges32[:-1], dtype=np.int32) > 0
        if clear is None:
            return m
        np.logical_not(m, out=m)
        clear &= m
        return clear

    def observe(self, cold: np.ndarray) -> None:
        """One interval's tracking result (True = not accessed). Resident cold pages age by
        one, resident accessed pages reset to 0; evicted pages are untouched."""
        cold = np.asarray(cold, dtype=bool)
        if cold.shape != (self.npages,):
            raise ValueError(f"observe: cold has shape {cold.shape}, want ({self.npages},)")
        self.cycle += 1
        self._version += 1
        st, age = self.state, self.age
        keep = np.uint8(0) - cold.view(np.uint8)  # 0xFF where cold, 0 where accessed
        aged = age + (age != 255)  # saturating +1
        aged &= keep
        warm_clear = keep | np.uint8(~ZERO & 0xFF)  # clears ZERO on accessed pages
        if not self._evicted:
            self.age = aged
            st &= warm_clear
            return
        # uint8 masks instead of where=: 0xFF on resident pages, 0 on evicted ones
        res = (st & np.uint8(EVICTED)) - np.uint8(1)
        age ^= (age ^ aged) & res
        st &= warm_clear | ~res
        since = np.uint8(self.cycle & 0xFF) - age  # wraps like the cycle byte
        st |= ((since > self.window).view(np.uint8) << np.uint8(EXPIRED_SHIFT)) & ~res

    def select(self, interval_s: float) -> np.ndarray:
        """Sorted uint64 page indexes to evict now: resident pages with age >= min_age +
        their refault hold, coldest first, at most budget_pages, budget_bytes_per_s *
        interval_s bytes, and (with resident_target_bytes) only as many as bring the
        resident size down to the target."""
        t = self.tracking
        st = self.state
        need = st >> HOLD_SHIFT
        if self.min_age + HOLD_MAX > 255:
            need = need.astype(np.uint16)
        need += need.dtype.type(self.min_age)
        eligible = (st & EVICTED) == 0
        eligible &= self.age >= need
        cand = np.flatnonzero(eligible)
        caps = []
        if t.budget_pages > 0:
            caps.append(t.budget_pages)
        if t.budget_bytes_per_s > 0:
            avail = t.budget_bytes_per_s * interval_s + self._carry
            caps.append(int(avail // self.page_size))
            self._carry = avail - caps[-1] * self.page_size
        if t.resident_target_bytes > 0:
            caps.append(max(0, self.resident_pages - t.resident_target_bytes // self.page_size))
        k = min(caps, default=len(cand))
        if k <= 0:
            return np.zeros(0, dtype=np.uint64)
        if k < len(cand):  # coldest k: an age histogram beats argpartition on uint8
            ages = self.age[cand]
            at_least = np.cumsum(np.bincount(ages, minlength=256)[::-1])  # [i]: age >= 255-i
            cut = 255 - int(np.searchsorted(at_least, k))
            older = ages > cut
            ties = np.flatnonzero(ages == cut)[: k - int(np.count_nonzero(older))]
            older[ties] = True
            cand = cand[older]
        return cand.astype(np.uint64)

    def mark_evicted(self, pages: np.ndarray) -> None:
        """Pages whose store txn committed and that are gone from memory."""
        p = _index(pages)
        st = self.state[p]
        self._evicted += int(np.count_nonzero((st & EVICTED) == 0))
        self.state[p] = GONE | (st & ZERO)
        self.age[p] = self.cycle & 0xFF
        self._version += 1

    def mark_resident(self, pages: np.ndarray) -> int:
        """Pages back in memory (after a fault). Returns how many were refaults: faulted
        back within refault_window cycles of their eviction; those get a refault hold."""
        p = _index(pages)
        st = self.state[p]
        ev = (st & EVICTED) != 0
        since = np.uint8(self.cycle & 0xFF) - self.age[p]
        refault = ev & ((st & EXPIRED) == 0) & (since <= self.window)
        # evicted pages restart with a hold (refault) or none, and ONCE; resident ones keep
        # their hold and ONCE
        fresh = np.where(refault, np.uint8(self.hold << HOLD_SHIFT | ONCE), np.uint8(ONCE))
        self.state[p] = np.where(ev, fresh, st & np.uint8(~(EVICTED | ZERO) & 0xFF))
        self.age[p] = 0
        n = int(np.count_nonzero(refault))
        self._evicted -= int(np.count_nonzero(ev))
        self.refaults_total += n
        self._version += 1
        return n

    def mark_resident_few(self, pages: list[int]) -> int:
        """``mark_resident`` for a handful of pages (a fault burst): scalar, same result."""
        st, age = self.view, self.age.data
        now, window, held = self.cycle & 0xFF, self.window, self.hold << HOLD_SHIFT | ONCE
        n = back = 0
        for p in pages:
            s = st[p]
            if s & EVICTED:
                if not s & EXPIRED and (now - age[p]) & 0xFF <= window:
                    st[p] = held
                    n += 1
                else:
                    st[p] = ONCE
                back += 1
            else:
                st[p] = s & (~(EVICTED | ZERO) & 0xFF)
            age[p] = 0
        self._evicted -= back
        self.refaults_total += n
        self._version += 1
        return n

    # ---- the engine's per-page bits (scalar ones are on the fault path) ------------------
    def gone(self, p: int) -> bool:
        """Committed and out of memory: a fault on it is served from the store."""
        return self.view[p] & GONE == GONE

    def once(self, p: int) -> bool:
        """Evicted since it was last known empty (an absent page is not zero memory)."""
        return self.view[p] & (EVICTED | ONCE) != 0

    def back_one(self, p: int) -> None:
        """A fault brought the page back; ``mark_resident`` follows in bulk."""
        self.view[p] &= ~OUT & 0xFF

    def gone_mask(self, pages: np.ndarray | slice = slice(None)) -> np.ndarray:
        return (self.state[pages] & GONE) == GONE

    def forget(self, first: int, end: int) -> None:
        """The guest discarded pages [first, end): absent now means zero. Pages still
        counted evicted (poisoned ones) become resident; no page keeps ONCE."""
        sl = self.state[first:end]
        ev = (sl & EVICTED) != 0
        n = int(np.count_nonzero(ev))
        if n:
            sl[ev] = 0
            self.age[first:end][ev] = 0
            self._evicted -= n
        sl &= np.uint8(~ONCE & 0xFF)
        self._version += 1

    def mark_zero(self, pages: np.ndarray) -> None:
        p = _index(pages)
        self.state[p] |= ZERO
        self._version += 1

    # ---- counts ------------------------------------------------------------------------
    def _counts(self) -> tuple[int, int, int, int, int]:
        if self._cache is None or self._cache[0] != self._version:
            resident = (self.state & EVICTED) == 0
            ws = int(np.count_nonzero(resident & (self.age < max(self.min_age, 1))))
            cold = int(np.count_nonzero(resident & (self.age >= 1)))
            zero = int(np.count_nonzero(self.state & ZERO))
            held = int(np.count_nonzero(resident & (self.state >= 1 << HOLD_SHIFT)))
            self._cache = (self._version, ws, cold, zero, held)
        return self._cache

    @property
    def resident_pages(self) -> int:
        return self.npages - self._evicted

    @property
    def evicted_pages(self) -> int:
        return self._evicted

    @property
    def working_set_pages(self) -> int:
        """Resident pages accessed within the last min_age intervals (not yet evictable)."""
        return self._counts()[1]

    @property
    def cold_pages(self) -> int:
        """Resident pages not accessed in the last interval (age >= 1)."""
        return self._counts()[2]

    @property
    def zero_pages(self) -> int:
        return self._counts()[3]

    @property
    def held_pages(self) -> int:
        """Resident pages under a refault hold."""
        return self._counts()[4]

    @property
    def metadata_bytes_per_page(self) -> float:
        return (self.age.nbytes + self.state.nbytes) / max(self.npages, 1)


def _index(pages: np.ndarray) -> np.ndarray:
    return np.unique(np.asarray(pages, dtype=np.int64).ravel())
