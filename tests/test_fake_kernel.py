"""FakeKernel: uffd API, registration, page ioctls, events, fault injection (both dialects).

Expected values are the ones measured on the Linux 6.18 host (see test_fake_vs_linux.py
for the side-by-side run) or, for RWP/RFC-only behaviour, the 7.3 RWP series / the RFC.
"""

from __future__ import annotations

import errno
import faulthandler
import select
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from vmm_tierd.kernel import open_kernel
from vmm_tierd.kernel import uapi as U
from vmm_tierd.kernel.api import (
    AccessKind,
    AccessStatus,
    Dialect,
    Kernel,
    KernelError,
    PageFault,
    RemoveEvent,
    Strategy,
    UnmapEvent,
)
from vmm_tierd.kernel.fake import FakeKernel

PS = 4096
DIALECTS = ("fake-rwp", "fake-rfc")


@pytest.fixture(autouse=True)
def _hang_guard() -> Iterator[None]:
    faulthandler.dump_traceback_later(60, exit=True, file=sys.__stderr__ or sys.stderr)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(params=DIALECTS)
def k(request: pytest.FixtureRequest) -> Iterator[FakeKernel]:
    kern = open_kernel(request.param)
    assert isinstance(kern, FakeKernel)
    yield kern
    kern.close()


def err_of(fn: object) -> tuple[int, int]:
    with pytest.raises(KernelError) as ei:
        fn()  # type: ignore[operator]
    return ei.value.errno or 0, ei.value.done


def uffd(k: FakeKernel, features: int = 0) -> int:
    fd = k.uffd_open()
    k.uffd_api(fd, features)
    return fd


def test_protocol_and_capabilities(k: FakeKernel) -> None:
    assert isinstance(k, Kernel)
    caps = k.capabilities()
    assert caps.backend == k.name and caps.release == "fake"
    assert caps.features == 0x7FFFF
    assert caps.strategy is Strategy.RWP
    names = set(caps.feature_names)
    if k.dialect is Dialect.RWP:
        assert {"RWP", "RWP_ASYNC"} <= names and caps.ioctls >> U._UFFDIO_SET_MODE & 1
    else:
        assert {"MINOR_ANON", "MINOR_ASYNC"} <= names
    assert caps.ioctls & (1 << 63) and caps.ioctls & 3 == 3


def test_api_once_and_unknown_bits(k: FakeKernel) -> None:
    fd = k.uffd_open()
    assert err_of(lambda: k.uffd_register(fd, 1 << 20, PS, 1))[0] == errno.EINVAL  # no API yet
    assert err_of(lambda: k.uffd_api(fd, 1 << 19))[0] == errno.EINVAL
    info = k.uffd_api(fd, U.UFFD_FEATURE_WP_ASYNC)
    assert info.features == 0x7FFFF
    assert err_of(lambda: k.uffd_api(fd, 0))[0] == errno.EINVAL  # second UFFDIO_API
    fd2 = k.uffd_open()
    # the async bit needs its base feature (RWP_ASYNC needs RWP; MINOR_ASYNC a minor one)
    assert err_of(lambda: k.uffd_api(fd2, 1 << 18))[0] == errno.EINVAL


def test_fd_is_pollable_and_tracks_pending(k: FakeKernel) -> None:
    r = k.map_anon(16 * PS)
    fd = uffd(k)
    k.uffd_register(fd, r.addr, r.length, U.UFFDIO_REGISTER_MODE_MISSING)
    assert select.select([fd], [], [], 0)[0] == []
    a = k.start_access(r.addr + 3 * PS + 7, AccessKind.READ, 4)
    assert select.select([fd], [], [], 5)[0] == [fd]
    msgs = k.uffd_read(fd)
    assert msgs == [PageFault(r.addr + 3 * PS, 0, 0)]
    assert select.select([fd], [], [], 0)[0] == []  # drained: not readable any more
    assert k.uffd_read(fd) == []
    assert k.uffd_copy(fd, r.addr + 3 * PS, b"\x11" * PS) == PS
    res = a.wait(5)
    assert res.status is AccessStatus.OK and res.data == b"\x11" * 4


