"""Parsing for benchmarks/vs_kernel.py (pure): cgroup v1/v2 memory files, zram's mm_stat,
/proc/PID/cgroup, /proc/PID/stat and /proc/swaps."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

MM_STAT_FIELDS = ("orig_data_size", "compr_data_size", "mem_used_total", "mem_limit",
                  "mem_used_max", "same_pages", "pages_compacted", "huge_pages",
                  "huge_pages_since")


def parse_keyed(text: str) -> dict[str, int]:
    """``key value`` lines (memory.stat, cpu.stat); lines that are not that are skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            with contextlib.suppress(ValueError):
                out[parts[0]] = int(parts[1])
    return out


def parse_mm_stat(text: str) -> dict[str, int]:
    """zram's mm_stat; kernels before 5.x have fewer fields, so only three are required."""
    vals = text.split()
    if len(vals) < 3 or not all(v.lstrip("-").isdigit() for v in vals):
        raise ValueError(f"mm_stat: expected at least 3 integers, got {text.strip()!r}")
    return {k: int(v) for k, v in zip(MM_STAT_FIELDS, vals, strict=False)}


def parse_proc_cgroup(text: str) -> tuple[str | None, str | None]:
    """(v1 memory cgroup path, v2 path) from /proc/PID/cgroup."""
    v1 = v2 = None
    for line in text.splitlines():
        hid, _, rest = line.partition(":")
        ctrls, _, path = rest.partition(":")
        if hid == "0" and ctrls == "":
            v2 = path
        elif "memory" in ctrls.split(","):
            v1 = path
    return v1, v2


def parse_task_cpu(text: str) -> tuple[int, int]:
    """(utime, stime) in clock ticks from a /proc/PID[/task/TID]/stat line; the command
    name may contain spaces and parentheses, so fields are counted after the last ')'."""
    rest = text[text.rindex(")") + 2:].split()
    return int(rest[11]), int(rest[12])


def parse_start_time(text: str) -> int:
    return int(text[text.rindex(")") + 2:].split()[19])


def parse_swaps(text: str) -> list[str]:
    return [line.split()[0] for line in text.splitlines()[1:] if line.strip()]


@dataclass(frozen=True, slots=True)
class MemSample:
    """Bytes charged to one memory cgroup. ``kernel``: the rest of usage (page tables,
    slab, kernel stacks), which v1 and v2 both charge to the same counter."""

    usage: int
    anon: int
    file: int
    swap: int
    mapped_file: int
    pgmajfault: int

    @property
    def kernel(self) -> int:
        return max(0, self.usage - self.anon - self.file)


def mem_from_v1(stat: dict[str, int], usage: int) -> MemSample:
    def g(k: str) -> int:  # total_* is the hierarchy's; ours has no children, either works
        return stat.get("total_" + k, stat.get(k, 0))

    return MemSample(usage=usage, anon=g("rss"), file=g("cache"), swap=g("swap"),
                     mapped_file=g("mapped_file"), pgmajfault=g("pgmajfault"))


def mem_from_v2(stat: dict[str, int], current: int, swap: int) -> MemSample:
    return MemSample(usage=current, anon=stat.get("anon", 0), file=stat.get("file", 0),
                     swap=swap, mapped_file=stat.get("file_mapped", 0),
                     pgmajfault=stat.get("pgmajfault", 0))
