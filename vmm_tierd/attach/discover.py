"""Find a VMM's guest RAM: its memfd in /proc/PID/fd and the shared mapping(s) of it in
/proc/PID/maps. Pure over the ``Process`` protocol (linux or fake).

Only a shared memfd can be tiered from outside the VMM: its pages are read with
``pread`` and dropped with ``fallocate(PUNCH_HOLE)`` on our copy of the fd, and the kernel
refuses both UFFDIO_MOVE and MADV_DONTNEED on another process's anonymous memory.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from ..kernel.api import MemType, Owner, Region
from ..kernel.process import Process, ProcFd, ProcMapping
from ..settings import DEFAULT_MEMFD_NAMES

MIN_RAM_BYTES = 1 << 20

HOW_TO = ("guest RAM must be a shared memfd. QEMU: -object memory-backend-memfd,id=ram,"
          "size=SIZE,share=on -machine memory-backend=ram; libvirt: <memoryBacking>"
          "<source type='memfd'/><access mode='shared'/></memoryBacking>")


class DiscoveryError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class RamMapping:
    """One shared mapping of a guest-RAM memfd in the VMM."""

    mapping: ProcMapping
    fd: ProcFd  # the VMM's fd of the memfd

    def region(self, page_size: int, owner: Owner) -> Region:
        return Region(addr=self.mapping.start, length=self.mapping.length,
                      memtype=MemType.MEMFD, offset=self.mapping.offset, owner=owner,
                      page_size=page_size, owner_fd=self.fd.fd)


def find_guest_ram(proc: Process, names: Sequence[str] = DEFAULT_MEMFD_NAMES,
                   page_size: int = 4096) -> list[RamMapping]:
    """Every rw-s mapping of a memfd whose name matches ``names``, at least
    MIN_RAM_BYTES long; DiscoveryError naming what was found and how to fix it."""
    fds = proc.fds()
    memfds = {f.inode: f for f in fds if f.memfd_name is not None
              and any(fnmatch.fnmatchcase(f.memfd_name, n) for n in names)}
    maps = proc.maps()
    found: list[RamMapping] = []
    for m in maps:
        f = memfds.get(m.inode)
        if f is None or not m.path.startswith("/memfd:"):
            continue
        if not m.shared or "rw" not in m.perms or m.length < MIN_RAM_BYTES:
            continue
        if m.start % page_size or m.length % page_size or m.offset % page_size:
            continue
        found.append(RamMapping(m, f))
    if found:
        return found
    raise DiscoveryError(f"pid {proc.pid}: no guest RAM to tier: {_what(fds, maps, names)}; "
                         f"{HOW_TO}")


def _what(fds: Sequence[ProcFd], maps: Sequence[ProcMapping], names: Sequence[str]) -> str:
    named = [f.memfd_name for f in fds if f.memfd_name is not None]
    big_private = [m for m in maps if not m.shared and "rw" in m.perms
                   and m.length >= 64 << 20]
    if named:
        shared = {m.inode for m in maps if m.shared}
        listed = ", ".join(f"{n!r}{'' if f.inode in shared else ' (not mapped shared)'}"
                           for n, f in ((f.memfd_name, f) for f in fds
                                        if f.memfd_name is not None))
        return (f"its memfds are {listed}, none named like {', '.join(names)} and mapped "
                "shared (set [[vm]] memfd = [...] if its RAM has another name)")
    if big_private:
        m = max(big_private, key=lambda m: m.length)
        return (f"its RAM looks private ({m.length >> 20} MiB {m.perms} "
                f"{m.path or 'anonymous'} at 0x{m.start:x}), which no process but the VMM "
                "can evict")
    return "it has no memfd"
