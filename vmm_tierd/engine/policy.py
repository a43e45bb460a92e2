"""Which pages to evict: pure ageing and selection over the per-page arrays that
``pages.PageTable`` owns (``age``, ``state``; bits in ``pagebits``).

- ``observe``: resident cold pages age by one (saturating at 255), resident accessed
  pages reset to 0; evicted pages keep their eviction cycle in ``age`` and get EXPIRED
  once the refault window has passed, so the mod-256 cycle byte never aliases.
- ``select``: resident pages with age >= min_age + their refault hold, coldest first,
  capped by the page budget, the byte budget (with carry) and the resident target.
No trio, no kernel, no Python loop over pages.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..settings import TrackingSettings
from .pagebits import EXPIRED, HOLD_MAX, HOLD_SHIFT, KIND, RESIDENT

WINDOW_MAX = 254  # the window must close before the cycle byte wraps


@dataclass(frozen=True, slots=True)
class Params:
    min_age: int
    window: int
    hold: int
    budget_pages: int
    budget_bytes_per_s: float
    resident_target_bytes: int
    prefetch: int = 0

    @classmethod
    def of(cls, t: TrackingSettings) -> Params:
        return cls(min_age=min(max(t.min_age, 0), 255),
                   window=min(max(t.refault_window, 0), WINDOW_MAX),
                   hold=min(max(t.refault_hold, 0), HOLD_MAX),
                   budget_pages=t.budget_pages, budget_bytes_per_s=t.budget_bytes_per_s,
                   resident_target_bytes=t.resident_target_bytes,
                   prefetch=max(0, t.prefetch_pages))


def observe(age: np.ndarray, state: np.ndarray, cold: np.ndarray, cycle: int,
            params: Params, *, any_evicted: bool = True) -> None:
    """One interval's result (``cold``: True = not accessed), in place."""
    keep = np.uint8(0) - np.asarray(cold, dtype=bool).view(np.uint8)  # 0xFF cold, 0 hot
    aged = age + (age != 255)  # saturating +1
    aged &= keep
    if not any_evicted:
        age[:] = aged
        return
    # uint8 masks instead of where=: 0xFF on resident pages, 0 on the others
    res = ((state & np.uint8(KIND)) == RESIDENT).view(np.uint8) * np.uint8(0xFF)
    age ^= (age ^ aged) & res
    # EXPIRED on evicted kinds (EVICTED, BACK: bit 0 set) once the window has passed
    since = np.uint8(cycle & 0xFF) - age
    ev = (state & np.uint8(1)) * np.uint8(EXPIRED)
    state |= ((since > params.window).view(np.uint8) * np.uint8(EXPIRED)) & ev


def select(age: np.ndarray, state: np.ndarray, params: Params, interval_s: float,
           carry: float, resident_pages: int, page_size: int) -> tuple[np.ndarray, float]:
    """Sorted uint64 victims and the byte-budget carry for the next call."""
    need = state >> HOLD_SHIFT  # the hold; garbage on non-resident pages, masked below
    if params.min_age + HOLD_MAX > 255:
        need = need.astype(np.uint16)
    need += need.dtype.type(params.min_age)
    eligible = (state & np.uint8(KIND)) == RESIDENT
    eligible &= age >= need
    cand = np.flatnonzero(eligible)
    caps = []
    if params.budget_pages > 0:
        caps.append(params.budget_pages)
    if params.budget_bytes_per_s > 0:
        avail = params.budget_bytes_per_s * interval_s + carry
        caps.append(int(avail // page_size))
        carry = avail - caps[-1] * page_size
    if params.resident_target_bytes > 0:
        caps.append(max(0, resident_pages - params.resident_target_bytes // page_size))
    k = min(caps, default=len(cand))
    if k <= 0:
        return np.zeros(0, dtype=np.uint64), carry
    if k < len(cand):  # coldest k: an age histogram beats argpartition on uint8
        ages = age[cand]
        at_least = np.cumsum(np.bincount(ages, minlength=256)[::-1])  # [i]: age >= 255-i
        cut = 255 - int(np.searchsorted(at_least, k))
        older = ages > cut
        ties = np.flatnonzero(ages == cut)[: k - int(np.count_nonzero(older))]
        older[ties] = True
        cand = cand[older]
    return cand.astype(np.uint64), carry
