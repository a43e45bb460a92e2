"""What only the VMM itself may do, as syscalls injected into one of its threads.

A daemon beside an unmodified VMM reaches most of its memory from outside (see
process.py), but three things must run inside the VMM: creating the uffd (its context
is the mm of the creating process), zapping the VMM's own PTEs (process_madvise refuses
MADV_DONTNEED on another process) and closing the VMM's copy of an fd. RemoteSpace does
them with as few injected syscalls and as few stops as possible: every operation is ONE
stop of ONE thread, never a vCPU thread (stopping one stalls the guest).

Pure Python over the :class:`~vmm_tierd.kernel.process.Process` protocol, so the fake
kernel's simulated processes run it too.

Every call blocks until the injected thread has stopped and run the calls; call it from
a worker thread (``trio.to_thread.run_sync``), never from the thread that serves the
VMM's uffd: a thread blocked on a fault only stops once the fault is served, and an
injected MADV_DONTNEED over a range registered with EVENT_REMOVE blocks until that event
is read.

A VMM under a seccomp filter (QEMU ``-sandbox on``, /proc/PID/status ``Seccomp: 2``) runs
the injected syscalls through it: one the filter denies fails or kills the VMM.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import secrets
import socket
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import uapi
from .api import KernelError
from .process import (
    SYS_BIND,
    SYS_CLOSE,
    SYS_IOCTL,
    SYS_MMAP,
    SYS_MUNMAP,
    SYS_PIDFD_OPEN,
    SYS_PROCESS_MADVISE,
    SYS_RECVMSG,
    SYS_SOCKET,
    SYS_USERFAULTFD,
    UIO_MAXIOV,
    InjectError,
    InjectResult,
    Process,
    Syscall,
    is_vcpu_thread,
    pick_inject_thread,
)

PAGE = 4096
IOVEC = 16  # struct iovec {void *iov_base; size_t iov_len}
SCRATCH_MIN = 64 << 10  # 4096 iovecs
SCRATCH_MAX = 16 << 20  # 1 Mi iovecs in one stop; larger discards take several stops
_U64 = (1 << 64) - 1
# Passing /dev/userfaultfd in: where the injected socket calls find their arguments in
# the scratch area (struct sockaddr_un, struct msghdr, one iovec, its byte, cmsg buffer).
_SUN, _MSG, _IOV, _BYTE, _CTL, _CTL_LEN = 0, 128, 192, 208, 224, 32
_MSGHDR = struct.Struct("<QI4xQQQQi4x")  # name, namelen, iov, iovlen, control, len, flags
_CMSG_FD = struct.Struct("<Qiii")  # cmsg_len, cmsg_level, cmsg_type, one int of data
_SOCK_CLOEXEC = 0o2000000
_MSG_DONTWAIT = 0x40
_MSG_CMSG_CLOEXEC = 0x40000000


@dataclass(slots=True)
class PauseStats:
    """Injected pauses of the VMM's thread, for metrics."""

    stops: int = 0
    calls: int = 0  # injected syscalls in all stops
    last_s: float = 0.0
    max_s: float = 0.0
    total_s: float = 0.0
    last_calls: int = 0  # calls in the last stop
    max_calls: int = 0

    def add(self, pause_s: float, calls: int) -> None:
        self.stops += 1
        self.calls += calls
        self.last_s = pause_s
        self.max_s = max(self.max_s, pause_s)
        self.total_s += pause_s
        self.last_calls = calls
        self.max_calls = max(self.max_calls, calls)

    @property
    def calls_per_stop(self) -> float:
        return self.calls / self.stops if self.stops else 0.0


