"""The context of a cross-process case: this process (the daemon's side) drives the guest
RAM of another process (the target, a VMM stand-in with memfd RAM mapped MAP_SHARED)
through a uffd created *inside* the target by ptrace syscall injection, as the daemon
attaches to a VMM.

The target is ``FakeKernel.spawn_process`` on the fake backends and
``tests/remote/target.py``'s ``Target`` on linux; both have the same shape (``pid``,
``ram_addr``, ``ram_fd``, ``start_access`` by one of its vCPU threads, ``close``).
Accesses come only from the target's threads. Teardown closes the target's uffd fd by
injection and then ours, which releases the context and wakes any fault still blocked.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import pytest

from vmm_tierd.kernel import uapi
from vmm_tierd.kernel.api import (
    Access,
    AccessKind,
    AccessStatus,
    Backend,
    MemType,
    Region,
    ScanResult,
)
from vmm_tierd.kernel.process import (
    SYS_CLOSE,
    SYS_MMAP,
    SYS_USERFAULTFD,
    Process,
    Syscall,
    is_vcpu_thread,
    pick_inject_thread,
)

from .harness import TIMEOUT, Case, Ctx, open_backend, skip_reason

TARGET_MODULES = ("tests.remote", "tests.remote.target")


class Target(Protocol):
    pid: int
    ram_addr: int
    ram_fd: int

    def start_access(self, addr: int, kind: AccessKind, length: int = 1,
                     data: bytes = b"") -> Access: ...

    def close(self) -> None: ...


def start_target(backend: str, kernel: Backend, ram_bytes: int) -> Target:
    if backend == "linux":
        try:
            from tests.remote.target import Target as LinuxTarget
        except ModuleNotFoundError as e:
            if e.name not in TARGET_MODULES:
                raise
            pytest.skip("linux: tests/remote/target.py (the target process for "
                        "cross-process cases) does not exist yet")
        target: Target = LinuxTarget.start(ram_bytes, vcpus=1, name="memory-backend-memfd")
        return target
    from vmm_tierd.kernel.fake import FakeKernel

    assert isinstance(kernel, FakeKernel), kernel
    return kernel.spawn_process(ram_bytes, vcpus=1, name="memory-backend-memfd")


class RemoteCtx(Ctx):
    """A :class:`Ctx` whose uffd lives in the target: ``uffd`` is this process's copy
    (pidfd_getfd) of the target's fd ``vfd``; ``region`` is the target's RAM, its ``fd``
    this process's copy of the target's memfd. ``register``, ``scan_pages``, ``fill``,
    ``check``, ``fault_at`` and the rest of the harness work unchanged."""

    def __init__(self, kernel: Backend, backend: str, case: Case, granted: int,
                 target: Target) -> None:
        super().__init__(kernel, backend, MemType.MEMFD, case, granted)
        self.target = target
        self.proc: Process | None = None
        self.vfd = -1  # the target's uffd fd, while it holds one
        self.mfd = -1  # this process's copy of the target's memfd
        self.inject_tid = 0

    @property
    def p(self) -> Process:
        assert self.proc is not None, "process not opened"
        return self.proc

    def open_uffd(self) -> None:
        try:
            self.proc = self.kernel.open_process(self.target.pid)
        except NotImplementedError as e:
            pytest.skip(f"{self.backend}: {e}")
        self.inject_tid = pick_inject_thread(self.p.pid, self.p.threads())
        self.vfd = self.syscall(SYS_USERFAULTFD, uapi.O_CLOEXEC | uapi.O_NONBLOCK)
        assert self.vfd >= 0, f"injected userfaultfd() = {self.vfd}"
        self.uffd = self.p.getfd(self.vfd)
        need = self.case.needs.features(self.dialect, self.mem)
        info = self.kernel.uffd_api(self.uffd, need | (self.case.wants & self.granted))
        self.features = info.features
        self.mfd = self.p.getfd(self.target.ram_fd)
        # Start from holes on every backend: the linux target writes a pattern into its
        # RAM at start, the fake's begins empty.
        self.kernel.punch_hole(self.mfd, 0, self.length)
        self.region = Region(self.target.ram_addr, self.length, MemType.MEMFD, fd=self.mfd,
                             offset=0, owner=self.p.owner, owner_fd=self.target.ram_fd)

    def syscall(self, nr: int, *args: int) -> int:
        """One syscall injected into the target's non-vCPU thread: its raw result."""
        res = self.p.inject(self.inject_tid, [Syscall(nr, tuple(args))])
        assert res.tid == self.inject_tid
        return res.results[0]

    def map(self, npages: int, mem: MemType | None = None) -> Region:
        """Scratch anonymous memory *in the target* (an injected mmap)."""
        assert (mem or MemType.ANON) is MemType.ANON, "the target maps scratch anon only"
        length = npages * self.ps
        addr = self.syscall(SYS_MMAP, 0, length, uapi.PROT_READ | uapi.PROT_WRITE,
                            uapi.MAP_PRIVATE | uapi.MAP_ANONYMOUS, -1, 0)
        assert addr > 0, f"injected mmap() = {addr}"
        return Region(addr, length, MemType.ANON, owner=self.p.owner)

    def pagemap_scan(self, start: int, end: int, **kw: int) -> ScanResult:
        return self.p.pagemap_scan(start, end, **kw)

    def access(self, addr: int, kind: AccessKind, data: bytes = b"",
               length: int | None = None) -> Access:
        n = length if length is not None else (len(data) if data else self.ps)
        a = self.target.start_access(addr, kind, n, data)
        self.accesses.append(a)
        return a

    def close_target_uffd(self) -> None:
        """The target closes its own uffd fd (injected close)."""
        fd, self.vfd = self.vfd, -1
        assert self.syscall(SYS_CLOSE, fd) == 0

    def teardown(self) -> None:
        problems: list[str] = []
        alive = self.proc is not None and self.proc.alive()
        try:
            if alive and self.vfd >= 0:
                self.close_target_uffd()
            self.close_uffd()  # the last reference: wakes every fault still blocked
        except Exception as e:
            problems.append(f"closing the uffd: {e!r}")
        stopped = getattr(self.target, "injections", None)  # the fake records ptrace stops
        if stopped is not None:
            vcpus = {t.tid for t in getattr(self.target, "threads", ())
                     if is_vcpu_thread(t.comm)}
            if vcpus & {tid for tid, _calls in stopped}:
                problems.append(f"a vCPU thread was stopped for injection: {stopped}")
        stuck = [a for a in self.accesses if a.wait(TIMEOUT).status is AccessStatus.PENDING]
        if stuck:
            problems.append(f"{len(stuck)} target access(es) still blocked after the "
                            "uffd was closed")
        if self.mfd >= 0:
            os.close(self.mfd)
        closers = [self.target.close, self.kernel.close]
        if self.proc is not None:
            closers.insert(0, self.proc.close)
        for closer in closers:
            try:
                closer()
            except Exception as e:
                problems.append(f"{closer}: {e!r}")
        if problems:
            raise AssertionError("teardown: " + "; ".join(problems))


def iovecs(ranges: list[tuple[int, int]], n: int | None = None) -> bytes:
    """``struct iovec[n]`` (little endian {void *base; size_t len}); the entries after
    ``ranges`` are empty."""
    arr = np.zeros((n if n is not None else len(ranges), 2), dtype="<u8")
    if ranges:
        arr[:len(ranges)] = np.asarray(ranges, dtype=np.uint64)
    return arr.tobytes()


@contextlib.contextmanager
def remote_context(backend: str, case: Case, npages: int) -> Iterator[RemoteCtx]:
    kernel = open_backend(backend)
    try:
        granted = kernel.capabilities().features
        reason = skip_reason(case, backend, MemType.MEMFD, kernel.dialect, granted)
        if reason:
            pytest.skip(reason)
        target = start_target(backend, kernel, npages * kernel.page_size)
    except BaseException:
        kernel.close()
        raise
    ctx = RemoteCtx(kernel, backend, case, granted, target)
    ctx.npages = npages
    try:
        ctx.open_uffd()
        yield ctx
    except BaseException as e:
        try:
            ctx.teardown()
        except Exception as te:
            e.add_note(f"and then {te}")
        raise
    ctx.teardown()
