"""Attach on the fake kernel: a simulated VMM (its own address space, fd table, vCPU
threads) runs a workload over its memfd RAM; the engine tiers it from beside it, a crash
of the daemon is taken over by a new one, and a detach leaves the VMM as it was."""

from __future__ import annotations

import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from vmm_tierd.attach.vm import VmTiering, vm_owner_alive
from vmm_tierd.engine.engine import Engine
from vmm_tierd.engine.store import PageStore
from vmm_tierd.kernel.api import Pattern, Strategy, WorkloadSpec
from vmm_tierd.kernel.fake import FakeKernel
from vmm_tierd.kernel.fake_proc import FakeVmm
from vmm_tierd.settings import (
    DaemonSettings,
    Settings,
    StoreSettings,
    TrackingSettings,
    VmSettings,
)

RAM = 4 << 20
SPEC = WorkloadSpec(pattern=Pattern.SHIFTING, threads=1, hot_fraction=0.1,
                    write_fraction=0.6, shift_period_s=0.5, zero_fraction=0.05, seed=3)


def settings(store: Path, interval: float = 0.05) -> Settings:
    return Settings(daemon=DaemonSettings(backend="fake", shutdown_deadline_s=30.0),
                    store=StoreSettings(path=store, sync="none"),
                    tracking=TrackingSettings(interval_s=interval, min_age=1,
                                              refault_hold=0),
                    regions=(), source="<test>")


@dataclass
class Daemon:
    engine: Engine
    vm: VmTiering
    store: PageStore
    meta_after: bytes | None = None  # the store's entry for the VM once it stopped

    def stats(self) -> list[object]:
        return list(self.engine.region_stats())

    def evicted(self) -> int:
        return sum(s.evicted_bytes for s in self.engine.region_stats())


@asynccontextmanager
async def daemon(k: FakeKernel, vmm: FakeVmm, store_dir: Path, *, strategy: Strategy | None
                 = None, crash: bool = False) -> AsyncIterator[Daemon]:
    """An engine attached to ``vmm``. With ``crash``, leaving the block kills it: no
    restore, no detach, the VMM keeps its uffd (kernel.crash closes our fds)."""
    store = PageStore(store_dir, sync="none", keep_owner=vm_owner_alive(k))
    engine = Engine(k, settings(store_dir), store=store, strategy=strategy)
    vm = VmTiering(k, engine, store, VmSettings(name="vm1", pid=vmm.pid))
    try:
        async with trio.open_nursery() as n:
            await n.start(engine.run)
            await n.start(vm.run)
            d = Daemon(engine, vm, store)
            yield d
            if crash:
                n.cancel_scope.cancel()
            else:
                engine.request_stop()
        d.meta_after = store.get_meta("vm/vm1")
    finally:
        store.close()
        if crash:
            k.crash()


async def wait_for(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await trio.sleep(0.02)


def uffds_of(k: FakeKernel, vmm: FakeVmm) -> list[int]:
    p = k.open_process(vmm.pid)
    try:
        return [f.fd for f in p.fds() if f.is_uffd]
    finally:
        p.close()


@pytest.mark.parametrize("backend,strategy", [("fake-rwp", None), ("fake-rwp", "wp"),
                                              ("fake-rfc", None)])
def test_attach_evicts_serves_and_detaches(backend: str, strategy: str | None) -> None:
    async def main() -> None:
        dialect = backend.split("-")[1]
        from vmm_tierd.kernel.api import Dialect
        with FakeKernel(Dialect(dialect)) as k, tempfile.TemporaryDirectory() as tmp:
            vmm = k.spawn_process(RAM)
            wl = vmm.start_workload(vmm.region, SPEC)
            await wait_for(lambda: wl.stats().writes > RAM // 4096)
            st = Strategy(strategy) if strategy else None
            async with daemon(k, vmm, Path(tmp) / "store", strategy=st) as d:
                assert len(uffds_of(k, vmm)) == 1  # the VMM holds its own reference
                await wait_for(lambda: d.evicted() >= RAM // 4)
                await wait_for(lambda: sum(s.faults.get("store", 0)
                                           for s in d.engine.region_stats()) > 0)
                if st is Strategy.WP:  # the zaps were injected, never into a vCPU
                    assert vmm.injections
                    assert all(tid not in vmm.vcpu_tids for tid, _ in vmm.injections)
                await trio.to_thread.run_sync(wl.stop)
                rep = await trio.to_thread.run_sync(wl.verify)
                assert (rep.lost_writes, rep.corrupt_pages, rep.poisoned_pages) == (0, 0, 0)
            assert d.engine.graceful
            assert uffds_of(k, vmm) == []  # detached: the VMM as it was found
            assert d.meta_after is None
            rep = await trio.to_thread.run_sync(wl.verify)  # all back in the VMM's memory
            assert (rep.lost_writes, rep.corrupt_pages, rep.poisoned_pages) == (0, 0, 0)
            assert rep.pages == RAM // 4096
    trio.run(main)


def test_crash_then_takeover_loses_nothing() -> None:
    async def main() -> None:
        with FakeKernel() as k, tempfile.TemporaryDirectory() as tmp:
            store_dir = Path(tmp) / "store"
            vmm = k.spawn_process(RAM)
            wl = vmm.start_workload(vmm.region, SPEC)
            await wait_for(lambda: wl.stats().writes > RAM // 4096)
            async with daemon(k, vmm, store_dir, crash=True) as d:
                await wait_for(lambda: d.evicted() >= RAM // 4)
                evicted_before = d.evicted()
            # The daemon is gone; the VMM keeps running on its uffd, faults wait.
            assert len(uffds_of(k, vmm)) == 1
            async with daemon(k, vmm, store_dir) as d2:
                regions = d2.engine.region_stats()
                assert regions and regions[0].evicted_bytes > 0
                assert regions[0].evicted_bytes <= evicted_before + RAM
                await trio.to_thread.run_sync(wl.stop)
                rep = await trio.to_thread.run_sync(wl.verify)
                assert (rep.lost_writes, rep.corrupt_pages, rep.poisoned_pages) == (0, 0, 0)
            assert uffds_of(k, vmm) == []
    trio.run(main)


def test_vmm_exit_drops_its_records_and_the_daemon_goes_on() -> None:
    async def main() -> None:
        with FakeKernel() as k, tempfile.TemporaryDirectory() as tmp:
            vmm = k.spawn_process(RAM)
            wl = vmm.start_workload(vmm.region, SPEC)
            await wait_for(lambda: wl.stats().writes > RAM // 4096)
            async with daemon(k, vmm, Path(tmp) / "store") as d:
                await wait_for(lambda: d.evicted() >= RAM // 4)
                assert d.store.stats().records > 0
                await trio.to_thread.run_sync(wl.stop)
                vmm.exit()
                await wait_for(lambda: not d.engine.runners)
                await wait_for(lambda: d.store.stats().records == 0)
                assert d.store.get_meta("vm/vm1") is None
                assert not d.engine.stopping  # serving other VMs would go on
    trio.run(main)
