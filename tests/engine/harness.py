"""An in-process engine on one region with no workload: tests write and read pages with
``Kernel.start_access`` (C threads on linux, simulated vCPUs on the fake) and look at the
engine's per-page state. Every wait is bounded."""

from __future__ import annotations

import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trio

from vmm_tierd.engine.engine import Engine
from vmm_tierd.engine.region import RegionCtx
from vmm_tierd.engine.runner import RegionRunner
from vmm_tierd.engine.store import PageStore
from vmm_tierd.engine.trace import PageTrace, TracingKernel
from vmm_tierd.kernel import open_kernel
from vmm_tierd.kernel.api import AccessKind, AccessResult, Backend, Kernel, MemType, Strategy
from vmm_tierd.kernel.stamps import page_bytes
from vmm_tierd.settings import (
    DaemonSettings,
    RegionSettings,
    Settings,
    StoreSettings,
    TrackingSettings,
)

PS = 4096


@dataclass
class H:
    kernel: Backend
    engine: Engine
    store: PageStore
    runner: RegionRunner

    @property
    def r(self) -> RegionCtx:
        assert self.runner.ctx is not None
        return self.runner.ctx

    def addr(self, p: int) -> int:
        return self.r.uffd.addr(p)

    async def access(self, p: int, kind: AccessKind, data: bytes = b"") -> AccessResult:
        length = len(data) if data else PS
        a = self.kernel.start_access(self.addr(p), kind, length, data)
        return await trio.to_thread.run_sync(a.wait, 20.0)

    async def write_pages(self, pages: range, version: int = 1) -> None:
        for p in pages:
            r = await self.access(p, AccessKind.WRITE, page_bytes(p, version))
            assert r.status.value == "ok", (p, r)

    def evicted(self, pages: range) -> np.ndarray:
        return self.r.pages.evicted_mask(slice(pages.start, pages.stop))

    async def wait_for(self, cond: Callable[[], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, "condition not reached in time"
            await trio.sleep(0.02)

    async def wait_evicted(self, pages: range, timeout: float = 20.0) -> None:
        await self.wait_for(lambda: bool(self.evicted(pages).all()), timeout)


@asynccontextmanager
async def engine(backend: str, memtype: str = "anon", *, npages: int = 256,
                 strategy: Strategy | None = None, store_cls: type[PageStore] = PageStore,
                 interval: float = 0.05, deadline: float = 30.0,
                 store_dir: Path | None = None,
                 wrap: Callable[[Backend], Kernel] | None = None,
                 debug: bool = False) -> AsyncIterator[H]:
    """``store_dir``: where the store goes (default: a temporary directory). ``wrap``:
    the kernel the engine gets, around the backend (the accesses still go straight to
    the backend). ``debug``: trace every page transition and kernel operation
    (``runner.trace``) and check the invariants after every cycle
    (``runner.invariants``)."""
    kernel = open_kernel(backend)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            daemon=DaemonSettings(backend=backend, shutdown_deadline_s=deadline),
            store=StoreSettings(path=Path(tmp), sync="none"),
            tracking=TrackingSettings(interval_s=interval, min_age=1, refault_hold=0),
            regions=(RegionSettings(name="t", size_bytes=npages * PS,
                                    memtype=MemType(memtype), workload_enabled=False),),
            source="<test>")
        store = store_cls(store_dir or Path(tmp) / "store", sync="none")
        try:
            k: Kernel = wrap(kernel) if wrap else kernel
            tk = TracingKernel(k) if debug else None
            eng = Engine(tk.as_kernel() if tk else k, settings, store=store,
                         strategy=strategy)
            if tk is not None:
                eng.runners[0].trace = PageTrace("t")
                tk.add(eng.runners[0].trace)
                eng.runners[0].debug_checks = True
            async with trio.open_nursery() as n:
                await n.start(eng.run)
                try:
                    yield H(kernel, eng, store, eng.runners[0])
                finally:
                    eng.request_stop()
        finally:
            store.close()
            kernel.close()
