"""Shared pieces of the tests that reach into the target process (tests/remote/target.c)."""

from __future__ import annotations

import select
import struct
import time

from vmm_tierd.kernel.api import Kernel, PageFault, ScanResult
from vmm_tierd.kernel.process import SYS_MMAP, SYS_MUNMAP, Process, Syscall

PS = 4096
WAIT = 10.0
# x86_64 syscall numbers the target's threads block in (syscall_64.tbl)
NR_READ = 0
NR_RECVFROM = 45
NR_FUTEX = 202
NR_CLOCK_NANOSLEEP = 230
NR_PPOLL = 271
NR_IOCTL = 16
CLOCK_MONOTONIC = 1


def pages(scan: ScanResult, base: int) -> set[int]:
    """Page indexes (relative to ``base``) of the regions a scan returned."""
    out: set[int] = set()
    for lo, hi, _ in scan.regions.tolist():
        out.update(range((lo - base) // PS, (hi - base) // PS))
    return out


def wait_fault(k: Kernel, fd: int, timeout: float = WAIT) -> PageFault:
    deadline = time.monotonic() + timeout
    p = select.poll()
    p.register(fd, select.POLLIN)
    while time.monotonic() < deadline:
        p.poll(100)
        for ev in k.uffd_read(fd):
            if isinstance(ev, PageFault):
                return ev
            raise AssertionError(f"unexpected uffd event {ev!r}")
    raise AssertionError(f"no fault on uffd {fd} within {timeout}s")


class RemotePage:
    """An anonymous page mapped inside the target by an injected mmap (for syscall
    arguments that live in memory)."""

    def __init__(self, proc: Process, tid: int) -> None:
        self.proc, self.tid = proc, tid
        r = proc.inject(tid, [Syscall(SYS_MMAP, (0, PS, 3, 0x22, (1 << 64) - 1, 0))])
        assert r.results[0] > 0, r
        self.addr = r.results[0]

    def put(self, fmt: str, *values: int, offset: int = 0) -> int:
        self.proc.write_memory(self.addr + offset, struct.pack(fmt, *values))
        return self.addr + offset

    def get(self, fmt: str, offset: int = 0) -> tuple[int, ...]:
        return struct.unpack(fmt, self.proc.read_memory(self.addr + offset,
                                                        struct.calcsize(fmt)))

    def close(self) -> None:
        assert self.proc.inject(self.tid, [Syscall(SYS_MUNMAP, (self.addr, PS))]).results == (0,)
