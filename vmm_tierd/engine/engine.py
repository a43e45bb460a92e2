"""The Engine: one trio nursery; per guest region a runner (runner.py) with its fault
server and its working-set cycle. Regions are the configured ones (memory of this
process) plus any added while running (another process's memory: attach, handoff)."""

from __future__ import annotations

import threading

import trio

from ..kernel.api import Capabilities, GuestSide, Kernel, Strategy
from ..settings import Settings, TrackingSettings
from .guest import Guest, LocalGuest
from .observer import NullObserver, Observer
from .runner import RegionRunner, RegionStats
from .store import PageStore


class Engine:
    def __init__(self, kernel: Kernel, settings: Settings, *, store: PageStore,
                 observer: Observer | None = None, strategy: Strategy | None = None,
                 guest_side: GuestSide | None = None) -> None:
        """``guest_side``: the backend's guest facet, for the built-in demo workload of
        configured regions that enable it (None: no workload runs)."""
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
        self.tracking = settings.tracking
        self.runners = [self._runner(LocalGuest(kernel, rs, guest_side))
                        for rs in settings.regions]
        self._deadline = [float("inf")]
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread: int | None = None
        self._nursery: trio.Nursery | None = None
        self._stopped: trio.Event | None = None
        self._stop_requested = False

    def _runner(self, guest: Guest) -> RegionRunner:
        return RegionRunner(self.kernel, guest, strategy=self.strategy,
                            granted=self.capabilities.features, tracking=self.tracking,
                            store=self.store, observer=self.observer)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.get_ident()
        self._stopped = trio.Event()
        async with trio.open_nursery() as n:
            self._nursery = n
            for r in self.runners:
                await n.start(r.run, self._deadline)
            task_status.started()
            if self._stop_requested:
                self._stop_now()
            await self._stopped.wait()  # regions may come and go until then
        self._nursery = None

    async def add(self, guest: Guest) -> RegionRunner:
        """Start tiering one more region while running (trio thread); returns once it
        is registered and served."""
        if self._nursery is None or self._stop_requested:
            raise RuntimeError("the engine is not running")
        if any(r.name == guest.name for r in self.runners):
            raise ValueError(f"a region named {guest.name!r} is tiered already")
        runner = self._runner(guest)
        self.runners.append(runner)
        try:
            await self._nursery.start(self._run_removing, runner)
        except BaseException:
            self._drop(runner)
            raise
        return runner

    async def _run_removing(self, runner: RegionRunner, *,
                            task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                            ) -> None:
        try:
            await runner.run(self._deadline, task_status=task_status)
        finally:
            self._drop(runner)

    def _drop(self, runner: RegionRunner) -> None:
        if runner in self.runners:
            self.runners.remove(runner)

    def runner(self, name: str) -> RegionRunner | None:
        return next((r for r in self.runners if r.name == name), None)

    def update_tracking(self, tracking: TrackingSettings) -> None:
        self.tracking = tracking
        for r in self.runners:
            r.update_tracking(tracking)

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
        if self._stopped is not None:
            self._stopped.set()
        if self._deadline[0] == float("inf"):
            self._deadline[0] = trio.current_time() + self.settings.daemon.shutdown_deadline_s
        for r in self.runners:
            r.request_stop()

    @property
    def graceful(self) -> bool:
        return all(r.graceful for r in self.runners)

    @property
    def stopping(self) -> bool:
        return self._stop_requested

    def region_stats(self) -> list[RegionStats]:
        return [s for s in (r.stats() for r in self.runners) if s is not None]
