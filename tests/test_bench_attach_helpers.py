"""The pure helpers of benchmarks/attach_rig.py: quantiles from Prometheus histogram
buckets, bucket deltas between scrapes, and per-cycle injected pauses from scrapes."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
try:
    from attach_rig import Scrape, bucket_deltas, histogram_quantile, per_cycle, percentiles
finally:
    sys.path.pop(0)

INF = float("inf")


def test_quantile_interpolates_inside_its_bucket() -> None:
    # 10 observations <= 1, 30 in (1, 2], 60 in (2, 4]
    b = [(1.0, 10.0), (2.0, 40.0), (4.0, 100.0), (INF, 100.0)]
    assert histogram_quantile(b, 0.1) == pytest.approx(1.0)
    assert histogram_quantile(b, 0.25) == pytest.approx(1.5)  # rank 25: half into (1, 2]
    assert histogram_quantile(b, 0.7) == pytest.approx(3.0)   # rank 70: half into (2, 4]
    assert histogram_quantile(b, 0.05) == pytest.approx(0.5)  # first bucket starts at 0
    assert histogram_quantile(list(reversed(b)), 0.25) == pytest.approx(1.5)


def test_quantile_in_the_inf_bucket_is_the_largest_bound() -> None:
    b = [(1.0, 10.0), (2.0, 20.0), (INF, 100.0)]
    assert histogram_quantile(b, 0.99) == 2.0


def test_quantile_of_nothing_is_nan_and_q_is_checked() -> None:
    assert math.isnan(histogram_quantile([], 0.5))
    assert math.isnan(histogram_quantile([(1.0, 0.0), (INF, 0.0)], 0.5))
    for q in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError):
            histogram_quantile([(1.0, 1.0)], q)


def test_quantile_matches_numpy_on_fine_buckets() -> None:
    rng = np.random.default_rng(3)
    x = rng.exponential(20e-6, 20000)
    les = np.linspace(0, 400e-6, 4001)[1:]
    b = [(float(le), float(np.count_nonzero(x <= le))) for le in les] + [(INF, len(x))]
    for q in (0.5, 0.9, 0.99):
        assert histogram_quantile(b, q) == pytest.approx(float(np.quantile(x, q)), rel=0.01)


def test_bucket_deltas_subtract_bucket_by_bucket() -> None:
    before = [(1.0, 5.0), (2.0, 7.0), (INF, 9.0)]
    after = [(1.0, 8.0), (2.0, 17.0), (INF, 20.0)]
    assert bucket_deltas(before, after) == [(1.0, 3.0), (2.0, 10.0), (INF, 11.0)]
    assert bucket_deltas([], after) == after


def _s(t: float, cycles: float, stops: float, total: float, mx: float) -> Scrape:
    return Scrape(t, cycles, stops, total, mx)


def test_per_cycle_uses_only_spans_of_exactly_one_cycle() -> None:
    scrapes = [_s(0, 10, 100, 1.0, 0.002),
               _s(1, 10, 100, 1.0, 0.002),    # no cycle: ignored
               _s(2, 11, 104, 1.004, 0.002),  # one cycle: 4 stops, 4 ms
               _s(3, 13, 110, 1.020, 0.003),  # two cycles: can't be split, ignored
               _s(4, 14, 112, 1.022, 0.003)]  # one cycle: 2 stops, 2 ms
    r = per_cycle(scrapes)
    assert r["cycles"] == 2
    assert r["total median s"] == pytest.approx(0.003)
    assert r["total max s"] == pytest.approx(0.004)
    assert r["stops median"] == 3
    assert r["longest stop s"] == 0.003


def test_per_cycle_without_a_single_cycle_span() -> None:
    assert per_cycle([]) == {"cycles": 0.0}
    assert per_cycle([_s(0, 1, 0, 0, 0), _s(1, 3, 2, 0.1, 0.1)]) == {"cycles": 0.0}


def test_percentiles() -> None:
    assert percentiles(np.arange(101.0)) == [50.0, 99.0]
    assert percentiles(np.zeros(0)) == [0.0, 0.0]
