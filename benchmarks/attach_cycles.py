"""Parts 2 and 3 of bench_attach: the cycle's cost per GiB through /proc/PID/pagemap
next to the bare ioctls, and the pauses that injected syscalls cause per cycle next to
an empty stop (see bench_attach.py)."""

from __future__ import annotations

import ctypes
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import trio

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path[:0] = [str(HERE), str(HERE.parent)]

from attach_rig import (  # noqa: E402
    NAME,
    PAGE,
    Attached,
    StandIn,
    empty_stops,
    load_figs,
    load_note,
    ms_median,
)
from bench_faults import Faulter, build_c  # noqa: E402
from bench_store import guest_pages  # noqa: E402

from vmm_tierd.engine.cycle import Cycle  # noqa: E402
from vmm_tierd.engine.evict import Evictor  # noqa: E402
from vmm_tierd.engine.faults import FaultServer  # noqa: E402
from vmm_tierd.engine.observer import NullObserver  # noqa: E402
from vmm_tierd.engine.store import PageStore  # noqa: E402
from vmm_tierd.kernel import uapi  # noqa: E402
from vmm_tierd.kernel.api import Strategy  # noqa: E402
from vmm_tierd.kernel.linux import LinuxKernel  # noqa: E402
from vmm_tierd.settings import TrackingSettings  # noqa: E402

WRITTEN = 0.2
INTERVAL_S = 1.0  # what select() is told; nothing sleeps
SCANS = ({"category_mask": uapi.PAGE_IS_WRITTEN, "return_mask": uapi.PAGE_IS_WRITTEN,
          "flags": uapi.PM_SCAN_WP_MATCHING},
         {"category_mask": uapi.PAGE_IS_PRESENT, "return_mask": uapi.PAGE_IS_PRESENT,
          "flags": 0})
Figs = dict[str, Any]


