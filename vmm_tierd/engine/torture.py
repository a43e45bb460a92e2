"""The torture run behind ``vmm-tierd selftest --torture`` (and the engine's stress tests):
one guest region under the most aggressive settings, for as long as asked, while

- the built-in workload's HAMMER pattern writes the pages just evicted (found absent, as
  a guest feels it) and reads bursts of pages, on top of a hot set;
- scraper threads read the engine's and the store's statistics as fast as they can (what
  a metrics flood does to the loop and the GIL), and a churn thread starts and ends
  short-lived threads (their stacks come and go in the address space);
- the tracking settings are reloaded at random, and (if asked) a share of the store's
  writes fail, so every eviction that hits one is rolled back, and a share of the moves
  back from staging fail EAGAIN, as they do while a guest discard's REMOVE event is
  unread (so rollbacks leave pages in staging, across the next cycles' scans);
- every cycle ends with the invariant checks (invariants.py), and every page transition
  and kernel operation is traced (trace.py) so that a failure prints the page's history;

then every page the workload wrote is verified while the fault server still serves.
"""

from __future__ import annotations

import errno
import logging
import random
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio

from ..kernel import uapi
from ..kernel.api import KernelError, MemType, Pattern, Strategy, VerifyReport, WorkloadSpec
from ..settings import DaemonSettings, RegionSettings, Settings, StoreSettings, TrackingSettings
from .observer import NullObserver
from .store import PageStore, StoreError
from .trace import PageTrace, TracingKernel

log = logging.getLogger("vmm_tierd.engine")
REGION = "torture"


@dataclass(frozen=True)
class TortureSpec:
    backend: str
    memtype: str = "anon"
    seconds: float = 10.0
    size_mib: int = 64
    interval_s: float = 0.05
    threads: int = 2
    strategy: str | None = None  # None: what the backend grants
    scrapers: int = 2
    churn: bool = True
    reloads: bool = True
    fail_puts: float = 0.0  # share of store writes that fail (rollback)
    fail_moves_back: float = 0.0  # share of MOVEs back from staging that fail EAGAIN
    trace: bool = True
    checks: bool = True
    seed: int = 1


@dataclass
class TortureResult:
    backend: str
    memtype: str
    strategy: str = ""
    kernel_release: str = ""
    size_mib: int = 0
    seconds: float = 0.0
    evictions: int = 0
    faults: int = 0
    faults_by_kind: dict[str, int] = field(default_factory=dict)
    refaults: int = 0
    cycles: int = 0
    workload_writes: int = 0
    workload_reads: int = 0
    workload_sigbus: int = 0
    scrapes: int = 0
    reloads: int = 0
    failed_puts: int = 0
    failed_moves_back: int = 0
    pages_verified: int = 0
    lost_writes: int = -1
    corrupt_pages: int = -1
    poisoned_pages: int = -1
    bad_pages: list[int] = field(default_factory=list)
    engine_poisoned: int = 0
    invariant_checks: int = 0
    staging_audits: int = 0
    touch_seconds: float = 0.0  # the first touch of every page, before the clock starts
    violations: list[str] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    graceful_stop: bool = False
    verify_completed: bool = False
    histories: str = ""

    @property
    def ok(self) -> bool:
        return (self.verify_completed and self.lost_writes == 0 and self.corrupt_pages == 0
                and self.poisoned_pages == 0 and self.engine_poisoned == 0
                and not self.violations and self.graceful_stop)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


class FlakyStore(PageStore):
    """A PageStore whose writes fail (before anything is written) with probability
    ``fail_puts``: each such eviction batch is rolled back."""

    fail_puts = 0.0
    failed = 0

    def put_batch(self, region: int, pages: np.ndarray,
                  data: bytes | bytearray | memoryview) -> Any:
        if self.fail_puts and random.random() < self.fail_puts:
            self.failed += 1
            raise StoreError(f"{self.path}: injected write failure (torture)")
        return super().put_batch(region, pages, data)


