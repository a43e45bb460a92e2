"""MISSING fault service: the engine's fault path vs a C reference handler (see run.py).

Both sides serve the same LMDB page store file (written by PageStore.put_batch) on a uffd
registered with the same features and mode, and both are driven by the same C faulter
threads (faulter.c) that read one word of every page in a random order and time each
read with clock_gettime: latency is seen from the faulting thread. Rounds alternate C and
engine so load noise hits both alike; each round maps a fresh region.

    .venv/bin/python benchmarks/bench_faults.py [--quick] [--profile]
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trio

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script
    sys.path[:0] = [str(HERE), str(HERE.parent)]

from bench_store import guest_pages  # noqa: E402

from vmm_tierd.engine.faults import FaultServer  # noqa: E402
from vmm_tierd.engine.guest import LocalGuest  # noqa: E402
from vmm_tierd.engine.observer import NullObserver  # noqa: E402
from vmm_tierd.engine.region import RegionCtx, Report  # noqa: E402
from vmm_tierd.engine.runner import RegionRunner  # noqa: E402
from vmm_tierd.engine.selftest import RecordingObserver  # noqa: E402
from vmm_tierd.engine.store import PageStore  # noqa: E402
from vmm_tierd.engine.tracker import OPTIONAL_FEATURES  # noqa: E402
from vmm_tierd.kernel.api import MemType  # noqa: E402
from vmm_tierd.kernel.linux import LinuxKernel  # noqa: E402
from vmm_tierd.settings import RegionSettings, TrackingSettings  # noqa: E402

PAGE = 4096
ROUND_TIMEOUT_S = 60.0
u64p = ctypes.c_void_p


# ---- the C parts, built at benchmark time -------------------------------------------
def build_c(out: Path, ref: bool = True) -> tuple[Path, Path | None]:
    """gcc faulter.so (and the ref_handler binary) into ``out``."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc): run scripts/setup --test")
    so = out / "faulter.so"
    cmds = [[cc, "-O2", "-shared", "-fPIC", "-o", str(so), str(HERE / "faulter.c"),
             "-lpthread"]]
    exe = out / "ref_handler" if ref else None
    if exe is not None:
        cmds.append([cc, "-O2", "-I", str(HERE), "-o", str(exe), str(HERE / "ref_handler.c"),
                     str(HERE / "faulter.c"), "-llmdb", "-lzstd", "-lz", "-lpthread"])
    for cmd in cmds:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if r.returncode:
            raise RuntimeError(f"building {cmd[-2 if exe else -1]} failed (needs liblmdb-dev "
                               f"libzstd-dev zlib1g-dev: scripts/setup --test): {r.stderr}")
    return so, exe


