"""The fake kernel's process model: simulated VMMs (spawn_process), Process handles
(open_process), uffds created inside a VMM by injection, reference counting across
processes, the daemon's crash, exit, injected syscalls and fault injection.

Expected values are Linux's (shared/kernel-facts.md "Another process's memory", and
fs/userfaultfd.c / mm/madvise.c where the facts don't say); tests/conformance runs the
cross-process cases on linux too.
"""

from __future__ import annotations

import errno
import faulthandler
import itertools
import select
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from vmm_tierd.kernel import uapi as U
from vmm_tierd.kernel.api import (
    AccessKind,
    AccessStatus,
    Dialect,
    KernelError,
    PageFault,
    WorkloadSpec,
)
from vmm_tierd.kernel.fake import FakeKernel
from vmm_tierd.kernel.fake_proc import FakeVmm
from vmm_tierd.kernel.fake_remote import FakeProcess
from vmm_tierd.kernel.process import (
    SYS_CLOSE,
    SYS_GETPID,
    SYS_MMAP,
    SYS_MUNMAP,
    SYS_PIDFD_OPEN,
    SYS_PROCESS_MADVISE,
    SYS_USERFAULTFD,
    GuestProcess,
    Process,
    Syscall,
    is_vcpu_thread,
    pick_inject_thread,
)

PS = 4096
NPAGES = 16
MISSING = U.UFFDIO_REGISTER_MODE_MISSING
RW = U.PROT_READ | U.PROT_WRITE
ANON = U.MAP_PRIVATE | U.MAP_ANONYMOUS


@pytest.fixture(autouse=True)
def _hang_guard() -> Iterator[None]:
    faulthandler.dump_traceback_later(60, exit=True, file=sys.__stderr__ or sys.stderr)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(params=[Dialect.RWP, Dialect.RFC], ids=["fake-rwp", "fake-rfc"])
def k(request: pytest.FixtureRequest) -> Iterator[FakeKernel]:
    kern = FakeKernel(request.param)
    yield kern
    kern.close()


def call(p: FakeProcess, nr: int, *args: int) -> int:
    tid = pick_inject_thread(p.pid, p.threads())
    return p.inject(tid, [Syscall(nr, args)]).results[0]


def err_of(fn: object) -> tuple[str, int, int]:
    with pytest.raises(KernelError) as ei:
        fn()  # type: ignore[operator]
    return ei.value.op, ei.value.errno or 0, ei.value.done


def attach(k: FakeKernel, vmm: FakeVmm, features: int = U.UFFD_FEATURE_MISSING_SHMEM
           | U.UFFD_FEATURE_THREAD_ID, flags: int = U.O_CLOEXEC | U.O_NONBLOCK
           ) -> tuple[FakeProcess, int, int]:
    """As the daemon attaches: (handle, the VMM's uffd fd, this process's copy of it)."""
    p = k.open_process(vmm.pid)
    vfd = call(p, SYS_USERFAULTFD, flags)
    assert vfd >= 0
    ufd = p.getfd(vfd)
    k.uffd_api(ufd, features)
    return p, vfd, ufd


def wait_fault(k: FakeKernel, fd: int) -> PageFault:
    assert select.select([fd], [], [], 5)[0], "no fault within 5 s"
    (msg,) = k.uffd_read(fd)
    assert isinstance(msg, PageFault)
    return msg


def page(n: int) -> bytes:
    return bytes([n + 1]) * PS


def fill(vmm: FakeVmm, pages: range | list[int]) -> None:
    for n in pages:
        r = vmm.start_access(vmm.ram_addr + n * PS, AccessKind.WRITE, PS, page(n)).wait(5)
        assert r.status is AccessStatus.OK


def read(vmm: FakeVmm, n: int) -> bytes:
    r = vmm.start_access(vmm.ram_addr + n * PS, AccessKind.READ, PS).wait(5)
    assert r.status is AccessStatus.OK, r
    return r.data


