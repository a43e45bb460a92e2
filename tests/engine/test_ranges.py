"""Pure helpers: contiguous runs and PAGEMAP_SCAN ranges → page masks (engine/ranges.py,
the one implementation the tracker and the paths use)."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vmm_tierd.engine.ranges import ranges_to_mask, runs

PS = 4096


@given(st.sets(st.integers(0, 300), max_size=120))
def test_runs_cover_exactly_the_pages(pages: set[int]) -> None:
    arr = np.array(sorted(pages), dtype=np.uint64)
    got = runs(arr)
    flat = [p for first, count, _ in got for p in range(first, first + count)]
    assert flat == sorted(pages)
    for first, count, idx in got:
        assert int(arr[idx]) == first and count >= 1
    # maximal: two runs never touch
    for (f1, c1, _), (f2, _, _) in itertools.pairwise(got):
        assert f1 + c1 < f2


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(1, 20)), max_size=20))
def test_ranges_to_mask_matches_naive(spans: list[tuple[int, int]]) -> None:
    npages, base = 160, 0x7F0000000000
    want = np.zeros(npages, dtype=bool)
    rows, cursor = [], 0
    for gap, length in spans:  # non-overlapping, ascending, may run past the end
        start = cursor + gap % 7
        end = start + length
        cursor = end
        rows.append((base + start * PS, base + end * PS, 2))
        want[min(start, npages):min(end, npages)] = True
    regions = np.array(rows, dtype=np.uint64).reshape(-1, 3)
    assert (ranges_to_mask(regions, base, npages, PS) == want).all()


def test_ranges_to_mask() -> None:
    base = 0x7F0000000000
    regions = np.array([[base, base + 2 * PS, 0x10],
                        [base + 2 * PS, base + 3 * PS, 0x20],  # adjacent, other category
                        [base + 5 * PS, base + 7 * PS, 0x10],
                        [base + 9 * PS, base + 20 * PS, 0x10]],  # clipped at npages
                       dtype=np.uint64)
    m = ranges_to_mask(regions, base, 10)
    assert m.tolist() == [1, 1, 1, 0, 0, 1, 1, 0, 0, 1]
    empty = ranges_to_mask(np.zeros((0, 3), dtype=np.uint64), base, 4)
    assert empty.tolist() == [False] * 4


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 63), st.integers(1, 8)), max_size=12))
def test_ranges_to_mask_matches_reference(spans: list[tuple[int, int]]) -> None:
    base, n = 1 << 30, 64
    want = np.zeros(n, dtype=bool)
    regions = []
    used = np.zeros(n + 8, dtype=bool)
    for start, length in spans:  # PAGEMAP_SCAN regions never overlap
        if used[start:start + length].any():
            continue
        used[start:start + length] = True
        want[start:start + length] = True
        regions.append((base + start * PS, base + (start + length) * PS, 0))
    arr = np.array(regions, dtype=np.uint64).reshape(-1, 3)
    assert ranges_to_mask(arr, base, n).tolist() == want.tolist()
    ordered = arr[np.argsort(arr[:, 0])] if len(arr) else arr  # as the kernel returns them
    assert ranges_to_mask(ordered, base, n).tolist() == want.tolist()


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(-4, 600), st.integers(0, 40)), min_size=33,
                max_size=150), st.booleans())
def test_ranges_to_mask_many_ranges_every_path(spans: list[tuple[int, int]],
                                              ordered: bool) -> None:
    """More than a few ranges: the sparse (page by page) and the dense (edges + cumsum)
    paths, sorted-disjoint or not, unaligned ends and ranges past either end. A page
    partly inside a range counts."""
    base, n = 1 << 30, 512
    want = np.zeros(n, dtype=bool)
    rows = []
    for start, length in spans:
        lo, hi = start * PS + 100, max((start + length) * PS - 7, start * PS + 100)
        rows.append((base + lo, base + hi, 0))
        want[max(lo // PS, 0):max(min(-(-hi // PS), n), 0)] = True
    arr = np.array(rows, dtype=np.uint64)
    if ordered:
        arr = arr[np.argsort(arr[:, 0], kind="stable")]
    assert ranges_to_mask(arr, base, n).tolist() == want.tolist()
    keep = np.arange(n) % 3 != 0
    got = ranges_to_mask(arr, base, n, PS, clear=keep.copy())
    assert got.tolist() == (keep & ~want).tolist()