class RemoteSpace:
    """Injected operations on process ``proc`` (a VMM), into the thread chosen by
    :func:`pick_inject_thread` or, with ``thread``, the first non-vCPU thread whose
    comm matches that glob (a glob that matches only vCPU threads is refused)."""

    def __init__(self, proc: Process, *, thread: str | None = None,
                 uffd_device: str | None = "/dev/userfaultfd") -> None:
        self.proc = proc
        self.thread_glob = thread
        self.uffd_device = uffd_device  # passed in when the VMM may not call userfaultfd()
        self.stats = PauseStats()
        self._tid = 0
        self._scratch = 0  # anon private mapping inside the VMM (iovec arrays)
        self._scratch_len = 0
        self._self_pidfd = -1  # the VMM's pidfd of itself (for process_madvise)
        self._lock = threading.Lock()

    # ---- the thread ---------------------------------------------------------------------
    def pick_thread(self) -> int:
        threads = self.proc.threads()
        if self.thread_glob is None:
            return pick_inject_thread(self.proc.pid, threads)
        hits = [t for t in threads if fnmatch.fnmatchcase(t.comm, self.thread_glob)]
        ok = [t for t in hits if not is_vcpu_thread(t.comm)]
        if not ok:
            why = (f"only vCPU threads match ({', '.join(t.comm for t in hits)}); none can "
                   f"be stopped safely" if hits else "no thread matches")
            raise LookupError(f"pid {self.proc.pid}: thread {self.thread_glob!r}: {why}")
        return ok[0].tid

    @property
    def tid(self) -> int:
        """The thread injections go into (picked at first use)."""
        if not self._tid:
            self._tid = self.pick_thread()
        return self._tid

    def _inject(self, calls: Sequence[Syscall]) -> InjectResult:
        try:
            r = self.proc.inject(self.tid, calls)
        except InjectError as e:
            # The thread exited before it was attached (nothing ran): pick another.
            if not (e.op == "ptrace(SEIZE)" and e.errno == errno.ESRCH and self.proc.alive()):
                raise
            self._tid = self.pick_thread()
            r = self.proc.inject(self._tid, calls)
        self.stats.add(r.pause_s, len(calls))
        return r

    def _where(self) -> str:
        return f"injected into pid {self.proc.pid} tid {self._tid}"

    # ---- uffd -------------------------------------------------------------------------------
    def create_uffd(self, flags: int = uapi.O_CLOEXEC | uapi.O_NONBLOCK) -> tuple[int, int]:
        """A uffd created inside the VMM (its context is the VMM's mm): (the VMM's fd
        number, this process's copy). The VMM keeps its reference on purpose: if this
        daemon dies, the VMM's faults on evicted pages then block (and a restarted
        daemon takes the uffd back with ``getfd``) instead of reading zeros."""
        with self._lock:
            r = self._inject([Syscall(SYS_USERFAULTFD, (flags,))]).results[0]
            if r == -errno.EPERM:
                r = self._uffd_from_device(flags)
            if r < 0:
                raise KernelError("userfaultfd", -r, 0, self._where())
            try:
                local = self.proc.getfd(r)
            except KernelError:
                self._close_quietly([r])
                raise
            return r, local

    def _uffd_from_device(self, flags: int) -> int:
        """userfaultfd() is EPERM in an unprivileged VMM (no CAP_SYS_PTRACE,
        vm.unprivileged_userfaultfd=0), but anyone holding an fd of /dev/userfaultfd may
        create uffds with USERFAULTFD_IOC_NEW: the device's permissions are checked at
        open only, and its uffds take kernel-mode faults (KVM, GUP) too, unlike
        UFFD_USER_MODE_ONLY ones. So this process opens the device and passes it in:
        the VMM binds a unix datagram socket to a random abstract name (once bound, the
        name is the VMM's: nobody else receives what is sent to it), this process sends
        the fd there with SCM_RIGHTS, the VMM receives it and issues the ioctl. Four
        stops, once per uffd; nothing is left in the VMM but the uffd."""
        if self.uffd_device is None:
            raise KernelError("userfaultfd", errno.EPERM, 0, self._why_eperm())
        try:
            dev = os.open(self.uffd_device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KernelError("userfaultfd", errno.EPERM, 0, f"{self._why_eperm()}; and "
                              f"{self.uffd_device} cannot be passed in: {e}") from None
        try:
            self._ensure_scratch(PAGE)
            sc = self._scratch
            name = b"\0vmm-tierd-uffd-" + secrets.token_hex(12).encode()
            sun = struct.pack("<H", socket.AF_UNIX) + name
            self.proc.write_memory(sc + _SUN, sun)
            s = self._inject([Syscall(SYS_SOCKET, (socket.AF_UNIX,
                                                   socket.SOCK_DGRAM | _SOCK_CLOEXEC, 0))]
                             ).results[0]
            if s < 0:
                raise KernelError("socket", -s, 0, self._where())
            try:
                r = self._inject([Syscall(SYS_BIND, (s, sc + _SUN, len(sun)))]).results[0]
                if r < 0:
                    raise KernelError("bind", -r, 0, self._where())
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as tx:
                    tx.sendmsg([b"u"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                         struct.pack("i", dev))], 0, name)
                self.proc.write_memory(sc + _MSG, _MSGHDR.pack(0, 0, sc + _IOV, 1, sc + _CTL,
                                                               _CTL_LEN, 0)
                                       + struct.pack("<QQ", sc + _BYTE, 1))
                r, _ = self._inject([
                    Syscall(SYS_RECVMSG, (s, sc + _MSG, _MSG_DONTWAIT | _MSG_CMSG_CLOEXEC)),
                    Syscall(SYS_CLOSE, (s,))]).results
            except BaseException:
                self._close_quietly([s])
                raise
        finally:
            os.close(dev)
        if r < 0:
            raise KernelError("recvmsg", -r, 0, self._where())
        ln, level, typ, remote_dev = _CMSG_FD.unpack(self.proc.read_memory(sc + _CTL, 20))
        if (ln, level, typ) != (_CMSG_FD.size, socket.SOL_SOCKET, socket.SCM_RIGHTS):
            raise KernelError("recvmsg", errno.EPROTO, 0, f"{self._where()}: no fd received")
        u, _ = self._inject([Syscall(SYS_IOCTL, (remote_dev, uapi.USERFAULTFD_IOC_NEW, flags)),
                             Syscall(SYS_CLOSE, (remote_dev,))]).results
        if u < 0:
            raise KernelError("USERFAULTFD_IOC_NEW", -u, 0, self._where())
        return u

    def _why_eperm(self) -> str:
        return (f"{self._where()}: the VMM may not create a userfaultfd (it lacks "
                f"CAP_SYS_PTRACE and vm.unprivileged_userfaultfd is 0); run it privileged, "
                f"set vm.unprivileged_userfaultfd=1 or let this daemon pass /dev/userfaultfd "
                f"in")

    # ---- PTEs -------------------------------------------------------------------------------
    def discard(self, ranges: Sequence[tuple[int, int]] | np.ndarray,
                advice: int = uapi.MADV_DONTNEED) -> int:
        """``advice`` (MADV_DONTNEED: zap the VMM's PTEs; memfd pages stay in the page
        cache) over (addr, length) ``ranges`` of the VMM: process_madvise on the VMM's
        own pidfd, UIO_MAXIOV ranges per call, all calls in one stop. Returns the bytes
        advised; on a failure KernelError("process_madvise", errno, bytes advised) naming
        the first range that failed (the calls after it have run too)."""
        arr = _ranges(ranges)
        if not len(arr):
            return 0
        with self._lock:
            per_stop = SCRATCH_MAX // IOVEC
            done = 0
            for s in range(0, len(arr), per_stop):
                done += self._discard(arr[s:s + per_stop], advice, done, s)
            return done

    def _discard(self, arr: np.ndarray, advice: int, done_before: int, first: int) -> int:
        n = len(arr)
        self._ensure_scratch(n * IOVEC)
        self.proc.write_memory(self._scratch, arr.astype("<u8").tobytes())
        starts = np.arange(0, n, UIO_MAXIOV)
        calls = [Syscall(SYS_PROCESS_MADVISE, (self._self_pidfd, self._scratch + int(i) * IOVEC,
                                               min(UIO_MAXIOV, n - int(i)), advice, 0))
                 for i in starts]
        got = self._inject(calls).results
        want = np.add.reduceat(arr[:, 1], starts)
        done = sum(r for r in got if r > 0)
        for k, (r, w) in enumerate(zip(got, want.tolist(), strict=True)):
            if r == w:
                continue
            # process_madvise stops at the first range that fails and returns the bytes
            # advised before it, if any (the errno is then lost): find that range and ask
            # again for it alone.
            lo = int(starts[k])
            if r < 0:
                bad, err = lo, -r
            else:
                cum = np.cumsum(arr[lo:lo + UIO_MAXIOV, 1])
                bad = lo + int(np.searchsorted(cum, r, side="right"))
                again = self._inject([Syscall(SYS_PROCESS_MADVISE, (
                    self._self_pidfd, self._scratch + bad * IOVEC, 1, advice, 0))]).results[0]
                err = -again if again < 0 else errno.EAGAIN
            a, ln = int(arr[bad, 0]), int(arr[bad, 1])
            raise KernelError("process_madvise", err, done_before + done,
                              f"{self._where()}: range {first + bad} of "
                              f"[0x{a:x}, 0x{a + ln:x}), advice {advice}")
        return done

    def _ensure_scratch(self, nbytes: int) -> None:
        """Map the scratch area (and open the VMM's pidfd of itself) at first use, or
        grow it: one stop either way."""
        need = min(max(SCRATCH_MIN, -(-nbytes // PAGE) * PAGE), SCRATCH_MAX)
        if self._scratch and self._scratch_len >= need and self._self_pidfd >= 0:
            return
        calls: list[Syscall] = []
        if self._scratch:
            calls.append(Syscall(SYS_MUNMAP, (self._scratch, self._scratch_len)))
        calls.append(Syscall(SYS_MMAP, (0, need, uapi.PROT_READ | uapi.PROT_WRITE,
                                        uapi.MAP_PRIVATE | uapi.MAP_ANONYMOUS, _U64, 0)))
        if self._self_pidfd < 0:
            # The pid as this process sees it: a VMM in another pid namespace would need
            # its own number for itself (NSpid in /proc/PID/status).
            calls.append(Syscall(SYS_PIDFD_OPEN, (self.proc.pid, 0)))
        res = self._inject(calls).results
        if self._scratch:
            res = res[1:]
            self._scratch = self._scratch_len = 0
        if self._self_pidfd < 0:
            if res[1] < 0:
                if res[0] >= 0:
                    self._inject([Syscall(SYS_MUNMAP, (res[0], need))])
                raise KernelError("pidfd_open", -res[1], 0, self._where())
            self._self_pidfd = res[1]
        if res[0] < 0:
            raise KernelError("mmap", -res[0], 0, f"{self._where()}: {need} bytes scratch")
        self._scratch, self._scratch_len = res[0], need

    # ---- fds and cleanup ----------------------------------------------------------------------
    def close_remote(self, fds: Sequence[int]) -> None:
        """Close the VMM's ``fds`` (one stop); KernelError("close") names the first that
        failed (the others are closed anyway)."""
        if not fds:
            return
        with self._lock:
            got = self._inject([Syscall(SYS_CLOSE, (int(fd),)) for fd in fds]).results
        for fd, r in zip(fds, got, strict=True):
            if r < 0:
                raise KernelError("close", -r, 0, f"{self._where()}: fd {fd}")

    def _close_quietly(self, fds: Sequence[int]) -> None:
        try:
            self._inject([Syscall(SYS_CLOSE, (fd,)) for fd in fds])
        except KernelError:
            pass

    def release(self) -> None:
        """Unmap the scratch area and close the VMM's pidfd of itself: the VMM as it was
        found (but for the uffds handed out, which ``close_remote`` closes). A VMM that
        has exited needs nothing."""
        with self._lock:
            calls: list[Syscall] = []
            if self._scratch:
                calls.append(Syscall(SYS_MUNMAP, (self._scratch, self._scratch_len)))
            if self._self_pidfd >= 0:
                calls.append(Syscall(SYS_CLOSE, (self._self_pidfd,)))
            self._scratch = self._scratch_len = 0
            self._self_pidfd = -1
            if calls and self.proc.alive():
                self._inject(calls)


def _ranges(ranges: Sequence[tuple[int, int]] | np.ndarray) -> np.ndarray:
    """(n, 2) uint64 (addr, length), checked: page aligned, non-empty, no wrap."""
    try:
        arr = np.asarray(ranges, dtype=np.uint64).reshape(-1, 2)
    except (ValueError, OverflowError, TypeError) as e:
        raise ValueError(f"discard: ranges must be (addr, length) pairs of integers: {e}"
                         ) from None
    if not len(arr):
        return arr
    bad = np.flatnonzero((arr[:, 0] % PAGE != 0) | (arr[:, 1] % PAGE != 0) | (arr[:, 1] == 0)
                         | (arr[:, 0] > np.uint64(_U64) - arr[:, 1]))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"discard: range {i} (0x{int(arr[i, 0]):x}, {int(arr[i, 1])}) is "
                         f"not a non-empty page-aligned range")
    return arr