# ---- the shape of a simulated VMM ------------------------------------------------------
def test_spawn_shape(k: FakeKernel) -> None:
    vmm = k.spawn_process(NPAGES * PS, vcpus=2)
    p = k.open_process(vmm.pid)
    assert isinstance(p, Process) and isinstance(vmm, GuestProcess)
    assert p.owner == vmm.owner and p.owner.pid == vmm.pid and p.owner.start_time > 0
    th = p.threads()
    assert [t.comm for t in th] == ["qemu-system-x86", "CPU 0/KVM", "CPU 1/KVM"]
    assert th[0].tid == vmm.pid and len({t.tid for t in th}) == 3
    assert pick_inject_thread(vmm.pid, th) == vmm.pid
    assert [is_vcpu_thread(t.comm) for t in th] == [False, True, True]
    fds = {f.fd: f for f in p.fds()}
    assert [fds[i].target for i in (0, 1, 2)] == ["/dev/null"] * 3
    ram = fds[vmm.ram_fd]
    assert ram.memfd_name == "memory-backend-memfd" and not ram.is_uffd
    assert ram.target == "/memfd:memory-backend-memfd (deleted)"
    maps = p.maps()
    assert [m.start for m in maps] == sorted(m.start for m in maps)
    assert all(a.end <= b.start for a, b in itertools.pairwise(maps))
    shared = [m for m in maps if m.shared]
    assert len(shared) == 1
    (m,) = shared
    assert (m.start, m.length, m.perms, m.offset) == (vmm.ram_addr, NPAGES * PS, "rw-s", 0)
    assert m.inode == ram.inode and m.path == ram.target
    assert any(x.path == "[vdso]" and "x" in x.perms for x in maps)
    assert vmm.region.owner == p.owner and vmm.region.owner_fd == vmm.ram_fd
    p.close()


def test_pid_reuse_gets_a_new_start_time(k: FakeKernel) -> None:
    a = k.spawn_process(PS)
    p = k.open_process(a.pid)
    with pytest.raises(ValueError, match="in use"):
        k.spawn_process(PS, pid=a.pid)
    a.exit()
    b = k.spawn_process(PS, pid=a.pid)
    assert b.pid == a.pid and b.start_time != a.start_time
    assert not p.alive()  # the old handle does not follow the pid to the new process
    assert err_of(p.threads)[1] == errno.ESRCH
    q = k.open_process(b.pid)
    assert q.alive() and q.owner != p.owner
    assert err_of(lambda: k.open_process(99999)) == ("pidfd_open", errno.ESRCH, 0)


# ---- injection -----------------------------------------------------------------------
def test_inject_userfaultfd_flags_and_privilege(k: FakeKernel) -> None:
    vmm = k.spawn_process(PS)
    p = k.open_process(vmm.pid)
    nb = call(p, SYS_USERFAULTFD, U.O_CLOEXEC | U.O_NONBLOCK)
    blk = call(p, SYS_USERFAULTFD, 0)
    assert nb >= 5 and blk == nb + 1  # the lowest free fds (0-4 are taken)
    assert vmm.fd_flags(nb) == (True, True) and vmm.fd_flags(blk) == (False, False)
    assert {f.fd for f in p.fds() if f.is_uffd} == {nb, blk}
    assert call(p, SYS_USERFAULTFD, 0x10) == -errno.EINVAL
    vmm.privileged = False  # vm.unprivileged_userfaultfd=0, no CAP_SYS_PTRACE
    assert call(p, SYS_USERFAULTFD, U.O_NONBLOCK) == -errno.EPERM
    assert call(p, SYS_USERFAULTFD, 0x10) == -errno.EPERM  # EPERM is checked first
    umo = call(p, SYS_USERFAULTFD, U.O_NONBLOCK | U.UFFD_USER_MODE_ONLY)
    assert umo >= 0
    assert call(p, SYS_CLOSE, umo) == 0 and call(p, SYS_CLOSE, umo) == -errno.EBADF


def test_inject_records_threads_and_refuses_unknown(k: FakeKernel) -> None:
    vmm = k.spawn_process(PS, vcpus=2)
    p = k.open_process(vmm.pid)
    res = p.inject(vmm.pid, [Syscall(SYS_GETPID), Syscall(999), Syscall(SYS_CLOSE, (77,))])
    assert res.tid == vmm.pid and res.results == (vmm.pid, -errno.ENOSYS, -errno.EBADF)
    assert res.pause_s >= 0 and res.signals == ()
    assert err_of(lambda: p.inject(12345, [Syscall(SYS_GETPID)])) == (
        "ptrace(SEIZE)", errno.ESRCH, 0)
    with pytest.raises(ValueError, match="at most 6"):
        p.inject(vmm.pid, [Syscall(SYS_GETPID, (0,) * 7)])
    assert [t for t, _c in vmm.injections] == [vmm.pid, vmm.pid]
    assert not set(vmm.vcpu_tids) & {t for t, _c in vmm.injections}


