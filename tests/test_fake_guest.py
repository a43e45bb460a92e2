"""FakeKernel guest side: RWP (7.3) and RFC access tracking, SET_MODE, GUP, workloads."""

from __future__ import annotations

import errno
import faulthandler
import select
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from vmm_tierd.kernel import stamps
from vmm_tierd.kernel import uapi as U
from vmm_tierd.kernel.api import (
    AccessKind,
    AccessStatus,
    Dialect,
    KernelError,
    MemType,
    PageFault,
    Pattern,
    Region,
    WorkloadSpec,
)
from vmm_tierd.kernel.fake import FakeKernel

PS = 4096
ACCESSED = 1 << 9


@pytest.fixture(autouse=True)
def _hang_guard() -> Iterator[None]:
    faulthandler.dump_traceback_later(120, exit=True, file=sys.__stderr__ or sys.stderr)
    yield
    faulthandler.cancel_dump_traceback_later()


class Tracker:
    """Dialect-neutral access tracking: RWP names on fake-rwp, RFC names on fake-rfc."""

    def __init__(self, k: FakeKernel, r: Region, extra_mode: int = 0, extra_feat: int = 0,
                 asynch: bool = True) -> None:
        self.k, self.r = k, r
        rwp = k.dialect is Dialect.RWP
        self.fd = k.uffd_open()
        base = U.UFFD_FEATURE_RWP if rwp else U.UFFD_FEATURE_MINOR_ANON
        self.async_bit = 1 << 18
        k.uffd_api(self.fd, base | (self.async_bit if asynch else 0) | extra_feat)
        mode = U.UFFDIO_REGISTER_MODE_RWP if rwp else U.UFFDIO_REGISTER_MODE_MINOR
        k.uffd_register(self.fd, r.addr, r.length, mode | extra_mode)

    def protect(self) -> None:
        if self.k.dialect is Dialect.RWP:
            self.k.uffd_rwprotect(self.fd, self.r.addr, self.r.length, 1)
        else:
            self.k.uffd_deactivate(self.fd, self.r.addr, self.r.length)

    def resolve(self, addr: int) -> None:
        if self.k.dialect is Dialect.RWP:
            self.k.uffd_rwprotect(self.fd, addr, PS, 0)
        else:
            self.k.uffd_continue(self.fd, addr, PS)

    def cold(self) -> list[int]:
        k, r = self.k, self.r
        if k.dialect is Dialect.RWP or r.memtype is MemType.MEMFD:
            inv = ACCESSED if k.dialect is Dialect.RWP else U.PAGE_IS_PRESENT
            mask = U.PAGE_IS_PRESENT | ACCESSED if k.dialect is Dialect.RWP else inv
            s = k.pagemap_scan(r.addr, r.addr + r.length, category_mask=mask,
                               category_inverted=inv, return_mask=U.PAGE_IS_PRESENT)
        else:
            s = k.pagemap_scan(r.addr, r.addr + r.length, category_mask=ACCESSED,
                               return_mask=ACCESSED)
        return [p for a, b, _c in s.regions.tolist()
                for p in range((a - r.addr) // PS, (b - r.addr) // PS)]


@pytest.fixture(params=[(d, m) for d in (Dialect.RWP, Dialect.RFC)
                        for m in (MemType.ANON, MemType.MEMFD)],
                ids=lambda p: f"{p[0].value}-{p[1].value}")
def setup(request: pytest.FixtureRequest) -> Iterator[tuple[FakeKernel, Region]]:
    d, mt = request.param
    k = FakeKernel(d)
    r = k.map_anon(16 * PS) if mt is MemType.ANON else k.map_memfd(16 * PS)
    for p in range(16):
        assert k.start_access(r.addr + p * PS, AccessKind.WRITE, PS,
                              bytes([p + 1]) * PS).wait(5).status is AccessStatus.OK
    yield k, r
    k.close()


def test_async_tracking_finds_cold_pages(setup: tuple[FakeKernel, Region]) -> None:
    k, r = setup
    t = Tracker(k, r)
    t.protect()
    assert t.cold() == list(range(16))
    assert k.start_access(r.addr + 3 * PS, AccessKind.READ, 2).wait(5).data == b"\4\4"
    k.start_access(r.addr + 9 * PS, AccessKind.WRITE, 1, b"x").wait(5)
    res = k.start_access(r.addr + 12 * PS, AccessKind.GUP_READ, 3).wait(5)
    assert res.status is AccessStatus.OK and res.data == b"\x0d" * 3
    assert k.uffd_read(t.fd) == []  # async: nothing delivered
    assert t.cold() == [p for p in range(16) if p not in (3, 9, 12)]
    assert k.pread(r.fd, 9 * PS, 2) == b"x\x0a" if r.fd >= 0 else True


def test_sync_fault_then_resolve(setup: tuple[FakeKernel, Region]) -> None:
    k, r = setup
    t = Tracker(k, r, asynch=False)
    t.protect()
    a = k.start_access(r.addr + 5 * PS + 9, AccessKind.WRITE, 1, b"W")
    assert a.wait(0.2).status is AccessStatus.PENDING
    (msg,) = k.uffd_read(t.fd)
    assert isinstance(msg, PageFault) and msg.address == r.addr + 5 * PS and msg.write
    assert msg.rwp if k.dialect is Dialect.RWP else msg.minor
    t.resolve(msg.address)
    assert a.wait(5).status is AccessStatus.OK
    assert k.start_access(r.addr + 5 * PS + 8, AccessKind.READ, 2).wait(5).data == b"\6W"


def test_set_mode_async_wakes_blocked(setup: tuple[FakeKernel, Region]) -> None:
    k, r = setup
    t = Tracker(k, r)
    t.protect()
    k.uffd_set_mode(t.fd, 0, t.async_bit)  # sync: hold faults (eviction window)
    g = k.start_access(r.addr + 7 * PS, AccessKind.GUP_READ, 1)
    assert g.wait(0.2).status is AccessStatus.PENDING
    assert len(k.uffd_read(t.fd)) == 1
    k.uffd_set_mode(t.fd, t.async_bit, 0)  # back to async: the fault retries and resolves
    assert g.wait(5).data == b"\x08"
    assert 7 not in t.cold()


def test_close_and_unregister_restore_access(setup: tuple[FakeKernel, Region]) -> None:
    k, r = setup
    t = Tracker(k, r, asynch=False)
    t.protect()
    a = k.start_access(r.addr + 2 * PS, AccessKind.READ, 1)
    assert a.wait(0.2).status is AccessStatus.PENDING
    k.uffd_unregister(t.fd, r.addr, 8 * PS)  # unprotects, but wakes only MISSING faults
    assert a.wait(0.2).status is AccessStatus.PENDING
    k.uffd_wake(t.fd, r.addr + 2 * PS, PS)
    assert a.wait(5).data == b"\3"
    b = k.start_access(r.addr + 10 * PS, AccessKind.READ, 1)
    assert b.wait(0.2).status is AccessStatus.PENDING
    k.uffd_close(t.fd)
    assert b.wait(5).data == b"\x0b"
    scan = k.pagemap_scan(r.addr, r.addr + r.length, category_mask=U.PAGE_IS_PRESENT,
                          return_mask=U.PAGE_IS_PRESENT)
    if r.memtype is MemType.ANON or k.dialect is Dialect.RWP:
        assert scan.pages() == 16  # protection dropped, pages stayed resident


def test_rfc_shmem_deactivate_is_zap_then_minor() -> None:
    k = FakeKernel(Dialect.RFC)
    m = k.map_memfd(4 * PS)
    k.start_access(m.addr, AccessKind.WRITE, PS, b"s" * PS).wait(5)
    fd = k.uffd_open()
    k.uffd_api(fd, U.UFFD_FEATURE_MINOR_SHMEM)
    k.uffd_register(fd, m.addr, m.length, U.UFFDIO_REGISTER_MODE_MINOR)
    k.uffd_deactivate(fd, m.addr, m.length)
    s = k.pagemap_scan(m.addr, m.addr + PS, return_mask=0x3FF)
    assert int(s.regions[0, 2]) & U.PAGE_IS_PRESENT == 0  # PTE zapped
    assert k.pread(m.fd, 0, 1) == b"s"  # still in the page cache
    a = k.start_access(m.addr, AccessKind.READ, 1)
    (msg,) = [x for x in [a.wait(0.2)] and k.uffd_read(fd)]
    assert isinstance(msg, PageFault) and msg.minor
    assert k.uffd_continue(fd, m.addr, PS) == PS
    assert a.wait(5).data == b"s"
    k.close()


def test_rfc_continue_anon_restores_protnone() -> None:
    k = FakeKernel(Dialect.RFC)
    r = k.map_anon(4 * PS)
    k.start_access(r.addr, AccessKind.WRITE, 1, b"c").wait(5)
    fd = k.uffd_open()
    k.uffd_api(fd, U.UFFD_FEATURE_MINOR_ANON)
    k.uffd_register(fd, r.addr, r.length, U.UFFDIO_REGISTER_MODE_MINOR)
    k.uffd_deactivate(fd, r.addr, PS)
    assert k.pagemap_scan(r.addr, r.addr + PS, category_mask=ACCESSED).pages() == 1
    assert k.uffd_continue(fd, r.addr, PS) == PS
    assert k.pagemap_scan(r.addr, r.addr + PS, category_mask=ACCESSED).pages() == 0
    assert k.read_unregistered(r.addr, 1) == b"c"
    k.close()


class Detaching:
    """The pages between their MOVE out and their store write, as the engine's in-flight
    batches: a fault on one waits until its record is there. (Without this, a read that
    faulted right after the MOVE was zero-filled before the record existed: the page's
    last write was lost, a race of this test's server, not of the kernel's.)"""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.pages: set[int] = set()


def serve(k: FakeKernel, fd: int, store: dict[int, bytes], stop: threading.Event,
          base: int, detaching: Detaching) -> None:
    """A minimal fault server: MISSING faults get the stored page back (or zeros)."""
    while not stop.is_set():
        if not select.select([fd], [], [], 0.02)[0]:
            continue
        for m in k.uffd_read(fd):
            assert isinstance(m, PageFault) and m.missing
            p = (m.address - base) // PS
            with detaching.cond:
                while p in detaching.pages:
                    detaching.cond.wait()
                data = store.pop(p, None)
            try:
                if data is None:
                    k.uffd_zeropage(fd, m.address, PS)
                else:
                    k.uffd_copy(fd, m.address, data)
            except KernelError as e:  # a second fault on a page served already
                assert e.errno == errno.EEXIST, e
                k.uffd_wake(fd, m.address, PS)


@pytest.mark.parametrize("dialect", [Dialect.RWP, Dialect.RFC])
@pytest.mark.parametrize("pattern", list(Pattern))
def test_workload_with_eviction_verifies(dialect: Dialect, pattern: Pattern) -> None:
    k = FakeKernel(dialect)
    n = 256
    r = k.map_anon(n * PS)
    fd = k.uffd_open()
    k.uffd_api(fd, U.UFFD_FEATURE_MOVE)
    k.uffd_register(fd, r.addr, r.length, U.UFFDIO_REGISTER_MODE_MISSING)
    store: dict[int, bytes] = {}
    stop = threading.Event()
    detaching = Detaching()
    th = threading.Thread(target=serve, args=(k, fd, store, stop, r.addr, detaching))
    th.start()
    spec = WorkloadSpec(pattern=pattern, threads=3, hot_fraction=0.2, write_fraction=0.5,
                        shift_period_s=0.05, seed=7)
    w = k.start_workload(r, spec)
    deadline = time.monotonic() + 20
    while not w.touched() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert w.touched()
    stage = k.map_anon(PS)
    k.uffd_register(fd, stage.addr, PS, U.UFFDIO_REGISTER_MODE_MISSING)
    evicted = 0
    for p in np.random.default_rng(1).permutation(n)[:120].tolist():
        with detaching.cond:
            detaching.pages.add(p)
        try:  # detach like the engine: MOVE out, read the staged copy, drop it
            k.uffd_move(fd, stage.addr, r.addr + p * PS, PS)
            store[p] = k.read_unregistered(stage.addr, PS)
            evicted += 1
        except KernelError:
            pass
        finally:
            with detaching.cond:
                detaching.pages.discard(p)
                detaching.cond.notify_all()
        k.madvise(stage.addr, PS, U.MADV_DONTNEED)
    stats = w.stop()
    rep = w.verify()
    stop.set()
    th.join(5)
    assert evicted > 0 and stats.writes > 0 and stats.sigbus == 0
    assert (rep.pages, rep.lost_writes, rep.corrupt_pages, rep.poisoned_pages) == (n, 0, 0, 0)
    v = w.versions()
    zero = np.flatnonzero(v == 0)
    assert len(zero) == round(0.05 * n)  # the never-written pages stay all-zero
    k.close()


def test_verify_detects_lost_corrupt_and_poisoned() -> None:
    k = FakeKernel(Dialect.RWP)
    r = k.map_anon(32 * PS)
    w = k.start_workload(r, WorkloadSpec(threads=2, write_fraction=1.0, zero_fraction=0.0,
                                         ops_per_sec=2000))
    while not w.touched():
        pass
    w.stop()
    assert w.verify().lost_writes == 0
    fd = k.uffd_open()
    k.uffd_api(fd, U.UFFD_FEATURE_POISON)
    k.uffd_register(fd, r.addr, r.length, U.UFFDIO_REGISTER_MODE_MISSING)
    k.madvise(r.addr + 3 * PS, PS, U.MADV_DONTNEED)
    k.uffd_poison(fd, r.addr + 3 * PS, PS)
    w.set_version_for_test(5, int(w.versions()[5]) + 1)  # page 5 "lost" its last write
    k.madvise(r.addr + 8 * PS, PS, U.MADV_DONTNEED)
    k.uffd_copy(fd, r.addr + 8 * PS, stamps.page_bytes(9, 1))  # wrong page's content
    rep = w.verify()
    assert (rep.lost_writes, rep.corrupt_pages, rep.poisoned_pages) == (1, 1, 1)
    assert rep.bad == [3, 5, 8]
    k.close()


@pytest.mark.parametrize("dialect", [Dialect.RWP, Dialect.RFC])
def test_move_into_tracked_range(dialect: Dialect) -> None:
    """7.3 re-arms RWP on a page MOVEd into an RWP VMA; the RFC's MOVE leaves the page
    accessible (its PTE is built from vm_page_prot)."""
    k = FakeKernel(dialect)
    r = k.map_anon(4 * PS)
    st = k.map_anon(4 * PS)
    k.start_access(st.addr, AccessKind.WRITE, 1, b"m").wait(5)
    t = Tracker(k, r, extra_mode=U.UFFDIO_REGISTER_MODE_MISSING,
                extra_feat=U.UFFD_FEATURE_MOVE, asynch=False)
    assert k.uffd_move(t.fd, r.addr, st.addr, PS) == PS
    a = k.start_access(r.addr, AccessKind.READ, 1)
    if dialect is Dialect.RWP:
        assert a.wait(0.2).status is AccessStatus.PENDING
        (msg,) = k.uffd_read(t.fd)
        assert isinstance(msg, PageFault) and msg.rwp
        t.resolve(r.addr)
    assert a.wait(5).data == b"m"
    k.close()
