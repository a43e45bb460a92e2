"""RemoteSpace on a real process (tests/remote/target.c): a uffd created inside the
target and used from here, PTEs zapped by injected process_madvise, PAGEMAP_SCAN through
/proc/PID/pagemap, and the choice of the thread to stop. Needs root."""

from __future__ import annotations

import errno
import os
import struct

import pytest

from tests.remote.helpers import NR_IOCTL, PS, RemotePage, pages, wait_fault
from tests.remote.target import Target, pattern
from vmm_tierd.kernel import uapi
from vmm_tierd.kernel.api import AccessKind, AccessStatus, KernelError
from vmm_tierd.kernel.linux import LinuxKernel
from vmm_tierd.kernel.linux_process import LinuxProcess
from vmm_tierd.kernel.process import Syscall, is_vcpu_thread, pick_inject_thread
from vmm_tierd.kernel.remote import RemoteSpace, _ranges

WAIT = 10.0


def _uffd(lk: LinuxKernel, space: RemoteSpace, features: int) -> tuple[int, int]:
    remote, local = space.create_uffd()
    assert space.proc.uffd_features(remote) is None  # no UFFDIO_API yet
    lk.uffd_api(local, features)
    return remote, local


# ---- the uffd ----------------------------------------------------------------------------
def test_create_uffd_and_serve_a_missing_fault(lk: LinuxKernel, target: Target,
                                               proc: LinuxProcess, space: RemoteSpace) -> None:
    remote, local = _uffd(lk, space, uapi.UFFD_FEATURE_THREAD_ID)
    fds = {f.fd: f for f in proc.fds()}
    assert fds[remote].is_uffd
    assert os.fstat(local).st_ino == fds[remote].inode
    assert proc.uffd_features(remote) == uapi.UFFD_FEATURE_THREAD_ID
    assert space.stats.stops == 1 and space.tid == target.pid
    memfd = proc.getfd(target.ram_fd)
    try:
        lk.uffd_register(local, target.ram_addr, target.ram_bytes,
                         uapi.UFFDIO_REGISTER_MODE_MISSING)
        lk.punch_hole(memfd, 9 * PS, PS)  # gone from the page cache and every mapping
        addr = target.ram_addr + 9 * PS
        a = target.start_access(addr + 16, AccessKind.READ, 16, vcpu=1)
        f = wait_fault(lk, local)
        assert (f.address, f.tid, f.missing) == (addr, target.vcpu_tids[1], True)
        assert a.wait(0).status is AccessStatus.PENDING
        lk.uffd_copy(local, addr, b"\xab" * PS)
        assert a.wait(WAIT).data == b"\xab" * 16
        # the neighbours were never touched
        assert target.start_access(addr + PS, AccessKind.READ, 8).wait(WAIT).data == \
            pattern(10, 8)
    finally:
        os.close(memfd)
        lk.uffd_close(local)
    space.close_remote([remote])
    assert remote not in {f.fd for f in proc.fds()}
    with pytest.raises(KernelError) as ei:
        space.close_remote([remote])
    assert (ei.value.op, ei.value.errno) == ("close", errno.EBADF)
    target.ping()


def test_poisoned_page_is_sigbus_in_the_vcpu(lk: LinuxKernel, target: Target,
                                            proc: LinuxProcess, space: RemoteSpace) -> None:
    remote, local = _uffd(lk, space, uapi.UFFD_FEATURE_POISON)
    memfd = proc.getfd(target.ram_fd)
    addr = target.ram_addr + 20 * PS
    try:
        lk.uffd_register(local, target.ram_addr, target.ram_bytes,
                         uapi.UFFDIO_REGISTER_MODE_MISSING)
        lk.punch_hole(memfd, 20 * PS, PS)
        assert lk.uffd_poison(local, addr, PS) == PS
        r = target.start_access(addr, AccessKind.READ, 8).wait(WAIT)
        assert r.status is AccessStatus.SIGBUS
        ok = target.start_access(addr + PS, AccessKind.READ, 8).wait(WAIT)
        assert (ok.status, ok.data) == (AccessStatus.OK, pattern(21, 8))
    finally:
        os.close(memfd)
        lk.uffd_close(local)
        space.close_remote([remote])
    target.ping()