class Faulter:
    """ctypes wrapper of faulter.c. ctypes releases the GIL around each call and the
    threads run in C, so touching registered memory never holds the GIL."""

    def __init__(self, so: Path) -> None:
        lib = ctypes.CDLL(str(so), use_errno=True)
        lib.ft_start.restype = ctypes.c_void_p
        lib.ft_start.argtypes = [ctypes.c_uint64, u64p, ctypes.c_uint64, ctypes.c_int,
                                 ctypes.c_int, u64p, u64p]
        lib.ft_running.argtypes = [ctypes.c_void_p]
        lib.ft_wall_ns.restype = ctypes.c_uint64
        lib.ft_wall_ns.argtypes = [ctypes.c_void_p]
        lib.ft_free.argtypes = [ctypes.c_void_p]
        lib.ft_pagemap_scan.restype = ctypes.c_long
        lib.ft_pagemap_scan.argtypes = [ctypes.c_uint64] * 5 + [
            ctypes.c_void_p, ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64)]
        self.lib = lib
        self._abandoned: list[object] = []  # buffers of timed-out jobs' threads

    def start(self, base: int, pages: np.ndarray, threads: int, write: bool,
              words: np.ndarray | None = None, lat: np.ndarray | None = None) -> int:
        h = self.lib.ft_start(base, pages.ctypes.data, len(pages), threads, int(write),
                              None if words is None else words.ctypes.data,
                              None if lat is None else lat.ctypes.data)
        if not h:
            raise OSError(ctypes.get_errno(), "ft_start failed")
        return int(h)

    def running(self, h: int) -> int:
        return int(self.lib.ft_running(h))

    def finish(self, h: int) -> int:
        """Join and free a finished job; its wall time in ns."""
        wall = int(self.lib.ft_wall_ns(h))
        self.lib.ft_free(h)
        return wall

    def pagemap_scan(self, start: int, end: int, flags: int, cat: int, ret: int,
                     vec: np.ndarray) -> tuple[int, int]:
        """One raw PAGEMAP_SCAN ioctl; (regions or -errno, ns)."""
        ns = ctypes.c_uint64()
        r = self.lib.ft_pagemap_scan(start, end, flags, cat, ret, vec.ctypes.data,
                                     len(vec), ctypes.byref(ns))
        return int(r), int(ns.value)

    async def run(self, base: int, pages: np.ndarray, threads: int, write: bool,
                  words: np.ndarray | None = None, lat: np.ndarray | None = None,
                  timeout: float = ROUND_TIMEOUT_S) -> int:
        """Start a job and wait for it on the trio loop (which serves its faults)."""
        h = self.start(base, pages, threads, write, words, lat)
        with trio.move_on_after(timeout) as cs:
            while self.running(h):
                await trio.sleep(0.002)
        if cs.cancelled_caught:
            # Its threads are blocked on faults; the caller's teardown (UNREGISTER) wakes
            # them, and they still write into these buffers: keep them alive.
            self._abandoned.append((pages, words, lat))
            raise TimeoutError(f"faulter threads still blocked after {timeout} s")
        return self.finish(h)


# ---- one round on each side ---------------------------------------------------------
@dataclass
class Round:
    lat_ns: np.ndarray
    words: np.ndarray
    wall_ns: int
    info: dict[str, Any]


