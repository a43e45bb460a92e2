"""Syscalls injected into a simulated VMM (``FakeProcess.inject``), run in its context:
its address space, its fd table, its credentials. Each returns what the syscall returns
in rax: a value, or -errno. What is modelled:

- ``userfaultfd(flags)``: EPERM first when the process is unprivileged
  (``FakeVmm.privileged`` False, as with vm.unprivileged_userfaultfd=0) unless
  UFFD_USER_MODE_ONLY is set, then EINVAL for unknown flags; the context is bound to
  the process's mm; O_CLOEXEC is the fd's flag, O_NONBLOCK the file's (shared with every
  pidfd_getfd copy: a copy of a blocking uffd blocks in read);
- ``close``, ``getpid``, ``pidfd_open(pid, flags)`` (flags 0 or PIDFD_NONBLOCK);
- ``mmap``: anonymous MAP_PRIVATE, or MAP_SHARED of a memfd fd, PROT_READ|PROT_WRITE,
  addr a hint only, MAP_NORESERVE allowed; any other form (MAP_FIXED, other
  protections, MAP_POPULATE...) is refused with EINVAL: not modelled, not Linux's answer;
- ``munmap`` of whole mappings (a range that splits one is refused with EINVAL, not
  modelled); UNMAP events are raised and waited for as by the daemon's own munmap;
- ``madvise`` as the daemon's own (fake_mem.madvise_mm). A madvise, munmap or
  process_madvise that raises REMOVE/UNMAP events on a uffd keeps the thread stopped,
  and ``inject`` with it, until they are read (so never inject one from the thread that
  reads that uffd when EVENT_REMOVE/EVENT_UNMAP is on);
- ``process_madvise(pidfd, iovec, vlen, advice, flags)`` (mm/madvise.c): flags must be
  0, vlen at most UIO_MAXIOV, the iovec array (struct iovec {void *base; size_t len},
  little endian) is read from the process's memory (EFAULT where unreadable); on its
  own mm any advice goes (Linux >= 6.13), on another process's only COLD, PAGEOUT,
  WILLNEED and COLLAPSE (else EINVAL), and those need privilege (else EPERM). Iovecs
  run in order; it returns the bytes of the iovecs done, or the first one's error.
Anything else is ENOSYS. Fault injection: the op "NAME(injected)" (e.g.
"userfaultfd(injected)"), which the plain name also hits, makes the call return -errno.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from . import uapi
from .api import KernelError, MemType
from .fake_proc import ANON_INODE_INO, FakeVmm, VmmFd
from .fake_state import OK, PAGE, TASK_SIZE, Mapping
from .process import (
    SYS_CLOSE,
    SYS_GETPID,
    SYS_MADVISE,
    SYS_MMAP,
    SYS_MUNMAP,
    SYS_PIDFD_OPEN,
    SYS_PROCESS_MADVISE,
    SYS_USERFAULTFD,
    UIO_MAXIOV,
    Syscall,
)

if TYPE_CHECKING:
    from .fake import FakeKernel

NAMES = {SYS_USERFAULTFD: "userfaultfd", SYS_CLOSE: "close", SYS_MMAP: "mmap",
         SYS_MUNMAP: "munmap", SYS_PIDFD_OPEN: "pidfd_open", SYS_GETPID: "getpid",
         SYS_MADVISE: "madvise", SYS_PROCESS_MADVISE: "process_madvise"}
_U64 = (1 << 64) - 1
_REMOTE_ADVICE = {uapi.MADV_COLD, uapi.MADV_PAGEOUT, uapi.MADV_WILLNEED, uapi.MADV_COLLAPSE}
PIDFD_NONBLOCK = uapi.O_NONBLOCK

Args = tuple[int, int, int, int, int, int]


def s32(v: int) -> int:
    """An ``int`` argument: the low 32 bits of the register, signed."""
    return ((v & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000


def run(k: FakeKernel, vmm: FakeVmm, tid: int, call: Syscall) -> int:
    """One syscall in thread ``tid`` of ``vmm``. Caller holds the kernel lock."""
    if len(call.args) > 6:
        raise ValueError(f"syscall {call.nr}: {len(call.args)} arguments (at most 6)")
    name = NAMES.get(call.nr)
    if name is None:
        return -errno.ENOSYS
    r = [a & _U64 for a in call.args] + [0] * (6 - len(call.args))  # the registers
    args: Args = (r[0], r[1], r[2], r[3], r[4], r[5])
    try:
        k.enter(f"{name}(injected)")
        return _HANDLERS[call.nr](k, vmm, tid, args)
    except KernelError as e:
        return -(e.errno or errno.EIO)


def _userfaultfd(k: FakeKernel, vmm: FakeVmm, tid: int, a: Args) -> int:
    flags = s32(a[0])
    if not vmm.privileged and not flags & uapi.UFFD_USER_MODE_ONLY:
        return -errno.EPERM  # userfaultfd_syscall_allowed()
    if flags & ~(uapi.O_CLOEXEC | uapi.O_NONBLOCK | uapi.UFFD_USER_MODE_ONLY):
        return -errno.EINVAL
    u = k.new_uffd(vmm.mm, bool(flags & uapi.UFFD_USER_MODE_ONLY),
                   nonblock=bool(flags & uapi.O_NONBLOCK))
    return vmm.alloc_fd(VmmFd("anon_inode:[userfaultfd]", ANON_INODE_INO,
                              bool(flags & uapi.O_CLOEXEC), uffd=u))


def _close(k: FakeKernel, vmm: FakeVmm, tid: int, a: Args) -> int:
    return vmm.close_fd(s32(a[0]))


def _getpid(k: FakeKernel, vmm: FakeVmm, tid: int, a: Args) -> int:
    return vmm.pid


def _pidfd_open(k: FakeKernel, vmm: FakeVmm, tid: int, a: Args) -> int:
    pid, flags = s32(a[0]), s32(a[1])
    if flags & ~PIDFD_NONBLOCK or pid <= 0:
        return -errno.EINVAL
    if k.procs.get(pid) is None:
        return -errno.ESRCH
    return vmm.alloc_fd(VmmFd("anon_inode:[pidfd]", ANON_INODE_INO, True, pid=pid))


def _mmap(k: FakeKernel, vmm: FakeVmm, tid: int, a: Args) -> int:
    length, prot, flags, fd, off = a[1], s32(a[2]), s32(a[3]), s32(a[4]), a[5]
    if length == 0 or off % PAGE:
        return -errno.EINVAL
    length = -(-length // PAGE) * PAGE
    if length > TASK_SIZE:
        return -errno.ENOMEM
    kind = flags & ~uapi.MAP_NORESERVE
    if prot != uapi.PROT_READ | uapi.PROT_WRITE:
        return -errno.EINVAL  # not modelled
    if kind == uapi.MAP_PRIVATE | uapi.MAP_ANONYMOUS:
        m = Mapping(vmm.mm.alloc_addr(length), length, MemType.ANON)
    elif kind == uapi.MAP_SHARED:
        e = vmm.fds.get(fd)
        if e is None:
            return -errno.EBADF
        f = e.file
        if f is None:
            return -errno.ENODEV  # not a memfd: not modelled
        if off + length > -(-f.size // PAGE) * PAGE:
            return -errno.EINVAL  # would map beyond EOF: not modelled (SIGBUS there)
        m = Mapping(vmm.mm.alloc_addr(length), length, MemType.MEMFD, f, off // PAGE)
        f.maps.append(m)
    else:
        return -errno.EINVAL  # not modelled
    vmm.mm.add(m)
    return m.addr


def _munmap(k: FakeKernel, vmm: FakeVmm, tid: int, a: Args) -> int:
    addr, length = a[0], a[1]
    if addr % PAGE or length == 0 or addr >= TASK_SIZE:
        return -errno.EINVAL
    end = addr + -(-length // PAGE) * PAGE
    parts = vmm.mm.maps_in(addr, end)
    if any(lo != 0 or hi != m.npages for m, lo, hi in parts):
        return -errno.EINVAL  # splitting a mapping: not modelled
    for m, _lo, _hi in parts:
        if m in vmm.mm.maps:
            k.munmap_one(vmm.mm, m)
    return 0


def _madvise(k: FakeKernel, vmm: FakeVmm, tid: int, a: Args) -> int:
    k.madvise_mm(vmm.mm, "madvise", a[0], a[1], s32(a[2]))
    return 0


def _process_madvise(k: FakeKernel, vmm: FakeVmm, tid: int, a: Args) -> int:
    pidfd, vec, vlen, advice, flags = s32(a[0]), a[1], a[2], s32(a[3]), a[4] & 0xFFFFFFFF
    if flags:
        return -errno.EINVAL
    if vlen > UIO_MAXIOV:
        return -errno.EINVAL  # import_iovec()
    st, raw, _done = k.copy_vm(vmm.mm, vec, vlen * 16, None, True, tid)
    if st != OK:
        return -errno.EFAULT
    iov = np.frombuffer(raw, dtype="<u8").reshape(-1, 2)
    e = vmm.fds.get(pidfd)
    if e is None or e.pid == 0:
        return -errno.EBADF
    target = k.procs.get(e.pid)
    if target is None:
        return -errno.ESRCH
    if target is not vmm:
        if advice not in _REMOTE_ADVICE:
            return -errno.EINVAL  # process_madvise_remote_valid()
        if not vmm.privileged:
            return -errno.EPERM  # CAP_SYS_NICE
    done = 0
    for base, ln in iov.tolist():
        try:
            k.madvise_mm(target.mm, "process_madvise", base, ln, advice)
        except KernelError as err:
            return done if done else -(err.errno or errno.EIO)
        done += ln
    return done


_HANDLERS: dict[int, Callable[[FakeKernel, FakeVmm, int, Args], int]] = {
    SYS_USERFAULTFD: _userfaultfd, SYS_CLOSE: _close, SYS_GETPID: _getpid,
    SYS_PIDFD_OPEN: _pidfd_open, SYS_MMAP: _mmap, SYS_MUNMAP: _munmap,
    SYS_MADVISE: _madvise, SYS_PROCESS_MADVISE: _process_madvise,
}
