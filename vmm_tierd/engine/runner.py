"""One region's life on the engine's trio loop: set up (guest.py) → serve faults
(faults.py) and run the cycle (cycle.py) → on stop: stop the guest activity of ours and
the cycle, bring every evicted page back (restore.py), delete the records, tear down."""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

import trio

from ..kernel.api import Kernel, Strategy
from ..settings import TrackingSettings
from .cycle import Cycle
from .evict import Evictor
from .faults import FaultServer
from .guest import Guest
from .invariants import Invariants
from .observer import Observer
from .pages import PageTable
from .region import RegionCtx, Report
from .restore import restore_all
from .store import PageStore
from .trace import PageTrace
from .tracker import make_tracker

log = logging.getLogger("vmm_tierd.engine")


@dataclass
class RegionStats:
    name: str
    vm: str
    memtype: str
    guest_bytes: int
    resident_bytes: int
    working_set_bytes: int
    cold_bytes: int
    evicted_bytes: int
    zero_pages: int
    poisoned_pages: int  # poisoned now
    poisoned_total: int  # pages poisoned so far
    faults: dict[str, int]
    evictions_total: int
    refaults_total: int
    cycles: int
    interval_s: float
    last_cycle_s: float
    loop_hold_max_s: float = 0.0


class RegionRunner:
    def __init__(self, kernel: Kernel, guest: Guest, *, strategy: Strategy, granted: int,
                 tracking: TrackingSettings, store: PageStore, observer: Observer) -> None:
        self.k = kernel
        self.guest = guest
        self.name = guest.name
        self.strategy = strategy
        self.granted = granted
        self.tracking = tracking
        self.store = store
        self.report = Report(guest.name, guest.vm, observer)
        self.ctx: RegionCtx | None = None
        self.faults: FaultServer | None = None
        self.cycle: Cycle | None = None
        self.stop_event = trio.Event()
        self.graceful = False
        self.vanished = False
        self.done = trio.Event()
        self.restored = 0
        # Debug, set before run(): a record of page transitions (trace.py), and the
        # invariant checks (invariants.py) at the end of every cycle.
        self.trace: PageTrace | None = None
        self.debug_checks = False
        self.invariants: Invariants | None = None

    async def setup(self) -> RegionCtx:
        """Register the region and build its context (``run`` does it first)."""
        uffd, features = await self.guest.setup(self.strategy, self.granted)
        region = uffd.region
        tracker = make_tracker(self.strategy, self.k, self.guest.space, uffd.fd, region,
                               features)
        pages = PageTable(region.npages, self.tracking, region.page_size)
        if self.trace is not None:
            pages.trace = self.trace
            st = uffd.staging
            self.trace.bind(region.addr, region.npages, region.page_size,
                            staging=st.addr if st is not None else 0,
                            staging_pages=st.npages if st is not None else 0,
                            fd=region.fd, offset=region.offset)
        rid = self.store.region_id(self.name, owner=self.guest.store_owner)
        return RegionCtx(name=self.name, rid=rid, pages=pages,
                         uffd=uffd, tracker=tracker, space=self.guest.space,
                         store=self.store, report=self.report,
                         memfd=region.fd >= 0, tracking=self.tracking)

    async def run(self, deadline: list[float], *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            r = self.ctx = await self.setup()
            self.guest.adopt(r)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.guest.teardown(True)  # nothing can be blocked on it yet
            raise
        evictor = Evictor(r)
        self.faults = FaultServer(r)
        if self.debug_checks:
            self.invariants = Invariants(r, evictor, self.trace)
        cycle = self.cycle = Cycle(r, evictor, after=self.invariants.check
                                   if self.invariants is not None else None)
        try:
            async with trio.open_nursery() as n:
                await n.start(self.faults.serve)
                n.start_soon(cycle.run)
                self.guest.start()
                task_status.started()
                await self.stop_event.wait()
                cycle.stop()
                if self.vanished:
                    # The memory is gone with its process: nothing to restore, records
                    # of it are dead.
                    r.dead = True
                    await cycle.done.wait()
                    await self._delete_all(r)
                else:
                    with trio.move_on_at(deadline[0]) as cs:
                        await self.guest.stop()
                        await cycle.done.wait()
                        await evictor.flush_deletes()
                        self.restored = await restore_all(r)
                        if not r.pages.evicted_pages:
                            self.graceful = True  # every page is back in guest memory
                            await self._delete_all(r)
                    if cs.cancelled_caught:
                        log.error("region %s: shutdown deadline passed; records stay for "
                                  "the next start to reclaim", self.name)
                n.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self.guest.teardown(self.graceful)
            self.done.set()

    async def _delete_all(self, r: RegionCtx) -> None:
        """The records of a region whose pages are all back. If this fails the stop is
        still graceful (nothing is lost): the next start reclaims them."""
        try:
            await trio.to_thread.run_sync(self.store.delete_range, r.rid, 0, r.npages)
        except Exception as e:
            r.report.failed("store.delete", getattr(e, "errno", None) or errno.EIO,
                            f"deleting the records after the restore failed ({e}); the "
                            "next start reclaims them")

    def request_stop(self) -> None:
        self.stop_event.set()

    def vanish(self) -> None:
        """The region's process exited: stop serving and drop its records."""
        self.vanished = True
        self.stop_event.set()

    def update_tracking(self, tracking: TrackingSettings) -> None:
        self.tracking = tracking
        if self.cycle is not None:
            self.cycle.update(tracking)

    def stats(self) -> RegionStats | None:
        r = self.ctx
        if r is None:
            return None
        pg, ps, c = r.pages, r.uffd.ps, self.report.c
        return RegionStats(
            name=self.name, vm=self.guest.vm, memtype=self.guest.memtype.value,
            guest_bytes=pg.npages * ps, resident_bytes=pg.resident_pages * ps,
            working_set_bytes=pg.working_set_pages * ps, cold_bytes=pg.cold_pages * ps,
            evicted_bytes=pg.evicted_pages * ps, zero_pages=pg.zero_pages,
            poisoned_pages=pg.poisoned_pages, poisoned_total=pg.counts.poisoned,
            faults=dict(c.faults), evictions_total=pg.counts.evicted,
            refaults_total=pg.counts.refaults, cycles=c.cycles,
            interval_s=r.tracking.interval_s, last_cycle_s=c.last_cycle_s,
            loop_hold_max_s=c.hold_max_s)
