"""Prometheus metrics on an injected registry.

Hot-path counts and latencies arrive through :class:`Metrics` (an engine Observer);
everything derived (sizes, working set, store figures) is read at scrape time by
collectors from ``Engine.region_stats()`` and ``PageStore.stats()``. No metric carries
guest memory contents.
"""

from __future__ import annotations

import errno as _errno
import logging
import math
import platform
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from .. import __version__
from ..kernel.api import PAGE_SIZE, Capabilities
from .httpd import MetricsServer

log = logging.getLogger(__name__)

NS = "vmm_tierd"
FAULT_KINDS = ("store", "zero", "staging", "wake", "rwp", "poison")
HTTP_DROP_REASONS = ("busy", "evicted", "timeout", "bad_request", "accept_failed")
# fault service is ~10-30 µs when all is well; the tail is what matters
FAULT_BUCKETS = (5e-6, 10e-6, 20e-6, 35e-6, 50e-6, 75e-6, 100e-6, 200e-6, 500e-6,
                 1e-3, 2e-3, 5e-3, 10e-3)
CYCLE_BUCKETS = (1e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RegionStatsLike(Protocol):
    name: str
    memtype: str
    guest_bytes: int
    resident_bytes: int
    working_set_bytes: int
    cold_bytes: int
    evicted_bytes: int
    zero_pages: int
    poisoned_pages: int
    cycles: int
    interval_s: float
    last_cycle_s: float
    loop_hold_max_s: float


class VmStatsLike(Protocol):
    """A VM tiered from beside it and the syscalls injected into its VMM."""

    name: str
    pid: int
    inject_stops: int
    inject_calls: int
    inject_pause_total_s: float
    inject_pause_max_s: float
    inject_pause_last_s: float


class StoreStatsLike(Protocol):
    cache_bytes: int
    records: int
    zero_records: int
    raw_records: int
    compressed_bytes: int
    disk_bytes: int
    guest_bytes: int


class Metrics:
    """The engine Observer: counters and histograms updated on the hot path, plus the
    service's own counters (reloads, metrics connections) and the process metrics
    (``process_resident_memory_bytes`` and the rest), all on the injected registry."""

    def __init__(self, registry: CollectorRegistry, regions: Sequence[str] = (),
                 on_cycle: Callable[[str, float], None] | None = None) -> None:
        self.on_cycle = on_cycle
        ProcessCollector(registry=registry)
        self.faults = Counter(f"{NS}_faults", "Faults served, by region and kind "
                              f"({', '.join(FAULT_KINDS)})", ["vm", "region", "kind"],
                              registry=registry)
        self.fault_seconds = Histogram(f"{NS}_fault_service_seconds",
                                       "Time from reading a fault to resolving it",
                                       ["vm", "region", "kind"], buckets=FAULT_BUCKETS,
                                       registry=registry)
        self.evictions = Counter(f"{NS}_evictions", "Guest pages (not bytes) evicted to the "
                                 "store", ["vm", "region"], registry=registry)
        self.refaults = Counter(f"{NS}_refaults", "Evicted guest pages (not bytes) faulted "
                                "back within tracking.refault_window intervals", ["vm", "region"],
                                registry=registry)
        self.prefetched_pages = Counter(f"{NS}_prefetched_pages", "Evicted pages brought "
                                        "back with a faulting neighbour evicted with it "
                                        "(tracking.prefetch_pages), without a fault of "
                                        "their own", ["vm", "region"], registry=registry)
        self.discarded_pages = Counter(f"{NS}_guest_discarded_pages",
                                       "Pages the guest discarded (MADV_DONTNEED/REMOVE, "
                                       "munmap): new memory, their records dropped",
                                       ["vm", "region"], registry=registry)
        self.poisoned_pages = Counter(f"{NS}_poisoned_pages", "Pages that could not be recovered "
                                "and were poisoned (the guest sees a memory error)",
                                ["vm", "region"], registry=registry)
        self.errors = Counter(f"{NS}_errors", "Failed operations, by operation and errno",
                              ["op", "errno"], registry=registry)
        self.cycle_seconds = Histogram(f"{NS}_cycle_seconds", "Duration of a tracking cycle's "
                                       "work (excluding the interval sleep)", ["vm", "region"],
                                       buckets=CYCLE_BUCKETS, registry=registry)
        self.phase_seconds = Histogram(f"{NS}_cycle_phase_seconds", "Duration of each phase "
                                       "of a tracking cycle", ["vm", "region", "phase"],
                                       buckets=CYCLE_BUCKETS, registry=registry)
        self.reloads = Counter(f"{NS}_config_reloads", "SIGHUP reloads applied", [],
                               registry=registry)
        self.reload_failures = Counter(f"{NS}_config_reload_failures", "SIGHUP reloads that "
                                       "failed (file unreadable, invalid or too slow to "
                                       "read); the running settings stayed", [],
                                       registry=registry)
        self.http_dropped = Counter(f"{NS}_metrics_http_dropped_connections", "Metrics "
                                    "connections refused or closed early, by reason (busy: "
                                    "503, evicted: idle when the limit was reached, timeout, "
                                    "bad_request, accept_failed)", ["reason"],
                                    registry=registry)
        for reason in HTTP_DROP_REASONS:
            self.http_dropped.labels(reason)
        for r in regions:  # so every series exists from the first scrape
            self.add_region(r)

    def add_region(self, region: str) -> None:
        v = vm_of(region)
        for kind in FAULT_KINDS:
            self.faults.labels(v, region, kind)
        self.evictions.labels(v, region)
        self.refaults.labels(v, region)
        self.poisoned_pages.labels(v, region)

    # -- Observer
    def fault_served(self, region: str, kind: str, latency_s: float) -> None:
        v = vm_of(region)
        self.faults.labels(v, region, kind).inc()
        self.fault_seconds.labels(v, region, kind).observe(latency_s)

    def evicted(self, region: str, pages: int, guest_bytes: int) -> None:
        self.evictions.labels(vm_of(region), region).inc(pages)

    def refault(self, region: str, pages: int) -> None:
        self.refaults.labels(vm_of(region), region).inc(pages)

    def prefetched(self, region: str, pages: int) -> None:
        self.prefetched_pages.labels(vm_of(region), region).inc(pages)

    def poisoned(self, region: str, pages: int) -> None:
        self.poisoned_pages.labels(vm_of(region), region).inc(pages)

    def discarded(self, region: str, pages: int, dropped: int) -> None:
        self.discarded_pages.labels(vm_of(region), region).inc(pages)

    def error(self, op: str, errno: int) -> None:
        self.errors.labels(op, _errno.errorcode.get(errno, str(errno))).inc()

    def cycle(self, region: str, phase_seconds: dict[str, float], total_s: float) -> None:
        v = vm_of(region)
        self.cycle_seconds.labels(v, region).observe(total_s)
        for phase, s in phase_seconds.items():
            self.phase_seconds.labels(v, region, phase).observe(s)
        if self.on_cycle is not None:
            self.on_cycle(region, total_s)


class StateCollector(Collector):
    """Scrape-time figures: per-region state, the store, tracking settings, build/kernel."""

    def __init__(self, *, region_stats: Callable[[], Sequence[RegionStatsLike]],
                 store_stats: Callable[[], StoreStatsLike] | None,
                 interval: Callable[[], float], capabilities: Capabilities | None,
                 strategy: str, store_reclaimed: int = 0,
                 vm_stats: Callable[[], Sequence[VmStatsLike]] | None = None,
                 store_health: Callable[[], Any] | None = None) -> None:
        self.vm_stats = vm_stats
        self.store_health = store_health
        self.region_stats = region_stats
        self.store_stats = store_stats
        self.interval = interval
        self.capabilities = capabilities
        self.strategy = strategy
        self.store_reclaimed = store_reclaimed

    def describe(self) -> Iterable[Any]:
        return []  # unchecked collector: names vary with what the engine reports

    def collect(self) -> Iterable[Any]:
        yield from self._info()
        yield _gauge("tracking_interval_seconds", "Configured tracking interval (changes on "
                     "SIGHUP reload)", self.interval())
        try:
            regions = list(self.region_stats())
        except Exception:  # a scrape must not take the daemon down; say why in the log
            log.exception("region_stats() failed during a scrape")
            regions = []
        yield from _region_families(regions)
        if self.vm_stats is not None:
            try:
                vms = list(self.vm_stats())
            except Exception:
                log.exception("vm stats failed during a scrape")
                vms = []
            yield from _vm_families(vms)
        if self.store_stats is not None:
            try:
                st = self.store_stats()
            except Exception:
                log.exception("store.stats() failed during a scrape")
            else:
                yield from self._store(st)
        if self.store_health is not None:
            try:
                h = self.store_health()
            except Exception:
                log.exception("store.health() failed during a scrape")
            else:
                yield from _health(h)

    def _info(self) -> Iterable[Any]:
        b = InfoMetricFamily(f"{NS}_build", "vmm-tierd build")
        b.add_metric([], {"version": __version__, "python": platform.python_version()})
        yield b
        caps = self.capabilities
        if caps is not None:
            k = InfoMetricFamily(f"{NS}_kernel", "Kernel backend, granted uffd features and "
                                 "the tiering strategy in use")
            k.add_metric([], {"backend": caps.backend, "release": caps.release,
                              "dialect": caps.dialect.value, "strategy": self.strategy,
                              "features": f"0x{caps.features:x}",
                              "feature_names": ",".join(caps.feature_names)})
            yield k

    def _store(self, st: StoreStatsLike) -> Iterable[Any]:
        yield _gauge("store_records", "Pages held in the store", st.records)
        yield _gauge("store_zero_records", "Store records of all-zero pages (no payload)",
                     st.zero_records)
        yield _gauge("store_raw_records", "Store records kept uncompressed (incompressible)",
                     st.raw_records)
        yield _gauge("store_disk_bytes", "Bytes the LMDB file really uses", st.disk_bytes)
        yield _gauge("store_compressed_bytes", "Payload bytes of live records",
                     st.compressed_bytes)
        yield _gauge("store_guest_bytes", "Guest bytes represented by the store's records",
                     st.guest_bytes)
        payload_pages = st.records - st.zero_records
        ratio = (payload_pages * PAGE_SIZE / st.compressed_bytes if st.compressed_bytes
                 else math.nan)
        yield _gauge("store_compression_ratio", "Guest bytes of non-zero records per payload "
                     "byte (NaN when empty)", ratio)
        yield _gauge("store_reclaimed_records", "Records of earlier instances reclaimed when "
                     "the store was opened", self.store_reclaimed)
        if st.cache_bytes >= 0:
            yield _gauge("store_cache_bytes", "Page cache the store's data file holds (what "
                         "evicting guest pages into it still costs in host memory)",
                         st.cache_bytes)


_REGION_GAUGES = (
    ("guest_bytes", "Size of the guest region"),
    ("resident_bytes", "Guest bytes in memory (not evicted)"),
    ("working_set_bytes", "Guest bytes accessed in the last tracking interval"),
    ("cold_bytes", "Resident guest bytes not accessed for at least one interval"),
    ("evicted_bytes", "Guest bytes evicted to the store"),
    ("zero_pages", "Evicted pages that were all zero"),
    ("poisoned_pages", "Pages currently poisoned"),
    ("last_cycle_seconds", "Duration of the region's last tracking cycle"),
    ("interval_seconds", "Tracking interval the region's cycles run with"),
    ("loop_hold_max_seconds", "Longest stretch of the region's cycle or eviction work on "
                              "the loop that serves faults (faults wait meanwhile)"),
)


def vm_of(region: str) -> str:
    """The VM a region belongs to: regions of another process are named ``VM/ramN``;
    memory of the daemon's own (the demo's) belongs to no VM ("")."""
    return region.split("/", 1)[0] if "/" in region else ""


def _region_families(regions: Sequence[RegionStatsLike]) -> Iterable[Any]:
    attrs = {"last_cycle_seconds": "last_cycle_s", "interval_seconds": "interval_s",
             "loop_hold_max_seconds": "loop_hold_max_s"}
    info = GaugeMetricFamily(f"{NS}_region_info", "Guest regions and their memory type",
                             labels=["vm", "region", "memtype"])
    for r in regions:
        info.add_metric([vm_of(r.name), r.name, str(r.memtype)], 1)
    yield info
    for name, help_text in _REGION_GAUGES:
        fam = GaugeMetricFamily(f"{NS}_region_{name}", help_text, labels=["vm", "region"])
        for r in regions:
            fam.add_metric([vm_of(r.name), r.name], float(getattr(r, attrs.get(name, name))))
        yield fam
    cycles = CounterMetricFamily(f"{NS}_cycles", "Tracking cycles completed",
                                 labels=["vm", "region"])
    for r in regions:
        cycles.add_metric([vm_of(r.name), r.name], r.cycles)
    yield cycles


def _health(h: Any) -> Iterable[Any]:
    yield _gauge("store_writable", "1 while the store can be written; 0 once it can't "
                 "before a restart (directory deleted or replaced, file truncated): "
                 "eviction pauses, faults are still served", 1 if h.writable else 0)
    errs = CounterMetricFamily(f"{NS}_store_errors", "Failed store operations since open, "
                               "by errno", labels=["errno"])
    for name, n in sorted(h.errors.items()):
        errs.add_metric([name], n)
    yield errs
    yield CounterMetricFamily(f"{NS}_store_sigbus", "Faults in LMDB's map of the data file "
                              "(truncated or unreadable) that were contained", value=h.sigbus)


def _vm_families(vms: Sequence[VmStatsLike]) -> Iterable[Any]:
    info = GaugeMetricFamily(f"{NS}_vm_info", "VMs tiered from beside them, with the pid of "
                             "their VMM", labels=["vm", "pid"])
    for v in vms:
        info.add_metric([v.name, str(v.pid)], 1)
    yield info
    stops = CounterMetricFamily(f"{NS}_vm_inject_stops", "Times a VMM thread was stopped to "
                                "run injected syscalls (ptrace)", labels=["vm"])
    calls = CounterMetricFamily(f"{NS}_vm_inject_calls", "Syscalls injected into the VMM",
                                labels=["vm"])
    total = CounterMetricFamily(f"{NS}_vm_inject_pause_seconds", "Time the injected-into "
                                "VMM thread was kept stopped, in all", labels=["vm"])
    worst = GaugeMetricFamily(f"{NS}_vm_inject_pause_max_seconds", "Longest single stop of "
                              "the VMM thread so far", labels=["vm"])
    last = GaugeMetricFamily(f"{NS}_vm_inject_pause_last_seconds", "The last stop of the VMM "
                             "thread", labels=["vm"])
    for v in vms:
        stops.add_metric([v.name], v.inject_stops)
        calls.add_metric([v.name], v.inject_calls)
        total.add_metric([v.name], v.inject_pause_total_s)
        worst.add_metric([v.name], v.inject_pause_max_s)
        last.add_metric([v.name], v.inject_pause_last_s)
    yield from (stops, calls, total, worst, last)


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{NS}_{name}", help_text, value=float(value))


__all__ = ["FAULT_KINDS", "Metrics", "MetricsServer", "StateCollector"]
