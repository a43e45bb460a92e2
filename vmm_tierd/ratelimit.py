"""Rate-limited logging, for lines that something outside the daemon can cause at will.

A guest decides how often it discards memory or faults; a client decides how often it
connects or sends SIGHUP. None of them may decide how many lines the daemon writes.
:class:`RateLimitedLog` lets through at most ``burst`` lines per ``interval_s`` for each
key, counts the rest, and writes one summary line for them::

    discards = RateLimitedLog(log, burst=5, interval_s=60)
    discards.info(("discard", region), "region %s: guest discarded pages [%d, %d)",
                  region, first, last)
    # ... once the minute is over, the next call for that key (or flush()) first writes
    # "region vm0: guest discarded pages [...) (suppressed 1234 similar messages in 60s)"

Keys are any hashable; use one per kind of event (and per region or path where they
should be limited separately), never one per page. The number of keys kept is bounded
(``max_keys``): the oldest key's summary is written when it is dropped. Safe from any
thread. The clock is injectable for tests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass


@dataclass(slots=True)
class _Window:
    start: float
    emitted: int = 0
    suppressed: int = 0
    level: int = logging.INFO
    msg: str = ""
    args: tuple[object, ...] = ()


class RateLimitedLog:
    """At most ``burst`` lines per ``interval_s`` per key, plus one summary of the rest."""

    def __init__(self, logger: logging.Logger, *, burst: int = 5, interval_s: float = 60.0,
                 max_keys: int = 1024, clock: Callable[[], float] = time.monotonic) -> None:
        if burst < 1 or interval_s <= 0 or max_keys < 1:
            raise ValueError("burst and max_keys must be >= 1 and interval_s > 0")
        self.logger = logger
        self.burst = burst
        self.interval_s = interval_s
        self.max_keys = max_keys
        self.clock = clock
        self._lock = threading.Lock()
        self._windows: OrderedDict[Hashable, _Window] = OrderedDict()

    def log(self, level: int, key: Hashable, msg: str, *args: object) -> bool:
        """Log ``msg % args`` at ``level`` unless ``key`` used up its burst in this interval.
        Returns whether the line was written (a summary may be written before it)."""
        if not self.logger.isEnabledFor(level):
            return False
        pending: list[tuple[int, str, tuple[object, ...]]] = []
        now = self.clock()
        with self._lock:
            w = self._windows.get(key)
            if w is not None and now - w.start >= self.interval_s:
                pending.append(self._summary(w, now))
                w = None
            if w is None:
                w = _Window(start=now)
                self._windows[key] = w
                while len(self._windows) > self.max_keys:
                    _, old = self._windows.popitem(last=False)
                    if old.suppressed:
                        pending.append(self._summary(old, now))
            self._windows.move_to_end(key)
            emit = w.emitted < self.burst
            if emit:
                w.emitted += 1
            else:
                w.suppressed += 1
                w.level, w.msg, w.args = level, msg, args
        for lvl, m, a in pending:
            if m:
                self.logger.log(lvl, m, *a)
        if emit:
            self.logger.log(level, msg, *args)
        return emit

    def debug(self, key: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.DEBUG, key, msg, *args)

    def info(self, key: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.INFO, key, msg, *args)

    def warning(self, key: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def error(self, key: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.ERROR, key, msg, *args)

    def suppressed(self, key: Hashable) -> int:
        """Lines held back for ``key`` in its current interval."""
        with self._lock:
            w = self._windows.get(key)
            return w.suppressed if w is not None else 0

    def flush(self) -> int:
        """Write the summary of every key with suppressed lines now (e.g. at stop).
        Returns how many summaries were written."""
        now = self.clock()
        with self._lock:
            pending = [self._summary(w, now) for w in self._windows.values() if w.suppressed]
            self._windows.clear()
        for lvl, m, a in pending:
            self.logger.log(lvl, m, *a)
        return len(pending)

    @staticmethod
    def _summary(w: _Window, now: float) -> tuple[int, str, tuple[object, ...]]:
        """The last suppressed line, with how many were suppressed ("" if none)."""
        if not w.suppressed:
            return (w.level, "", ())
        took = max(now - w.start, 0.0)
        return (w.level, w.msg + " (suppressed %d similar messages in %.0fs)",
                (*w.args, w.suppressed, took))