class Bench:
    def __init__(self, tmp: Path, npages: int) -> None:
        self.tmp = tmp
        self.npages = npages
        self.so, self.exe = build_c(tmp)
        self.faulter = Faulter(self.so)
        self.kernel = LinuxKernel()
        self.granted = self.kernel.capabilities().features
        self.strategy = self.kernel.capabilities().strategy
        if self.strategy is None:
            raise RuntimeError(f"no strategy on this kernel: {self.kernel.capabilities().reason}")
        # no fault-around: every access of the benchmark is a fault, as in the C handler
        self.tracking = TrackingSettings(interval_s=3600.0, min_age=1000, prefetch_pages=0)
        self.rs = RegionSettings(name="bench", size_bytes=npages * PAGE,
                                 memtype=MemType.ANON, workload_enabled=False)
        self.store_dir = tmp / "store"
        self.store = PageStore(self.store_dir, sync="none", instance_id="bench-faults")
        self.rid = self.store.region_id(self.rs.name)
        self.pages = guest_pages(npages, seed=13)
        for b in range(0, npages, 512):
            n = min(512, npages - b)
            self.store.put_batch(self.rid, np.arange(b, b + n, dtype=np.uint64),
                                 self.pages[b:b + n].data.cast("B"))
        self.first_words = np.ascontiguousarray(self.pages.view(np.uint64)[:, 0])
        self.ref_args: tuple[int, int, int] | None = None  # features, mode, zero_by_copy
        self.nolock = 0
        self.meta = 0.0  # engine bytes per guest page, measured in core()

    def close(self) -> None:
        self.store.close()
        self.kernel.close()

    def core(self, observer: RecordingObserver | None = None
             ) -> tuple[RegionRunner, RegionCtx]:
        assert self.strategy is not None
        runner = RegionRunner(self.kernel, LocalGuest(self.kernel, self.rs),
                              strategy=self.strategy, granted=self.granted,
                              tracking=self.tracking, store=self.store,
                              observer=observer or NullObserver())
        core = trio.run(runner.setup)
        # What setup() asked UFFDIO_API for (the features granted are what it supports).
        feats = (type(core.tracker).wanted(self.kernel.dialect, MemType.ANON)
                 | OPTIONAL_FEATURES) & self.granted
        self.ref_args = (feats, core.tracker.register_mode(), int(core.uffd.zero_by_copy))
        everything = np.arange(self.npages, dtype=np.uint64)
        core.pages.committed(core.pages.detached(everything, 0),
                             np.zeros(self.npages, dtype=bool))
        self.meta = per_page_bytes(core)
        return runner, core

    def engine_round(self, order: np.ndarray, threads: int) -> Round:
        lat = np.zeros(len(order), dtype=np.uint64)
        words = np.zeros(len(order), dtype=np.uint64)
        obs = RecordingObserver()  # the handler's own time: read -> resolved
        runner, core = self.core(obs)
        fs = FaultServer(core)
        try:
            async def main() -> int:
                async with trio.open_nursery() as n:
                    await n.start(fs.serve)
                    wall = await self.faulter.run(core.uffd.base, order, threads, False, words, lat)
                    n.cancel_scope.cancel()
                return wall

            wall = trio.run(main)
        finally:
            trio.run(runner.guest.teardown, True)
        info = {"faults": dict(core.report.c.faults), "reads": fs.reads, "msgs": fs.msgs,
                "errors": core.report.c.errors, "service_s": obs.latencies}
        return Round(lat, words, wall, info)

    def c_round(self, order: np.ndarray, threads: int) -> Round:
        assert self.exe is not None and self.ref_args is not None
        of, out = self.tmp / "order.u64", self.tmp / "out.u64"
        order.astype(np.uint64).tofile(of)
        feats, mode, zbc = self.ref_args
        for nolock in (self.nolock, 1):
            cmd = [str(self.exe), str(self.store_dir), str(self.rid), str(self.npages),
                   str(threads), hex(feats), hex(mode), str(zbc), str(nolock), str(of),
                   str(out)]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=ROUND_TIMEOUT_S)
            if r.returncode == 0:
                self.nolock = nolock
                break
            if r.returncode == -signal.SIGBUS:
                raise RuntimeError("ref_handler: a faulting thread got SIGBUS (the handler "
                                   f"poisoned a page it could not read): {r.stderr.strip()}")
            if nolock or "mdb_env_open" not in r.stderr:
                raise RuntimeError(f"ref_handler failed ({r.returncode}): {r.stderr.strip()}")
        info: dict[str, Any] = {k: int(v) for k, v in
                                (kv.split("=") for kv in r.stdout.split())}
        raw = np.fromfile(out, dtype=np.uint64)
        n = len(order)
        return Round(raw[:n].copy(), raw[n:2 * n].copy(), info["wall_ns"], info)

    def check(self, order: np.ndarray, r: Round, side: str) -> None:
        bad = int(np.count_nonzero(r.words != self.first_words[order]))
        if bad:
            raise RuntimeError(f"{side}: {bad} of {len(order)} pages came back with the "
                               "wrong content")


def per_page_bytes(core: RegionCtx) -> float:
    """Bytes per guest page of every array the region's engine objects hold that grows
    with the region (numpy arrays, and buffers such as memoryviews of them, counted once
    per underlying allocation), measured, not declared."""
    seen: set[int] = set()
    total = 0
    for obj in (core, core.pages, core.tracker, core.uffd):
        for v in vars(obj).values():
            if isinstance(v, memoryview):
                v = v.obj
            if isinstance(v, bytes | bytearray) and len(v) >= core.npages:
                if id(v) not in seen:
                    seen.add(id(v))
                    total += len(v)
            elif isinstance(v, np.ndarray):
                while isinstance(v.base, np.ndarray):
                    v = v.base
                if v.nbytes >= core.npages and id(v) not in seen:
                    seen.add(id(v))
                    total += v.nbytes
    return total / core.npages


def _pct(a: list[np.ndarray]) -> tuple[float, float]:
    x = np.concatenate(a) / 1e3
    return float(np.percentile(x, 50)), float(np.percentile(x, 99))


