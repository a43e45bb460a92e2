"""`benchmarks/run.py --quick --json` runs and reports every figure next to its reference.

No timing asserts: only that each figure is there, is a finite positive number, and that
the figures the issue asks for carry their reference."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 300

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.path.exists("/dev/userfaultfd")
    or os.geteuid() != 0,
    reason="the benchmarks drive the real kernel's userfaultfd as root")

# (benchmark entry, figure) -> must it carry a reference?
REQUIRED = {
    ("bench_faults:bench_faults", "fault p50"): True,
    ("bench_faults:bench_faults", "fault p99"): True,
    ("bench_faults:bench_faults", "faults/s 1 thread"): True,
    ("bench_faults:bench_faults", "faults/s 2 threads"): True,
    ("bench_faults:bench_faults", "fault p50 engine/C"): False,
    ("bench_cycle:bench_cycle", "cycle ms/GiB"): True,
    ("bench_cycle:bench_cycle", "cycle / kernel scan"): False,
    ("bench_cycle:bench_cycle", "PAGEMAP_SCAN WP_MATCHING ms/GiB"): True,
    ("bench_cycle:bench_cycle", "tracking part ms/GiB with evictions"): True,
    ("bench_store:bench_eviction", "put_batch MB/s sync=commit"): True,
    ("bench_store:bench_eviction", "disk bytes/page"): True,
    ("bench_store:bench_policy", "metadata bytes/page"): False,
    ("bench_metrics_flood:bench_metrics_flood", "fault p99 flood"): True,
    ("bench_attach:bench_attach", "attach: service p50"): True,
    ("bench_attach:bench_attach", "attach: fault round trip p50"): True,
    ("bench_attach:bench_attach", "attach: cycle ms/GiB"): True,
    ("bench_attach:bench_attach", "attach: injected pause, longest per cycle"): True,
}


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick",
                        "--json"], cwd=ROOT, capture_output=True, text=True,
                       timeout=BUDGET_S)
    assert r.returncode == 0, r.stderr[-3000:]
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def _positive(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_every_benchmark_ran(report: dict[str, Any]) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import run  # the registry itself, so a new benchmark is covered too
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert report["quick"] is True
    assert set(report["benchmarks"]) == set(run.BENCHMARKS)
    for entry, b in report["benchmarks"].items():
        assert "error" not in b["figures"], (entry, b["figures"].get("error"))
        assert b["figures"], entry


def test_figures_are_numbers_with_references(report: dict[str, Any]) -> None:
    for entry, b in report["benchmarks"].items():
        for name, f in b["figures"].items():
            assert isinstance(f["value"], int | float) and math.isfinite(f["value"]), \
                (entry, name, f)
            assert f["value"] >= 0, (entry, name, f)
            if "ref" in f:
                assert _positive(f["ref"]), (entry, name, f)


def test_issue_figures_present(report: dict[str, Any]) -> None:
    for (entry, name), needs_ref in REQUIRED.items():
        f = report["benchmarks"][entry]["figures"].get(name)
        assert f is not None, (entry, name, sorted(report["benchmarks"][entry]["figures"]))
        assert _positive(f["value"]), (entry, name, f)
        if needs_ref:
            assert _positive(f.get("ref")), (entry, name, f)
            assert f.get("ref_name"), (entry, name, f)