def test_uffd_from_inside_drives_its_memory(k: FakeKernel) -> None:
    vmm = k.spawn_process(NPAGES * PS, vcpus=2)
    p, vfd, ufd = attach(k, vmm)
    assert p.uffd_features(vfd) == k.uffd_features(ufd)
    assert p.uffd_features(vfd) & U.UFFD_FEATURE_MISSING_SHMEM
    assert err_of(lambda: p.uffd_features(vmm.ram_fd))[1] == errno.EBADF
    mine = k.map_anon(NPAGES * PS)  # this process's memory is not the VMM's
    k.uffd_register(ufd, vmm.ram_addr, NPAGES * PS, MISSING)
    assert err_of(lambda: k.uffd_register(ufd, mine.addr, PS, MISSING))[1] == errno.EINVAL
    a = vmm.start_access(vmm.ram_addr + 3 * PS, AccessKind.READ, PS)
    f = wait_fault(k, ufd)
    assert (f.address, f.missing, f.tid) == (vmm.ram_addr + 3 * PS, True, a.tid)
    assert a.tid in vmm.vcpu_tids
    assert k.uffd_copy(ufd, vmm.ram_addr + 3 * PS, page(3)) == PS
    assert a.wait(5).data == page(3)
    pres = p.pagemap_scan(vmm.ram_addr, vmm.ram_addr + NPAGES * PS,
                          category_mask=U.PAGE_IS_PRESENT, return_mask=U.PAGE_IS_PRESENT)
    assert pres.regions.tolist() == [[vmm.ram_addr + 3 * PS, vmm.ram_addr + 4 * PS,
                                      U.PAGE_IS_PRESENT]]
    assert k.pagemap_scan(mine.addr, mine.end, category_mask=U.PAGE_IS_PRESENT,
                          return_mask=U.PAGE_IS_PRESENT).pages() == 0
    # MOVE: refused across mms before its ranges are even looked at
    assert err_of(lambda: k.uffd_move(ufd, 1, 3, 5))[1] == errno.EINVAL
    assert not set(vmm.vcpu_tids) & {t for t, _c in vmm.injections}