class CycleBench:
    def __init__(self, tmp: Path, k: LinuxKernel, vmm_exe: Path, gib: int) -> None:
        caps = k.capabilities()
        self.k, self.gib = k, gib
        so, _ = build_c(tmp, ref=False)
        self.lib = Faulter(so).lib
        self.lib.ft_pagemap_scan_fd.restype = ctypes.c_long
        self.lib.ft_pagemap_scan_fd.argtypes = [ctypes.c_int] + [ctypes.c_uint64] * 5 + [
            ctypes.c_void_p, ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64)]
        self.store = PageStore(tmp / "store-cycle", sync="none", instance_id="bench-attach-c")
        self.pagemap = -1
        self.a: Attached | None = None
        try:
            self.vmm = StandIn(vmm_exe, gib << 30, tmp)
        except BaseException:
            self.store.close()
            raise
        try:
            self.npages = self.vmm.npages
            chunk = guest_pages(4096, seed=3)
            self.first_words = np.tile(chunk.view(np.uint64)[:, 0],
                                       -(-self.npages // 4096))[:self.npages]
            fd = self.vmm.open_memfd()
            try:
                data = chunk.tobytes()
                for off in range(0, self.vmm.ram_bytes, len(data)):
                    os.pwrite(fd, data[:self.vmm.ram_bytes - off], off)
            finally:
                os.close(fd)
            self.populate_s = self.vmm.populate()
            self.pagemap = os.open(f"/proc/{self.vmm.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            self.a = Attached.open(k, self.vmm.pid, self.store, Strategy.WP, caps.features,
                                   TrackingSettings(interval_s=INTERVAL_S, min_age=255,
                                                    refault_hold=0), NullObserver(), NAME)
        except BaseException:
            self.close()
            raise
        rng = np.random.default_rng(17)
        nw = int(WRITTEN * self.npages)
        self.subsets = [np.sort(rng.choice(self.npages, nw, replace=False)).astype(np.uint64)
                        for _ in range(4)]
        self.nwrites = 0
        self.vec = np.zeros((self.npages // 2 + 2, 3), dtype=np.uint64)

    def close(self) -> None:
        if self.pagemap >= 0:
            os.close(self.pagemap)
        if self.a is not None:
            self.a.proc.close()  # (run() detaches; closing twice is harmless)
        self.vmm.close()
        self.store.close()

    async def write(self) -> None:
        pages = self.subsets[self.nwrites % len(self.subsets)]
        self.nwrites += 1
        await self.vmm.touch_async(pages, 2, True)

    def py_scans(self) -> float:
        assert self.a is not None
        base, end = self.vmm.ram_addr, self.vmm.ram_addr + self.vmm.ram_bytes
        t0 = time.perf_counter()
        for kw in SCANS:
            self.a.proc.pagemap_scan(base, end, **kw)
        return time.perf_counter() - t0

    def c_scans(self) -> float:
        base, end = self.vmm.ram_addr, self.vmm.ram_addr + self.vmm.ram_bytes
        total = 0
        for kw in SCANS:
            ns = ctypes.c_uint64()
            r = self.lib.ft_pagemap_scan_fd(self.pagemap, base, end, kw["flags"],
                                            kw["category_mask"], kw["return_mask"],
                                            self.vec.ctypes.data, len(self.vec),
                                            ctypes.byref(ns))
            if r < 0 or r >= len(self.vec):
                raise RuntimeError(f"raw PAGEMAP_SCAN of /proc/{self.vmm.pid}/pagemap: {r}")
            total += ns.value
        return total / 1e9

    def empty_stops(self, n: int) -> list[float]:
        assert self.a is not None
        return empty_stops(self.a.proc, self.a.remote.tid, n)

    async def run(self, rounds: int, evict_rounds: int, budget: int, unlimited: bool
                  ) -> dict[str, Any]:
        a = self.a
        assert a is not None
        out: dict[str, Any] = {"eng": [], "eng_ph": [], "py": [], "c": [], "ev": [], "ev_ph": [],
                               "unlimited": None}
        try:
            core = await a.runner.setup()
            cycle = Cycle(core, Evictor(core))
            fs = FaultServer(core)

            async def one() -> tuple[float, dict[str, float]]:
                """One cycle's work, as Cycle.run does it minus the interval's sleep."""
                ph: dict[str, float] = {}
                t0 = time.perf_counter()
                await trio.to_thread.run_sync(core.tracker.begin_interval)
                await cycle.one(INTERVAL_S, ph)
                return time.perf_counter() - t0, ph

            async with trio.open_nursery() as n:
                await n.start(fs.serve)
                await self.write()
                await one()  # the first scan: everything was written
                for _ in range(rounds):
                    await self.write()
                    dt, ph = await one()
                    out["eng"].append(dt)
                    out["eng_ph"].append(ph)
                    await self.write()
                    out["py"].append(self.py_scans())
                    await self.write()
                    out["c"].append(self.c_scans())
                if core.pages.counts.evicted:
                    raise RuntimeError("evictions with min_age 255")
                out["empty"] = await trio.to_thread.run_sync(self.empty_stops, 20)
                plans = [budget] * evict_rounds + ([0] if unlimited else [])
                for b in plans:
                    cycle.update(TrackingSettings(interval_s=INTERVAL_S, min_age=1,
                                                  budget_pages=b, refault_hold=0))
                    cycle._apply()
                    await self.write()  # some of its writes fault evicted pages back
                    i0, e0 = len(a.pauses.each), core.pages.counts.evicted
                    dt, ph = await one()
                    rec = (dt, a.pauses.each[i0:], core.pages.counts.evicted - e0)
                    if b:
                        out["ev"].append(rec)
                        out["ev_ph"].append(ph)
                    else:
                        out["unlimited"] = rec
                out["evicted"] = core.pages.counts.evicted
                # Read every page back: the evicted ones fault and are served; each first
                # word must be what was written there (writes go to the second word).
                order = np.arange(self.npages, dtype=np.uint64)
                _, words, _ = await self.vmm.touch_async(order, 2, False)
                bad = int(np.count_nonzero(words != self.first_words))
                if bad:
                    raise RuntimeError(f"{bad} pages read back wrong after eviction")
                out["faults"] = dict(core.report.c.faults)
                n.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await a.close()
        return out


def phase_note(ph: list[dict[str, float]], per: float = 1.0) -> str:
    """Median ms of each phase (divided by ``per``)."""
    keys = sorted({k for p in ph for k in p})
    return ", ".join(f"{k} {float(np.median([p.get(k, 0.0) for p in ph])) * 1e3 / per:.2f}"
                     for k in keys)


def part_cycles(tmp: Path, k: LinuxKernel, vmm_exe: Path, quick: bool) -> Figs:
    load0, t0 = load_note(), time.perf_counter()
    strategy = k.capabilities().strategy
    if strategy is not Strategy.WP:
        # rwp injects nothing after the uffd exists, and its scans are others
        return {"cycles: skipped": {"value": 0, "note": f"measures the wp strategy (PTE "
                                    f"zaps injected into the VMM); this kernel: {strategy}"}}
    gib = 1 if quick else 4
    rounds = 8 if quick else 12
    budget = 4096
    b = CycleBench(tmp, k, vmm_exe, gib)
    try:
        r = trio.run(b.run, rounds, rounds, budget, not quick)
    finally:
        b.close()
    per = 1 / gib
    eng, c, py = ms_median(r["eng"]) * per, ms_median(r["c"]) * per, ms_median(r["py"]) * per
    empty = ms_median(r["empty"])
    worst = [max(p for p, _ in st) * 1e3 if st else 0.0 for _, st, _ in r["ev"]]
    total = [sum(p for p, _ in st) * 1e3 for _, st, _ in r["ev"]]
    stops = [len(st) for _, st, _ in r["ev"]]
    calls = [c_ for _, st, _ in r["ev"] for _, c_ in st]
    evicted = [e for _, _, e in r["ev"]]
    setup = (f"{gib} GiB memfd RAM of attach_vmm, all mapped, {WRITTEN:.0%} of pages written "
             f"by 2 VMM threads before each measurement, wp strategy, {rounds} rounds, "
             "medians")
    figs: Figs = {
        "attach: cycle ms/GiB": {
            "value": eng, "unit": "ms", "ref": c, "ref_name": "kernel PAGEMAP_SCAN x2",
            "note": f"{setup}; phases ms/GiB: {phase_note(r['eng_ph'], gib)}; ref = the "
                    "tracker's two scans (WRITTEN+WP_MATCHING, PRESENT) as raw ioctls on "
                    f"/proc/{b.vmm.pid}/pagemap from C; min: "
                    f"engine {min(r['eng']) * 1e3 * per:.1f}, C {min(r['c']) * 1e3 * per:.1f}"},
        "attach: cycle / kernel scan": {"value": eng / c, "unit": "x"},
        "attach: pagemap_scan x2 via LinuxProcess ms/GiB": {
            "value": py, "unit": "ms", "ref": c, "ref_name": "C ioctls"},
        f"attach: cycle ms evicting {budget} pages": {
            "value": ms_median([d for d, _, _ in r["ev"]]), "unit": "ms",
            "note": f"a whole cycle of the {gib} GiB region (not per GiB: eviction costs by "
                    f"the page); phases ms: {phase_note(r['ev_ph'])}; evicted per cycle "
                    f"{int(np.median(evicted))}, {r['evicted']} in all, faults "
                    f"{r['faults']} (fault-around on); every page read back right at the "
                    "end"},
        "attach: injected pause, longest per cycle": {
            "value": float(np.median(worst)), "unit": "ms", "ref": empty,
            "ref_name": "one empty stop (getpid)",
            "note": f"{budget} pages evicted per cycle: the victims' PTEs zapped by "
                    f"process_madvise(DONTNEED) injected into the VMM's main thread, one "
                    f"stop per {1024}-page batch; median over {len(worst)} cycles, max "
                    f"{max(worst):.2f} ms"},
        "attach: injected pause, total per cycle": {
            "value": float(np.median(total)), "unit": "ms", "ref": empty,
            "ref_name": "one empty stop (getpid)",
            "note": f"stops per cycle {int(np.median(stops))}, process_madvise calls per "
                    f"stop {float(np.mean(calls)) if calls else 0:.1f}; max {max(total):.2f} ms"},
    }
    if r["unlimited"] is not None:
        dt, st, ev = r["unlimited"]
        figs["attach: injected pause, longest in an unlimited cycle"] = {
            "value": max(p for p, _ in st) * 1e3 if st else 0.0, "unit": "ms",
            "ref": empty, "ref_name": "one empty stop (getpid)",
            "note": f"one cycle evicting every cold page: {ev} pages "
                    f"({ev * PAGE / 2**20:.0f} MiB) in {dt:.1f} s, {len(st)} stops, total "
                    f"{sum(p for p, _ in st) * 1e3:.1f} ms"}
    figs.update(load_figs("cycles", load0, t0))
    return figs
