"""``Process`` on the fake kernel: this process's reach into a simulated VMM (pidfd,
/proc/PID, pidfd_getfd, process_vm_readv/writev, PAGEMAP_SCAN of /proc/PID/pagemap,
ptrace syscall injection). See process.py for the contract and fake_proc for the VMM.

Op names (for ``KernelError.op`` and ``FakeKernel.inject``): "pidfd_open" (open),
"pidfd_getfd", "process_vm_readv", "process_vm_writev", "ptrace(SEIZE)" (inject),
"PAGEMAP_SCAN", and "/proc/PID/maps", "/proc/PID/fd", "/proc/PID/task",
"/proc/PID/fdinfo" (literally "PID"). A process that has exited (or whose pid now
belongs to another process) answers ESRCH; a closed handle EBADF.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import fake_inject
from .api import KernelError, ScanResult
from .fake_proc import SPECIAL_MAPS, FakeVmm
from .fake_state import OK, PAGE
from .process import InjectResult, ProcFd, ProcMapping, Syscall, ThreadInfo

if TYPE_CHECKING:
    from .fake import FakeKernel


class FakeProcess:
    def __init__(self, kernel: FakeKernel, vmm: FakeVmm) -> None:
        self.k = kernel
        self.vmm = vmm
        self.pid = vmm.pid
        self.owner = vmm.owner
        # pidfd: POLLIN once the process has exited (an eventfd the VMM's exit writes)
        self.pidfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._closed = False
        vmm.pidfds.append(self.pidfd)
        if vmm.exited:
            os.eventfd_write(self.pidfd, 1)

    def alive(self) -> bool:
        with self.k.lock:
            return not self.vmm.exited and self.k.procs.get(self.pid) is self.vmm

    def _live(self, op: str) -> FakeVmm:
        """Count ``op``, fire its injected error, and check the process is still there.
        Caller holds the lock."""
        self.k.enter(op)
        if self._closed:
            raise KernelError(op, errno.EBADF, 0, f"handle on pid {self.pid} is closed")
        if self.vmm.exited or self.k.procs.get(self.pid) is not self.vmm:
            raise KernelError(op, errno.ESRCH, 0, f"pid {self.pid} has exited")
        return self.vmm

    # ---- /proc/PID ------------------------------------------------------------------
    def maps(self) -> list[ProcMapping]:
        with self.k.lock:
            vmm = self._live("/proc/PID/maps")
            out = [ProcMapping(*line) for line in SPECIAL_MAPS]
            for m in vmm.mm.maps:
                if m.file is not None:
                    out.append(ProcMapping(m.addr, m.end, "rw-s", m.fpgoff * PAGE,
                                           m.file.ino, f"/memfd:{m.file.name} (deleted)"))
                else:
                    out.append(ProcMapping(m.addr, m.end, "rw-p", 0, 0, ""))
            return sorted(out, key=lambda p: p.start)

    def fds(self) -> list[ProcFd]:
        with self.k.lock:
            vmm = self._live("/proc/PID/fd")
            return [ProcFd(fd, e.target, e.inode) for fd, e in sorted(vmm.fds.items())]

    def threads(self) -> list[ThreadInfo]:
        with self.k.lock:
            return list(self._live("/proc/PID/task").threads)

    def uffd_features(self, fd: int) -> int:
        op = "/proc/PID/fdinfo"
        with self.k.lock:
            e = self._live(op).fds.get(fd)
            if e is None or e.uffd is None:
                raise KernelError(op, errno.EBADF, 0, f"pid {self.pid} fd {fd} is not a uffd")
            return e.uffd.features or 0

    # ---- fds and memory ---------------------------------------------------------------
    def getfd(self, fd: int) -> int:
        op = "pidfd_getfd"
        with self.k.lock:
            e = self._live(op).fds.get(fd)
            if e is None:
                raise KernelError(op, errno.EBADF, 0, f"pid {self.pid} has no fd {fd}")
            if e.uffd is not None:
                new = os.dup(e.uffd.fd)  # same context, same readiness
                e.uffd.refs += 1
                self.k.uffds[new] = e.uffd
                return new
            if e.file is not None:
                return self.k.add_file(e.file)
            if e.eventfd >= 0:
                return os.dup(e.eventfd)
            # /dev/null, or a file the fake does not model (a pidfd): a /dev/null stand-in
            return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)

    def read_memory(self, addr: int, length: int) -> bytes:
        """Through the fault path, as the kernel's remote GUP does: a page that would
        fault on a uffd blocks this call until the fault is served."""
        op = "process_vm_readv"
        with self.k.lock:
            vmm = self._live(op)
            st, out, done = self.k.copy_vm(vmm.mm, addr, length, None, True,
                                           self.k.new_tid())
            if st != OK:
                raise KernelError(op, errno.EFAULT, done, f"0x{addr + done:x} of pid {self.pid}")
            return out

    def write_memory(self, addr: int, data: bytes) -> None:
        op = "process_vm_writev"
        with self.k.lock:
            vmm = self._live(op)
            st, _out, done = self.k.copy_vm(vmm.mm, addr, len(data), bytes(data), True,
                                            self.k.new_tid())
            if st != OK:
                raise KernelError(op, errno.EFAULT, done, f"0x{addr + done:x} of pid {self.pid}")

    def pagemap_scan(self, start: int, end: int, *, category_mask: int = 0,
                     category_inverted: int = 0, category_anyof_mask: int = 0,
                     return_mask: int = 0, flags: int = 0, max_pages: int = 0
                     ) -> ScanResult:
        with self.k.lock:
            if self._closed or not self.alive():
                self._live("PAGEMAP_SCAN")  # counts the call and raises EBADF/ESRCH
            return self.k.scan_mm(self.vmm.mm, start, end, category_mask, category_inverted,
                                  category_anyof_mask, return_mask, flags, max_pages)

    # ---- ptrace -------------------------------------------------------------------------
    def inject(self, tid: int, calls: Sequence[Syscall]) -> InjectResult:
        op = "ptrace(SEIZE)"
        batch = tuple(calls)
        with self.k.lock:
            vmm = self._live(op)
            if tid not in vmm.tids:
                raise KernelError(op, errno.ESRCH, 0, f"pid {self.pid} has no thread {tid}")
            vmm.injections.append((tid, batch))
            t0 = time.monotonic()
            results = tuple(fake_inject.run(self.k, vmm, tid, c) for c in batch)
            return InjectResult(tid, results, time.monotonic() - t0)

    def close(self) -> None:
        with self.k.lock:
            if self._closed:
                return
            self._closed = True
            if self.pidfd in self.vmm.pidfds:
                self.vmm.pidfds.remove(self.pidfd)
            self.k.handles.discard(self)
            os.close(self.pidfd)

    def __enter__(self) -> FakeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FakeProcess(pid={self.pid}, owner={self.owner}, alive={self.alive()})"
