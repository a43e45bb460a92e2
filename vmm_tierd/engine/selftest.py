"""``vmm-tierd selftest``: one guest region under aggressive settings with writers hammering
the pages being evicted; then every page is verified while the fault server still serves.
``--torture``: the same, harder and for as long as asked, on every backend and memory type
asked for (torture.py, torture_cli.py)."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import trio

from ..kernel.api import MemType, Pattern, Strategy, VerifyReport, WorkloadSpec
from ..settings import DaemonSettings, RegionSettings, Settings, StoreSettings, TrackingSettings
from .guest import LocalGuest
from .observer import NullObserver

REGION = "selftest"


class RecordingObserver(NullObserver):
    """Keeps fault latencies and error counts for the summary."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.poisoned_count = 0

    def fault_served(self, region: str, kind: str, latency_s: float) -> None:
        self.latencies.append(latency_s)

    def poisoned(self, region: str, pages: int) -> None:
        self.poisoned_count += pages

    def error(self, op: str, errno: int) -> None:
        key = f"{op}:{errno}"
        self.errors[key] = self.errors.get(key, 0) + 1

    def percentiles_us(self) -> dict[str, float]:
        if not self.latencies:
            return {}
        a = np.asarray(self.latencies) * 1e6
        return {"p50": round(float(np.percentile(a, 50)), 1),
                "p99": round(float(np.percentile(a, 99)), 1),
                "max": round(float(a.max()), 1)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    # the same bounds and messages as the config file's keys (service/rules.py)
    from ..service import rules
    from .torture_cli import BACKENDS, MEMTYPES, STRATEGIES, listed

    p.add_argument("--backend", default=("linux",), type=listed("backend", BACKENDS),
                   metavar="NAME", help="kernel backend: linux, fake (= fake-rwp), fake-rwp, "
                   "fake-rfc; with --torture a comma-separated list, or all (default: linux)")
    p.add_argument("--seconds", type=rules.arg_type(rules.SECONDS), default=10.0,
                   metavar="N", help="how long the workload runs before the verification "
                   "(a positive duration; with --torture: per backend and memory type; "
                   "default: 10)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--size-mib", type=rules.arg_type(rules.SIZE_MIB), default=None,
                   metavar="MIB", help="size of the guest region in MiB (default: 64; "
                   "--torture: 256 on linux, 8 on the fakes, whose vCPUs are Python)")
    p.add_argument("--memtype", default=("anon",), type=listed("memtype", MEMTYPES),
                   metavar="TYPE", help="guest memory type, as region.memtype: anon or "
                   "memfd; with --torture a list, or all (default: anon)")
    p.add_argument("--store", type=Path, default=None, metavar="DIR",
                   help="store directory (default: a temporary one, removed afterwards)")
    p.add_argument("--interval", type=rules.arg_type(rules.INTERVAL), default=None,
                   metavar="DURATION", help="tracking interval, as tracking.interval "
                   "(10ms - 1h; default: 100ms, --torture: 50ms)")
    p.add_argument("--strategy", default=None, type=listed("strategy", STRATEGIES),
                   metavar="NAME", help="force a strategy, rwp or wp (default: what the "
                   "kernel grants); with --torture a list: each one the backend can run")
    p.add_argument("--threads", type=rules.arg_type(rules.WORKLOAD_THREADS), default=2,
                   metavar="N", help="workload threads, as region.workload.threads "
                   "(1 - 64; default: 2)")
    p.add_argument("--torture", action="store_true",
                   help="the torture: HAMMER writers on the pages being evicted, read "
                   "bursts, stats scrapers, thread churn, random reloads, invariant checks "
                   "after every cycle and a page trace; a summary per backend x memory "
                   "type; exit 1 on any lost, corrupt or poisoned page or broken invariant")
    p.add_argument("--fail-puts", type=float, default=0.0, metavar="FRACTION",
                   help="--torture: this share of the store's writes fail (each such "
                   "eviction is rolled back; default: 0)")
    p.add_argument("--fail-moves-back", type=float, default=0.0, metavar="FRACTION",
                   help="--torture: this share of the moves back from staging fail EAGAIN, "
                   "as while a guest discard's event is unread (default: 0)")
    p.add_argument("--no-trace", action="store_true",
                   help="--torture: no page trace (faster; a failure prints no history)")


def selftest_settings(args: argparse.Namespace, store_dir: Path) -> Settings:
    """For one backend and memory type (``args.backend``, ``args.memtype``: strings)."""
    spec = WorkloadSpec(pattern=Pattern.SHIFTING, threads=args.threads, hot_fraction=0.1,
                        write_fraction=0.6, shift_period_s=1.0, touch_all_first=True,
                        zero_fraction=0.05, seed=int(time.time()) & 0xFFFF)
    return Settings(
        daemon=DaemonSettings(backend=args.backend, shutdown_deadline_s=60.0),
        store=StoreSettings(path=store_dir, sync="none"),
        tracking=TrackingSettings(interval_s=args.interval, min_age=1, refault_window=3,
                                  refault_hold=2),
        regions=(RegionSettings(name=REGION, size_bytes=args.size_mib << 20,
                                memtype=MemType(args.memtype), workload=spec),),
        source="<selftest>")


async def _run(args: argparse.Namespace, kernel: Any, settings: Settings, store: Any,
               obs: RecordingObserver) -> dict[str, Any]:
    from .engine import Engine

    strategy = Strategy(args.strategy) if args.strategy else None
    engine = Engine(kernel, settings, store=store, observer=obs, strategy=strategy,
                    guest_side=kernel)
    out: dict[str, Any] = {}
    async with trio.open_nursery() as n:
        t0 = time.perf_counter()
        await n.start(engine.run)
        await trio.sleep(args.seconds)
        guest = engine.runners[0].guest
        assert isinstance(guest, LocalGuest)
        wl = guest.workload
        assert wl is not None
        wstats = wl.stats()
        await guest.stop()
        busy_s = time.perf_counter() - t0
        stats = engine.region_stats()[0]
        sstats = store.stats()
        t1 = time.perf_counter()
        report: VerifyReport | None = None
        with trio.move_on_after(max(120.0, args.seconds * 4)):
            report = await trio.to_thread.run_sync(wl.verify, abandon_on_cancel=True)
        verify_s = time.perf_counter() - t1
        final = engine.region_stats()[0]
        engine.request_stop()
    nfaults = sum(stats.faults.values())
    out.update(
        backend=kernel.name, kernel_release=engine.capabilities.release,
        strategy=engine.strategy.value, memtype=args.memtype, size_mib=args.size_mib,
        seconds=round(busy_s, 2), interval_s=args.interval,
        evictions=stats.evictions_total, faults=nfaults, faults_by_kind=stats.faults,
        refaults=stats.refaults_total, cycles=stats.cycles,
        evictions_per_s=round(stats.evictions_total / busy_s, 1),
        faults_per_s=round(nfaults / busy_s, 1),
        fault_latency_us=obs.percentiles_us(),
        workload_reads=wstats.reads, workload_writes=wstats.writes,
        store_records=sstats.records, store_compressed_bytes=sstats.compressed_bytes,
        store_disk_bytes=sstats.disk_bytes,
        verify_seconds=round(verify_s, 2), verify_faults=sum(final.faults.values()) - nfaults,
        pages_verified=report.pages if report else 0,
        lost_writes=report.lost_writes if report else -1,
        corrupt_pages=report.corrupt_pages if report else -1,
        poisoned_pages=report.poisoned_pages if report else -1,
        bad_pages=report.bad[:10] if report else [],
        engine_poisoned=final.poisoned_pages, errors=obs.errors,
        graceful_stop=engine.graceful, verify_completed=report is not None)
    return out


def run_selftest(args: argparse.Namespace) -> dict[str, Any]:
    from ..kernel import open_kernel
    from .store import PageStore

    tmp = None
    store_dir = args.store
    if store_dir is None:
        tmp = tempfile.mkdtemp(prefix="vmm-tierd-selftest-")
        store_dir = Path(tmp) / "store"
    kernel = open_kernel(args.backend)
    try:
        settings = selftest_settings(args, store_dir)
        store = PageStore(store_dir, map_size=settings.store.map_size_bytes,
                          zstd_level=settings.store.zstd_level, sync=settings.store.sync)
        try:
            return trio.run(_run, args, kernel, settings, store, RecordingObserver())
        finally:
            store.close()
    finally:
        kernel.close()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.torture:
        from .torture_cli import main_torture

        return main_torture(args)
    for name in ("backend", "memtype", "strategy"):
        v = getattr(args, name)
        if v is not None and len(v) != 1:
            print(f"vmm-tierd selftest: error: argument --{name}: one value (a list or "
                  "all needs --torture)", file=sys.stderr)
            return 2
        setattr(args, name, v[0] if v is not None else None)
    args.size_mib = args.size_mib or 64
    args.interval = args.interval or 0.1
    out = run_selftest(args)
    ok = (out["verify_completed"] and out["lost_writes"] == 0 and out["corrupt_pages"] == 0)
    out["ok"] = bool(ok)
    if args.json:
        print(json.dumps(out, indent=2, default=lambda o: asdict(o)))
    else:
        lat = out["fault_latency_us"]
        print(f"selftest {out['backend']} ({out['kernel_release']}), strategy {out['strategy']}, "
              f"{out['memtype']} {out['size_mib']} MiB, {out['seconds']} s")
        print(f"  evictions {out['evictions']} ({out['evictions_per_s']}/s), faults "
              f"{out['faults']} ({out['faults_per_s']}/s) {out['faults_by_kind']}, "
              f"refaults {out['refaults']}, cycles {out['cycles']}")
        print(f"  fault latency p50 {lat.get('p50')} us, p99 {lat.get('p99')} us")
        print(f"  verified {out['pages_verified']} pages: lost_writes {out['lost_writes']}, "
              f"corrupt {out['corrupt_pages']}, poisoned {out['poisoned_pages']}")
        print("  OK" if ok else "  FAILED")
    return 0 if ok else 1