def test_register_rules(k: FakeKernel) -> None:
    r = k.map_anon(64 * PS)
    m = k.map_memfd(64 * PS)
    fd = uffd(k)
    assert err_of(lambda: k.uffd_register(fd, r.addr + 1, PS, 1))[0] == errno.EINVAL
    assert err_of(lambda: k.uffd_register(fd, r.addr, PS, 0))[0] == errno.EINVAL
    assert err_of(lambda: k.uffd_register(fd, r.addr, PS, 1 << 4))[0] == errno.EINVAL
    # MINOR on anon needs the RFC's MINOR_ANON (not requested here); shmem is fine
    assert err_of(lambda: k.uffd_register(fd, r.addr, PS, 4))[0] == errno.EINVAL
    ioctls = k.uffd_register(fd, m.addr, PS, U.UFFDIO_REGISTER_MODE_MINOR)
    assert ioctls >> U._UFFDIO_CONTINUE & 1 and not ioctls >> U._UFFDIO_WRITEPROTECT & 1
    ioctls = k.uffd_register(fd, r.addr, 8 * PS, U.UFFDIO_REGISTER_MODE_MISSING)
    assert ioctls == 0x13C  # WAKE COPY ZEROPAGE MOVE POISON, as 6.18 answers for MISSING
    fd2 = uffd(k)
    assert err_of(lambda: k.uffd_register(fd2, r.addr + 4 * PS, PS, 1))[0] == errno.EBUSY
    assert err_of(lambda: k.uffd_unregister(fd2, r.addr, 8 * PS))[0] == errno.EINVAL
    assert k.uffd_register(fd2, r.addr + 8 * PS, PS, 1)  # next to it is fine


def test_copy_zeropage_partial_and_errors(k: FakeKernel) -> None:
    r = k.map_anon(64 * PS)
    fd = uffd(k)
    k.uffd_register(fd, r.addr, 32 * PS, U.UFFDIO_REGISTER_MODE_MISSING)
    assert err_of(lambda: k.uffd_copy(fd, r.addr + 40 * PS, b"a" * PS)) == (errno.ENOENT, 0)
    assert err_of(lambda: k.uffd_copy(fd, r.addr + 31 * PS, b"a" * 2 * PS))[0] == errno.ENOENT
    assert err_of(lambda: k.uffd_copy(fd, r.addr, b"a" * PS, U.UFFDIO_COPY_MODE_WP)) == (
        errno.EINVAL, 0)
    assert k.uffd_copy(fd, r.addr + 2 * PS, b"a" * PS) == PS
    assert err_of(lambda: k.uffd_copy(fd, r.addr + 2 * PS, b"b" * PS)) == (errno.EEXIST, 0)
    # partial progress: bytes done, then EAGAIN (the kernel's "copied ? copied : err")
    assert err_of(lambda: k.uffd_copy(fd, r.addr + PS, b"b" * 3 * PS)) == (errno.EAGAIN, PS)
    assert err_of(lambda: k.uffd_zeropage(fd, r.addr, 3 * PS)) == (errno.EAGAIN, PS)
    assert k.read_unregistered(r.addr, 2) == b"\0\0"
    assert k.read_unregistered(r.addr + PS, 2) == b"bb"
    assert k.read_unregistered(r.addr + 2 * PS, 2) == b"aa"
    scan = k.pagemap_scan(r.addr, r.addr + PS, return_mask=U.PAGE_IS_PFNZERO)
    assert scan.regions.tolist() == [[r.addr, r.addr + PS, U.PAGE_IS_PFNZERO]]
    assert err_of(lambda: k.read_unregistered(r.addr + 9 * PS, 1))[0] == errno.EFAULT


