"""SIGHUP before the daemon is ready.

SIGHUP's default action ends the process, and the daemon's own handler (trio's signal
receiver) exists only once the event loop runs. ``vmm-tierd run`` calls
:func:`hold_sighup` first thing, so a SIGHUP from then until the receiver takes over is
remembered; the daemon applies it as one reload once it is ready (``take_sighup``).
Python runs the handler on the main thread between bytecodes: it only sets a flag.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

_held = threading.Event()


def _on_sighup(signum: int, frame: FrameType | None) -> None:
    _held.set()


def hold_sighup() -> None:
    signal.signal(signal.SIGHUP, _on_sighup)


def take_sighup() -> bool:
    """True once if a SIGHUP was held since the last call."""
    was = _held.is_set()
    _held.clear()
    return was