def test_blocking_uffd_copy_blocks_in_read(k: FakeKernel) -> None:
    """O_NONBLOCK belongs to the file: a copy of a uffd made without it blocks in read
    until a fault arrives, while an O_NONBLOCK one answers [] at once."""
    vmm = k.spawn_process(NPAGES * PS)
    _p, _vfd, ufd = attach(k, vmm, flags=U.O_CLOEXEC)
    k.uffd_register(ufd, vmm.ram_addr, NPAGES * PS, MISSING)
    u = k.uffds[ufd]
    got: list[object] = []
    t = threading.Thread(target=lambda: got.extend(k.uffd_read(ufd)), daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while True:  # until the reader sleeps in read() (a state, not a timing)
        with k.lock:
            if u.readers:
                break
        assert time.monotonic() < deadline, "the reader never blocked"
        time.sleep(0.001)
    a = vmm.start_access(vmm.ram_addr, AccessKind.READ, PS)
    t.join(5)
    assert not t.is_alive() and len(got) == 1 and isinstance(got[0], PageFault)
    k.uffd_zeropage(ufd, vmm.ram_addr, PS)
    assert a.wait(5).status is AccessStatus.OK
    _p2, _v2, nb = attach(k, vmm)
    assert k.uffd_read(nb) == []


# ---- reference counting, the daemon's death --------------------------------------------
@pytest.mark.parametrize("vmm_keeps_ref", [True, False])
def test_crash(k: FakeKernel, vmm_keeps_ref: bool) -> None:
    vmm = k.spawn_process(NPAGES * PS)
    p, vfd, ufd = attach(k, vmm)
    mfd = p.getfd(vmm.ram_fd)
    fill(vmm, range(NPAGES))
    k.uffd_register(ufd, vmm.ram_addr, NPAGES * PS, MISSING)
    saved = k.pread(mfd, 2 * PS, PS)
    k.punch_hole(mfd, 2 * PS, PS)
    if not vmm_keeps_ref:
        assert call(p, SYS_CLOSE, vfd) == 0
    a = vmm.start_access(vmm.ram_addr + 2 * PS, AccessKind.READ, PS)
    wait_fault(k, ufd)
    k.crash()
    assert not k.uffds and not k.files and not k.handles
    assert err_of(p.threads)[1] == errno.EBADF  # the handle died with its process
    if not vmm_keeps_ref:
        # the hazard: the context went with the daemon, the hole reads as zeros
        assert a.wait(5).data == bytes(PS) and read(vmm, 5) == page(5)
        assert not any(f.is_uffd for f in k.open_process(vmm.pid).fds())
        return
    assert not a.done()
    p2 = k.open_process(vmm.pid)  # the restarted daemon
    ufd2 = p2.getfd(vfd)
    # the fault was read before the crash: it waits, not re-delivered; COPY wakes it
    assert k.uffd_read(ufd2) == []
    assert k.uffd_copy(ufd2, vmm.ram_addr + 2 * PS, saved) == PS
    assert a.wait(5).data == page(2)
    b = vmm.start_access(vmm.ram_addr + 2 * PS + 7, AccessKind.READ, 1)
    assert b.wait(5).data == page(2)[:1]


def test_close_copies_in_any_order(k: FakeKernel) -> None:
    vmm = k.spawn_process(NPAGES * PS)
    p, vfd, ufd = attach(k, vmm)
    u = k.uffds[ufd]
    copies = [ufd, p.getfd(vfd), p.getfd(vfd)]
    assert u.refs == 4 and len({k.uffds[c] for c in copies}) == 1
    k.uffd_register(copies[1], vmm.ram_addr, PS, MISSING)
    for c in copies:
        k.uffd_close(c)
    assert not u.released and u.refs == 1  # the VMM's own fd keeps it
    assert err_of(lambda: k.uffd_close(ufd))[1] == errno.EBADF
    ufd3 = p.getfd(vfd)
    a = vmm.start_access(vmm.ram_addr, AccessKind.READ, PS)
    assert wait_fault(k, ufd3).address == vmm.ram_addr  # still registered
    assert call(p, SYS_CLOSE, vfd) == 0 and not u.released
    k.uffd_close(ufd3)
    assert u.released and a.wait(5).data == bytes(PS)
    assert err_of(lambda: p.getfd(vfd))[1] == errno.EBADF


# ---- memory of the VMM ----------------------------------------------------------------
def test_read_write_memory(k: FakeKernel) -> None:
    vmm = k.spawn_process(NPAGES * PS)
    p, _vfd, ufd = attach(k, vmm)
    scratch = call(p, SYS_MMAP, 0, 2 * PS, RW, ANON, -1, 0)
    assert scratch > 0
    assert any(m.start == scratch and m.perms == "rw-p" for m in p.maps())
    p.write_memory(scratch + 100, b"hello")
    assert p.read_memory(scratch + 98, 9) == b"\0\0hello\0\0"
    assert err_of(lambda: p.read_memory(scratch + PS, 2 * PS)) == (
        "process_vm_readv", errno.EFAULT, PS)
    assert err_of(lambda: p.write_memory(scratch + 2 * PS - 2, b"abcd"))[1:] == (
        errno.EFAULT, 2)
    # registered guest RAM: the kernel's access faults like any other (and blocks)
    k.uffd_register(ufd, vmm.ram_addr, NPAGES * PS, MISSING)
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(p.read_memory(vmm.ram_addr + PS, 8)),
                         daemon=True)
    t.start()
    f = wait_fault(k, ufd)
    assert f.address == vmm.ram_addr + PS and f.tid not in vmm.tids  # this side's thread
    k.uffd_copy(ufd, vmm.ram_addr + PS, page(1))
    t.join(5)
    assert got == [page(1)[:8]]