def test_move_semantics(k: FakeKernel) -> None:
    g = k.map_anon(32 * PS)
    st = k.map_anon(32 * PS)
    m = k.map_memfd(32 * PS)
    fd = uffd(k, U.UFFD_FEATURE_MOVE)
    for p in range(4):
        assert k.start_access(g.addr + p * PS, AccessKind.WRITE, PS,
                              bytes([p + 1]) * PS).wait(5).status is AccessStatus.OK
    k.start_access(g.addr + 4 * PS, AccessKind.READ).wait(5)  # zero page
    assert err_of(lambda: k.uffd_move(fd, st.addr, g.addr, PS))[0] == errno.EINVAL  # dst unreg
    k.uffd_register(fd, st.addr, st.length, U.UFFDIO_REGISTER_MODE_MISSING)
    k.uffd_register(fd, g.addr, g.length, U.UFFDIO_REGISTER_MODE_MISSING)
    assert k.uffd_move(fd, st.addr, g.addr, 2 * PS) == 2 * PS
    assert k.read_unregistered(st.addr + PS, 3) == b"\2\2\2"
    assert err_of(lambda: k.uffd_move(fd, st.addr, g.addr + 2 * PS, PS))[0] == errno.EEXIST
    assert err_of(lambda: k.uffd_move(fd, st.addr + 9 * PS, g.addr + 20 * PS, PS))[0] == (
        errno.ENOENT)
    assert k.uffd_move(fd, st.addr + 9 * PS, g.addr + 20 * PS, PS,
                       U.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES) == PS
    assert k.uffd_move(fd, st.addr + 4 * PS, g.addr + 4 * PS, PS) == PS  # zero PTE moves
    scan = k.pagemap_scan(st.addr + 4 * PS, st.addr + 5 * PS, return_mask=0x3F)
    assert int(scan.regions[0, 2]) & U.PAGE_IS_PFNZERO
    k.uffd_register(fd, m.addr, m.length, U.UFFDIO_REGISTER_MODE_MISSING)
    assert err_of(lambda: k.uffd_move(fd, st.addr + 12 * PS, m.addr, PS))[0] == errno.EINVAL
    assert err_of(lambda: k.uffd_move(fd, st.addr + 1, g.addr, PS))[0] == errno.EINVAL
    # a moved-out page faults MISSING at the source; moving it back resolves the fault
    a = k.start_access(g.addr, AccessKind.READ, 2)
    assert a.wait(0.2).status is AccessStatus.PENDING
    assert k.uffd_read(fd) == [PageFault(g.addr, 0, 0)]
    assert k.uffd_move(fd, g.addr, st.addr, PS) == PS
    assert a.wait(5).data == b"\1\1"


def test_move_partial_progress() -> None:
    k = FakeKernel(Dialect.RWP)
    g, st = k.map_anon(8 * PS), k.map_anon(8 * PS)
    fd = uffd(k)
    for p in range(3):
        k.start_access(g.addr + p * PS, AccessKind.WRITE, 1).wait(5)
    k.uffd_register(fd, st.addr, st.length, 1)
    k.uffd_copy(fd, st.addr + PS, b"x" * PS)
    assert err_of(lambda: k.uffd_move(fd, st.addr, g.addr, 3 * PS)) == (errno.EAGAIN, PS)
    k.close()


def test_writeprotect_and_sync_wp_fault(k: FakeKernel) -> None:
    r = k.map_anon(16 * PS)
    fd = uffd(k, U.UFFD_FEATURE_THREAD_ID)
    k.start_access(r.addr, AccessKind.WRITE, 4, b"abcd").wait(5)
    assert err_of(lambda: k.uffd_writeprotect(fd, r.addr, PS, 1))[0] == errno.ENOENT
    k.uffd_register(fd, r.addr, r.length, U.UFFDIO_REGISTER_MODE_WP)
    assert err_of(lambda: k.uffd_writeprotect(fd, r.addr, PS, 3))[0] == errno.EINVAL
    k.uffd_writeprotect(fd, r.addr, PS, U.UFFDIO_WRITEPROTECT_MODE_WP)
    rd = k.start_access(r.addr, AccessKind.READ, 4)
    assert rd.wait(5).data == b"abcd"  # reads are not write faults
    a = k.start_access(r.addr + 1, AccessKind.WRITE, 1, b"X")
    assert a.wait(0.2).status is AccessStatus.PENDING
    (msg,) = k.uffd_read(fd)
    assert isinstance(msg, PageFault) and msg.wp and msg.write and msg.address == r.addr
    assert msg.tid == a.tid != 0
    k.uffd_writeprotect(fd, r.addr, PS, 0)  # clear + wake
    assert a.wait(5).status is AccessStatus.OK
    assert k.read_unregistered(r.addr, 4) == b"aXcd"


