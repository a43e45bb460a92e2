"""RateLimitedLog: at most `burst` lines per interval per key, and nothing uncounted."""

from __future__ import annotations

import logging
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmm_tierd.ratelimit import RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def make(name: str, burst: int = 5, interval_s: float = 60.0,
         max_keys: int = 1024) -> tuple[RateLimitedLog, ListHandler, Clock]:
    logger = logging.getLogger(f"test.ratelimit.{name}")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    h = ListHandler()
    logger.addHandler(h)
    clock = Clock()
    rl = RateLimitedLog(logger, burst=burst, interval_s=interval_s, max_keys=max_keys,
                        clock=clock)
    return rl, h, clock


SUMMARY = re.compile(r"\(suppressed (\d+) similar messages in \d+s\)$")


def test_burst_then_one_summary_with_the_last_message() -> None:
    rl, h, clock = make("burst", burst=3, interval_s=10)
    written = [rl.info("discard", "discarded [%d, %d)", i, i + 1) for i in range(1000)]
    assert written == [True] * 3 + [False] * 997
    assert h.lines == ["discarded [0, 1)", "discarded [1, 2)", "discarded [2, 3)"]
    assert rl.suppressed("discard") == 997
    clock.t += 10
    assert rl.info("discard", "discarded [%d, %d)", 5000, 5001)
    assert h.lines[3] == "discarded [999, 1000) (suppressed 997 similar messages in 10s)"
    assert h.lines[4] == "discarded [5000, 5001)"
    assert rl.suppressed("discard") == 0


def test_keys_are_limited_separately_and_flush_writes_pending_summaries() -> None:
    rl, h, _ = make("keys", burst=1, interval_s=60)
    for _ in range(5):
        rl.warning(("store", "/a"), "store %s failed", "/a")
        rl.warning(("store", "/b"), "store %s failed", "/b")
    assert h.lines == ["store /a failed", "store /b failed"]
    assert rl.flush() == 2
    assert sorted(h.lines[2:]) == ["store /a failed (suppressed 4 similar messages in 0s)",
                                   "store /b failed (suppressed 4 similar messages in 0s)"]
    assert rl.flush() == 0


def test_the_number_of_keys_is_bounded_and_dropped_keys_are_summarised() -> None:
    rl, h, _ = make("bounded", burst=1, interval_s=60, max_keys=4)
    for k in range(4):
        rl.info(k, "k%d", k)
        rl.info(k, "k%d", k)  # suppressed
    rl.info(99, "k99")  # drops key 0, the oldest, and writes its summary
    assert h.lines[-2:] == ["k0 (suppressed 1 similar messages in 0s)", "k99"]
    assert len(rl._windows) == 4


def test_disabled_levels_cost_nothing_and_count_nothing() -> None:
    rl, h, _ = make("level", burst=1)
    rl.logger.setLevel(logging.WARNING)
    assert not rl.info("x", "hidden")
    assert rl.suppressed("x") == 0 and h.lines == []


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        RateLimitedLog(logging.getLogger("x"), burst=0)
    with pytest.raises(ValueError):
        RateLimitedLog(logging.getLogger("x"), interval_s=0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.floats(0, 30)), max_size=300),
       st.integers(1, 4))
def test_every_call_is_either_written_or_counted_and_no_window_exceeds_the_burst(
        calls: list[tuple[int, float]], burst: int) -> None:
    rl, h, clock = make("prop", burst=burst, interval_s=10)
    starts: dict[int, float] = {}
    in_window: dict[int, int] = {}
    for key, dt in calls:
        clock.t += dt
        if key not in starts or clock.t - starts[key] >= 10:
            starts[key], in_window[key] = clock.t, 0
        if rl.info(key, "key %d", key):
            in_window[key] += 1
        assert in_window[key] <= burst
    rl.flush()
    plain = [ln for ln in h.lines if not SUMMARY.search(ln)]
    counted = sum(int(m.group(1)) for ln in h.lines if (m := SUMMARY.search(ln)))
    assert len(plain) + counted == len(calls)
