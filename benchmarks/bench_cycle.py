"""Cycle cost per GiB: the engine's tracking cycle work (everything but the sleep) vs the
kernel's own PAGEMAP_SCAN time over the same region with the same arguments (see run.py).

A real anonymous region (1 GiB quick, 4 GiB full) is registered by the engine's own
RegionRunner.setup on this host's strategy, filled, and before every measurement C threads
(faulter.c) write 20% of its pages at random. Measured, interleaved round by round:
- engine: ``Tracker.begin_interval`` + ``RegionRunner._one_cycle`` (delete flush, scan,
  policy observe/select, and in the second phase a batch of evictions), fault server on;
- reference: the same PAGEMAP_SCAN calls as the tracker makes, bare through
  ``LinuxKernel.pagemap_scan`` and as raw ioctls from C (the kernel's own time).

    .venv/bin/python benchmarks/bench_cycle.py [--quick]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import trio

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script
    sys.path[:0] = [str(HERE), str(HERE.parent)]

from bench_faults import Faulter, build_c  # noqa: E402
from bench_store import guest_pages  # noqa: E402

from vmm_tierd.engine.cycle import Cycle  # noqa: E402
from vmm_tierd.engine.evict import Evictor  # noqa: E402
from vmm_tierd.engine.faults import FaultServer  # noqa: E402
from vmm_tierd.engine.guest import LocalGuest  # noqa: E402
from vmm_tierd.engine.observer import NullObserver  # noqa: E402
from vmm_tierd.engine.ranges import ranges_to_mask  # noqa: E402
from vmm_tierd.engine.region import RegionCtx  # noqa: E402
from vmm_tierd.engine.runner import RegionRunner  # noqa: E402
from vmm_tierd.engine.store import PageStore  # noqa: E402
from vmm_tierd.kernel import uapi  # noqa: E402
from vmm_tierd.kernel.api import MemType, Strategy  # noqa: E402
from vmm_tierd.kernel.linux import LinuxKernel  # noqa: E402
from vmm_tierd.settings import RegionSettings, TrackingSettings  # noqa: E402

PAGE = 4096
WRITTEN = 0.2
FILL_CHUNK = 256  # pages per UFFDIO_COPY when filling the region
INTERVAL_S = 1.0  # what select() is told; nothing sleeps
TIMEOUT_S = 600.0

WRITTEN_SCAN = {"category_mask": uapi.PAGE_IS_WRITTEN, "return_mask": uapi.PAGE_IS_WRITTEN,
                "flags": uapi.PM_SCAN_WP_MATCHING}
PRESENT_SCAN = {"category_mask": uapi.PAGE_IS_PRESENT, "return_mask": uapi.PAGE_IS_PRESENT,
                "flags": 0}


def _med(xs: list[float]) -> float:
    return float(np.median(xs))


def _phase_note(ph: list[dict[str, float]], gib: int) -> str:
    keys = sorted({k for p in ph for k in p})
    return ", ".join(f"{k} {_med([p.get(k, 0.0) for p in ph]) * 1e3 / gib:.2f}" for k in keys)


class CycleBench:
    def __init__(self, tmp: Path, gib: int, evict_batch: int) -> None:
        self.gib = gib
        self.npages = (gib << 30) // PAGE
        self.evict_batch = evict_batch
        so, _ = build_c(tmp, ref=False)
        self.faulter = Faulter(so)
        self.k = LinuxKernel()
        caps = self.k.capabilities()
        if caps.strategy is not Strategy.WP:
            raise RuntimeError(f"bench_cycle measures the wp strategy; this kernel gives "
                               f"{caps.strategy} ({caps.reason})")
        self.granted = caps.features
        self.store = PageStore(tmp / "store", sync="none", instance_id="bench-cycle")
        tracking = TrackingSettings(interval_s=INTERVAL_S, min_age=255, refault_hold=0)
        rs = RegionSettings(name="cycle", size_bytes=gib << 30, memtype=MemType.ANON,
                            workload_enabled=False)
        self.runner = RegionRunner(self.k, LocalGuest(self.k, rs), strategy=caps.strategy,
                                   granted=caps.features, tracking=tracking,
                                   store=self.store, observer=NullObserver())
        self.r: RegionCtx | None = None
        self.rng = np.random.default_rng(17)
        nw = int(WRITTEN * self.npages)
        # a pool of random 20% subsets (drawing one costs more than a scan)
        self.subsets = [np.sort(self.rng.choice(self.npages, nw, replace=False)
                                ).astype(np.uint64) for _ in range(4)]
        self.nwrites = 0
        self.vec = np.zeros((self.npages // 2 + 2, 3), dtype=np.uint64)

    @property
    def core(self) -> RegionCtx:
        assert self.r is not None
        return self.r

    def close(self) -> None:
        trio.run(self.runner.guest.teardown, True)
        self.store.close()
        self.k.close()

    def fill(self) -> None:
        core = self.core
        chunk = guest_pages(FILL_CHUNK, seed=3).tobytes()
        for off in range(0, self.npages, FILL_CHUNK):
            n = min(FILL_CHUNK, self.npages - off)
            self.k.uffd_copy(core.uffd.fd, core.uffd.addr(off), chunk[:n * PAGE], 0)

    async def write(self) -> None:
        pages = self.subsets[self.nwrites % len(self.subsets)]
        self.nwrites += 1
        await self.faulter.run(self.core.uffd.base, pages, 2, True)

    async def engine_cycle(self, cycle: Cycle) -> tuple[float, dict[str, float]]:
        phases: dict[str, float] = {}
        t0 = time.perf_counter()
        self.core.tracker.begin_interval()
        await cycle.one(INTERVAL_S, phases)
        return time.perf_counter() - t0, phases

    def py_scan(self) -> tuple[float, float, float]:
        """The tracker's two scans, bare; (both, the WP_MATCHING one) in s; then the time
        ranges_to_mask (the engine's one implementation) takes on the written
        scan's result."""
        base, end = self.core.uffd.base, self.core.uffd.region.end
        t0 = time.perf_counter()
        w = self.k.pagemap_scan(base, end, **WRITTEN_SCAN)
        t1 = time.perf_counter()
        self.k.pagemap_scan(base, end, **PRESENT_SCAN)
        t2 = time.perf_counter()
        ranges_to_mask(w.regions, base, self.npages, PAGE)
        t3 = time.perf_counter()
        return t2 - t0, t1 - t0, t3 - t2

    def c_scan(self) -> tuple[float, float]:
        base, end = self.core.uffd.base, self.core.uffd.region.end
        total = 0
        out = []
        for kw in (WRITTEN_SCAN, PRESENT_SCAN):
            ret, ns = self.faulter.pagemap_scan(base, end, kw["flags"], kw["category_mask"],
                                                kw["return_mask"], self.vec)
            if ret < 0 or ret >= len(self.vec):
                raise RuntimeError(f"raw PAGEMAP_SCAN returned {ret}")
            total += ns
            out.append(ns)
        return total / 1e9, out[0] / 1e9

    async def run(self, rounds: int) -> dict[str, Any]:
        core = self.r = await self.runner.setup()
        self.fill()
        faults = FaultServer(core)
        cycle = Cycle(core, Evictor(core))
        eng: list[float] = []
        eng_ph: list[dict[str, float]] = []
        py: list[tuple[float, float, float]] = []
        c: list[tuple[float, float]] = []
        ev: list[float] = []
        ev_ph: list[dict[str, float]] = []
        with trio.fail_after(TIMEOUT_S):
            async with trio.open_nursery() as n:
                await n.start(faults.serve)
                await self.write()
                await self.engine_cycle(cycle)  # first scan: everything was written
                for _ in range(rounds):
                    await self.write()
                    dt, ph = await self.engine_cycle(cycle)
                    eng.append(dt)
                    eng_ph.append(ph)
                    await self.write()
                    py.append(self.py_scan())
                    await self.write()
                    c.append(self.c_scan())
                if core.pages.counts.evicted:
                    raise RuntimeError(f"{core.pages.counts.evicted} evictions with min_age "
                                       "255")
                cycle.update(TrackingSettings(
                    interval_s=INTERVAL_S, min_age=1, budget_pages=self.evict_batch,
                    refault_hold=0))
                cycle._apply()
                for _ in range(rounds):
                    await self.write()  # some of its writes fault evicted pages back
                    dt, ph = await self.engine_cycle(cycle)
                    ev.append(dt)
                    ev_ph.append(ph)
                n.cancel_scope.cancel()
        return {"eng": eng, "eng_ph": eng_ph, "py": py, "c": c, "ev": ev, "ev_ph": ev_ph,
                "evictions": core.pages.counts.evicted, "faults": dict(core.report.c.faults)}


def bench_cycle(quick: bool) -> dict[str, Any]:
    gib = 1 if quick else 4
    rounds = 5 if quick else 8
    batch = 4096
    with tempfile.TemporaryDirectory(prefix="vmm-tierd-bench-", dir="/var/tmp") as tmp:
        b = CycleBench(Path(tmp), gib, batch)
        try:
            r = trio.run(b.run, rounds)
        finally:
            b.close()
    per = 1e3 / gib  # s -> ms/GiB
    eng = _med(r["eng"]) * per
    c_pair = _med([x[0] for x in r["c"]]) * per
    py_pair = _med([x[0] for x in r["py"]]) * per
    c_wp = _med([x[1] for x in r["c"]]) * per
    py_wp = _med([x[1] for x in r["py"]]) * per
    track_ev = _med([p.get("scan", 0.0) + p.get("select", 0.0) + p.get("delete", 0.0)
                     for p in r["ev_ph"]]) * per
    setup = (f"{gib} GiB anon, wp strategy, {WRITTEN:.0%} of pages written at random "
             f"before each measurement, {rounds} rounds, medians")
    return {
        "cycle ms/GiB": {
            "value": eng, "unit": "ms", "ref": c_pair, "ref_name": "kernel PAGEMAP_SCAN x2",
            "goal": "<= 1.2x ref",
            "note": f"{setup}; engine phases ms/GiB: {_phase_note(r['eng_ph'], gib)}; "
                    "ref = the tracker's two scans (WRITTEN+WP_MATCHING, PRESENT) as raw "
                    "ioctls from C"},
        "cycle / kernel scan": {"value": eng / c_pair, "unit": "x", "goal": "<= 1.2"},
        "bare pagemap_scan x2 ms/GiB": {
            "value": py_pair, "unit": "ms", "ref": c_pair, "ref_name": "C ioctls",
            "note": "the same two scans through LinuxKernel.pagemap_scan"},
        "PAGEMAP_SCAN WP_MATCHING ms/GiB": {
            "value": c_wp, "unit": "ms", "ref": py_wp, "ref_name": "via LinuxKernel",
            "note": "PAGE_IS_WRITTEN with PM_SCAN_WP_MATCHING, raw ioctl from C"},
        "written mask ms/GiB": {
            "value": _med([x[2] for x in r["py"]]) * per, "unit": "ms",
            "note": "ranges_to_mask (the tracker's scan uses it) on the "
                    "written scan's ranges"},
        f"cycle ms/GiB with {batch} evictions": {
            "value": _med(r["ev"]) * per, "unit": "ms",
            "note": f"phases ms/GiB: {_phase_note(r['ev_ph'], gib)}; {r['evictions']} "
                    f"evictions in all, faults {r['faults']}; store sync=none"},
        "tracking part ms/GiB with evictions": {
            "value": track_ev, "unit": "ms", "ref": c_pair,
            "ref_name": "kernel PAGEMAP_SCAN x2", "goal": "<= 1.2x ref",
            "note": "delete+scan+select phases of the eviction cycles"},
    }


if __name__ == "__main__":
    import json

    print(json.dumps(bench_cycle("--quick" in sys.argv), indent=1))
