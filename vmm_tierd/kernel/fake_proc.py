"""Simulated VMM processes of the fake kernel: their own address space, fd table and
threads, beside this process (the daemon).

``FakeKernel.spawn_process(ram_bytes)`` makes one shaped like QEMU with
``-object memory-backend-memfd,share=on``: fds 0-2 are /dev/null, fd 3 the RAM memfd
(named like QEMU's), fd 4 an eventfd; the memfd is mapped MAP_SHARED once, the size of
the RAM; the main thread (tid == pid) is named ``comm`` and each vCPU thread
"CPU n/KVM". Its accesses (``start_access``, ``start_workload``) are made by its vCPU
threads, in its address space, and block on uffd faults exactly as this process's do.

A uffd created inside it (an injected ``userfaultfd()``, see fake_inject) is bound to
its address space; every fd of that uffd, in any process, holds a reference, and the
context is released only with the last one (``FakeState.unref``). ``exit()`` is its
death: its address space is torn down (no UNMAP events, as at a real exit), its fds are
closed (dropping those references), its blocked accesses end with ESRCH, and every
pidfd on it becomes readable.
"""

from __future__ import annotations

import errno
import itertools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .api import Access, AccessKind, MemType, Owner, Region, WorkloadSpec
from .fake_state import Mapping, MemFile, Mm, Uffd
from .fake_workload import FakeWorkload
from .process import Syscall, ThreadInfo

if TYPE_CHECKING:
    from .fake import FakeKernel

# Where a simulated VMM's mmaps go, below the fixed lines of SPECIAL_MAPS.
VMM_BASE = 0x7F0000000000
VMM_LIMIT = 0x7F8000000000
ANON_INODE_INO = 1057  # every anon_inode file shares the one anon inode
NULL_INO = 5

# /proc/PID/maps lines that are not modelled as memory (never registered or read by the
# daemon): the binary, the heap, libc, the stack, [vvar] and [vdso] (where a real
# injector finds its ``syscall`` instruction).
SPECIAL_MAPS: tuple[tuple[int, int, str, int, int, str], ...] = (
    (0x555555554000, 0x5555556A0000, "r--p", 0, 1311001, "/usr/bin/qemu-system-x86_64"),
    (0x5555556A0000, 0x555555E40000, "r-xp", 0x14C000, 1311001,
     "/usr/bin/qemu-system-x86_64"),
    (0x555556E40000, 0x555557200000, "rw-p", 0, 0, "[heap]"),
    (0x7F9A3C000000, 0x7F9A3C028000, "r--p", 0, 1312044, "/usr/lib/x86_64-linux-gnu/libc.so.6"),
    (0x7F9A3C028000, 0x7F9A3C1B0000, "r-xp", 0x28000, 1312044,
     "/usr/lib/x86_64-linux-gnu/libc.so.6"),
    (0x7FFC8E3A0000, 0x7FFC8E3C1000, "rw-p", 0, 0, "[stack]"),
    (0x7FFC8E3F8000, 0x7FFC8E3FC000, "r--p", 0, 0, "[vvar]"),
    (0x7FFC8E3FC000, 0x7FFC8E3FE000, "r-xp", 0, 0, "[vdso]"),
)


@dataclass(eq=False)
class VmmFd:
    """One entry of a simulated process's fd table."""

    target: str  # readlink(/proc/PID/fd/N)
    inode: int
    cloexec: bool
    uffd: Uffd | None = None
    file: MemFile | None = None
    eventfd: int = -1  # a real eventfd the simulated process owns
    pid: int = 0  # a pidfd: the process it refers to