def test_move_from_outside_is_einval_inside_it_works(lk: LinuxKernel, target: Target,
                                                     proc: LinuxProcess,
                                                     space: RemoteSpace) -> None:
    remote, local = _uffd(lk, space, uapi.UFFD_FEATURE_MOVE)
    dst, src = target.anon_addr, target.anon_addr + 4 * PS
    try:
        lk.uffd_register(local, dst, PS, uapi.UFFDIO_REGISTER_MODE_MISSING)
        assert space.discard([(dst, PS)]) == PS  # dst: registered and empty
        with pytest.raises(KernelError) as ei:
            lk.uffd_move(local, dst, src, PS)
        assert (ei.value.op, ei.value.errno) == ("UFFDIO_MOVE", errno.EINVAL)
        # The very same move issued by the target itself: the kernel only refuses the mm.
        page = RemotePage(proc, target.pid)
        assert struct.calcsize("<QQQQq") == uapi.SIZEOF_UFFDIO_MOVE
        arg = page.put("<QQQQq", dst, src, PS, 0, 0)
        r = proc.inject(target.pid, [Syscall(NR_IOCTL, (remote, uapi.UFFDIO_MOVE, arg))])
        assert r.results == (0,)
        assert page.get("<q", 32) == (PS,)
        page.close()
        assert target.start_access(dst, AccessKind.READ, 8).wait(WAIT).data == pattern(4, 8)
    finally:
        lk.uffd_close(local)
        space.close_remote([remote])


