"""One guest region as the data paths see it: its collaborators (page table, uffds,
tracker, address space, store) and what it reports (counters, observer, errors).

No logic lives here: the fault path (faults.py), the eviction path (evict.py), the
restore path (restore.py) and the cycle (cycle.py) each take a :class:`RegionCtx`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from time import perf_counter
from typing import TYPE_CHECKING

from ..kernel.api import KernelError
from ..kernel.space import AddressSpace
from ..ratelimit import RateLimitedLog
from ..settings import TrackingSettings
from .observer import Observer
from .pages import PageTable
from .tracker import Tracker
from .uffd import RegionUffd

if TYPE_CHECKING:
    from .store import PageStore

log = logging.getLogger("vmm_tierd.engine")


@dataclass
class Counters:
    faults: dict[str, int] = field(default_factory=dict)
    cycles: int = 0
    last_cycle_s: float = 0.0
    errors: int = 0
    hold_max_s: float = 0.0  # longest time cycle/eviction work held the fault loop


class Report:
    """Counters, the observer (metrics) and rate-limited error logs of one region."""

    def __init__(self, name: str, vm: str, obs: Observer) -> None:
        self.name = name
        self.vm = vm
        self.obs = obs
        self.c = Counters()
        self.log = RateLimitedLog(log)

    def fault(self, kind: str, t_read: float) -> None:
        f = self.c.faults
        f[kind] = f.get(kind, 0) + 1
        self.obs.fault_served(self.name, kind, perf_counter() - t_read)

    def held(self, t0: float) -> float:
        """A stretch of cycle or eviction work that ran on the loop that serves faults,
        from ``t0`` to now; returns now."""
        t = perf_counter()
        if t - t0 > self.c.hold_max_s:
            self.c.hold_max_s = t - t0
        return t

    def error(self, e: KernelError, where: str) -> None:
        self.c.errors += 1
        self.log.error(f"{self.name}:{e.op}:{e.errno}", "region %s: %s failed: %s",
                       self.name, where, e)
        self.obs.error(e.op, e.errno or 0)

    def failed(self, op: str, err: int, what: str) -> None:
        """A failure that is not a KernelError (store, thread): counted and logged."""
        self.c.errors += 1
        self.log.error(f"{self.name}:{op}:{err}", "region %s: %s", self.name, what)
        self.obs.error(op, err)


@dataclass(eq=False)
class RegionCtx:
    name: str
    rid: int  # the store's id of the region
    pages: PageTable
    uffd: RegionUffd
    tracker: Tracker
    space: AddressSpace
    store: PageStore
    report: Report
    memfd: bool
    tracking: TrackingSettings
    dead: bool = False  # the guest unmapped the whole region (or its process exited)

    @property
    def npages(self) -> int:
        return self.pages.npages
