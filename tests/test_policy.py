"""PagePolicy: ageing, victim selection, budgets, targets, refaults (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmm_tierd.engine.policy import HOLD_MAX, PagePolicy
from vmm_tierd.settings import TrackingSettings

PS = 4096


def pol(n: int = 16, **kw: object) -> PagePolicy:
    return PagePolicy(n, TrackingSettings(**kw))  # type: ignore[arg-type]


def cold_except(n: int, *hot: int) -> np.ndarray:
    c = np.ones(n, dtype=bool)
    c[list(hot)] = False
    return c


def test_metadata_is_two_bytes_per_page() -> None:
    p = pol(1 << 16)
    assert p.metadata_bytes_per_page == 2.0
    assert p.age.dtype == np.uint8 and p.state.dtype == np.uint8


def test_observe_ages_cold_and_resets_accessed() -> None:
    p = pol(4)
    p.observe(cold_except(4, 1))
    p.observe(cold_except(4, 2))
    assert p.age.tolist() == [2, 1, 0, 2]
    assert p.cold_pages == 3


def test_age_saturates_at_255() -> None:
    p = pol(2)
    for _ in range(300):
        p.observe(np.ones(2, dtype=bool))
    assert p.age.tolist() == [255, 255]


def test_observe_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        pol(4).observe(np.ones(5, dtype=bool))


def test_min_age_exactly() -> None:
    p = pol(3, min_age=2)
    p.observe(cold_except(3, 2))
    assert p.select(3.0).tolist() == []  # age 1 < 2
    p.observe(cold_except(3, 1))
    assert p.select(3.0).tolist() == [0]  # page 0 has age exactly 2; page 1 reset
    assert p.select(3.0).dtype == np.uint64


def test_min_age_zero_selects_every_resident_page() -> None:
    p = pol(4, min_age=0)
    p.mark_evicted(np.array([1]))
    assert p.select(1.0).tolist() == [0, 2, 3]


def test_evicted_pages_are_untouched_by_observe_and_never_selected() -> None:
    p = pol(4, min_age=1)
    p.observe(np.ones(4, dtype=bool))
    p.mark_evicted(np.array([0, 2]))
    before = p.age.copy()
    p.observe(np.zeros(4, dtype=bool))  # "accessed" everywhere: evicted ones can't be
    assert p.age[[0, 2]].tolist() == before[[0, 2]].tolist()
    p.observe(np.ones(4, dtype=bool))
    assert p.select(1.0).tolist() == [1, 3]
    assert (p.resident_pages, p.evicted_pages) == (2, 2)


def test_budget_pages_caps_and_takes_coldest() -> None:
    p = pol(6, min_age=1, budget_pages=2)
    p.observe(cold_except(6, 0, 1, 2, 3, 4))  # page 5 age 1
    p.observe(cold_except(6, 0, 1, 2))  # 3,4 age 1; 5 age 2
    p.observe(cold_except(6, 0, 1))  # 2 age 1; 3,4 age 2; 5 age 3
    got = p.select(3.0).tolist()
    assert len(got) == 2 and 5 in got and set(got) <= {3, 4, 5}


def test_budget_bytes_per_second_times_interval() -> None:
    p = pol(100, min_age=1, budget_bytes_per_s=10 * PS)
    p.observe(np.ones(100, dtype=bool))
    assert len(p.select(2.0)) == 20
    assert len(p.select(0.5)) == 5


def test_budget_bytes_carries_fractions_of_a_page() -> None:
    p = pol(100, min_age=1, budget_bytes_per_s=PS / 2)
    p.observe(np.ones(100, dtype=bool))
    assert [len(p.select(1.0)) for _ in range(4)] == [0, 1, 0, 1]


def test_smallest_budget_wins() -> None:
    p = pol(100, min_age=1, budget_pages=7, budget_bytes_per_s=3 * PS)
    p.observe(np.ones(100, dtype=bool))
    assert len(p.select(1.0)) == 3
    p.set_tracking(TrackingSettings(min_age=1, budget_pages=2, budget_bytes_per_s=3 * PS))
    assert len(p.select(1.0)) == 2


def test_resident_target_evicts_coldest_until_target() -> None:
    p = pol(10, min_age=1, resident_target_bytes=6 * PS)
    p.observe(np.ones(10, dtype=bool))
    p.observe(cold_except(10, 0, 1, 2, 3, 4, 5))  # 6..9 age 2, 0..5 age 0
    p.observe(cold_except(10, 0, 1))  # 2..5 age 1, 6..9 age 3
    assert p.select(1.0).tolist() == [6, 7, 8, 9]
    p.mark_evicted(np.array([6, 7, 8, 9]))
    assert p.select(1.0).tolist() == []  # at target: nothing more


def test_resident_target_when_nothing_is_old_enough() -> None:
    p = pol(10, min_age=3, resident_target_bytes=PS)
    p.observe(np.ones(10, dtype=bool))
    p.observe(np.ones(10, dtype=bool))
    assert p.select(1.0).tolist() == []  # far above target but min_age still holds
    p.observe(cold_except(10, 0))
    got = p.select(1.0)
    assert got.tolist() == list(range(1, 10))  # 9 eligible, target would allow 9


def test_resident_target_combined_with_budget() -> None:
    p = pol(10, min_age=1, resident_target_bytes=2 * PS, budget_pages=3)
    p.observe(np.ones(10, dtype=bool))
    assert len(p.select(1.0)) == 3


def test_refault_within_window_counts_and_holds() -> None:
    p = pol(4, min_age=1, refault_window=2, refault_hold=3)
    p.observe(np.ones(4, dtype=bool))
    p.mark_evicted(np.array([0, 1]))
    p.observe(np.ones(4, dtype=bool))
    p.observe(np.ones(4, dtype=bool))  # 2 cycles since eviction
    assert p.mark_resident(np.array([0])) == 1
    p.observe(np.ones(4, dtype=bool))
    p.observe(np.ones(4, dtype=bool))  # 3 cycles since eviction: outside the window
    assert p.mark_resident(np.array([1])) == 0
    assert p.refaults_total == 1
    assert p.held_pages == 1
    # page 0 (age 2 now) needs min_age 1 + hold 3 = 4 cold intervals; page 1 only 1
    for want in ([1, 2, 3], [0, 1, 2, 3]):
        p.observe(np.ones(4, dtype=bool))
        assert p.select(1.0).tolist() == want
    p.mark_evicted(np.array([0]))  # the hold is served: cleared
    p.mark_resident(np.array([0]))  # immediate refault: hold again
    assert p.held_pages == 1


def test_refault_window_survives_cycle_byte_wraparound() -> None:
    p = pol(2, min_age=1, refault_window=3)
    p.mark_evicted(np.array([0, 1]))
    for _ in range(256):  # the cycle byte is back where it was at eviction
        p.observe(np.ones(2, dtype=bool))
    assert p.mark_resident(np.array([0])) == 0
    for _ in range(254):
        p.observe(np.ones(2, dtype=bool))
    assert p.mark_resident(np.array([1])) == 0  # 510 cycles: aliases to 254, still old
    p.mark_evicted(np.array([0]))
    for _ in range(258):  # crosses the wrap with eviction at a non-zero cycle byte
        p.observe(np.ones(2, dtype=bool))
    assert p.mark_resident(np.array([0])) == 0


def test_refault_right_after_eviction_across_the_wrap() -> None:
    p = pol(1, refault_window=3)
    for _ in range(254):
        p.observe(np.ones(1, dtype=bool))
    p.mark_evicted(np.array([0]))  # cycle byte 254
    for _ in range(3):  # 255, 0, 1
        p.observe(np.ones(1, dtype=bool))
    assert p.mark_resident(np.array([0])) == 1


def test_live_set_tracking_changes_window_and_hold() -> None:
    p = pol(2, min_age=1, refault_window=10, refault_hold=0)
    p.mark_evicted(np.array([0, 1]))
    for _ in range(5):
        p.observe(np.ones(2, dtype=bool))
    p.set_tracking(TrackingSettings(min_age=1, refault_window=2, refault_hold=HOLD_MAX + 50))
    assert p.mark_resident(np.array([0])) == 0  # 5 > new window 2
    p.mark_evicted(np.array([0]))
    p.observe(np.ones(2, dtype=bool))
    assert p.mark_resident(np.array([0])) == 1
    assert p.state[0] >> 3 == HOLD_MAX  # clamped to what the bits hold
    p.set_tracking(TrackingSettings(min_age=5))
    assert p.select(1.0).tolist() == []  # page 1 evicted, page 0 too young


def test_mark_resident_on_resident_page_is_no_refault_and_keeps_hold() -> None:
    p = pol(2, refault_hold=2)
    p.mark_evicted(np.array([0]))
    assert p.mark_resident(np.array([0])) == 1
    assert p.mark_resident(np.array([0, 1])) == 0
    assert p.held_pages == 1 and p.resident_pages == 2


def test_duplicate_pages_count_once() -> None:
    p = pol(4)
    p.mark_evicted(np.array([1, 1, 2]))
    assert p.evicted_pages == 2
    p.mark_evicted(np.array([1]))
    assert p.evicted_pages == 2
    p.mark_resident(np.array([1, 1, 2, 3]))
    assert p.evicted_pages == 0


def test_zero_pages_marked_and_cleared_on_access_or_fault() -> None:
    p = pol(4)
    p.mark_zero(np.array([0, 1, 2]))
    assert p.zero_pages == 3
    p.observe(cold_except(4, 0))
    assert p.zero_pages == 2
    p.mark_evicted(np.array([1]))
    assert p.zero_pages == 2  # still zero while evicted
    p.mark_resident(np.array([1]))
    assert p.zero_pages == 1


def test_working_set_counts() -> None:
    p = pol(5, min_age=2)
    p.observe(cold_except(5, 0, 1))
    p.observe(cold_except(5, 0))
    assert p.working_set_pages == 2  # page 0 age 0, page 1 age 1; others age 2
    p.mark_evicted(np.array([0]))
    assert p.working_set_pages == 1


def test_ranges_to_mask() -> None:
    base = 0x7F0000000000
    regions = np.array([[base, base + 2 * PS, 0x10],
                        [base + 2 * PS, base + 3 * PS, 0x20],  # adjacent, other category
                        [base + 5 * PS, base + 7 * PS, 0x10],
                        [base + 9 * PS, base + 20 * PS, 0x10]],  # clipped at npages
                       dtype=np.uint64)
    m = PagePolicy.ranges_to_mask(regions, base, 10)
    assert m.tolist() == [1, 1, 1, 0, 0, 1, 1, 0, 0, 1]
    empty = PagePolicy.ranges_to_mask(np.zeros((0, 3), dtype=np.uint64), base, 4)
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
    assert PagePolicy.ranges_to_mask(arr, base, n).tolist() == want.tolist()
    ordered = arr[np.argsort(arr[:, 0])] if len(arr) else arr  # as the kernel returns them
    assert PagePolicy.ranges_to_mask(ordered, base, n).tolist() == want.tolist()


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), min_age=st.integers(0, 4),
       budget=st.integers(0, 20), target=st.integers(0, 64), steps=st.integers(1, 12))
def test_select_invariants(seed: int, min_age: int, budget: int, target: int,
                           steps: int) -> None:
    n = 64
    rng = np.random.default_rng(seed)
    p = pol(n, min_age=min_age, budget_pages=budget, resident_target_bytes=target * PS,
            refault_hold=2, refault_window=2)
    for _ in range(steps):
        p.observe(rng.random(n) < 0.7)
        resident_before = p.resident_pages
        got = p.select(3.0)
        assert np.all(np.diff(got.astype(np.int64)) > 0)  # sorted, unique
        assert not np.any(p.state[got] & 1)  # never an evicted page
        need = min_age + (p.state[got] >> 3).astype(int)
        assert np.all(p.age[got] >= need)
        if budget:
            assert len(got) <= budget
        if target:
            assert resident_before - len(got) >= min(target, resident_before)
        # nothing eligible and colder was left behind
        left = np.setdiff1d(np.flatnonzero((p.state & 1) == 0), got)
        eligible_left = left[p.age[left] >= min_age + (p.state[left] >> 3)]
        if len(got) and len(eligible_left):
            assert p.age[eligible_left].max() <= p.age[got].min()
        if not budget and not target:
            assert len(eligible_left) == 0
        p.mark_evicted(got)
        back = rng.choice(n, size=3, replace=False)
        p.mark_resident(back)
        assert p.evicted_pages == int(np.count_nonzero(p.state & 1))
        assert p.resident_pages + p.evicted_pages == n


def test_large_min_age_with_hold_does_not_overflow() -> None:
    p = pol(2, min_age=250, refault_hold=10)
    p.mark_evicted(np.array([0]))
    assert p.mark_resident(np.array([0])) == 1
    for _ in range(300):
        p.observe(np.ones(2, dtype=bool))
    assert p.select(1.0).tolist() == [1]  # page 0 would need age 260: never


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 31), max_size=40), st.lists(st.integers(0, 31), max_size=40),
       st.integers(0, 300))
def test_mark_resident_few_matches_mark_resident(evict: list[int], back: list[int],
                                                 cycles: int) -> None:
    t = TrackingSettings(min_age=1, refault_window=3, refault_hold=2)
    a, b = PagePolicy(32, t), PagePolicy(32, t)
    for p in (a, b):
        p.mark_evicted(np.array(evict[: len(evict) // 2], dtype=np.uint64))
        for _ in range(cycles % 7):
            p.observe(np.ones(32, dtype=bool))
        p.mark_evicted(np.array(evict[len(evict) // 2:], dtype=np.uint64))
        p.mark_zero(np.array(evict[:3], dtype=np.uint64))
    assert a.mark_resident(np.array(back, dtype=np.uint64)) == b.mark_resident_few(back)
    assert a.state.tolist() == b.state.tolist() and a.age.tolist() == b.age.tolist()
    assert (a.evicted_pages, a.refaults_total) == (b.evicted_pages, b.refaults_total)


def test_engine_bits_share_the_state_byte() -> None:
    p = PagePolicy(8, TrackingSettings(min_age=1, refault_window=4, refault_hold=3))
    assert not p.gone(2) and not p.once(2)
    p.mark_evicted(np.array([2, 3], dtype=np.uint64))
    assert p.gone(2) and p.once(2) and p.gone_mask().tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    p.back_one(2)  # faulted back: not served from the store any more, policy not told yet
    assert not p.gone(2) and p.once(2) and p.evicted_pages == 2
    assert p.mark_resident(np.array([2])) == 1
    assert p.once(2) and not p.gone(2) and p.state[2] >> 3 == 3  # hold kept beside ONCE
    p.forget(0, 4)  # guest discarded: nothing evicted, nothing ONCE any more
    assert not p.once(2) and not p.gone(3) and p.evicted_pages == 0
    assert p.state[2] >> 3 == 3 and p.metadata_bytes_per_page == 2


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
    assert PagePolicy.ranges_to_mask(arr, base, n).tolist() == want.tolist()
    keep = np.arange(n) % 3 != 0
    got = PagePolicy.ranges_to_mask(arr, base, n, PS, clear=keep.copy())
    assert got.tolist() == (keep & ~want).tolist()
