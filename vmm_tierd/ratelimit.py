"""Log lines a guest can cause, at a bounded rate: a guest must not be able to fill the
host's disk with our logs (one test once produced 3.8 M lines from guest discards)."""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """At most ``burst`` lines per ``key`` per ``period`` seconds; the next line after a
    quiet spell says how many similar ones were suppressed."""

    def __init__(self, logger: logging.Logger, *, burst: int = 5, period: float = 60.0,
                 clock: object = time.monotonic) -> None:
        self.logger = logger
        self.burst = burst
        self.period = period
        self._clock = clock
        self._seen: dict[str, list[float | int]] = {}  # key -> [window start, lines, dropped]

    def log(self, level: int, key: str, msg: str, *args: object) -> bool:
        """Log unless ``key`` is over its budget; True if logged."""
        if not self.logger.isEnabledFor(level):
            return False
        now = float(self._clock())  # type: ignore[operator]
        ent = self._seen.get(key)
        if ent is None or now - ent[0] >= self.period:
            dropped = int(ent[2]) if ent else 0
            if len(self._seen) > 4096:  # bounded memory whatever the keys
                self._seen.clear()
            self._seen[key] = [now, 1, 0]
            if dropped:
                msg += " (%d similar messages suppressed)"
                args = (*args, dropped)
            self.logger.log(level, msg, *args)
            return True
        if ent[1] < self.burst:
            ent[1] = int(ent[1]) + 1
            self.logger.log(level, msg, *args)
            return True
        ent[2] = int(ent[2]) + 1
        return False

    def error(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.ERROR, key, msg, *args)

    def warning(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def info(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.INFO, key, msg, *args)
