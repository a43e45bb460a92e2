"""Metrics on an injected registry, served over real HTTP and parsed back."""

from __future__ import annotations

import math
import urllib.request
from dataclasses import dataclass, field

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from vmm_tierd.kernel.api import Capabilities, Dialect, Strategy
from vmm_tierd.service.metrics import FAULT_KINDS, Metrics, MetricsServer, StateCollector


@dataclass
class FakeRegionStats:
    name: str
    memtype: str = "anon"
    guest_bytes: int = 64 << 20
    resident_bytes: int = 48 << 20
    working_set_bytes: int = 8 << 20
    cold_bytes: int = 40 << 20
    evicted_bytes: int = 16 << 20
    zero_pages: int = 7
    poisoned_pages: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    evictions_total: int = 0
    refaults_total: int = 0
    cycles: int = 5
    interval_s: float = 0.5
    last_cycle_s: float = 0.01
    loop_hold_max_s: float = 0.002


@dataclass
class FakeStoreStats:
    records: int = 4096
    zero_records: int = 96
    raw_records: int = 3
    compressed_bytes: int = 4000 * 1024
    disk_bytes: int = 40 << 20
    guest_bytes: int = 4096 * 4096
    cache_bytes: int = -1  # not measured


CAPS = Capabilities(backend="fake-rwp", release="fake", dialect=Dialect.RWP, features=0x7FFFF,
                    ioctls=0x3FF, feature_names=("RWP", "RWP_ASYNC"), strategy=Strategy.RWP,
                    reason="test")


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def one(m: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    vals = [v for lab, v in m[name] if all(lab.get(k) == x for k, x in labels.items())]
    assert len(vals) == 1, (name, labels, m.get(name))
    return vals[0]


def test_scrape_over_http_parses_with_every_family() -> None:
    registry = CollectorRegistry()
    cycles_seen: list[str] = []
    metrics = Metrics(registry, ["g0", "g1"], on_cycle=lambda r, s: cycles_seen.append(r))
    regions = [FakeRegionStats("g0"), FakeRegionStats("g1", memtype="memfd", cycles=9)]
    interval = [0.5]
    registry.register(StateCollector(region_stats=lambda: regions,
                                     store_stats=FakeStoreStats, interval=lambda: interval[0],
                                     capabilities=CAPS, strategy="rwp", store_reclaimed=12))
    metrics.fault_served("g0", "store", 12e-6)
    metrics.fault_served("g0", "store", 30e-6)
    metrics.fault_served("g1", "zero", 3e-3)
    metrics.fault_served("g1", "poison", 40e-6)
    metrics.evicted("g0", 100, 100 * 4096)
    metrics.refault("g0", 4)
    metrics.poisoned("g1", 1)
    metrics.error("UFFDIO_COPY", 11)
    metrics.cycle("g0", {"scan": 0.002, "evict": 0.01}, 0.015)
    assert cycles_seen == ["g0"]

    server = MetricsServer(registry, "127.0.0.1", 0, cache_s=0)
    try:
        assert server.port != 0 and server.url == f"http://127.0.0.1:{server.port}/metrics"
        m = scrape(server.url)
        interval[0] = 2.0  # a reload: visible at the next scrape (no cache here)
        m2 = scrape(server.url)
    finally:
        server.close()

    assert one(m, "vmm_tierd_faults_total", region="g0", kind="store") == 2
    assert one(m, "vmm_tierd_faults_total", region="g1", kind="zero") == 1
    assert one(m, "vmm_tierd_faults_total", region="g1", kind="poison") == 1
    assert one(m, "vmm_tierd_faults_total", region="g0", kind="poison") == 0  # pre-created
    # the daemon's own memory, from ProcessCollector on the injected registry
    assert one(m, "process_resident_memory_bytes") > 0
    assert one(m, "process_open_fds") > 0
    assert one(m, "vmm_tierd_config_reload_failures_total") == 0
    assert one(m, "vmm_tierd_metrics_http_dropped_connections_total", reason="busy") == 0
    for r in ("g0", "g1"):  # pre-created, so absent faults still read 0
        for kind in FAULT_KINDS:
            assert ("vmm_tierd_faults_total" in m and one(m, "vmm_tierd_faults_total",
                                                          region=r, kind=kind) >= 0)
    # microsecond buckets: 12 µs and 30 µs land below 35 µs, 3 ms does not
    assert one(m, "vmm_tierd_fault_service_seconds_bucket", region="g0", kind="store",
               le="3.5e-05") == 2
    assert one(m, "vmm_tierd_fault_service_seconds_bucket", region="g0", kind="store",
               le="1e-05") == 0
    assert one(m, "vmm_tierd_fault_service_seconds_bucket", region="g1", kind="zero",
               le="0.002") == 0
    assert one(m, "vmm_tierd_fault_service_seconds_bucket", region="g1", kind="zero",
               le="0.005") == 1
    assert one(m, "vmm_tierd_evictions_total", region="g0") == 100
    assert one(m, "vmm_tierd_refaults_total", region="g0") == 4
    assert one(m, "vmm_tierd_poisoned_pages_total", region="g1") == 1
    assert one(m, "vmm_tierd_errors_total", op="UFFDIO_COPY", errno="EAGAIN") == 1
    assert one(m, "vmm_tierd_cycle_seconds_count", region="g0") == 1
    assert one(m, "vmm_tierd_cycle_phase_seconds_count", region="g0", phase="scan") == 1
    assert one(m, "vmm_tierd_region_guest_bytes", region="g1") == 64 << 20
    assert one(m, "vmm_tierd_region_resident_bytes", region="g0") == 48 << 20
    assert one(m, "vmm_tierd_region_working_set_bytes", region="g0") == 8 << 20
    assert one(m, "vmm_tierd_region_cold_bytes", region="g0") == 40 << 20
    assert one(m, "vmm_tierd_region_evicted_bytes", region="g0") == 16 << 20
    assert one(m, "vmm_tierd_region_zero_pages", region="g0") == 7
    assert one(m, "vmm_tierd_region_info", region="g1", memtype="memfd") == 1
    assert one(m, "vmm_tierd_cycles_total", region="g1") == 9
    assert one(m, "vmm_tierd_store_records") == 4096
    assert one(m, "vmm_tierd_store_disk_bytes") == 40 << 20
    assert one(m, "vmm_tierd_store_compressed_bytes") == 4000 * 1024
    assert one(m, "vmm_tierd_store_compression_ratio") == (4096 - 96) * 4096 / (4000 * 1024)
    assert one(m, "vmm_tierd_store_reclaimed_records") == 12
    info = m["vmm_tierd_kernel_info"][0][0]
    assert info["strategy"] == "rwp" and info["features"] == "0x7ffff"
    assert info["backend"] == "fake-rwp" and "RWP_ASYNC" in info["feature_names"]
    assert "version" in m["vmm_tierd_build_info"][0][0]
    assert one(m, "vmm_tierd_tracking_interval_seconds") == 0.5
    assert one(m2, "vmm_tierd_tracking_interval_seconds") == 2.0
    # nothing went to the process-global registry (ProcessCollector included)
    assert not [n for n in prometheus_client.REGISTRY._names_to_collectors
                if n.startswith("vmm_tierd")]
    assert metrics is not None


def help_texts(url: str) -> dict[str, str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return {fam.name: fam.documentation for fam in text_string_to_metric_families(text)}


def test_help_says_pages_and_lists_every_fault_kind() -> None:
    registry = CollectorRegistry()
    Metrics(registry, ["g0"])
    server = MetricsServer(registry, "127.0.0.1", 0)
    try:
        h = help_texts(server.url)
    finally:
        server.close()
    assert "pages (not bytes)" in h["vmm_tierd_evictions"]
    assert "pages (not bytes)" in h["vmm_tierd_refaults"]
    assert all(kind in h["vmm_tierd_faults"] for kind in FAULT_KINDS)
    assert "poison" in FAULT_KINDS


def test_scrapes_within_cache_s_reuse_one_exposition() -> None:
    registry = CollectorRegistry()
    interval = [0.5]
    registry.register(StateCollector(region_stats=list, store_stats=None,
                                     interval=lambda: interval[0], capabilities=None,
                                     strategy="wp"))
    server = MetricsServer(registry, "127.0.0.1", 0, cache_s=3600)
    try:
        first = scrape(server.url)
        interval[0] = 9.0
        again = [scrape(server.url) for _ in range(20)]
        assert server.generated == 1
        assert all(one(m, "vmm_tierd_tracking_interval_seconds") == 0.5 for m in again)
        assert one(first, "vmm_tierd_tracking_interval_seconds") == 0.5
        server.cache_s = 0
        assert one(scrape(server.url), "vmm_tierd_tracking_interval_seconds") == 9.0
        assert server.generated == 2
    finally:
        server.close()


def test_empty_store_ratio_is_nan_and_failing_sources_do_not_break_scrapes() -> None:
    registry = CollectorRegistry()
    Metrics(registry, ["g0"])

    def broken() -> list[FakeRegionStats]:
        raise RuntimeError("engine gone")

    registry.register(StateCollector(
        region_stats=broken,
        store_stats=lambda: FakeStoreStats(records=0, zero_records=0, raw_records=0,
                                           compressed_bytes=0, disk_bytes=8192, guest_bytes=0),
        interval=lambda: 3.0, capabilities=None, strategy="wp"))
    server = MetricsServer(registry, "127.0.0.1", 0)
    try:
        m = scrape(server.url)
    finally:
        server.close()
    assert math.isnan(one(m, "vmm_tierd_store_compression_ratio"))
    assert "vmm_tierd_region_guest_bytes" not in m
    assert one(m, "vmm_tierd_faults_total", region="g0", kind="store") == 0
