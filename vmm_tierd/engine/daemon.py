"""The Engine: one trio nursery, per guest region a fault server and a working-set cycle.

Cycle (per region): begin interval (rwp: RWPROTECT all, async) → sleep(interval) →
PAGEMAP_SCAN → policy.observe/select → evict (see evict.py). Graceful stop: stop the
workload and the cycle, bring every evicted page back, delete the records, unregister.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import trio

from ..kernel.api import Capabilities, Kernel, KernelError, Strategy, Workload
from ..settings import RegionSettings, Settings, TrackingSettings
from .evict import Evictor
from .faults import FaultServer
from .observer import NullObserver, Observer
from .policy import PagePolicy
from .region import RegionCore
from .store import PageStore

log = logging.getLogger("vmm_tierd.engine")

COMPACT_DEAD = 0.10  # compact once dead payload bytes exceed this share of the live ones
COMPACT_SEGMENTS = 8  # segments rewritten per cycle at most


@dataclass
class RegionStats:
    name: str
    memtype: str
    guest_bytes: int
    resident_bytes: int
    working_set_bytes: int
    cold_bytes: int
    evicted_bytes: int
    zero_pages: int
    poisoned_pages: int
    faults: dict[str, int]
    evictions_total: int
    refaults_total: int
    cycles: int
    interval_s: float
    last_cycle_s: float


class RegionRunner:
    """The trio tasks of one region."""

    def __init__(self, core: RegionCore, granted: int) -> None:
        self.core = core
        self.granted = granted
        self.faults = FaultServer(core)
        self.evictor = Evictor(core)
        self.workload: Workload | None = None
        self.workload_stopped = True
        self.stop_event = trio.Event()
        self.cycle_done = trio.Event()
        self.graceful = False
        self.restored = 0

    async def run(self, deadline: list[float], *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        core = self.core
        try:
            core.setup(self.granted)
        except BaseException:
            core.teardown(True, True)  # nothing can be blocked on it yet: safe to close
            raise
        try:
            async with trio.open_nursery() as n:
                await n.start(self.faults.serve)
                n.start_soon(self._cycle)
                rs = core.settings
                if rs.workload_enabled:
                    assert core.region is not None
                    self.workload = core.k.start_workload(core.region, rs.workload)
                    self.workload_stopped = False
                task_status.started()
                await self.stop_event.wait()
                with trio.move_on_at(deadline[0]) as cs:
                    await self.stop_workload()
                    await self.cycle_done.wait()
                    await self.evictor.flush_deletes()
                    self.restored = await core.restore_all()
                    if not np.count_nonzero(core.policy.gone_mask()):
                        await trio.to_thread.run_sync(core.store.delete_range, core.rid, 0,
                                                      core.npages)
                        self.graceful = True
                if cs.cancelled_caught:
                    log.error("region %s: shutdown deadline passed; records stay for the "
                              "next start to reclaim", core.name)
                n.cancel_scope.cancel()
        finally:
            core.teardown(self.graceful, self.workload_stopped)

    async def stop_workload(self) -> None:
        # Runs in a thread: stopping joins guest threads that may wait on faults we serve.
        if self.workload is not None and not self.workload_stopped:
            await trio.to_thread.run_sync(self.workload.stop, abandon_on_cancel=True)
            self.workload_stopped = True

    async def _cycle(self) -> None:
        core = self.core
        tr = core.tracker
        assert tr is not None
        try:
            while not core.stopping and not core.dead:
                core.apply_tracking()
                interval = core.tracking.interval_s
                t0 = time.perf_counter()
                phases: dict[str, float] = {}
                try:
                    tr.begin_interval()
                except KernelError as e:
                    core.kerr(e, "begin interval (protect)")
                phases["protect"] = time.perf_counter() - t0
                with trio.move_on_after(interval):
                    await self.stop_event.wait()
                if core.stopping:
                    break
                t = time.perf_counter()
                try:
                    await self._one_cycle(interval, phases)
                except KernelError as e:  # whatever wasn't committed stays resident
                    core.kerr(e, "cycle")
                core.c.cycles += 1
                core.c.last_cycle_s = time.perf_counter() - t
                core.obs.cycle(core.name, phases, core.c.last_cycle_s + phases["protect"])
        finally:
            self.cycle_done.set()

    async def _one_cycle(self, interval: float, phases: dict[str, float]) -> None:
        core = self.core
        assert core.tracker is not None
        t = time.perf_counter()
        await self.evictor.flush_deletes()  # before any put: a re-evicted page's record lives
        phases["delete"] = time.perf_counter() - t
        t = time.perf_counter()
        cold = core.tracker.scan_cold()  # observe() leaves evicted pages alone
        phases["scan"] = time.perf_counter() - t
        t = time.perf_counter()
        core.policy.observe(cold)
        victims = core.policy.select(interval)
        phases["select"] = time.perf_counter() - t
        if len(victims):
            await self.evictor.evict(victims, phases)
        t = time.perf_counter()
        await self.compact()
        phases["compact"] = time.perf_counter() - t

    async def compact(self) -> int:
        """Deletes (restores, REMOVE drops) leave dead bytes in the store's segments; once
        they pass COMPACT_DEAD of the live bytes, rewrite a bounded number of segments."""
        store = self.core.store
        st = store.stats()
        if st.dead_bytes <= COMPACT_DEAD * max(1, st.compressed_bytes):
            return 0
        try:
            return await trio.to_thread.run_sync(store.compact, COMPACT_SEGMENTS)
        except Exception as e:  # only space is lost; the next cycle tries again
            log.error("region %s: store compaction failed: %s", self.core.name, e)
            return 0

    def stats(self) -> RegionStats:
        core = self.core
        pol = core.policy
        ps = core.ps
        return RegionStats(
            name=core.name, memtype=core.settings.memtype.value,
            guest_bytes=core.npages * ps,
            resident_bytes=int(pol.resident_pages) * ps,
            working_set_bytes=int(pol.working_set_pages) * ps,
            cold_bytes=int(pol.cold_pages) * ps,
            evicted_bytes=int(pol.evicted_pages) * ps,
            zero_pages=int(pol.zero_pages), poisoned_pages=core.c.poisoned,
            faults=dict(core.c.faults), evictions_total=core.c.evictions,
            refaults_total=core.c.refaults, cycles=core.c.cycles,
            interval_s=core.tracking.interval_s, last_cycle_s=core.c.last_cycle_s)


class Engine:
    def __init__(self, kernel: Kernel, settings: Settings, *, store: PageStore,
                 observer: Observer | None = None, strategy: Strategy | None = None) -> None:
        self.kernel = kernel
        self.settings = settings
        self.store = store
        self.observer: Observer = observer or NullObserver()
        self.capabilities: Capabilities = kernel.capabilities()
        chosen = strategy or self.capabilities.strategy
        if chosen is None:
            raise RuntimeError(f"{kernel.name}: no tiering strategy possible: "
                               f"{self.capabilities.reason}")
        self.strategy: Strategy = chosen
        names = [r.name for r in settings.regions]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate region names in {settings.source}: {names}")
        self.runners = [RegionRunner(self._core(rs), self.capabilities.features)
                        for rs in settings.regions]
        self._deadline = [float("inf")]
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread: int | None = None
        self._stop_requested = False

    def _core(self, rs: RegionSettings) -> RegionCore:
        policy = PagePolicy(rs.size_bytes // self.kernel.page_size, self.settings.tracking,
                            self.kernel.page_size)
        return RegionCore(self.kernel, rs, self.strategy, self.settings.tracking, self.store,
                          self.observer, policy)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.get_ident()
        async with trio.open_nursery() as n:
            for r in self.runners:
                await n.start(r.run, self._deadline)
            task_status.started()
            if self._stop_requested:
                self._stop_now()

    def workload(self, name: str) -> Workload | None:
        for r in self.runners:
            if r.core.name == name:
                return r.workload
        return None

    def update_tracking(self, tracking: TrackingSettings) -> None:
        for r in self.runners:
            r.core.pending_tracking = tracking

    def request_stop(self) -> None:
        """Safe from the trio thread, another thread, or before run() started."""
        self._stop_requested = True
        if self._token is None:
            return
        if threading.get_ident() == self._thread:
            self._stop_now()
        else:
            self._token.run_sync_soon(self._stop_now)

    def _stop_now(self) -> None:
        if self._deadline[0] == float("inf"):
            self._deadline[0] = trio.current_time() + self.settings.daemon.shutdown_deadline_s
        for r in self.runners:
            r.core.stopping = True
            r.stop_event.set()

    @property
    def graceful(self) -> bool:
        return all(r.graceful for r in self.runners)

    def region_stats(self) -> list[RegionStats]:
        return [r.stats() for r in self.runners]