def test_wp_only_unregister_does_not_wake(k: FakeKernel) -> None:
    r = k.map_anon(4 * PS)
    fd = uffd(k)
    k.start_access(r.addr, AccessKind.WRITE, 1).wait(5)
    k.uffd_register(fd, r.addr, r.length, U.UFFDIO_REGISTER_MODE_WP)
    k.uffd_writeprotect(fd, r.addr, PS, 1)
    a = k.start_access(r.addr, AccessKind.WRITE, 1, b"Q")
    assert k.uffd_read(fd) or a.wait(0.2).status is AccessStatus.PENDING
    k.uffd_unregister(fd, r.addr, r.length)
    assert a.wait(0.3).status is AccessStatus.PENDING  # as measured on 6.18
    k.uffd_wake(fd, r.addr, PS)
    assert a.wait(5).status is AccessStatus.OK


def test_poison(k: FakeKernel) -> None:
    r = k.map_anon(8 * PS)
    fd = uffd(k, U.UFFD_FEATURE_POISON)
    k.uffd_register(fd, r.addr, r.length, U.UFFDIO_REGISTER_MODE_MISSING)
    assert k.uffd_poison(fd, r.addr + PS, PS) == PS
    assert err_of(lambda: k.uffd_poison(fd, r.addr + PS, PS))[0] == errno.EEXIST
    assert k.start_access(r.addr + PS, AccessKind.READ).wait(5).status is AccessStatus.SIGBUS
    res = k.start_access(r.addr + PS, AccessKind.GUP_READ).wait(5)
    assert res.status is AccessStatus.ERROR and res.err == errno.EFAULT
    scan = k.pagemap_scan(r.addr + PS, r.addr + 2 * PS, return_mask=0x3FF)
    assert int(scan.regions[0, 2]) == U.PAGE_IS_SWAPPED | U.PAGE_IS_WRITTEN
    assert k.uffd_copy(fd, r.addr + PS, b"z" * PS) == PS  # COPY replaces the marker
    assert k.start_access(r.addr + PS, AccessKind.READ).wait(5).data == b"z"


def test_remove_event_blocks_madvise_and_eagain(k: FakeKernel) -> None:
    r = k.map_anon(8 * PS)
    fd = uffd(k, U.UFFD_FEATURE_EVENT_REMOVE | U.UFFD_FEATURE_EVENT_UNMAP)
    k.uffd_register(fd, r.addr, r.length, U.UFFDIO_REGISTER_MODE_MISSING)
    k.uffd_copy(fd, r.addr, b"q" * PS)
    done = threading.Event()

    def dontneed() -> None:
        k.madvise(r.addr, PS, U.MADV_DONTNEED)
        done.set()

    t = threading.Thread(target=dontneed)
    t.start()
    assert select.select([fd], [], [], 5)[0] == [fd]
    assert not done.is_set()  # madvise waits until the REMOVE event is read
    for op in (lambda: k.uffd_copy(fd, r.addr + PS, b"x" * PS),
               lambda: k.uffd_zeropage(fd, r.addr + PS, PS),
               lambda: k.uffd_poison(fd, r.addr + PS, PS),
               lambda: k.uffd_move(fd, r.addr + PS, r.addr + 2 * PS, PS)):
        assert err_of(op)[0] == errno.EAGAIN
    k.uffd_wake(fd, r.addr, PS)  # WAKE is not a page op: no EAGAIN
    assert k.uffd_read(fd) == [RemoveEvent(r.addr, r.addr + PS)]
    t.join(5)
    assert done.is_set()
    assert k.uffd_copy(fd, r.addr, b"w" * PS) == PS  # zapped, so COPY works again
    t = threading.Thread(target=lambda: k.unmap(r))
    t.start()
    assert select.select([fd], [], [], 5)[0] == [fd]
    assert k.uffd_read(fd) == [UnmapEvent(r.addr, r.addr + r.length)]
    t.join(5)
    assert not t.is_alive()


