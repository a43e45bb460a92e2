"""The page store's file layer on Linux (native/store_io.c): SIGBUS containment for LMDB's
map of data.mdb, page-cache control and hole punching. Only vmm_tierd.engine.store* uses
it; it is here because it is the project's one place for cffi. Failures raise OSError
with the real errno."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from vmm_tierd._native import ffi, lib

SYNC_WAIT_BEFORE, SYNC_WRITE, SYNC_WAIT_AFTER = 1, 2, 4  # sync_file_range(2) flags


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


def _ranges(ranges: np.ndarray) -> tuple[object, int]:
    r = np.ascontiguousarray(ranges, dtype=np.uint64).reshape(-1, 2)
    return ffi.from_buffer("uint64_t[]", r), len(r)


class MapGuard:
    """Contain SIGBUS in ``[base, base+length)``, a read-only shared map of ``fd``: a
    faulting page reads as zeros (``repairable``: until ``repair()`` maps the file back;
    otherwise for good, from that page to the end of the range)."""

    def __init__(self, base: int, length: int, fd: int, repairable: bool = True) -> None:
        _check(lib.vs_guard_add(base, length, fd, int(repairable)), "SIGBUS guard")
        self.base = base
        self.length = length
        self.closed = False

    def events(self) -> int:
        """SIGBUS faults contained in this range so far."""
        return int(lib.vs_guard_range_events(self.base))

    def repair(self) -> bool:
        """Map the file back over pages that faulted; True if there were any."""
        return bool(_check(lib.vs_guard_repair(self.base), "remap after SIGBUS"))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            lib.vs_guard_remove(self.base)


def guard_ensure() -> None:
    """Put the guard's handler back on top if another one replaced it (cheap: one
    rt_sigaction when nothing changed)."""
    _check(lib.vs_guard_ensure(), "sigaction(SIGBUS)")


def guard_events() -> int:
    """SIGBUS faults contained so far, in every guarded range."""
    return int(lib.vs_guard_events())


def guard_thread_events() -> int:
    """SIGBUS faults contained in the calling thread so far."""
    return int(lib.vs_guard_thread_events())


def copy_guarded(addr: int, n: int) -> bytes | None:
    """``n`` bytes at ``addr`` inside a guarded map, or None if reading them faulted."""
    buf = ffi.new("uint8_t[]", n)
    if lib.vs_copy_guarded(buf, addr, n) != 0:
        return None
    return bytes(ffi.buffer(buf, n))


@dataclass(frozen=True)
class CacheStat:
    """Page-cache state of a file, in bytes (cachestat(2))."""

    cached: int
    dirty: int
    writeback: int
    evicted: int


def cachestat(fd: int) -> CacheStat:
    out = ffi.new("uint64_t[5]")
    _check(lib.vs_cachestat(fd, 0, 0, out), "cachestat")
    page = os.sysconf("SC_PAGESIZE")
    return CacheStat(out[0] * page, out[1] * page, out[2] * page, out[3] * page)


def resident(addr: int, length: int) -> int:
    """Bytes of the file mapped at ``[addr, addr+length)`` that are in the page cache
    (mincore(2), which systemd's unit filters know by name; cachestat(2) is newer)."""
    return _check(lib.vs_mincore_count(addr, length), "mincore") * os.sysconf("SC_PAGESIZE")


def punch(fd: int, ranges: np.ndarray) -> int:
    """fallocate(PUNCH_HOLE|KEEP_SIZE) each (offset, length) row of ``ranges``."""
    buf, n = _ranges(ranges)
    return _check(lib.vs_punch(fd, buf, n), "fallocate(PUNCH_HOLE)")


FAULT_AROUND = 64 << 10  # /sys/kernel/mm/...: fault_around_bytes' default and maximum


def writeback(fd: int, ranges: np.ndarray, *, map_base: int = 0, map_len: int = 0,
              sync_flags: int = 0, drop: bool = False) -> int:
    """For each (offset, length) row: MADV_DONTNEED of the pages of the map at
    ``map_base`` (``map_len`` bytes long) there and within FAULT_AROUND of it,
    sync_file_range(``sync_flags``), POSIX_FADV_DONTNEED (``drop``)."""
    buf, n = _ranges(ranges)
    return _check(lib.vs_writeback(fd, map_base, map_len, buf, n, sync_flags, int(drop),
                                   FAULT_AROUND), "write-behind")