class FlakyMoves:
    """The backend, with a share ``p`` of the MOVEs back into the guest (the ones that
    wake; the evictor's moves out don't) failing EAGAIN."""

    def __init__(self, kernel: Any, p: float) -> None:
        self._k = kernel
        self.p = p
        self.failed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._k, name)

    def uffd_move(self, fd: int, dst: int, src: int, length: int, mode: int = 0) -> int:
        if self.p and not mode & uapi.UFFDIO_MOVE_MODE_DONTWAKE and random.random() < self.p:
            self.failed += 1
            raise KernelError("UFFDIO_MOVE", errno.EAGAIN, 0, "injected (torture)")
        return int(self._k.uffd_move(fd, dst, src, length, mode))


class ErrorCounter(NullObserver):
    """The observer: error counts by (op, errno) for the summary; nothing else."""

    def __init__(self) -> None:
        self.errors: dict[str, int] = {}

    def error(self, op: str, err: int) -> None:
        key = f"{op}:{err}"
        self.errors[key] = self.errors.get(key, 0) + 1


def _settings(spec: TortureSpec, store_dir: Path) -> Settings:
    wl = WorkloadSpec(pattern=Pattern.HAMMER, threads=spec.threads, hot_fraction=0.05,
                      write_fraction=0.7, touch_all_first=True, zero_fraction=0.05,
                      seed=spec.seed & 0xFFFF)
    return Settings(
        daemon=DaemonSettings(backend=spec.backend, shutdown_deadline_s=120.0),
        store=StoreSettings(path=store_dir, sync="none"),
        tracking=_tracking(spec.interval_s),
        regions=(RegionSettings(name=REGION, size_bytes=spec.size_mib << 20,
                                memtype=MemType(spec.memtype), workload=wl),),
        source="<torture>")


def _tracking(interval_s: float) -> TrackingSettings:
    # min_age 1 and no refault hold: a page is evicted again the interval after it came
    # back, so the writers keep hitting pages in mid-eviction.
    return TrackingSettings(interval_s=interval_s, min_age=1, budget_pages=0,
                            refault_window=3, refault_hold=0)


def _scrape(engine: Any, store: PageStore, token: trio.lowlevel.TrioToken,
            stop: threading.Event, counts: list[int]) -> None:
    while not stop.is_set():
        try:
            trio.from_thread.run_sync(engine.region_stats, trio_token=token)
            store.stats()
        except (trio.RunFinishedError, trio.Cancelled, RuntimeError):
            return
        counts[0] += 1
        time.sleep(0)


