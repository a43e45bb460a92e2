"""What a value may be, said once: the config file and the command-line options check
their values with the same rules, so both give the same bounds and the same message
(``must be an integer between 1 and 64, got 0``).

A :class:`Rule` converts a value as TOML gives it (``3``, ``"250ms"``, ``true``) or raises
ValueError. :func:`arg_type` adapts a rule to an argparse ``type=`` for options.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..kernel.api import PAGE_SIZE
from .units import fmt_duration, fmt_size, parse_duration, parse_size

T = TypeVar("T")
_SHOW_MAX = 80  # a value quoted in an error line is cut to this many characters


def show(value: object) -> str:
    """A value as the file wrote it (JSON-ish), cut to a readable length."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= _SHOW_MAX else text[:_SHOW_MAX - 3] + "..."


@dataclass(frozen=True, slots=True)
class Rule(Generic[T]):
    allowed: str  # "an integer between 1 and 64": completes "must be ..."
    conv: Callable[[Any], T]  # raises ValueError (or TypeError) for a value not allowed

    def check(self, value: object) -> T:
        try:
            return self.conv(value)
        except (ValueError, TypeError) as e:
            raise ValueError(self.message(value)) from e

    def message(self, got: object) -> str:
        return f"must be {self.allowed}, got {show(got)}"


def fsize(n: int) -> str:
    """A bound as a size: ``16TiB``, ``4KiB``, ``0B``."""
    for unit, mult in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return fmt_size(n) if n >= 1024 else f"{n}B"


def duration(lo: float, hi: float) -> Rule[float]:
    def conv(v: object) -> float:
        s = parse_duration(v)
        if not lo <= s <= hi:
            raise ValueError
        return s
    return Rule(f"a duration between {fmt_duration(lo)} and {fmt_duration(hi)} "
                f"(e.g. \"3s\", \"250ms\" or seconds)", conv)


def positive_duration() -> Rule[float]:
    def conv(v: object) -> float:
        s = parse_duration(v)
        if not s > 0:
            raise ValueError
        return s
    return Rule("a positive duration (e.g. \"30s\", \"2m\" or seconds)", conv)


def size(lo: int, hi: int, multiple: int = 1) -> Rule[int]:
    def conv(v: object) -> int:
        n = parse_size(v)
        if not lo <= n <= hi or n % multiple:
            raise ValueError
        return n
    extra = f", a multiple of {multiple} bytes" if multiple > 1 else ""
    return Rule(f"a size between {fsize(lo)} and {fsize(hi)}{extra} "
                f"(e.g. \"512MiB\", \"1GiB\" or bytes)", conv)


def integer(lo: int, hi: int, unit: str = "") -> Rule[int]:
    def conv(v: object) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError
        return v
    return Rule(f"an integer between {lo} and {hi}{f' ({unit})' if unit else ''}", conv)


def number(lo: float, hi: float) -> Rule[float]:
    def conv(v: object) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
            raise ValueError
        return float(v)
    return Rule(f"a number between {lo:g} and {hi:g}", conv)


def boolean() -> Rule[bool]:
    def conv(v: object) -> bool:
        if not isinstance(v, bool):
            raise ValueError
        return v
    return Rule("true or false", conv)


def choice(choices: Sequence[str]) -> Rule[str]:
    def conv(v: object) -> str:
        if v not in choices:
            raise ValueError
        return str(v)
    return Rule("one of " + ", ".join(show(c) for c in choices), conv)


def string(allowed: str, check: Callable[[str], object] = lambda s: None) -> Rule[str]:
    def conv(v: object) -> str:
        if not isinstance(v, str):
            raise ValueError
        check(v)
        return v
    return Rule(allowed, conv)


def string_list(allowed: str) -> Rule[list[str]]:
    def conv(v: object) -> list[str]:
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
            raise ValueError
        return list(v)
    return Rule(f"a non-empty list of strings ({allowed})", conv)


def int_list(lo: int, hi: int, allowed: str) -> Rule[list[int]]:
    def conv(v: object) -> list[int]:
        if not isinstance(v, list) or not all(
                isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi for x in v):
            raise ValueError
        return list(v)
    return Rule(f"a list of integers between {lo} and {hi} ({allowed})", conv)


# ---- the bounds that both the file and the options use
MAX_REGIONS = 64
REGION_SIZE = size(PAGE_SIZE, 16 << 40, PAGE_SIZE)
INTERVAL = duration(0.01, 3600)
WORKLOAD_THREADS = integer(1, 64)
SHUTDOWN_DEADLINE = duration(0.1, 3600)
MAP_SIZE = size(1 << 20, 64 << 40, PAGE_SIZE)
# --size-mib: region.size's bounds, in MiB
SIZE_MIB = integer(1, (16 << 40) >> 20, "MiB, as region.size allows 4KiB - 16TiB")
SECONDS = positive_duration()

_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")


def _from_text(text: str) -> object:
    """An option's text as TOML would type it: ``"3"`` -> 3, ``"0.5"`` -> 0.5, else the
    string (``"250ms"``, ``"1GiB"``)."""
    t = text.strip()
    if _INT.match(t):
        return int(t)
    if _FLOAT.match(t):
        return float(t)
    return text


def arg_type(rule: Rule[T]) -> Callable[[str], T]:
    """An argparse ``type=``: ``--threads 0`` -> ``argument --threads: must be an integer
    between 1 and 64, got 0`` and exit status 2."""
    def convert(text: str) -> T:
        try:
            return rule.check(_from_text(text))
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = "value"  # argparse names the type in some messages
    return convert
