"""Fault-path latency with and without a scrape flood, from the daemon's own histogram.

A real ``vmm-tierd run`` (linux backend, 64 MiB anon region, built-in workload, 100 ms
interval, min_age 1: a steady stream of evictions and faults) is measured over two
windows of equal length, one after the other:
- quiet: nothing but one scrape at each end of the window;
- flood: 300 slow-loris connections held open plus back-to-back bursts of 1,000 parallel
  scrapes on loopback (tests/service/svc_floods.py), for the whole window, from a
  process of its own at nice 19: on two shared cores the flood client's own CPU use
  would otherwise be what is measured, not the daemon's.
The p99 of ``vmm_tierd_fault_service_seconds`` is read from the difference of the bucket
counts at the window's ends (linear within a bucket, as Prometheus' histogram_quantile).
The exposition is cached for 1 s, so each window's ends are known to within 1 s.
Printed, not asserted (see run.py):

    .venv/bin/python benchmarks/bench_metrics_flood.py [--quick] [--backend fake]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
for p in (HERE.parent / "tests" / "service", HERE.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from svc_floods import threads_of  # noqa: E402
from svc_helpers import Daemon, Samples  # noqa: E402

CONFIG = """
[daemon]
log_level = "warning"
metrics_listen = "127.0.0.1:0"
shutdown_deadline = "30s"
[store]
path = "{store}"
map_size = "1GiB"
[tracking]
interval = "100ms"
min_age = 1
[[region]]
name = "vm0"
size = "64MiB"
[region.workload]
threads = 2
hot_fraction = 0.2
ops_per_sec = 5000
shift_period = "1s"
"""


def scrape(d: Daemon, timeout_s: float = 60.0) -> Samples:
    """A scrape as Prometheus would make it, retried while the flood takes the endpoint."""
    end = time.monotonic() + timeout_s
    while True:
        try:
            return d.scrape()
        except (urllib.error.URLError, OSError):
            if time.monotonic() > end:
                raise
            time.sleep(0.2)


def buckets(m: Samples) -> dict[float, float]:
    """Cumulative fault count per upper bound, summed over the fault kinds."""
    out: dict[float, float] = {}
    for labels, v in m.get("vmm_tierd_fault_service_seconds_bucket", []):
        if labels.get("region") == "vm0":
            le = float(labels["le"])
            out[le] = out.get(le, 0.0) + v
    return out


def quantile(q: float, before: dict[float, float], after: dict[float, float]
             ) -> tuple[float, float]:
    """(q-quantile in seconds, number of faults) of the faults between two snapshots."""
    bounds = sorted(after)
    cum = [after[b] - before.get(b, 0.0) for b in bounds]
    total = cum[-1] if cum else 0.0
    if total <= 0:
        return float("nan"), 0.0
    rank = q * total
    lo_bound, lo_cum = 0.0, 0.0
    for b, c in zip(bounds, cum, strict=True):
        if c >= rank:
            if b == float("inf"):
                return lo_bound, total  # beyond the last finite bucket: its bound
            return lo_bound + (b - lo_bound) * (rank - lo_cum) / max(c - lo_cum, 1e-12), total
        lo_bound, lo_cum = b, c
    return float("nan"), total


def _flood(url: str, seconds: float, nice: int) -> subprocess.Popen[str]:
    """The floods in their own process (niced: on two shared cores the flood client's
    own CPU use would otherwise dominate what is measured here)."""
    return subprocess.Popen([sys.executable, str(HERE.parent / "tests" / "service" /
                                                 "svc_floods.py"), url, str(seconds)],
                            stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.nice(nice))


def _tally(line: str) -> Counter[str]:
    return Counter({k: int(v) for k, v in (kv.split("=") for kv in line.split())})


def measure(backend: str, window_s: float, nice: int = 19) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vmm-tierd-bench-flood-") as tmp:
        cfg = Path(tmp) / "c.toml"
        cfg.write_text(CONFIG.format(store=Path(tmp) / "store"))
        d = Daemon(["--config", str(cfg), "--backend", backend])
        try:
            d.url = d.wait_for(r"metrics at (http://\S+)", 60).group(1)
            time.sleep(3.0)  # past the workload's first touch of every page
            base_threads = threads_of(d.proc.pid)
            b0 = buckets(scrape(d))
            time.sleep(window_s)
            q1 = buckets(scrape(d))
            flood = _flood(d.url, window_s + 2.0, nice)
            time.sleep(1.0)  # the floods are under way
            b1 = buckets(scrape(d))
            peak = base_threads
            t_end = time.monotonic() + window_s
            while time.monotonic() < t_end:
                peak = max(peak, threads_of(d.proc.pid))
                time.sleep(0.1)
            b2 = buckets(scrape(d))  # a normal scrape during the flood
            out, _ = flood.communicate(timeout=120)
            tally = _tally(out.strip())
            alive = d.proc.poll() is None
        finally:
            rc = d.stop()
    p99_quiet, n_quiet = quantile(0.99, b0, q1)
    p99_flood, n_flood = quantile(0.99, b1, b2)
    p50_quiet, _ = quantile(0.5, b0, q1)
    p50_flood, _ = quantile(0.5, b1, b2)
    return {"p99_quiet_us": p99_quiet * 1e6, "p99_flood_us": p99_flood * 1e6,
            "p50_quiet_us": p50_quiet * 1e6, "p50_flood_us": p50_flood * 1e6,
            "faults_quiet": n_quiet, "faults_flood": n_flood, "threads_base": base_threads,
            "threads_peak": peak, "scrapes": dict(tally), "alive": alive, "exit": rc}


def bench_metrics_flood(quick: bool, backend: str | None = None) -> dict[str, Any]:
    if backend is None:
        backend = "linux" if os.path.exists("/dev/userfaultfd") and os.geteuid() == 0 \
            else "fake"
    r = measure(backend, 4.0 if quick else 15.0)
    served = r["scrapes"].get("200", 0)
    refused = sum(v for k, v in r["scrapes"].items() if k != "200")
    note = (f"{backend} backend; flood scrapes served {served}, refused/closed {refused}; "
            f"daemon alive {r['alive']}, exit {r['exit']}")
    return {
        "fault p99 quiet": {"value": round(r["p99_quiet_us"], 1), "unit": "µs",
                            "note": note},
        "fault p99 flood": {"value": round(r["p99_flood_us"], 1), "unit": "µs",
                            "ref": round(r["p99_quiet_us"], 1), "ref_name": "quiet"},
        "fault p50 quiet": {"value": round(r["p50_quiet_us"], 1), "unit": "µs"},
        "fault p50 flood": {"value": round(r["p50_flood_us"], 1), "unit": "µs",
                            "ref": round(r["p50_quiet_us"], 1), "ref_name": "quiet"},
        "faults in quiet window": r["faults_quiet"],
        "faults in flood window": r["faults_flood"],
        "daemon threads peak": {"value": r["threads_peak"], "ref": r["threads_base"],
                                "ref_name": "before the flood"},
        "flood scrapes served": served,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--backend", choices=("linux", "fake"), default=None)
    a = ap.parse_args()
    for k, v in bench_metrics_flood(a.quick, a.backend).items():
        print(f"{k}: {v}")