def test_user_mode_only_uffd_refuses_kernel_accesses(k: FakeKernel) -> None:
    vmm = k.spawn_process(NPAGES * PS)
    vmm.privileged = False
    p, _vfd, ufd = attach(k, vmm, flags=U.O_NONBLOCK | U.UFFD_USER_MODE_ONLY)
    k.uffd_register(ufd, vmm.ram_addr, NPAGES * PS, MISSING)
    assert err_of(lambda: p.read_memory(vmm.ram_addr, 8))[1] == errno.EFAULT
    r = vmm.start_access(vmm.ram_addr, AccessKind.GUP_READ, 8).wait(5)
    assert (r.status, r.err) == (AccessStatus.ERROR, errno.EFAULT)
    a = vmm.start_access(vmm.ram_addr, AccessKind.READ, 8)  # user mode: a fault
    assert wait_fault(k, ufd).address == vmm.ram_addr
    k.uffd_zeropage(ufd, vmm.ram_addr, PS)
    assert a.wait(5).data == bytes(8)


def test_mmap_munmap(k: FakeKernel) -> None:
    vmm = k.spawn_process(NPAGES * PS)
    p = k.open_process(vmm.pid)
    alias = call(p, SYS_MMAP, 0, 4 * PS, RW, U.MAP_SHARED, vmm.ram_fd, 2 * PS)
    assert alias > 0
    fill(vmm, [3])
    r = vmm.start_access(alias + PS, AccessKind.READ, PS).wait(5)
    assert r.data == page(3)  # the same page cache, file page 3
    ino = {m.inode for m in p.maps() if m.shared}
    assert len(ino) == 1 and len([m for m in p.maps() if m.shared]) == 2
    for args, err in (((0, PS, RW, ANON | U.MAP_FIXED, -1, 0), errno.EINVAL),
                      ((0, PS, U.PROT_READ, ANON, -1, 0), errno.EINVAL),
                      ((0, 0, RW, ANON, -1, 0), errno.EINVAL),
                      ((0, PS, RW, U.MAP_SHARED, 77, 0), errno.EBADF),
                      ((0, PS, RW, U.MAP_SHARED, 0, 0), errno.ENODEV)):
        assert call(p, SYS_MMAP, *args) == -err, args
    assert call(p, SYS_MUNMAP, alias, PS) == -errno.EINVAL  # would split it
    assert call(p, SYS_MUNMAP, alias + 1, PS) == -errno.EINVAL
    assert call(p, SYS_MUNMAP, alias, 4 * PS) == 0
    assert len([m for m in p.maps() if m.shared]) == 1


def test_process_madvise(k: FakeKernel) -> None:
    vmm = k.spawn_process(NPAGES * PS)
    other = k.spawn_process(NPAGES * PS)
    p = k.open_process(vmm.pid)
    fill(vmm, range(NPAGES))
    fill(other, range(NPAGES))
    me = call(p, SYS_PIDFD_OPEN, vmm.pid, 0)
    them = call(p, SYS_PIDFD_OPEN, other.pid, 0)
    assert me >= 0 and them >= 0 and call(p, SYS_PIDFD_OPEN, 99999, 0) == -errno.ESRCH
    vec = call(p, SYS_MMAP, 0, PS, RW, ANON, -1, 0)

    def iov(*ranges: tuple[int, int]) -> int:
        p.write_memory(vec, np.asarray(ranges, dtype="<u8").tobytes())
        return len(ranges)

    def present(v: FakeVmm) -> int:
        return k.open_process(v.pid).pagemap_scan(
            v.ram_addr, v.ram_addr + NPAGES * PS, category_mask=U.PAGE_IS_PRESENT).pages()

    n = iov((vmm.ram_addr, PS), (vmm.ram_addr + 4 * PS, 2 * PS))
    assert call(p, SYS_PROCESS_MADVISE, me, vec, n, U.MADV_DONTNEED, 0) == 3 * PS
    assert present(vmm) == NPAGES - 3 and read(vmm, 4) == page(4)  # the page cache stays
    n = iov((other.ram_addr, PS))
    assert call(p, SYS_PROCESS_MADVISE, them, vec, n, U.MADV_DONTNEED, 0) == -errno.EINVAL
    assert call(p, SYS_PROCESS_MADVISE, them, vec, n, U.MADV_COLD, 0) == PS
    assert present(other) == NPAGES  # COLD without swap: nothing leaves
    # the second range is not mapped: the first one's bytes are reported
    n = iov((vmm.ram_addr + 8 * PS, PS), (0x10000, PS))
    assert call(p, SYS_PROCESS_MADVISE, me, vec, n, U.MADV_DONTNEED, 0) == PS
    assert call(p, SYS_PROCESS_MADVISE, me, vec + PS - 8, 1, U.MADV_DONTNEED, 0) == -errno.EFAULT
    for args, err in (((me, vec, 1, U.MADV_DONTNEED, 1), errno.EINVAL),
                      ((me, vec, 1025, U.MADV_DONTNEED, 0), errno.EINVAL),
                      ((vmm.ram_fd, vec, 1, U.MADV_DONTNEED, 0), errno.EBADF)):
        assert call(p, SYS_PROCESS_MADVISE, *args) == -err, args
    vmm.privileged = False  # no CAP_SYS_NICE: nothing on another process
    assert call(p, SYS_PROCESS_MADVISE, them, vec, 1, U.MADV_COLD, 0) == -errno.EPERM
    other.exit()
    assert call(p, SYS_PROCESS_MADVISE, them, vec, 1, U.MADV_COLD, 0) == -errno.ESRCH