def bench_faults(quick: bool) -> dict[str, Any]:
    npages = 16384 if quick else 65536
    rounds = 3 if quick else 5
    rng = np.random.default_rng(21)
    with tempfile.TemporaryDirectory(prefix="vmm-tierd-bench-", dir="/var/tmp") as tmp:
        b = Bench(Path(tmp), npages)
        try:
            res: dict[tuple[str, int], list[Round]] = {}
            for threads in (1, 2):
                order = rng.permutation(npages).astype(np.uint64)
                b.engine_round(order, threads)  # warm-up: LMDB file, code paths, ref args
                b.c_round(order, threads)
                for _ in range(rounds):
                    order = rng.permutation(npages).astype(np.uint64)
                    for side, fn in (("c", b.c_round), ("engine", b.engine_round)):
                        r = fn(order, threads)
                        b.check(order, r, side)
                        res.setdefault((side, threads), []).append(r)
            strategy = b.strategy.value if b.strategy else "?"
        finally:
            b.close()
    e1, c1 = res[("engine", 1)], res[("c", 1)]
    ep50, ep99 = _pct([r.lat_ns for r in e1])
    cp50, cp99 = _pct([r.lat_ns for r in c1])

    def fps(rs: list[Round]) -> float:
        return float(np.median([len(r.lat_ns) / (r.wall_ns / 1e9) for r in rs]))

    c_get = sum(r.info["get_ns"] for r in c1) / sum(len(r.lat_ns) for r in c1) / 1e3
    c_copy = sum(r.info["copy_ns"] for r in c1) / sum(len(r.lat_ns) for r in c1) / 1e3
    e_service = np.concatenate([np.asarray(r.info["service_s"]) for r in e1]) * 1e6
    msgs = sum(r.info["msgs"] for r in res[("engine", 2)])
    reads = sum(r.info["reads"] for r in res[("engine", 2)])
    kinds: dict[str, int] = {}
    for r in e1:
        for k, v in r.info["faults"].items():
            kinds[k] = kinds.get(k, 0) + v
    note = (f"{npages} pages ({npages * PAGE >> 20} MiB: 60% stamped, 30% text, 10% zero), "
            f"{rounds} rounds/side, 1 faulting C thread, random order, {strategy} "
            f"registration; engine fault kinds {kinds}")
    return {
        "fault p50": {"value": ep50, "unit": "us", "ref": cp50, "ref_name": "C handler",
                      "goal": "<= 1.3x ref", "note": note},
        "fault p99": {"value": ep99, "unit": "us", "ref": cp99, "ref_name": "C handler"},
        "fault p50 engine/C": {
            "value": ep50 / cp50, "unit": "x", "goal": "<= 1.3",
            "note": f"C handler per fault: store get+zstd+crc32 {c_get:.1f} us, "
                    f"UFFDIO_COPY (incl. waking the faulter) {c_copy:.1f} us"},
        "handler service mean engine/C": {
            "value": float(e_service.mean()) / (c_get + c_copy), "unit": "x", "goal": "<= 1.3",
            "note": f"read -> resolved, the handler's own time in the same run: engine mean "
                    f"{float(e_service.mean()):.1f} us (p50 {float(np.median(e_service)):.1f}), "
                    f"C {c_get + c_copy:.1f} us (its get + COPY, the same span); the round "
                    "trip above also holds the faulting thread's wake-up"},
        "metadata bytes per guest page": {
            "value": b.meta, "unit": "B", "goal": "<= 2",
            "note": "all per-page engine state (policy age + state byte, which also holds "
                    "the engine's evicted/ever-evicted bits), measured on the region's "
                    "objects; per-batch state (in-flight pages) is bounded by the staging "
                    "size"},
        "faults/s 1 thread": {"value": fps(e1), "unit": "/s", "ref": fps(c1),
                              "ref_name": "C handler"},
        "faults/s 2 threads": {"value": fps(res[("engine", 2)]), "unit": "/s",
                               "ref": fps(res[("c", 2)]), "ref_name": "C handler",
                               "note": f"engine read {msgs / max(1, reads):.2f} msgs/read"},
    }