class FakeVmm:
    """A simulated VMM process (see the module docstring). Create it with
    ``FakeKernel.spawn_process``; it shares the kernel's lock."""

    def __init__(self, kernel: FakeKernel, pid: int, vcpu_tids: list[int], start_time: int,
                 ram_bytes: int, name: str, comm: str, privileged: bool) -> None:
        self.k = kernel
        self.pid = pid
        self.start_time = start_time
        self.owner = Owner(pid, start_time)
        self.comm = comm
        self.ram_bytes = ram_bytes
        self.privileged = privileged  # False: userfaultfd() needs UFFD_USER_MODE_ONLY
        self.mm = Mm(VMM_BASE, VMM_LIMIT)
        self.threads = [ThreadInfo(pid, comm)] + [ThreadInfo(t, f"CPU {i}/KVM")
                                                  for i, t in enumerate(vcpu_tids)]
        self.vcpu_tids = tuple(vcpu_tids)
        self._next_vcpu = itertools.cycle(self.vcpu_tids)
        self.fds: dict[int, VmmFd] = {}
        self.injections: list[tuple[int, tuple[Syscall, ...]]] = []  # every ptrace stop
        self.pidfds: list[int] = []  # this side's pidfds on it: readable once it exits
        self.exited = False
        self._workloads: list[FakeWorkload] = []
        f = MemFile(name, ram_bytes, kernel.new_ino())
        m = Mapping(self.mm.alloc_addr(ram_bytes), ram_bytes, MemType.MEMFD, f, 0)
        f.maps.append(m)
        self.mm.add(m)
        for fd in (0, 1, 2):
            self.fds[fd] = VmmFd("/dev/null", NULL_INO, False)
        self.ram_fd = 3
        self.fds[3] = VmmFd(f"/memfd:{name} (deleted)", f.ino, True, file=f)
        ev = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.fds[4] = VmmFd("anon_inode:[eventfd]", ANON_INODE_INO, True, eventfd=ev)
        self.ram_addr = m.addr

    @property
    def region(self) -> Region:
        """The guest RAM as this process sees it (no fd here: ``Process.getfd`` makes one)."""
        return Region(self.ram_addr, self.ram_bytes, MemType.MEMFD, fd=-1, offset=0,
                      owner=self.owner, owner_fd=self.ram_fd)

    @property
    def alive(self) -> bool:
        return not self.exited

    @property
    def tids(self) -> tuple[int, ...]:
        return tuple(t.tid for t in self.threads)

    def vcpu_tid(self) -> int:
        """The vCPU thread that makes the next access (round robin)."""
        return next(self._next_vcpu)

    # ---- guest side ----------------------------------------------------------------
    def start_access(self, addr: int, kind: AccessKind, length: int = 1,
                     data: bytes = b"") -> Access:
        """An access by one of its vCPU threads, in its address space. After ``exit``
        it ends at once with ERROR/ESRCH (the thread is gone)."""
        return self.k.access_in(self.mm, self.vcpu_tid, addr, kind, length, data)

    def start_workload(self, region: Region, spec: WorkloadSpec) -> FakeWorkload:
        if region.owner != self.owner:
            raise ValueError(f"workload: region at 0x{region.addr:x} belongs to "
                             f"{region.owner}, not to {self.owner}")
        wl = FakeWorkload(self.k, region, spec, self.mm, self.vcpu_tid)
        with self.k.lock:
            self._workloads.append(wl)
        return wl

    # ---- fd table ------------------------------------------------------------------
    def alloc_fd(self, entry: VmmFd) -> int:
        """The lowest free fd number, as the kernel picks it."""
        fd = 0
        while fd in self.fds:
            fd += 1
        self.fds[fd] = entry
        return fd

    def close_fd(self, fd: int) -> int:
        """close(fd) inside the process: 0 or -errno. Caller holds the lock."""
        e = self.fds.pop(fd, None)
        if e is None:
            return -errno.EBADF
        self._drop(e)
        return 0

    def _drop(self, e: VmmFd) -> None:
        if e.uffd is not None:
            self.k.unref(e.uffd)
        if e.eventfd >= 0:
            os.close(e.eventfd)
            e.eventfd = -1

    def fd_flags(self, fd: int) -> tuple[bool, bool]:
        """(O_CLOEXEC of the fd, O_NONBLOCK of its file) for a uffd ``fd``: what
        /proc/PID/fdinfo's flags line shows (tests check injected flags with it)."""
        e = self.fds[fd]
        return e.cloexec, e.uffd.nonblock if e.uffd is not None else False

    # ---- death ---------------------------------------------------------------------
    def exit(self) -> None:
        """The process dies (idempotent): see the module docstring."""
        with self.k.lock:
            if self.exited:
                return
            self.exited = True
            self.k.reap(self)
            for fd in sorted(self.fds):
                self._drop(self.fds.pop(fd))
            self.k.teardown_mm(self.mm)
            for pfd in self.pidfds:
                os.eventfd_write(pfd, 1)
            for wl in self._workloads:
                wl.halt()

    def close(self) -> None:
        """Exit if still running (the shape of tests/remote's ``Target.close``)."""
        self.exit()

    def __enter__(self) -> FakeVmm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "exited" if self.exited else "running"
        return f"FakeVmm(pid={self.pid}, start={self.start_time}, {state})"