def test_pagemap_scan_finds_exactly_the_written_pages(lk: LinuxKernel, target: Target,
                                                      proc: LinuxProcess,
                                                      space: RemoteSpace) -> None:
    feats = (uapi.UFFD_FEATURE_WP_ASYNC | uapi.UFFD_FEATURE_WP_UNPOPULATED
             | uapi.UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
    remote, local = _uffd(lk, space, feats)
    ram, n = target.ram_addr, target.ram_bytes
    try:
        lk.uffd_register(local, ram, n, uapi.UFFDIO_REGISTER_MODE_WP)
        lk.uffd_writeprotect(local, ram, n, uapi.UFFDIO_WRITEPROTECT_MODE_WP)

        def scan() -> set[int]:
            return pages(proc.pagemap_scan(
                ram, ram + n, category_mask=uapi.PAGE_IS_WRITTEN,
                return_mask=uapi.PAGE_IS_WRITTEN,
                flags=uapi.PM_SCAN_WP_MATCHING | uapi.PM_SCAN_CHECK_WPASYNC), ram)

        assert scan() == set()
        written = {1, 5, 9, 200, 4095}
        for p in sorted(written):
            a = target.start_access(ram + p * PS + 8, AccessKind.WRITE, 4, b"abcd")
            assert a.wait(WAIT).status is AccessStatus.OK  # WP_ASYNC: never blocks
        target.start_access(ram + 7 * PS, AccessKind.READ, 8).wait(WAIT)  # reads: invisible
        assert scan() == written
        assert scan() == set()  # re-protected by WP_MATCHING
        target.start_access(ram + 5 * PS, AccessKind.WRITE, 1, b"z").wait(WAIT)
        assert scan() == {5}
        assert proc.read_memory(ram + 9 * PS, 16) == pattern(9, 8) + b"abcd" + pattern(9, 4, 12)
    finally:
        lk.uffd_close(local)
        space.close_remote([remote])


# ---- discard ----------------------------------------------------------------------------------
def test_discard_zaps_ptes_then_minor_fault_and_continue(lk: LinuxKernel, target: Target,
                                                         proc: LinuxProcess,
                                                         space: RemoteSpace) -> None:
    remote, local = _uffd(lk, space, uapi.UFFD_FEATURE_MINOR_SHMEM)
    ram = target.ram_addr
    try:
        lk.uffd_register(local, ram, target.ram_bytes, uapi.UFFDIO_REGISTER_MODE_MINOR)
        assert space.discard([(ram + 3 * PS, PS), (ram + 10 * PS, 2 * PS)]) == 3 * PS
        present = pages(proc.pagemap_scan(ram, ram + 16 * PS,
                                          category_mask=uapi.PAGE_IS_PRESENT,
                                          return_mask=uapi.PAGE_IS_PRESENT), ram)
        assert present == set(range(16)) - {3, 10, 11}
        a = target.start_access(ram + 11 * PS, AccessKind.READ, 8)
        f = wait_fault(lk, local)
        assert (f.address, f.minor) == (ram + 11 * PS, True)
        assert lk.uffd_continue(local, ram + 11 * PS, PS) == PS
        assert a.wait(WAIT).data == pattern(11, 8)  # the page cache kept the data
    finally:
        lk.uffd_close(local)
        space.close_remote([remote])


def test_discard_many_ranges_in_one_stop(target: Target, proc: LinuxProcess,
                                         space: RemoteSpace) -> None:
    ram = target.ram_addr
    assert space.discard([(ram, PS)]) == PS  # maps the scratch area (its own stop)
    before = space.stats.stops
    ranges = [(ram + p * PS, PS) for p in range(0, 3000, 2)]  # 1500 ranges
    assert space.discard(ranges) == 1500 * PS
    assert space.stats.stops - before == 1
    assert space.stats.last_calls == 2  # ceil(1500 / UIO_MAXIOV) process_madvise calls
    assert space.discard(ranges * 4) == 6000 * PS  # 96000 bytes of iovecs: more scratch
    assert space.stats.stops - before == 3  # grow the scratch area, then the discard
    assert space.stats.last_calls == 6
    present = pages(proc.pagemap_scan(ram, ram + 3000 * PS, category_mask=uapi.PAGE_IS_PRESENT,
                                      return_mask=uapi.PAGE_IS_PRESENT), ram)
    assert present == set(range(1, 3000, 2))
    target.ping()


def test_discard_partial_failure_names_the_range(target: Target, space: RemoteSpace) -> None:
    ram = target.ram_addr
    with pytest.raises(KernelError) as ei:
        space.discard([(ram, PS), (ram + PS, PS), (0x1000, PS), (ram + 2 * PS, PS)])
    e = ei.value
    assert (e.op, e.errno, e.done) == ("process_madvise", errno.ENOMEM, 2 * PS)
    assert "range 2 of [0x1000, 0x2000)" in str(e)


def test_discard_checks_its_ranges(space: RemoteSpace) -> None:
    for bad in ([(4097, PS)], [(PS, 100)], [(PS, 0)], [(PS, 1, 2)], [((1 << 64) - PS, 2 * PS)]):
        with pytest.raises(ValueError, match="discard"):
            space.discard(bad)  # type: ignore[arg-type]
    assert space.discard([]) == 0
    assert space.stats.stops == 0
    assert _ranges([(PS, PS), (3 * PS, 2 * PS)]).tolist() == [[PS, PS], [3 * PS, 2 * PS]]


def test_release_leaves_the_vmm_as_found(target: Target, proc: LinuxProcess,
                                         space: RemoteSpace) -> None:
    maps0 = [(m.start, m.end, m.perms) for m in proc.maps()]
    fds0 = [f.fd for f in proc.fds()]
    space.discard([(target.ram_addr, PS)])
    assert [(m.start, m.end, m.perms) for m in proc.maps()] != maps0  # the scratch area
    assert any(f.target == "anon_inode:[pidfd]" for f in proc.fds())
    space.release()
    assert [(m.start, m.end, m.perms) for m in proc.maps()] == maps0
    assert [f.fd for f in proc.fds()] == fds0
    space.release()  # idempotent, no stop
    target.ping()


# ---- which thread ------------------------------------------------------------------------------
def test_vcpu_threads_are_never_picked(target: Target, proc: LinuxProcess) -> None:
    assert RemoteSpace(proc).tid == target.pid
    for glob in ("CPU 0/KVM", "CPU *"):
        with pytest.raises(LookupError, match="only vCPU threads match"):
            RemoteSpace(proc, thread=glob).pick_thread()
    with pytest.raises(LookupError, match="no thread matches"):
        RemoteSpace(proc, thread="nonesuch").pick_thread()
    assert RemoteSpace(proc, thread="worker-s*").tid == target.workers["sleep"]
    target.set_comm(target.pid, "CPU 9/KVM")  # main thread named like a vCPU
    tid = pick_inject_thread(target.pid, proc.threads())
    assert tid in target.workers.values()
    for name, wtid in target.workers.items():
        target.set_comm(wtid, f"vcpu{len(name)}")
    assert all(is_vcpu_thread(t.comm) for t in proc.threads())
    with pytest.raises(LookupError, match="none can be stopped safely"):
        pick_inject_thread(target.pid, proc.threads())
    with pytest.raises(LookupError):
        RemoteSpace(proc).create_uffd()
    assert not any(f.is_uffd for f in proc.fds())


def test_injection_into_a_vcpu_thread_is_possible_but_not_chosen(
        target: Target, proc: LinuxProcess, space: RemoteSpace) -> None:
    """Process.inject itself does what it is told (a vCPU blocked on a fault would only
    stop once served); RemoteSpace never tells it to stop a vCPU thread."""
    r = proc.inject(target.vcpu_tids[0], [Syscall(39)])
    assert r.results == (target.pid,)
    a = target.start_access(target.ram_addr, AccessKind.READ, 8, vcpu=0)
    assert a.wait(WAIT).data == pattern(0, 8)
    remote, local = space.create_uffd()
    os.close(local)
    space.close_remote([remote])
    assert space.tid not in target.vcpu_tids


# ---- an unprivileged VMM ---------------------------------------------------------------------
NOBODY = 65534


def test_unprivileged_vmm_gets_its_uffd_through_the_device(lk: LinuxKernel) -> None:
    """userfaultfd() is EPERM in it (vm.unprivileged_userfaultfd=0): /dev/userfaultfd is
    passed in, and the uffd takes kernel-mode (GUP) faults, unlike a user-mode-only one."""
    with open("/proc/sys/vm/unprivileged_userfaultfd") as sysctl:
        if sysctl.read().strip() != "0":
            pytest.skip("vm.unprivileged_userfaultfd is 1: userfaultfd() would just work")
    if not os.path.exists("/dev/userfaultfd"):
        pytest.skip("no /dev/userfaultfd")
    with Target.start(1 << 20, user=NOBODY) as t:
        p = lk.open_process(t.pid)
        try:
            r = p.inject(t.pid, [Syscall(uapi.SYS_userfaultfd, (uapi.O_CLOEXEC,))])
            assert r.results == (-errno.EPERM,)
            with pytest.raises(KernelError) as ei:
                RemoteSpace(p, uffd_device=None).create_uffd()
            assert (ei.value.op, ei.value.errno) == ("userfaultfd", errno.EPERM)
            assert "vm.unprivileged_userfaultfd" in str(ei.value)
            space = RemoteSpace(p)
            fds0 = {f.fd for f in p.fds()}
            remote, local = space.create_uffd()
            assert {f.fd for f in p.fds()} - fds0 == {remote, *(
                f.fd for f in p.fds() if f.target == "anon_inode:[pidfd]")}
            assert next(f for f in p.fds() if f.fd == remote).is_uffd
            lk.uffd_api(local, 0)
            memfd = p.getfd(t.ram_fd)
            lk.uffd_register(local, t.ram_addr, t.ram_bytes, uapi.UFFDIO_REGISTER_MODE_MISSING)
            lk.punch_hole(memfd, 2 * PS, PS)
            a = t.start_access(t.ram_addr + 2 * PS, AccessKind.GUP_READ, 8)
            fault = wait_fault(lk, local)
            assert fault.address == t.ram_addr + 2 * PS
            lk.uffd_copy(local, fault.address, b"\x11" * PS)
            res = a.wait(WAIT)
            assert (res.status, res.data) == (AccessStatus.OK, b"\x11" * 8)
            os.close(memfd)
            lk.uffd_close(local)
            space.close_remote([remote])
            space.release()
            assert {f.fd for f in p.fds()} == fds0
            t.ping()
        finally:
            p.close()