def _timed(obj: object, name: str, out: dict[str, list[int]]) -> None:
    """Wrap obj.name (an instance attribute shadows the method) to record call durations."""
    f = getattr(obj, name)
    rec = out.setdefault(name, [])
    ns = time.perf_counter_ns

    def w(*a: Any, **kw: Any) -> Any:
        t0 = ns()
        try:
            return f(*a, **kw)
        finally:
            rec.append(ns() - t0)

    setattr(obj, name, w)


def profile(npages: int = 16384) -> None:
    """Where one engine round's time goes (1 faulting thread): per-stage timers around the
    kernel and store calls the fault path makes, next to the C handler's, then cProfile."""
    import cProfile
    import pstats

    with tempfile.TemporaryDirectory(prefix="vmm-tierd-bench-", dir="/var/tmp") as tmp:
        b = Bench(Path(tmp), npages)
        try:
            rng = np.random.default_rng(1)
            b.engine_round(rng.permutation(npages).astype(np.uint64), 1)
            stages: dict[str, list[int]] = {}
            for name in ("uffd_read", "uffd_copy"):
                _timed(b.kernel, name, stages)
            _timed(b.store, "get", stages)
            # class attributes, put back below (FaultServer is created per round)
            saved = {(cls, n): cls.__dict__[n] for cls, n in
                     ((FaultServer, "pull"), (FaultServer, "serve_one"),
                      (FaultServer, "_from_store"), (Report, "fault"))}
            for cls, n in saved:
                _timed(cls, n, stages)
            order = rng.permutation(npages).astype(np.uint64)
            try:
                r = b.engine_round(order, 1)
            finally:
                for (cls, n), f in saved.items():
                    setattr(cls, n, f)
            c = b.c_round(order, 1)
            del b.kernel.uffd_read, b.kernel.uffd_copy, b.store.get
            pr = cProfile.Profile()
            order = rng.permutation(npages).astype(np.uint64)
            pr.enable()
            b.engine_round(order, 1)
            pr.disable()
        finally:
            b.close()
    us = 1e3 * npages
    print(f"engine: p50 {np.median(r.lat_ns) / 1e3:.1f} us, wall {r.wall_ns / us:.1f} us/fault "
          "(pull includes uffd_read; serve_one includes _from_store: get, uffd_copy, "
          "count_fault; the rest of the wall time is the trio loop and waiting)")
    for k, v in stages.items():
        a = np.array(v) / 1e3
        print(f"  {k:10s} calls/fault {len(a) / npages:.2f}  p50 {np.median(a):6.1f} us  "
              f"mean {a.mean():6.1f} us  p99 {np.percentile(a, 99):7.1f} us")
    print(f"C: p50 {np.median(c.lat_ns) / 1e3:.1f} us, wall {c.wall_ns / us:.1f} us/fault; "
          f"get+decompress+crc {c.info['get_ns'] / us:.1f} us/fault, "
          f"UFFDIO_COPY {c.info['copy_ns'] / us:.1f} us/fault")
    st = pstats.Stats(pr)
    rows = []
    for (fn, line, name), (_cc, nc, tt, ct, _) in st.stats.items():  # type: ignore[attr-defined]
        rows.append((tt, ct, nc, f"{Path(fn).name}:{line}({name})"))
    rows.sort(reverse=True)
    print("cProfile (inflates Python-level costs):")
    print(f"{'tottime us/fault':>16} {'cumtime us/fault':>16} {'calls/fault':>11}  function")
    for tt, ct, nc, name in rows[:25]:
        print(f"{tt / npages * 1e6:16.2f} {ct / npages * 1e6:16.2f} {nc / npages:11.2f}  {name}")


if __name__ == "__main__":
    if "--profile" in sys.argv:
        profile()
    else:
        import json

        print(json.dumps(bench_faults("--quick" in sys.argv), indent=1))
