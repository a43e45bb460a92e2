"""An in-process kernel with the semantics of Linux userfaultfd + PAGEMAP_SCAN.

``FakeKernel(dialect=Dialect.RWP)`` speaks the Linux 7.3 RWP API (``fake-rwp``);
``Dialect.RFC`` speaks the RFC as posted (MINOR_ANON/MINOR_ASYNC/DEACTIVATE,
``fake-rfc``). Everything else follows Linux 6.18 as measured on the host. uffd fds are
real eventfds, readable iff a message is pending, so trio's ``wait_readable`` works.

Modules: fake_state (address spaces, contexts), fake_uffd (API/register/read/events),
fake_ops (page ioctls), fake_mem (mmap/madvise/memfd files), fake_scan (PAGEMAP_SCAN),
fake_guest (accesses), fake_workload (workloads), fake_proc (simulated VMM processes),
fake_remote (``Process`` handles on them), fake_inject (syscalls injected into them).

Processes. The FakeKernel is this process (the daemon): ``mm``, ``uffds``, ``files``
are its address space and fds. ``spawn_process`` makes simulated VMMs with their own
(fake_proc), ``open_process`` a ``Process`` handle on one (fake_remote). A uffd context
belongs to the mm of the process that created it and every ioctl acts there, whoever
calls, except that UFFDIO_MOVE is EINVAL when that mm is not this process's; it is
released only when the last fd referring to it, in any process, is closed. ``crash()``
is this process's death (and restart).

Semantics checked against the real 6.18 kernel (tests/test_fake_vs_linux.py), notably:
- a partial COPY/ZEROPAGE/CONTINUE/POISON/MOVE reports the bytes done and fails EAGAIN;
  the op's own errno (EEXIST, ENOENT, ...) only comes when nothing was done;
- every page op fails EAGAIN while a REMOVE/UNMAP event is unread, and the madvise/munmap
  that raised it blocks until the event is read (so never call it from the thread that
  reads the uffd when EVENT_REMOVE/EVENT_UNMAP is on);
- UNREGISTER unprotects, but wakes blocked faults only on MISSING-registered ranges;
  close wakes everything;
- PAGEMAP_SCAN: see fake_scan. PAGE_IS_ACCESSED (RWP dialect) is "present and no uffd
  bit" inside RWP VMAs, so a page never protected, or freshly COPY'd, reads as accessed.

Test hooks: ``inject(op, errno, count, after)`` fails the named op (the same op names
``KernelError.op`` carries, e.g. "UFFDIO_COPY", "madvise", "PAGEMAP_SCAN", and those of
fake_remote: "pidfd_open", "pidfd_getfd", "ptrace(SEIZE)", "process_vm_readv", ...); a
syscall injected into a VMM answers to "NAME(injected)" and to its plain name (so
"userfaultfd" hits this process's uffd_open too) and returns -errno instead of raising.
``calls[op]`` counts calls.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from . import uapi
from .api import (
    Capabilities,
    Dialect,
    KernelError,
    Region,
    choose_strategy,
    dialect_names,
)
from .fake_guest import GuestMixin
from .fake_mem import MemMixin
from .fake_proc import FakeVmm
from .fake_remote import FakeProcess
from .fake_scan import ScanMixin
from .fake_state import PAGE, Mm

FIRST_PID = 4200
FIRST_START_TIME = 170000  # clock ticks since the fake boot


class FakeKernel(MemMixin, ScanMixin, GuestMixin):
    page_size = PAGE

    def __init__(self, dialect: Dialect = Dialect.RWP) -> None:
        if dialect is Dialect.NONE:
            name = "fake-618"
        else:
            name = "fake-rwp" if dialect is Dialect.RWP else "fake-rfc"
        super().__init__(dialect)
        self.name = name
        self._closed = False
        self.procs: dict[int, FakeVmm] = {}  # running simulated processes, by pid
        self.handles: set[FakeProcess] = set()  # this process's open Process handles
        self._next_pid = FIRST_PID
        self._next_start = FIRST_START_TIME

    # ---- test hooks -----------------------------------------------------------------
    def inject(self, op: str, err: int, count: int = 1, after: int = 0) -> None:
        """Make ``op`` fail with ``err`` for its next ``count`` calls after ``after``."""
        with self.lock:
            self.injections.setdefault(op, []).append([err, count, after])

    def enter(self, op: str) -> None:
        super().enter(op)
        base = op.split("(", 1)[0]
        if base != op:  # "madvise(4)" also answers to "madvise"
            self.calls[base] = self.calls.get(base, 0) + 1
            for inj in self.injections.get(base, []):
                if inj[1] > 0:
                    if inj[2] > 0:
                        inj[2] -= 1
                        continue
                    inj[1] -= 1
                    raise KernelError(op, inj[0], 0, "injected")

    # ---- other processes --------------------------------------------------------------
    def spawn_process(self, ram_bytes: int, *, vcpus: int = 1,
                      name: str = "memory-backend-memfd", comm: str = "qemu-system-x86",
                      pid: int | None = None, privileged: bool = True) -> FakeVmm:
        """A simulated VMM with ``ram_bytes`` of memfd RAM mapped MAP_SHARED (fake_proc).
        ``pid`` asks for a given pid (free, e.g. one an exited process had: a reused pid,
        told apart by the start time); ``privileged`` False makes an injected
        userfaultfd() fail EPERM unless UFFD_USER_MODE_ONLY is asked."""
        if ram_bytes <= 0 or ram_bytes % PAGE:
            raise ValueError(f"spawn_process: ram_bytes {ram_bytes} is not whole pages")
        if vcpus < 1:
            raise ValueError(f"spawn_process: vcpus must be >= 1, not {vcpus}")
        with self.lock:
            if self._closed:
                raise ValueError("spawn_process: the fake kernel is closed")
            used = {t for v in self.procs.values() for t in v.tids}
            if pid is None:
                pid = self._alloc_id(used)
            elif pid <= 0 or pid in used:
                raise ValueError(f"spawn_process: pid {pid} is in use or invalid")
            used.add(pid)
            tids = []
            for _ in range(vcpus):
                tids.append(self._alloc_id(used))
                used.add(tids[-1])
            self._next_start += 137
            vmm = FakeVmm(self, pid, tids, self._next_start, ram_bytes, name, comm,
                          privileged)
            self.procs[pid] = vmm
            return vmm

    def _alloc_id(self, used: set[int]) -> int:
        while self._next_pid in used:
            self._next_pid += 1
        self._next_pid += 1
        return self._next_pid - 1

    def reap(self, vmm: FakeVmm) -> None:
        """``vmm`` exited: its pid is free again (its own exit calls this)."""
        if self.procs.get(vmm.pid) is vmm:
            del self.procs[vmm.pid]

    def open_process(self, pid: int) -> FakeProcess:
        with self.lock:
            self.enter("pidfd_open")
            vmm = self.procs.get(pid)
            if vmm is None:
                raise KernelError("pidfd_open", errno.ESRCH, 0, f"no process {pid}")
            h = FakeProcess(self, vmm)
            self.handles.add(h)
            return h

    def owner_mm(self, region: Region) -> tuple[Mm, Callable[[], int]]:
        if region.owner.is_self:
            return self.mm, self.new_tid
        with self.lock:
            vmm = self.procs.get(region.owner.pid)
            if vmm is None or vmm.owner != region.owner:
                raise ValueError(f"region at 0x{region.addr:x}: owner {region.owner} is "
                                 "not a running process of this fake kernel")
            return vmm.mm, vmm.vcpu_tid

    def crash(self) -> None:
        """This process dies (the daemon is killed): every fd it holds is closed - uffd
        copies (a context goes with its last reference: if the VMM kept its own, its
        faults stay queued for a later ``getfd``; if not, it is released and the VMM
        reads holes in its memfd as zeros), memfd copies, pidfds - and its address
        space is torn down (its own accessors end with ESRCH). The kernel then stands
        for the restarted daemon: empty fd table, fresh address space, same simulated
        processes. As on Linux, a fault the dead daemon had already read is not
        delivered again to the new copy: it waits until a COPY/ZEROPAGE/WAKE covers it."""
        with self.lock:
            self._drop_fds()
            self.teardown_mm(self.mm)
            self.mm = Mm()

    def _drop_fds(self) -> None:
        for fd, u in list(self.uffds.items()):
            del self.uffds[fd]
            os.close(fd)
            self.unref(u)
        for fd in list(self.files):
            self.close_file(fd)
        for h in list(self.handles):
            h.close()

    # ---- capabilities / close -----------------------------------------------------------
    def capabilities(self) -> Capabilities:
        fd = self.uffd_open()
        try:
            info = self.uffd_api(fd, 0)
        finally:
            self.uffd_close(fd)
        strategy, reason = choose_strategy(self.dialect, info.features)
        names = uapi.feature_names(info.features, dialect_names(self.dialect))
        return Capabilities(self.name, "fake", self.dialect, info.features, info.ioctls,
                            names, strategy, reason)

    def close(self) -> None:
        with self.lock:
            if self._closed:
                return
            self._closed = True
            for vmm in list(self.procs.values()):
                vmm.exit()
            self._drop_fds()
            self.maps.clear()
            self.cv.notify_all()

    def __enter__(self) -> FakeKernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
