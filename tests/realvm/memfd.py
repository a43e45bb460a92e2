"""QEMU's guest RAM seen from beside it: its memfd, its mapping, what is resident.

QEMU started with ``-object memory-backend-memfd,id=ram,...`` holds the RAM as a memfd named
``memory-backend-memfd`` (``/proc/PID/fd/N -> /memfd:memory-backend-memfd (deleted)``) and
maps it once, shared (``rw-s``), at the RAM's size. Opening ``/proc/PID/fd/N`` gives another
process the same file: reads and writes through it are the guest's memory (memfd offset =
offset in the RAM block; for a guest below 3 GiB, its physical address).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MEMFD_NAME = "/memfd:memory-backend-memfd"
CHUNK = 16 << 20


class MemfdNotFound(RuntimeError):
    """The process has no memory-backend-memfd (or no shared mapping of it)."""


@dataclass(frozen=True)
class RamMapping:
    fd: int          # the memfd's number in QEMU's fd table
    start: int       # the rw-s mapping in QEMU's address space
    end: int
    offset: int      # file offset the mapping starts at

    @property
    def size(self) -> int:
        return self.end - self.start


def find_ram(pid: int) -> RamMapping:
    """The memfd and its rw-s mapping of process ``pid`` (the largest, if several)."""
    fds = []
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith(MEMFD_NAME):
            fds.append(int(entry.name))
    if not fds:
        raise MemfdNotFound(f"process {pid} holds no {MEMFD_NAME} fd "
                            "(QEMU needs -object memory-backend-memfd)")
    best: tuple[int, int, int] | None = None
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[1] == "rw-s" and parts[5].startswith(MEMFD_NAME):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if best is None or hi - lo > best[1] - best[0]:
                best = (lo, hi, int(parts[2], 16))
    if best is None:
        raise MemfdNotFound(f"process {pid} has {MEMFD_NAME} (fd {fds}) but no rw-s mapping")
    if len(fds) > 1:
        raise MemfdNotFound(f"process {pid} holds {len(fds)} {MEMFD_NAME} fds {fds}: "
                            "which one backs the mapping is ambiguous")
    return RamMapping(fds[0], *best)


def open_ram(pid: int, writable: bool = False) -> int:
    """A new fd for QEMU's memfd (the caller closes it)."""
    ram = find_ram(pid)
    return os.open(f"/proc/{pid}/fd/{ram.fd}",
                   (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)


def allocated_bytes(fd: int) -> int:
    """Bytes of the memfd that hold pages (SEEK_DATA/SEEK_HOLE over its extents; without
    swap a shmem page that exists is resident)."""
    size = os.fstat(fd).st_size
    total, pos = 0, 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:          # ENXIO: no data after pos
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        total += hole - data
        pos = hole
    return total


def mapping_rss(pid: int, start: int) -> int:
    """Rss (bytes) of the mapping of ``pid`` that starts at ``start``, from smaps: the RAM
    pages present in QEMU's own page tables."""
    head = f"{start:x}-"
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if line[:1] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
            inside = line.startswith(head)
        elif inside and line.startswith("Rss:"):
            return int(line.split()[1]) * 1024
    raise MemfdNotFound(f"no mapping at {start:#x} in /proc/{pid}/smaps")


def process_rss(pid: int) -> int:
    """VmRSS of the process, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise MemfdNotFound(f"no VmRSS in /proc/{pid}/status")


def find_all(fd: int, needle: bytes) -> list[int]:
    """Every offset of ``needle`` in the file, read in CHUNK-sized preads (holes read as
    zeros and allocate nothing)."""
    if not needle:
        raise ValueError("empty needle")
    size = os.fstat(fd).st_size
    found: list[int] = []
    pos = 0
    while pos < size:
        # Chunks overlap by len(needle) - 1 so a match across a boundary is seen once.
        buf = os.pread(fd, CHUNK + len(needle) - 1, pos)
        i = buf.find(needle)
        while i >= 0:
            found.append(pos + i)
            i = buf.find(needle, i + 1)
        pos += CHUNK
    return found


def overwrite(fd: int, offset: int, data: bytes) -> bytes:
    """Write ``data`` at ``offset`` and return the bytes it replaced."""
    old = os.pread(fd, len(data), offset)
    if len(old) != len(data):
        raise ValueError(f"offset {offset:#x}+{len(data)} is past the end of the memfd")
    if os.pwrite(fd, data, offset) != len(data):
        raise OSError(f"short pwrite at {offset:#x}")
    return old
