"""Pure helpers of the tracker: contiguous runs and PAGEMAP_SCAN ranges → page masks
(the tracker uses the policy's ranges_to_mask, the one implementation)."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from vmm_tierd.engine.policy import PagePolicy
from vmm_tierd.engine.tracker import runs

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
    assert (PagePolicy.ranges_to_mask(regions, base, npages, PS) == want).all()
