"""Debug-mode checks of a region's engine state against the kernel's (stress tests and
``selftest --torture``): run at the end of every cycle, and before every drop of the
staging area when a :class:`~vmm_tierd.engine.trace.PageTrace` is installed.

What must hold, measured with PAGEMAP_SCAN(PAGE_IS_PRESENT) over the guest region and
the staging area (anon) or SEEK_DATA over the memfd:

- every page the engine believes resident that was evicted once (ONCE, or BACK) is in
  memory, or in flight (then its copy is in staging). Otherwise its only copy is gone:
  its next fault finds no record and poisons it (or it was a guest discard whose REMOVE
  event is not read yet, which the workloads these checks run with never do);
- no EVICTED page is in memory (something filled it behind the engine's back);
- no staging slot holds a page that is not in flight once the staging area is clean,
  or that is the only copy of a page when the area is about to be dropped: a slot
  holding a page the engine does not account for fails every later MOVE into it with
  EEXIST, and dropping it loses that page.

A page swapped out counts as absent: PAGEMAP_SCAN reports uffd-wp and poison PTE markers
as PAGE_IS_SWAPPED too, so "swapped" can't vouch for a page here. Run the checks where
the test's memory is not pushed to swap.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..kernel import uapi
from .pagebits import BACK, EVICTED, KIND, ONCE, RESIDENT
from .ranges import ranges_to_mask

if TYPE_CHECKING:
    from .evict import Evictor
    from .region import RegionCtx
    from .trace import PageTrace

log = logging.getLogger("vmm_tierd.engine")
SHOW = 8  # pages listed (and histories printed) per violation


@dataclass
class Violation:
    kind: str
    pages: list[int]  # the first few guest pages concerned (staging checks: their owners)
    count: int
    detail: str = ""
    slots: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        s = f"{self.kind}: {self.count} page(s) {self.pages}"
        if self.slots:
            s += f" in staging slots {self.slots}"
        return s + (f" ({self.detail})" if self.detail else "")


class Invariants:
    """The checks of one region. ``violations`` keeps every one found (capped)."""

    def __init__(self, r: RegionCtx, evictor: Evictor | None = None,
                 trace: PageTrace | None = None, *, keep: int = 100) -> None:
        self.r = r
        self.evictor = evictor
        self.trace = trace
        self.keep = keep
        self.violations: list[Violation] = []
        self.checks = 0
        self.audits = 0
        if trace is not None and not r.memfd:
            trace.before_drop = self.audit_staging

    # ---- measuring ------------------------------------------------------------------
    def _present(self, start: int, npages: int) -> np.ndarray:
        ps = self.r.uffd.ps
        res = self.r.space.pagemap_scan(start, start + npages * ps,
                                        category_mask=uapi.PAGE_IS_PRESENT,
                                        return_mask=uapi.PAGE_IS_PRESENT)
        return ranges_to_mask(res.regions, start, npages, ps)

    def _file_data(self) -> np.ndarray:
        u = self.r.uffd
        reg = u.region
        runs = u.k.file_data_runs(reg.fd, reg.offset, reg.length)
        out = np.zeros(u.npages, dtype=bool)
        for a, b in np.asarray(runs, dtype=np.int64).reshape(-1, 2).tolist():
            out[(a - reg.offset) // u.ps:-(-(b - reg.offset) // u.ps)] = True
        return out

    def _inflight_mask(self) -> np.ndarray:
        m = np.zeros(self.r.npages, dtype=bool)
        if self.r.pages.inflight:
            m[np.fromiter(self.r.pages.inflight, dtype=np.int64)] = True
        return m

    def _inflight_slots(self, staging: int) -> dict[int, int]:
        return {i: p for p, (b, i) in self.r.pages.inflight.items() if b.staging == staging}

    # ---- reporting ----------------------------------------------------------------------
    def _found(self, kind: str, pages: np.ndarray, detail: str = "",
               slots: list[int] | None = None) -> Violation:
        v = Violation(kind, [int(p) for p in pages[:SHOW]], len(pages), detail,
                      slots or [])
        if len(self.violations) < self.keep:
            self.violations.append(v)
        msg = f"region {self.r.name}: INVARIANT {v}"
        if self.trace is not None:
            msg += "\n" + self.trace.format_histories(v.pages)
        log.error("%s", msg)
        return v

    # ---- the checks -------------------------------------------------------------------------
    def check(self) -> list[Violation]:
        """End of a cycle: memory against the page table, staging against in-flight."""
        self.checks += 1
        r = self.r
        st = r.pages.state
        kind = st & KIND
        once = ((kind == RESIDENT) & ((st & ONCE) != 0)) | (kind == BACK)
        there = self._file_data() if r.memfd else self._present(r.uffd.base, r.npages)
        found: list[Violation] = []
        lost = np.flatnonzero(once & ~there & ~self._inflight_mask())
        if len(lost):
            found.append(self._found("resident page evicted once is absent (its only copy "
                                     "is gone)", lost))
        double = np.flatnonzero((kind == EVICTED) & there)
        if len(double):
            found.append(self._found("evicted page is in memory", double,
                                     "filled behind the engine's back"))
        if not r.memfd and r.uffd.staging is not None:
            found += self._check_staging(clean=not (self.evictor is not None
                                                    and self.evictor.staging_dirty))
        return found

    def _check_staging(self, *, clean: bool) -> list[Violation]:
        u = self.r.uffd
        assert u.staging is not None
        held = np.flatnonzero(self._present(u.staging.addr, u.staging.npages))
        ours = self._inflight_slots(u.staging.addr)
        extra = [int(s) for s in held if int(s) not in ours]
        if not extra:
            return []
        if clean:
            return [self._found("staging is clean but a slot holds a page",
                                self._owners(extra), "every later MOVE into it fails "
                                "EEXIST", extra)]
        return self._judge(extra, "not in flight")

    def _owners(self, slots: list[int]) -> np.ndarray:
        """The guest page the last batch put in each slot (-1: none known)."""
        assert self.r.uffd.staging is not None
        last = (self.trace.last_batch.get(self.r.uffd.staging.addr)
                if self.trace is not None else None)
        if last is None:
            return np.full(len(slots), -1, dtype=np.int64)
        return np.array([int(last[s]) if s < len(last) else -1 for s in slots],
                        dtype=np.int64)

    def _judge(self, slots: list[int], why: str) -> list[Violation]:
        """Slots holding a page that is not in flight: harmless if their page is
        committed (EVICTED: the record holds it) or in memory (a stale copy); the only
        copy of the page otherwise; unaccounted if no batch put a page there."""
        r = self.r
        owners = self._owners(slots)
        present = self._present(r.uffd.base, r.npages)
        known = owners >= 0
        kinds = np.zeros(len(slots), dtype=np.uint8)
        kinds[known] = r.pages.state[owners[known]] & KIND
        safe = np.zeros(len(slots), dtype=bool)
        safe[known] = (kinds[known] == EVICTED) | present[owners[known]]
        found = []
        only = np.flatnonzero(known & ~safe)
        if len(only):
            found.append(self._found(f"staging slot {why} holds the only copy of a page",
                                     owners[only], slots=[slots[i] for i in only[:SHOW]]))
        unknown = np.flatnonzero(~known)
        if len(unknown):
            found.append(self._found(f"staging slot {why} holds a page no batch put there",
                                     owners[unknown],
                                     slots=[slots[i] for i in unknown[:SHOW]]))
        return found

    def audit_staging(self, staging: int) -> list[Violation]:
        """Right before the staging area is dropped: nothing in it may be in flight,
        or be the only copy of a page."""
        self.audits += 1
        u = self.r.uffd
        assert u.staging is not None and staging == u.staging.addr
        held = [int(s) for s in np.flatnonzero(self._present(staging, u.staging.npages))]
        if not held:
            return []
        ours = self._inflight_slots(staging)
        found = []
        busy = [s for s in held if s in ours]
        if busy:
            found.append(self._found("staging dropped while a slot holds a page in flight",
                                     np.array([ours[s] for s in busy]), slots=busy[:SHOW]))
        return found + self._judge([s for s in held if s not in ours], "at the drop")