def test_close_restores_and_wakes(k: FakeKernel) -> None:
    r = k.map_anon(8 * PS)
    fd = uffd(k)
    k.uffd_register(fd, r.addr, r.length, U.UFFDIO_REGISTER_MODE_MISSING)
    a = k.start_access(r.addr, AccessKind.READ, 1)
    assert a.wait(0.2).status is AccessStatus.PENDING
    k.uffd_close(fd)
    res = a.wait(5)
    assert res.status is AccessStatus.OK and res.data == b"\0"
    assert err_of(lambda: k.uffd_read(fd))[0] == errno.EBADF


def test_inject_and_calls(k: FakeKernel) -> None:
    r = k.map_anon(8 * PS)
    fd = uffd(k)
    k.uffd_register(fd, r.addr, r.length, 1)
    k.inject("UFFDIO_COPY", errno.ENOMEM, count=2, after=1)
    assert k.uffd_copy(fd, r.addr, b"a" * PS) == PS
    for _ in range(2):
        e = err_of(lambda: k.uffd_copy(fd, r.addr + PS, b"a" * PS))
        assert e == (errno.ENOMEM, 0)
    assert k.uffd_copy(fd, r.addr + PS, b"a" * PS) == PS
    assert k.calls["UFFDIO_COPY"] == 4
    k.inject("madvise", errno.EIO)
    assert err_of(lambda: k.madvise(r.addr, PS, U.MADV_DONTNEED))[0] == errno.EIO
    k.madvise(r.addr, PS, U.MADV_DONTNEED)
    assert k.calls["madvise"] == 2


def test_set_mode_rules(k: FakeKernel) -> None:
    base = U.UFFD_FEATURE_RWP if k.dialect is Dialect.RWP else U.UFFD_FEATURE_MINOR_ANON
    fd = uffd(k, base)
    bit = 1 << 18
    assert err_of(lambda: k.uffd_set_mode(fd, bit, bit))[0] == errno.EINVAL
    assert err_of(lambda: k.uffd_set_mode(fd, U.UFFD_FEATURE_WP_ASYNC, 0))[0] == errno.EINVAL
    k.uffd_set_mode(fd, bit, 0)
    k.uffd_set_mode(fd, 0, bit)


def test_dialect_specific_ioctls(k: FakeKernel) -> None:
    r = k.map_anon(4 * PS)
    fd = uffd(k)
    if k.dialect is Dialect.RWP:
        assert err_of(lambda: k.uffd_deactivate(fd, r.addr, PS))[0] == errno.ENOTTY
        assert err_of(lambda: k.uffd_rwprotect(fd, r.addr, PS, 1))[0] == errno.ENOENT
        assert err_of(lambda: k.uffd_rwprotect(fd, r.addr, PS, 3))[0] == errno.EINVAL
    else:
        assert err_of(lambda: k.uffd_rwprotect(fd, r.addr, PS, 1))[0] == errno.EINVAL
        assert err_of(lambda: k.uffd_register(fd, r.addr, PS, 8))[0] == errno.EINVAL
        assert err_of(lambda: k.uffd_deactivate(fd, r.addr, PS))[0] == errno.ENOENT


