"""The page table (engine/pages.py) and the pure policy over it: ageing, victim selection,
budgets, targets, refaults, and every named state transition."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmm_tierd.engine.pagebits import BACK, EVICTED, HOLD_MAX, KIND, POISONED, RESIDENT
from vmm_tierd.engine.pages import PageTable
from vmm_tierd.settings import TrackingSettings

PS = 4096


def table(n: int = 16, **kw: object) -> PageTable:
    return PageTable(n, TrackingSettings(**kw))  # type: ignore[arg-type]


def cold_except(n: int, *hot: int) -> np.ndarray:
    c = np.ones(n, dtype=bool)
    c[list(hot)] = False
    return c


def observe(t: PageTable, cold: np.ndarray, present: np.ndarray | None = None) -> None:
    t.observe(cold, np.ones(t.npages, dtype=bool) if present is None else present)


def evict(t: PageTable, pages: list[int] | np.ndarray, zero: bool = False) -> np.ndarray:
    p = np.unique(np.asarray(pages, dtype=np.uint64))
    p = p[(t.state[p] & KIND) == RESIDENT]
    b = t.detached(p, 0)
    return t.committed(b, np.full(len(p), zero))


def back(t: PageTable, pages: list[int] | np.ndarray) -> int:
    for p in np.asarray(pages, dtype=np.int64).tolist():
        if t.kind(p) == EVICTED:
            t.served_back(p)
    return t.flush()


def kinds(t: PageTable) -> list[int]:
    return (t.state & KIND).tolist()


def test_metadata_is_two_bytes_per_page() -> None:
    t = table(1 << 16)
    assert t.metadata_bytes_per_page == 2.0
    assert t.age.dtype == np.uint8 and t.state.dtype == np.uint8


def test_observe_ages_cold_and_resets_accessed() -> None:
    t = table(4)
    observe(t, cold_except(4, 1))
    observe(t, cold_except(4, 2))
    assert t.age.tolist() == [2, 1, 0, 2]
    assert t.cold_pages == 3 and t.working_set_pages == 1


def test_never_touched_memory_is_neither_resident_nor_working_set() -> None:
    """Two regions with no workload reported 64 MiB resident and 64 MiB working set while
    the process RSS was 50 MB: only present pages count."""
    t = table(8)
    present = np.zeros(8, dtype=bool)
    present[[1, 2]] = True
    cold = present.copy()
    cold[1] = False
    t.observe(cold, present)
    assert (t.resident_pages, t.working_set_pages, t.cold_pages) == (2, 1, 1)
    t.zero_filled()  # a MISSING fault populated one more page
    assert t.resident_pages == 3


def test_age_saturates_at_255() -> None:
    t = table(2)
    for _ in range(300):
        observe(t, np.ones(2, dtype=bool))
    assert t.age.tolist() == [255, 255]


def test_observe_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        observe(table(4), np.ones(5, dtype=bool))


def test_min_age_exactly() -> None:
    t = table(3, min_age=2)
    observe(t, cold_except(3, 2))
    assert t.select(3.0).tolist() == []  # age 1 < 2
    observe(t, cold_except(3, 1))
    assert t.select(3.0).tolist() == [0]  # page 0 has age exactly 2; page 1 reset
    assert t.select(3.0).dtype == np.uint64


def test_min_age_zero_selects_every_resident_page() -> None:
    t = table(4, min_age=0)
    evict(t, [1])
    assert t.select(1.0).tolist() == [0, 2, 3]


def test_evicted_pages_are_untouched_by_observe_and_never_selected() -> None:
    t = table(4, min_age=1)
    observe(t, np.ones(4, dtype=bool))
    evict(t, [0, 2])
    before = t.age.copy()
    observe(t, np.zeros(4, dtype=bool))  # "accessed" everywhere: evicted ones can't be
    assert t.age[[0, 2]].tolist() == before[[0, 2]].tolist()
    observe(t, np.ones(4, dtype=bool))
    assert t.select(1.0).tolist() == [1, 3]
    assert t.evicted_pages == 2


def test_budget_pages_caps_and_takes_coldest() -> None:
    t = table(6, min_age=1, budget_pages=2)
    observe(t, cold_except(6, 0, 1, 2, 3, 4))  # page 5 age 1
    observe(t, cold_except(6, 0, 1, 2))  # 3,4 age 1; 5 age 2
    observe(t, cold_except(6, 0, 1))  # 2 age 1; 3,4 age 2; 5 age 3
    got = t.select(3.0).tolist()
    assert len(got) == 2 and 5 in got and set(got) <= {3, 4, 5}


def test_budget_bytes_per_second_times_interval() -> None:
    t = table(100, min_age=1, budget_bytes_per_s=10 * PS)
    observe(t, np.ones(100, dtype=bool))
    assert len(t.select(2.0)) == 20
    assert len(t.select(0.5)) == 5


def test_budget_bytes_carries_fractions_of_a_page() -> None:
    t = table(100, min_age=1, budget_bytes_per_s=PS / 2)
    observe(t, np.ones(100, dtype=bool))
    assert [len(t.select(1.0)) for _ in range(4)] == [0, 1, 0, 1]


def test_smallest_budget_wins() -> None:
    t = table(100, min_age=1, budget_pages=7, budget_bytes_per_s=3 * PS)
    observe(t, np.ones(100, dtype=bool))
    assert len(t.select(1.0)) == 3
    t.set_tracking(TrackingSettings(min_age=1, budget_pages=2, budget_bytes_per_s=3 * PS))
    assert len(t.select(1.0)) == 2


def test_resident_target_evicts_coldest_until_target() -> None:
    t = table(10, min_age=1, resident_target_bytes=6 * PS)
    observe(t, np.ones(10, dtype=bool))
    observe(t, cold_except(10, 0, 1, 2, 3, 4, 5))  # 6..9 age 2, 0..5 age 0
    observe(t, cold_except(10, 0, 1))  # 2..5 age 1, 6..9 age 3
    assert t.select(1.0).tolist() == [6, 7, 8, 9]
    evict(t, [6, 7, 8, 9])
    assert t.select(1.0).tolist() == []  # at target: nothing more


def test_resident_target_when_nothing_is_old_enough() -> None:
    t = table(10, min_age=3, resident_target_bytes=PS)
    observe(t, np.ones(10, dtype=bool))
    observe(t, np.ones(10, dtype=bool))
    assert t.select(1.0).tolist() == []  # far above target but min_age still holds
    observe(t, cold_except(10, 0))
    assert t.select(1.0).tolist() == list(range(1, 10))  # 9 eligible, target allows 9


def test_resident_target_combined_with_budget() -> None:
    t = table(10, min_age=1, resident_target_bytes=2 * PS, budget_pages=3)
    observe(t, np.ones(10, dtype=bool))
    assert len(t.select(1.0)) == 3


def held(t: PageTable) -> int:
    res = (t.state & KIND) == RESIDENT
    return int(np.count_nonzero(res & ((t.state >> 3) > 0)))


def test_refault_within_window_counts_and_holds() -> None:
    t = table(4, min_age=1, refault_window=2, refault_hold=3)
    observe(t, np.ones(4, dtype=bool))
    evict(t, [0, 1])
    observe(t, np.ones(4, dtype=bool))
    observe(t, np.ones(4, dtype=bool))  # 2 cycles since eviction
    assert back(t, [0]) == 1
    observe(t, np.ones(4, dtype=bool))
    observe(t, np.ones(4, dtype=bool))  # 3 cycles since eviction: outside the window
    assert back(t, [1]) == 0
    assert t.counts.refaults == 1 and held(t) == 1
    # page 0 (age 2 now) needs min_age 1 + hold 3 = 4 cold intervals; page 1 only 1
    for want in ([1, 2, 3], [0, 1, 2, 3]):
        observe(t, np.ones(4, dtype=bool))
        assert t.select(1.0).tolist() == want
    evict(t, [0])  # the hold is served: cleared
    back(t, [0])  # immediate refault: hold again
    assert held(t) == 1


def test_refault_window_survives_cycle_byte_wraparound() -> None:
    t = table(2, min_age=1, refault_window=3)
    evict(t, [0, 1])
    for _ in range(256):  # the cycle byte is back where it was at eviction
        observe(t, np.ones(2, dtype=bool))
    assert back(t, [0]) == 0
    for _ in range(254):
        observe(t, np.ones(2, dtype=bool))
    assert back(t, [1]) == 0  # 510 cycles: aliases to 254, still old
    evict(t, [0])
    for _ in range(258):  # crosses the wrap with eviction at a non-zero cycle byte
        observe(t, np.ones(2, dtype=bool))
    assert back(t, [0]) == 0


def test_refault_right_after_eviction_across_the_wrap() -> None:
    t = table(1, refault_window=3)
    for _ in range(254):
        observe(t, np.ones(1, dtype=bool))
    evict(t, [0])  # cycle byte 254
    for _ in range(3):  # 255, 0, 1
        observe(t, np.ones(1, dtype=bool))
    assert back(t, [0]) == 1


def test_live_set_tracking_changes_window_and_hold() -> None:
    t = table(2, min_age=1, refault_window=10, refault_hold=0)
    evict(t, [0, 1])
    for _ in range(5):
        observe(t, np.ones(2, dtype=bool))
    t.set_tracking(TrackingSettings(min_age=1, refault_window=2, refault_hold=HOLD_MAX + 50))
    assert back(t, [0]) == 0  # 5 > new window 2
    evict(t, [0])
    observe(t, np.ones(2, dtype=bool))
    assert back(t, [0]) == 1
    assert t.state[0] >> 3 == HOLD_MAX  # clamped to what the bits hold
    t.set_tracking(TrackingSettings(min_age=5))
    assert t.select(1.0).tolist() == []  # page 1 evicted, page 0 too young


def test_zero_pages_counted_while_evicted() -> None:
    t = table(4)
    evict(t, [0, 1], zero=True)
    evict(t, [2])
    assert t.zero_pages == 2
    back(t, [1])
    assert t.zero_pages == 1


def test_large_min_age_with_hold_does_not_overflow() -> None:
    t = table(2, min_age=250, refault_hold=10)
    evict(t, [0])
    assert back(t, [0]) == 1
    for _ in range(300):
        observe(t, np.ones(2, dtype=bool))
    assert t.select(1.0).tolist() == [1]  # page 0 would need age 260: never


def test_reclaimed_in_flight_page_stays_resident_and_its_record_goes() -> None:
    t = table(8)
    b = t.detached(np.array([2, 3, 4], dtype=np.uint64), 0)
    assert t.reclaimed(3) is b
    ev = t.committed(b, np.zeros(3, dtype=bool))
    assert ev.tolist() == [2, 4] and kinds(t)[2:5] == [EVICTED, RESIDENT, EVICTED]
    assert t.take_deletes().tolist() == [3]
    assert not t.inflight


def test_deletes_never_touch_a_page_evicted_again() -> None:
    t = table(8)
    evict(t, [5])
    back(t, [5])
    evict(t, [5])  # evicted again before the deletes were taken: its new record lives
    assert t.take_deletes().tolist() == []


def test_poisoned_lasts_until_the_guest_discards() -> None:
    t = table(8)
    evict(t, [1, 2, 3])
    assert t.poisoned(2) and not t.poisoned(2)  # once
    assert kinds(t)[1:4] == [EVICTED, POISONED, EVICTED]
    assert (t.poisoned_pages, t.evicted_pages, t.counts.poisoned) == (1, 2, 1)
    observe(t, np.ones(8, dtype=bool))
    assert t.kind(2) == POISONED and 2 not in t.select(1.0).tolist()
    assert t.take_deletes().tolist() == [2]  # its bad record goes
    assert t.discarded(0, 4) == 3  # two evicted, one poisoned: all new memory now
    assert kinds(t)[:4] == [RESIDENT] * 4 and not t.once(1)
    assert (t.poisoned_pages, t.evicted_pages) == (0, 0)
    assert t.take_deletes().tolist() == [1, 2, 3]


def test_served_back_is_back_until_flushed() -> None:
    t = table(4, refault_hold=2)
    evict(t, [0])
    t.served_back(0)
    assert t.kind(0) == BACK and t.evicted_pages == 0 and t.once(0)
    assert t.flush() == 1
    assert t.kind(0) == RESIDENT and t.once(0) and t.evicted_pages == 0


def test_discard_reclaims_in_flight_pages() -> None:
    t = table(8)
    b = t.detached(np.array([1, 6], dtype=np.uint64), 0)
    t.discarded(0, 4)
    assert b.reclaimed.tolist() == [True, False] and list(t.inflight) == [6]


def test_adopt_marks_records_evicted_long_ago() -> None:
    t = table(8, refault_window=5)
    t.adopt(np.array([1, 2], dtype=np.uint64), np.array([False, True]))
    assert kinds(t)[1:3] == [EVICTED, EVICTED] and t.zero_pages == 1
    assert back(t, [1, 2]) == 0  # not refaults


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 31), max_size=40), st.lists(st.integers(0, 31), max_size=80),
       st.integers(0, 300))
def test_flush_few_matches_flush_many(evicted: list[int], served: list[int],
                                      cycles: int) -> None:
    """The scalar flush (a small burst) and the numpy one give the same table."""
    tr = TrackingSettings(min_age=1, refault_window=3, refault_hold=2)
    a, b = PageTable(32, tr), PageTable(32, tr)
    for t in (a, b):
        evict(t, evicted[: len(evicted) // 2])
        for _ in range(cycles % 7):
            observe(t, np.ones(32, dtype=bool))
        evict(t, evicted[len(evicted) // 2:], zero=True)
    uniq = list(dict.fromkeys(p for p in served if a.kind(p) == EVICTED))
    for p in uniq:
        a.served_back(p)
        b.served_back(p)
    n_b = b._to_resident(np.asarray(b.back * 2, dtype=np.int64))  # the path > FEW takes
    b.back = []
    assert a.flush() == n_b  # a: the scalar path (at most 32 pages)
    assert a.state.tolist() == b.state.tolist() and a.age.tolist() == b.age.tolist()
    assert a.evicted_pages == b.evicted_pages


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), min_age=st.integers(0, 4),
       budget=st.integers(0, 20), target=st.integers(0, 64), steps=st.integers(1, 12))
def test_select_invariants(seed: int, min_age: int, budget: int, target: int,
                           steps: int) -> None:
    n = 64
    rng = np.random.default_rng(seed)
    t = table(n, min_age=min_age, budget_pages=budget, resident_target_bytes=target * PS,
              refault_hold=2, refault_window=2)
    for _ in range(steps):
        observe(t, rng.random(n) < 0.7)
        resident_before = t.resident_pages
        got = t.select(3.0)
        assert np.all(np.diff(got.astype(np.int64)) > 0)  # sorted, unique
        assert np.all((t.state[got] & KIND) == RESIDENT)  # never an evicted page
        need = min_age + (t.state[got] >> 3).astype(int)
        assert np.all(t.age[got] >= need)
        if budget:
            assert len(got) <= budget
        if target:
            assert resident_before - len(got) >= min(target, resident_before)
        # nothing eligible and colder was left behind
        left = np.setdiff1d(np.flatnonzero((t.state & KIND) == RESIDENT), got)
        eligible_left = left[t.age[left] >= min_age + (t.state[left] >> 3)]
        if len(got) and len(eligible_left):
            assert t.age[eligible_left].max() <= t.age[got].min()
        if not budget and not target:
            assert len(eligible_left) == 0
        evict(t, got)
        back(t, rng.choice(n, size=3, replace=False))
        assert t.evicted_pages == int(np.count_nonzero((t.state & 1) == 1))


def test_a_page_that_keeps_coming_back_gets_a_doubling_hold() -> None:
    """Read-hot pages under wp look cold, are evicted and refault: each refault soon
    after an eviction doubles the hold (refault_hold, 2x, 4x ... 31), and a page that
    stays away for the window starts over."""
    t = table(2, min_age=1, refault_window=3, refault_hold=4)
    holds = []
    for _ in range(5):
        evict(t, [0])
        observe(t, np.ones(2, dtype=bool))
        assert back(t, [0]) == 1
        holds.append(int(t.state[0] >> 3))
    assert holds == [4, 8, 16, 31, 31]
    evict(t, [0])
    for _ in range(5):  # past the window: no refault, no hold
        observe(t, np.ones(2, dtype=bool))
    assert back(t, [0]) == 0 and t.state[0] >> 3 == 0
    evict(t, [0])
    observe(t, np.ones(2, dtype=bool))
    assert back(t, [0]) == 1 and t.state[0] >> 3 == 4  # starts over


def test_served_back_pages_count_as_resident_not_evicted_before_the_flush() -> None:
    """resident + evicted never exceed the region, also between a fault and the flush
    (the fault server flushes in bulk)."""
    t = table(8)
    observe(t, np.ones(8, dtype=bool))
    evict(t, [0, 1, 2, 3], zero=True)
    assert (t.resident_pages, t.evicted_pages, t.zero_pages) == (4, 4, 4)
    t.served_back(1)
    assert (t.resident_pages, t.evicted_pages, t.zero_pages) == (5, 3, 3)
    t.flush()
    assert (t.resident_pages, t.evicted_pages, t.zero_pages) == (5, 3, 3)
