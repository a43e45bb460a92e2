"""Where a guest region's page tables are: this process, or another one (a VMM).

The engine scans and drops PTEs through an :class:`AddressSpace`, so one engine tiers
memory of either owner. ``LocalSpace`` is this process; the other process's space
(``kernel/remote.py``) scans /proc/PID/pagemap and zaps PTEs with syscalls injected into
the VMM, because the kernel refuses MADV_DONTNEED from outside (process_madvise on
another process accepts only COLD/PAGEOUT/WILLNEED/COLLAPSE).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from . import uapi
from .api import Kernel, ScanResult


@runtime_checkable
class AddressSpace(Protocol):
    def pagemap_scan(self, start: int, end: int, *, category_mask: int = 0,
                     category_inverted: int = 0, category_anyof_mask: int = 0,
                     return_mask: int = 0, flags: int = 0, max_pages: int = 0
                     ) -> ScanResult: ...

    def discard(self, ranges: Sequence[tuple[int, int]],
                advice: int = uapi.MADV_DONTNEED) -> int:
        """``advice`` (MADV_DONTNEED) over every (addr, length) range, in as few calls as
        the owner allows; returns the bytes advised. KernelError on failure, with
        ``done`` = bytes advised before it."""
        ...


class LocalSpace:
    """This process's address space."""

    def __init__(self, kernel: Kernel) -> None:
        self.k = kernel

    def pagemap_scan(self, start: int, end: int, **kw: int) -> ScanResult:
        return self.k.pagemap_scan(start, end, **kw)

    def discard(self, ranges: Sequence[tuple[int, int]],
                advice: int = uapi.MADV_DONTNEED) -> int:
        done = 0
        for addr, length in ranges:
            self.k.madvise(addr, length, advice)
            done += length
        return done