def _churn(stop: threading.Event) -> None:
    while not stop.is_set():
        ts = [threading.Thread(target=lambda: bytearray(1 << 16)) for _ in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()


async def _reload(engine: Any, spec: TortureSpec, rng: random.Random,
                  counts: list[int]) -> None:
    while True:
        await trio.sleep(rng.uniform(0.5, 2.0))
        engine.update_tracking(_tracking(spec.interval_s * rng.choice((0.5, 1, 1, 2))))
        counts[0] += 1


async def _run(spec: TortureSpec, kernel: Any, engine_kernel: Any, tk: TracingKernel | None,
               flaky: FlakyMoves | None, store: FlakyStore, out: TortureResult) -> None:
    from .engine import Engine
    from .guest import LocalGuest

    obs = ErrorCounter()
    settings = _settings(spec, store.path)
    strategy = Strategy(spec.strategy) if spec.strategy else None
    engine = Engine(engine_kernel, settings, store=store, observer=obs, strategy=strategy,
                    guest_side=kernel)
    runner = engine.runners[0]
    trace = PageTrace(REGION) if spec.trace else None
    if trace is not None and tk is not None:
        runner.trace = trace
        tk.add(trace)
    runner.debug_checks = spec.checks
    stop = threading.Event()
    scrapes, reloads = [0], [0]
    threads: list[threading.Thread] = []
    report: VerifyReport | None = None
    async with trio.open_nursery() as n:
        t0 = time.perf_counter()
        await n.start(engine.run)
        token = trio.lowlevel.current_trio_token()
        threads = [threading.Thread(target=_scrape, args=(engine, store, token, stop, scrapes),
                                    daemon=True, name=f"scrape-{i}")
                   for i in range(spec.scrapers)]
        if spec.churn:
            threads.append(threading.Thread(target=_churn, args=(stop,), daemon=True,
                                            name="churn"))
        for t in threads:
            t.start()
        guest = runner.guest
        assert isinstance(guest, LocalGuest) and guest.workload is not None
        wl = guest.workload
        # The asked-for seconds are the hammer's: the first touch of every page (one zero
        # fault each, 65,536 for 256 MiB) took 8-19 s on loaded machines, and a run that
        # ended inside it had hammered nothing.
        t_touch = time.perf_counter()
        with trio.move_on_after(max(120.0, spec.seconds * 10)):
            while not wl.touched():
                await trio.sleep(0.05)
        out.touch_seconds = round(time.perf_counter() - t_touch, 2)
        async with trio.open_nursery() as during:
            if spec.reloads:
                during.start_soon(_reload, engine, spec, random.Random(spec.seed), reloads)
            store.fail_puts = spec.fail_puts
            if flaky is not None:
                flaky.p = spec.fail_moves_back
            await trio.sleep(spec.seconds)
            store.fail_puts = 0.0
            if flaky is not None:
                flaky.p = 0.0
                out.failed_moves_back = flaky.failed
            during.cancel_scope.cancel()
        stop.set()
        await guest.stop()
        out.seconds = round(time.perf_counter() - t0, 2)
        with trio.move_on_after(max(300.0, spec.seconds * 4)):
            report = await trio.to_thread.run_sync(wl.verify, abandon_on_cancel=True)
        if runner.invariants is not None:
            runner.invariants.check()
        stats = engine.region_stats()[0]
        wstats = wl.stats()
        out.strategy = engine.strategy.value
        out.kernel_release = engine.capabilities.release
        out.evictions, out.faults_by_kind = stats.evictions_total, dict(stats.faults)
        out.faults = sum(stats.faults.values())
        out.refaults, out.cycles = stats.refaults_total, stats.cycles
        out.engine_poisoned = stats.poisoned_total
        out.workload_writes, out.workload_reads = wstats.writes, wstats.reads
        out.workload_sigbus = wstats.sigbus
        engine.request_stop()
    for t in threads:
        t.join(10)
    out.graceful_stop = engine.graceful
    out.scrapes, out.reloads, out.failed_puts = scrapes[0], reloads[0], store.failed
    out.errors = obs.errors
    inv = runner.invariants
    if inv is not None:
        out.invariant_checks, out.staging_audits = inv.checks, inv.audits
        out.violations = [str(v) for v in inv.violations]
    if report is not None:
        out.verify_completed = True
        out.pages_verified, out.lost_writes = report.pages, report.lost_writes
        out.corrupt_pages, out.poisoned_pages = report.corrupt_pages, report.poisoned_pages
        out.bad_pages = list(report.bad)
    if trace is not None:
        bad = out.bad_pages + [p for v in (inv.violations if inv else []) for p in v.pages]
        if bad:
            out.histories = trace.format_histories(sorted(set(bad))[:16])


def run_torture(spec: TortureSpec, store_dir: Path | None = None) -> TortureResult:
    """One backend x memory type; blocks for the first touch, ``spec.seconds``, the verify."""
    from ..kernel import open_kernel

    out = TortureResult(backend=spec.backend, memtype=spec.memtype, size_mib=spec.size_mib)
    kernel = open_kernel(spec.backend)
    flaky = FlakyMoves(kernel, 0.0) if spec.fail_moves_back else None
    inner: Any = flaky or kernel
    tk = TracingKernel(inner) if spec.trace else None
    with tempfile.TemporaryDirectory(prefix="vmm-tierd-torture-") as tmp:
        path = store_dir or Path(tmp) / "store"
        store = FlakyStore(path, map_size=8 << 30, sync="none")
        try:
            trio.run(_run, spec, kernel, tk.as_kernel() if tk is not None else inner, tk,
                     flaky, store, out)
        finally:
            store.close()
            kernel.close()
    return out