def test_memfd_pread_punch_and_shared_cache(k: FakeKernel) -> None:
    m = k.map_memfd(8 * PS)
    k.start_access(m.addr + PS, AccessKind.WRITE, PS, b"m" * PS).wait(5)
    assert k.pread(m.fd, PS, 3) == b"mmm"
    assert k.pread(m.fd, 0, 2) == b"\0\0"
    assert err_of(lambda: k.pread(m.fd, 7 * PS, 2 * PS))[0] == errno.EIO
    fd = uffd(k)
    k.uffd_register(fd, m.addr, m.length, U.UFFDIO_REGISTER_MODE_MISSING)
    k.punch_hole(m.fd, PS, PS)
    assert k.pread(m.fd, PS, 3) == b"\0\0\0"
    a = k.start_access(m.addr + PS, AccessKind.READ, 1)  # hole -> MISSING again
    assert a.wait(0.2).status is AccessStatus.PENDING
    assert k.uffd_read(fd) == [PageFault(m.addr + PS, 0, 0)]
    k.uffd_copy(fd, m.addr + PS, b"n" * PS)
    assert a.wait(5).data == b"n"
    assert k.pread(m.fd, PS, 1) == b"n"  # COPY filled the shared page cache
    assert err_of(lambda: k.madvise(k.map_anon(PS).addr, PS, U.MADV_REMOVE))[0] == errno.EINVAL
    assert err_of(lambda: k.madvise(m.addr, PS, 77))[0] == errno.EINVAL


def test_madvise_dontneed_counts_as_written_under_wp_async(k: FakeKernel) -> None:
    r = k.map_anon(32 * PS)
    fd = uffd(k, U.UFFD_FEATURE_WP_ASYNC)
    for p in range(4):
        k.start_access(r.addr + p * PS, AccessKind.WRITE, 1).wait(5)
    k.uffd_register(fd, r.addr, r.length, U.UFFDIO_REGISTER_MODE_WP)
    k.uffd_writeprotect(fd, r.addr, r.length, 1)
    scan = k.pagemap_scan(r.addr, r.addr + r.length, category_mask=U.PAGE_IS_WRITTEN,
                          return_mask=U.PAGE_IS_WRITTEN)
    assert scan.pages() == 0
    k.madvise(r.addr + 2 * PS, PS, U.MADV_DONTNEED)
    k.start_access(r.addr + 3 * PS, AccessKind.WRITE, 1).wait(5)
    scan = k.pagemap_scan(r.addr, r.addr + r.length, category_mask=U.PAGE_IS_WRITTEN,
                          return_mask=U.PAGE_IS_WRITTEN)
    assert scan.regions.tolist() == [[r.addr + 2 * PS, r.addr + 4 * PS, U.PAGE_IS_WRITTEN]]


def test_threads_hammering_is_consistent(k: FakeKernel) -> None:
    """vCPU threads, a fault server and page ops from other threads at once."""
    r = k.map_anon(64 * PS)
    fd = uffd(k)
    k.uffd_register(fd, r.addr, r.length, U.UFFDIO_REGISTER_MODE_MISSING)
    stop = threading.Event()

    def server() -> None:
        while not stop.is_set():
            if not select.select([fd], [], [], 0.05)[0]:
                continue
            for m in k.uffd_read(fd):
                assert isinstance(m, PageFault)
                try:
                    k.uffd_copy(fd, m.address, bytes([(m.address - r.addr) // PS]) * PS)
                except KernelError as e:
                    assert e.errno == errno.EEXIST  # raced with another copy: fine

    t = threading.Thread(target=server)
    t.start()
    accs = [k.start_access(r.addr + (i % 64) * PS, AccessKind.READ, 1) for i in range(256)]
    t0 = time.monotonic()
    res = [a.wait(max(0.1, 10 - (time.monotonic() - t0))) for a in accs]
    stop.set()
    t.join(5)
    assert all(x.status is AccessStatus.OK for x in res)
    assert [x.data[0] for x in res] == [i % 64 for i in range(256)]