# ---- exit ---------------------------------------------------------------------------------
def test_exit(k: FakeKernel) -> None:
    vmm = k.spawn_process(NPAGES * PS, vcpus=2)
    p, vfd, ufd = attach(k, vmm)
    mfd = p.getfd(vmm.ram_fd)
    fill(vmm, [1])
    k.uffd_register(ufd, vmm.ram_addr, NPAGES * PS, MISSING)
    blocked = vmm.start_access(vmm.ram_addr + 5 * PS, AccessKind.READ, PS)
    wait_fault(k, ufd)
    wl = vmm.start_workload(vmm.region, WorkloadSpec(threads=1, touch_all_first=False))
    assert not select.select([p.pidfd], [], [], 0)[0]
    vmm.exit()
    vmm.exit()  # idempotent
    assert select.select([p.pidfd], [], [], 5)[0] and not p.alive()
    r = blocked.wait(5)
    assert (r.status, r.err) == (AccessStatus.ERROR, errno.ESRCH)
    assert wl.stop().sigbus == 0
    ops = {"/proc/PID/maps": p.maps, "/proc/PID/fd": p.fds, "/proc/PID/task": p.threads,
           "/proc/PID/fdinfo": lambda: p.uffd_features(vfd),
           "pidfd_getfd": lambda: p.getfd(vfd),
           "process_vm_readv": lambda: p.read_memory(vmm.ram_addr, 1),
           "process_vm_writev": lambda: p.write_memory(vmm.ram_addr, b"x"),
           "ptrace(SEIZE)": lambda: p.inject(vmm.pid, [Syscall(SYS_GETPID)]),
           "PAGEMAP_SCAN": lambda: p.pagemap_scan(vmm.ram_addr, vmm.ram_addr + PS)}
    for op, fn in ops.items():
        assert err_of(fn)[:2] == (op, errno.ESRCH)
    # this side's copy outlives the address space (mmget_not_zero fails)
    a = vmm.ram_addr
    assert err_of(lambda: k.uffd_copy(ufd, a, page(0)))[1] == errno.ESRCH
    assert err_of(lambda: k.uffd_writeprotect(ufd, a, PS, 1))[1] == errno.ESRCH
    assert err_of(lambda: k.uffd_register(ufd, a, PS, MISSING))[1] == errno.ENOMEM
    assert err_of(lambda: k.uffd_move(ufd, a, a + PS, PS))[1] == errno.EINVAL  # cross-mm
    k.uffd_wake(ufd, a, PS)
    assert k.uffd_read(ufd) == []
    assert k.pread(mfd, PS, PS) == page(1)  # the RAM lives on in this side's memfd copy
    assert vmm.start_access(a, AccessKind.READ, 1).wait(5).err == errno.ESRCH
    assert err_of(lambda: k.open_process(vmm.pid))[1] == errno.ESRCH
    k.uffd_close(ufd)  # the last reference
    p.close()
    p.close()
