"""Another process's memory: the part of the kernel boundary that reaches into a VMM.

A daemon beside a VM tiers memory that lives in the VMM's process. What it can do from
outside (measured on 6.18, see ``shared/kernel-facts.md``):
- a uffd created *inside* the VMM has the VMM's mm as its context: every uffd ioctl
  issued on a copy of it (``pidfd_getfd``) acts on the VMM's memory, except UFFDIO_MOVE,
  which the kernel refuses across mms (EINVAL);
- PAGEMAP_SCAN runs on ``/proc/PID/pagemap``;
- memfd guest RAM is read with ``pread`` and dropped with ``fallocate(PUNCH_HOLE)`` on
  the daemon's own copy of the memfd;
- what only the VMM itself may do (create its uffd, ``MADV_DONTNEED`` its own PTEs, close
  its copy of the uffd) runs as syscalls injected with ptrace into one non-vCPU thread.

:class:`Process` is that reach, opened with ``Kernel.open_process(pid)``. The linux
backend implements it with pidfds, ``/proc`` and ptrace; the fake kernel with simulated
processes that have their own address spaces and fd tables. Nothing here touches guest
memory from Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .api import Access, AccessKind, KernelError, Owner, ScanResult

# x86_64 syscall numbers for injection (arch/x86/entry/syscalls/syscall_64.tbl).
SYS_CLOSE = 3
SYS_MMAP = 9
SYS_MUNMAP = 11
SYS_IOCTL = 16
SYS_MADVISE = 28
SYS_GETPID = 39
SYS_SOCKET = 41
SYS_RECVMSG = 47
SYS_BIND = 49
SYS_USERFAULTFD = 323
SYS_PIDFD_OPEN = 434
SYS_PROCESS_MADVISE = 440
UIO_MAXIOV = 1024  # iovecs per process_madvise call


@dataclass(frozen=True, slots=True)
class ProcMapping:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str  # e.g. "rw-s"
    offset: int  # file offset of ``start``
    inode: int
    path: str  # e.g. "/memfd:memory-backend-memfd (deleted)", "[vdso]", ""

    @property
    def shared(self) -> bool:
        return self.perms[3:4] == "s"

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class ProcFd:
    """One entry of /proc/PID/fd: the fd number, readlink's answer, and the inode of what
    it refers to (matches ``ProcMapping.inode`` for a mapped memfd)."""

    fd: int
    target: str  # e.g. "/memfd:memory-backend-memfd (deleted)", "anon_inode:[userfaultfd]"
    inode: int

    @property
    def is_uffd(self) -> bool:
        return self.target == "anon_inode:[userfaultfd]"

    @property
    def memfd_name(self) -> str | None:
        """The memfd's name ("memory-backend-memfd"), or None if it isn't a memfd."""
        t = self.target
        if not t.startswith("/memfd:"):
            return None
        t = t[len("/memfd:"):]
        return t[: -len(" (deleted)")] if t.endswith(" (deleted)") else t


@dataclass(frozen=True, slots=True)
class ThreadInfo:
    tid: int
    comm: str  # /proc/PID/task/TID/comm, e.g. "CPU 0/KVM", "qemu-system-x86"


@dataclass(frozen=True, slots=True)
class Syscall:
    """One syscall to run inside the target thread: number and up to six arguments."""

    nr: int
    args: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class InjectResult:
    tid: int  # the thread the calls ran in
    results: tuple[int, ...]  # each call's raw return value (-errno on failure)
    pause_s: float  # how long that thread was kept stopped, attach to detach
    signals: tuple[int, ...] = ()  # signals that arrived meanwhile and were re-delivered


class InjectError(KernelError):
    """An injection that failed in ptrace itself (or the thread died) after running
    ``results`` (raw values of the calls that completed, in order). The thread's
    registers were restored and it was detached (``restored``), unless it died."""

    def __init__(self, op: str, err: int, detail: str = "", *,
                 results: tuple[int, ...] = (), restored: bool = False,
                 signals: tuple[int, ...] = ()) -> None:
        super().__init__(op, err, 0, detail)
        self.results = results
        self.restored = restored
        self.signals = signals


@runtime_checkable
class Process(Protocol):
    """Another process (a VMM), opened by ``Kernel.open_process(pid)``.

    Errors are :class:`~vmm_tierd.kernel.api.KernelError` with the op named as the
    syscall ("pidfd_open", "pidfd_getfd", "ptrace(SEIZE)", "process_vm_readv", ...).
    A process that has exited raises ESRCH from every call but ``alive``/``close``.
    """

    pid: int
    owner: Owner  # pid and start time, read at open
    pidfd: int  # readable (poll/trio.wait_readable) once the process has exited

    def alive(self) -> bool:
        """Still the same process (not exited, pid not reused)."""
        ...

    def maps(self) -> list[ProcMapping]: ...
    def fds(self) -> list[ProcFd]: ...
    def threads(self) -> list[ThreadInfo]: ...

    def uffd_features(self, fd: int) -> int | None:
        """Features enabled on the process's uffd ``fd`` (the API line of
        /proc/PID/fdinfo/FD), or None if UFFDIO_API has not been done on it yet (as
        ``Kernel.uffd_features``); ENOTTY/EINVAL-free: raises KernelError(EBADF) if ``fd``
        is not a uffd."""
        ...

    def getfd(self, fd: int) -> int:
        """``pidfd_getfd``: a copy of the process's ``fd`` in this process (O_CLOEXEC).
        The process keeps its own. Needs PTRACE_MODE_ATTACH_REALCREDS."""
        ...

    def read_memory(self, addr: int, length: int) -> bytes:
        """``process_vm_readv``. Never for registered guest RAM (it would fault)."""
        ...

    def write_memory(self, addr: int, data: bytes) -> None:
        """``process_vm_writev`` (e.g. into a scratch page mapped by an injected mmap)."""
        ...

    def inject(self, tid: int, calls: Sequence[Syscall]) -> InjectResult:
        """Run ``calls`` in thread ``tid``, in order, within one ptrace stop: seize,
        interrupt, save every register, run each call at a ``syscall`` instruction of the
        process (its vDSO has one) with ``orig_rax = -1``, restore every register, and
        detach re-delivering any signal that arrived meanwhile. A thread stopped inside a
        restartable syscall (ppoll, futex, nanosleep, recvfrom) restarts it correctly.
        Results are raw (-errno); only a failure of ptrace itself raises, as
        :class:`InjectError` (its op names the step, e.g. "ptrace(SETREGS)", and it
        carries the results of the calls that did run)."""
        ...

    def pagemap_scan(self, start: int, end: int, *, category_mask: int = 0,
                     category_inverted: int = 0, category_anyof_mask: int = 0,
                     return_mask: int = 0, flags: int = 0, max_pages: int = 0
                     ) -> ScanResult:
        """``Kernel.pagemap_scan``, over /proc/PID/pagemap."""
        ...

    def close(self) -> None:
        """Close the pidfd and anything else held for the process (not the fds that
        ``getfd`` returned: they belong to the caller)."""
        ...


@runtime_checkable
class GuestProcess(Protocol):
    """Guest-side facet of another process, for tests and simulation: accesses made by a
    thread *of that process* (a vCPU of the VMM). The fake's simulated VMMs have it; on
    Linux the test target program (tests/remote/) provides it."""

    def start_access(self, addr: int, kind: AccessKind, length: int = 1,
                     data: bytes = b"") -> Access: ...


def is_vcpu_thread(comm: str) -> bool:
    """Thread names VMMs give their vCPU threads: QEMU "CPU 0/KVM", "CPU 1/TCG";
    Firecracker "fc_vcpu 0"; Cloud Hypervisor "vcpu0".

    QEMU names its threads only with ``-name ...,debug-threads=on`` (libvirt always
    passes it). Without it every thread is "qemu-system-x86" (measured with Debian's
    7.2) and no vCPU is recognised; the main thread, which pick_inject_thread prefers,
    is never a vCPU thread in QEMU, so the choice is still safe there."""
    c = comm.lower()
    if c.startswith("cpu ") and "/" in c:
        return True
    return c.startswith(("fc_vcpu", "vcpu")) and c.rstrip()[-1:].isdigit()


def pick_inject_thread(pid: int, threads: Sequence[ThreadInfo]) -> int:
    """The thread injected syscalls go into: never a vCPU thread (stopping one stalls
    the guest). The main thread unless it is one, else the first other thread."""
    for t in threads:
        if t.tid == pid and not is_vcpu_thread(t.comm):
            return t.tid
    for t in threads:
        if not is_vcpu_thread(t.comm):
            return t.tid
    raise LookupError(f"pid {pid}: every thread is a vCPU thread "
                      f"({', '.join(t.comm for t in threads)}); none can be stopped safely")
