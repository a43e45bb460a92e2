"""One configuration of benchmarks/vs_kernel.py, run as its own process (in its own memory
cgroup, so that everything it causes is charged there).

``--mode plain``: the project's C workload on an anonymous region mapped with
``LinuxKernel().map_anon`` and no uffd at all (nothing behind it, or zram swap).
``--mode daemon``: the daemon itself, ``vmm_tierd.service.runner.Service`` on a config file
exactly as ``vmm-tierd run --config FILE`` runs it, in this process's main thread; its
built-in workload is the one measured.

Either way a sampler thread prints one JSON line per second (workload ops, CPU by thread
group, the cgroup's memory, zram's mm_stat, the daemon's region and store figures) and a
probe thread reads one word of a known-cold page 20 times a second, timing the access in
C (benchmarks/faulter.c): that is the fault latency the faulting thread sees. After
``--seconds`` a final line follows and the process ends with ``os._exit`` (no graceful
daemon stop: the parent removes the store).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # no idle BLAS threads among ours

import argparse
import dataclasses
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from bench_faults import Faulter  # noqa: E402
from vs_kernel_host import Cgroup  # noqa: E402
from vs_kernel_parse import parse_mm_stat, parse_task_cpu  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def emit(rec: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(rec) + "\n")
    sys.stdout.flush()


def thread_cpu() -> tuple[float, float, dict[int, float]]:
    """(user, sys) seconds of this process's live threads that are not Python threads
    (the C workload threads; a probe's C thread lives only during its access), and the
    CPU seconds of each Python thread by tid."""
    py = {t.native_id for t in threading.enumerate() if t.native_id is not None}
    u = s = 0.0
    pyt: dict[int, float] = {}
    for name in os.listdir("/proc/self/task"):
        tid = int(name)
        try:
            ut, st = parse_task_cpu(Path(f"/proc/self/task/{name}/stat").read_text())
        except (OSError, ValueError):
            continue  # exited meanwhile
        if tid in py:
            pyt[tid] = (ut + st) / TICK
        else:
            u += ut / TICK
            s += st / TICK
    return u, s, pyt


class Probe:
    """Reads the first word of one page at a time from a window of the shifting workload
    that was hot 15-40 s ago (windows k+2 .. k+7 of 10 while window k is hot), never an
    all-zero page, and keeps (t, ns) of each access."""

    def __init__(self, faulter: Faulter, base: int, npages: int, hot: int, period: float,
                 zero: np.ndarray | None, t0: float, hz: float) -> None:
        self.f, self.base, self.npages, self.hot = faulter, base, npages, hot
        self.period, self.zero, self.t0, self.dt = period, zero, t0, 1.0 / hz
        self.out: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self.tid = 0
        self.rng = np.random.default_rng(12345)

    def page(self, t: float) -> int:
        k = int(t // self.period)
        while True:
            p = int(((k + int(self.rng.integers(2, 8))) * self.hot
                     + int(self.rng.integers(0, self.hot))) % self.npages)
            if self.zero is None or not self.zero[p]:
                return p

    def run(self) -> None:
        self.tid = threading.get_native_id()
        nxt = time.monotonic()
        while not self.stop.is_set():
            t = time.monotonic() - self.t0
            pages = np.array([self.page(t)], dtype=np.uint64)
            lat = np.zeros(1, dtype=np.uint64)
            h = self.f.start(self.base, pages, 1, False, None, lat)
            # Joined in C with the GIL released (ctypes): polling from Python would take
            # the GIL thousands of times a second from the daemon's loop in this process.
            self.f.finish(h)
            self.out.append((round(t, 3), int(lat[0])))
            nxt += self.dt
            time.sleep(max(0.0, nxt - time.monotonic()))


class Sampler:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cg = Cgroup(Path(args.cgroup), args.cgroup_version) if args.cgroup else None
        self.zram = Path(args.zram) / "mm_stat" if args.zram else None
        self.bench_tids: set[int] = set()

    def sample(self, t: float, ops: int, daemon: dict[str, Any] | None) -> dict[str, Any]:
        tm = os.times()
        wu, ws, pyt = thread_cpu()
        bench = sum(v for k, v in pyt.items() if k in self.bench_tids)
        rec: dict[str, Any] = {"type": "sample", "t": round(t, 3), "ops": ops,
                               "cpu": round(tm.user + tm.system, 3),
                               "cpu_sys": round(tm.system, 3), "wl_cpu": round(wu + ws, 3),
                               "wl_sys": round(ws, 3), "bench_cpu": round(bench, 3)}
        if self.cg is not None:
            rec["mem"] = dataclasses.asdict(self.cg.sample())
        if self.zram is not None:
            rec["zram"] = parse_mm_stat(self.zram.read_text())
        if daemon is not None:
            rec["daemon"] = daemon
        return rec


def hist(metric: Any) -> dict[str, float]:
    """Cumulative bucket counts of a prometheus Histogram, summed over its labels."""
    out: dict[str, float] = {}
    for fam in metric.collect():
        for s in fam.samples:
            if s.name.endswith("_bucket"):
                out[s.labels["le"]] = out.get(s.labels["le"], 0.0) + s.value
    return out


def fincore(paths: list[Path]) -> int | None:
    """Bytes of these files in the page cache (util-linux fincore = mincore(2))."""
    files = [str(p) for p in paths if p.is_file()]
    if not files:
        return 0
    try:
        r = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES",
                            *files], capture_output=True, text=True, timeout=30)
        return sum(int(x) for x in r.stdout.split()) if r.returncode == 0 else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def measure(args: argparse.Namespace, wl: Any, t0: float, base: int, npages: int,
            daemon: Any = None) -> None:
    """The sampler loop (runs in whatever thread calls it); ends the process."""
    sm = Sampler(args)
    sm.bench_tids.add(threading.get_native_id())
    spec = wl.spec
    hot = max(1, min(npages, int(spec.hot_fraction * npages + 0.5)))
    probe = Probe(Faulter(Path(args.faulter)), base, npages, hot, spec.shift_period_s,
                  getattr(wl, "zero_mask", None), t0, args.probe_hz)
    pt = threading.Thread(target=probe.run, name="vsk-probe", daemon=True)
    pt.start()
    while not probe.tid:
        time.sleep(0.001)
    sm.bench_tids.add(probe.tid)
    h0: dict[str, float] = {}
    nxt = time.monotonic()
    while True:
        now = time.monotonic()
        t = now - t0
        st = wl.stats()
        emit(sm.sample(t, st.reads + st.writes, daemon_figures(daemon)))
        if daemon is not None and not h0 and t >= args.window_from:
            h0 = hist(daemon.metrics.fault_seconds)
        if t >= args.seconds:
            break
        nxt += 1.0
        time.sleep(max(0.0, nxt - time.monotonic()))
    probe.stop.set()
    final: dict[str, Any] = {"type": "final", "probes": probe.out}
    if daemon is not None:
        final["service_hist"] = {"start": h0, "end": hist(daemon.metrics.fault_seconds)}
        store = Path(daemon.settings.store.path)
        final["store_cached"] = fincore(sorted(store.iterdir()))
        s = daemon.store.stats()
        final["store"] = {"records": s.records, "compressed": s.compressed_bytes,
                          "disk": s.disk_bytes}
    emit(final)
    os._exit(0)


def daemon_figures(svc: Any) -> dict[str, Any] | None:
    if svc is None:
        return None
    r = svc.engine.region_stats()[0]
    s = svc.store.stats()
    return {"resident": r.resident_bytes, "evicted": r.evicted_bytes,
            "faults": sum(r.faults.values()), "evictions": r.evictions_total,
            "refaults": r.refaults_total, "store_disk": s.disk_bytes,
            "store_compressed": s.compressed_bytes}


def run_plain(args: argparse.Namespace) -> None:
    from vmm_tierd.kernel.linux import LinuxKernel
    from vmm_tierd.service.config import default_settings

    spec = default_settings().regions[0].workload
    spec = dataclasses.replace(spec, ops_per_sec=args.ops_per_sec)
    k = LinuxKernel()
    region = k.map_anon(args.size_mib << 20)
    emit({"type": "meta", "mode": "plain", "spec": dataclasses.asdict(spec) | {
        "pattern": spec.pattern.value}, "pid": os.getpid()})
    t0 = time.monotonic()
    wl = k.start_workload(region, spec)
    measure(args, wl, t0, region.addr, region.length // 4096)


def run_daemon(args: argparse.Namespace) -> None:
    from vmm_tierd.service.capacity import check_capacity
    from vmm_tierd.service.config import load_settings
    from vmm_tierd.service.main import setup_logging
    from vmm_tierd.service.runner import Service

    settings = load_settings(args.config)
    cap = check_capacity(settings)
    if cap.errors:
        raise SystemExit("\n".join(cap.errors))
    setup_logging(settings.daemon.log_level)
    svc = Service(settings, config_path=args.config,
                  overrides={"backend": None, "metrics_listen": None, "store_path": None})

    def wait_then_measure() -> None:
        while True:  # the workload starts once the fault server serves
            eng = svc.engine
            g = eng.runners[0].guest if eng is not None and eng.runners else None
            wl = getattr(g, "workload", None)
            if g is not None and wl is not None:
                break
            time.sleep(0.005)
        t0 = time.monotonic()
        spec = wl.spec
        emit({"type": "meta", "mode": "daemon", "spec": dataclasses.asdict(spec) | {
            "pattern": spec.pattern.value}, "pid": os.getpid(),
            "tracking": dataclasses.asdict(settings.tracking),
            "strategy": eng.strategy.value})
        try:
            measure(args, wl, t0, g.region.addr, g.region.length // 4096, svc)
        except BaseException as e:
            emit({"type": "error", "error": f"{type(e).__name__}: {e}"})
            os._exit(1)

    threading.Thread(target=wait_then_measure, name="vsk-sampler", daemon=True).start()
    rc = svc.run()
    emit({"type": "error", "error": f"the daemon exited ({rc}) before the run ended"})
    os._exit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("plain", "daemon"), required=True)
    ap.add_argument("--config", help="daemon mode: the vmm-tierd config file")
    ap.add_argument("--size-mib", type=int, default=1024, help="plain mode: region size")
    ap.add_argument("--ops-per-sec", type=float, default=20000.0,
                    help="plain mode: per-thread pace (0 = unpaced)")
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--window-from", type=float, default=0.0)
    ap.add_argument("--probe-hz", type=float, default=20.0)
    ap.add_argument("--faulter", required=True, help="faulter.so")
    ap.add_argument("--cgroup", default="", help="this process's memory cgroup directory")
    ap.add_argument("--cgroup-version", type=int, default=1)
    ap.add_argument("--zram", default="", help="/sys/block/zramN of the swap device")
    args = ap.parse_args()
    try:
        run_daemon(args) if args.mode == "daemon" else run_plain(args)
    except BaseException as e:
        emit({"type": "error", "error": f"{type(e).__name__}: {e}"})
        os._exit(1)


if __name__ == "__main__":
    main()
