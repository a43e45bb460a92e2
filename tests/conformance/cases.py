"""The case table (after tools/testing/selftests/mm/uffd-unit-tests.c's ``uffd_tests[]``).

Each case asserts observable results only - data, fault flags and addresses, scan
results, errnos and ``done`` - so it means the same thing on every backend. The rwp-*
cases are the RFC's six selftests (minor-anon-async/-sync/-pagemap/-gup/-async-toggle/
-close), spelled per dialect by the harness (RWPROTECT vs DEACTIVATE, RWP vs MINOR).
"""

from __future__ import annotations

import errno
import time

from vmm_tierd.kernel import uapi
from vmm_tierd.kernel.api import (
    AccessKind,
    AccessStatus,
    Dialect,
    KernelError,
    MemType,
    RemoveEvent,
)

from .cases_rwp import (
    detach_memfd_rwp,
    detach_memfd_wp,
    rwp_async,
    rwp_close,
    rwp_cold_scan,
    rwp_gup,
    rwp_missing_hole,
    rwp_move_detach,
    rwp_register_combos,
    rwp_sync,
    rwp_toggle,
    rwp_unregister,
    wp_unregister,
)
from .harness import TIMEOUT, Case, Ctx, Needs, check, data, fault_at, fill

ANON_ONLY = (MemType.ANON,)
MEMFD_ONLY = (MemType.MEMFD,)
MISSING = uapi.UFFDIO_REGISTER_MODE_MISSING
F = uapi

# Read+write tracking: one capability, two spellings of bits 17/18.
RWP = Needs(
    per_dialect={Dialect.RWP: F.UFFD_FEATURE_RWP | F.UFFD_FEATURE_RWP_ASYNC,
                 Dialect.NONE: F.UFFD_FEATURE_RWP | F.UFFD_FEATURE_RWP_ASYNC,
                 Dialect.RFC: F.UFFD_FEATURE_MINOR_ANON | F.UFFD_FEATURE_MINOR_ASYNC},
    memfd=F.UFFD_FEATURE_MISSING_SHMEM,
    memfd_per_dialect={Dialect.RFC: F.UFFD_FEATURE_MINOR_SHMEM},
)
BASIC = Needs(memfd=F.UFFD_FEATURE_MISSING_SHMEM)
WP_ASYNC = Needs(common=F.UFFD_FEATURE_PAGEFAULT_FLAG_WP | F.UFFD_FEATURE_WP_ASYNC,
                 memfd=F.UFFD_FEATURE_WP_HUGETLBFS_SHMEM)


# ---- MISSING ----------------------------------------------------------------------------
def missing_copy(ctx: Ctx) -> None:
    k, ps = ctx.kernel, ctx.ps
    ctx.register(MISSING)
    a = ctx.access(ctx.addr(3), AccessKind.READ)
    f = ctx.wait_fault()
    assert (f.address, f.missing, f.write) == (ctx.addr(3), True, False), f
    if ctx.features & F.UFFD_FEATURE_THREAD_ID:
        assert f.tid and f.tid == a.tid, f"fault tid {f.tid}, accessor tid {a.tid}"
    assert not a.done()
    assert k.uffd_copy(ctx.uffd, ctx.addr(3), data(3, 1)) == ps
    r = ctx.wait_access(a)
    assert r.status is AccessStatus.OK and r.data == data(3, 1)
    # Onto a present page: nothing copied.
    ctx.expect_error(errno.EEXIST, lambda: k.uffd_copy(ctx.uffd, ctx.addr(3), data(3, 2)),
                     done=0)
    # [hole, present]: the first page lands, the kernel reports copy=4096 and EAGAIN.
    assert k.uffd_copy(ctx.uffd, ctx.addr(5), data(5, 1)) == ps
    ctx.expect_error(errno.EAGAIN,
                     lambda: k.uffd_copy(ctx.uffd, ctx.addr(4), data(4, 1) + data(5, 2)),
                     done=ps)
    check(ctx, [3, 4, 5], 1)
    # A write into a hole faults MISSING with the WRITE flag; the write lands after COPY.
    w = ctx.access(ctx.addr(7), AccessKind.WRITE, data(7, 3))
    f = ctx.wait_fault()
    assert (f.address, f.missing, f.write) == (ctx.addr(7), True, True), f
    assert k.uffd_copy(ctx.uffd, ctx.addr(7), bytes(ps)) == ps
    assert ctx.wait_access(w).status is AccessStatus.OK
    check(ctx, [7], 3)
    ctx.expect_quiet()


def missing_zeropage(ctx: Ctx) -> None:
    k, ps = ctx.kernel, ctx.ps
    ctx.register(MISSING)
    a = ctx.access(ctx.addr(2), AccessKind.READ)
    fault_at(ctx, 2, missing=True)
    assert k.uffd_zeropage(ctx.uffd, ctx.addr(2), ps) == ps
    r = ctx.wait_access(a)
    assert r.status is AccessStatus.OK and r.data == bytes(ps)
    if ctx.mem is MemType.ANON:
        z = F.PAGE_IS_PFNZERO
        assert ctx.scan_pages(category_mask=z, return_mask=z) == {2}
    else:
        assert k.pread(ctx.region.fd, ctx.off(2), ps) == bytes(ps)
    ctx.expect_error(errno.EEXIST, lambda: k.uffd_zeropage(ctx.uffd, ctx.addr(2), ps), done=0)
    ctx.expect_quiet()


def missing_close(ctx: Ctx) -> None:
    """Closing the uffd wakes a blocked MISSING fault; it completes as if unregistered."""
    ctx.register(MISSING)
    a = ctx.access(ctx.addr(2), AccessKind.READ)
    fault_at(ctx, 2, missing=True)
    ctx.close_uffd()
    r = ctx.wait_access(a)
    assert r.status is AccessStatus.OK and r.data == bytes(ctx.ps)
    fill(ctx, [2, 3], 1)
    check(ctx, [2, 3], 1)


def missing_unregister(ctx: Ctx) -> None:
    """UNREGISTER wakes a blocked fault in the range; later accesses never fault."""
    ctx.register(MISSING)
    a = ctx.access(ctx.addr(2), AccessKind.READ)
    fault_at(ctx, 2, missing=True)
    ctx.unregister()
    r = ctx.wait_access(a)
    assert r.status is AccessStatus.OK and r.data == bytes(ctx.ps)
    fill(ctx, [2, 9], 1)
    check(ctx, [2, 9], 1)
    ctx.expect_quiet()


# ---- WP_ASYNC + PAGEMAP_SCAN --------------------------------------------------------------
def wp_async_written(ctx: Ctx) -> None:
    fill(ctx)
    ctx.register(uapi.UFFDIO_REGISTER_MODE_WP)
    ctx.kernel.uffd_writeprotect(ctx.uffd, ctx.region.addr, ctx.length,
                                 F.UFFDIO_WRITEPROTECT_MODE_WP)
    assert ctx.written_scan() == set()
    written = [1, 4, 5, 9]
    fill(ctx, written, 2)
    check(ctx, [2, 3, 12], 1)  # reads are invisible to PAGE_IS_WRITTEN
    assert ctx.written_scan() == set(written)
    ctx.expect_quiet()  # async: no fault messages
    assert ctx.written_scan(rearm=True) == set(written)
    assert ctx.written_scan() == set()  # re-protected by PM_SCAN_WP_MATCHING
    fill(ctx, [3], 3)
    assert ctx.written_scan() == {3}
    check(ctx, written, 2)
    check(ctx, [3], 3)


def wp_async_dontneed(ctx: Ctx) -> None:
    """MADV_DONTNEED under async WP: an anon page becomes a hole that reads as WRITTEN;
    a memfd page keeps a uffd-wp marker (not WRITTEN) and its content in the page cache."""
    fill(ctx)
    ctx.register(uapi.UFFDIO_REGISTER_MODE_WP)
    ctx.kernel.uffd_writeprotect(ctx.uffd, ctx.region.addr, ctx.length,
                                 F.UFFDIO_WRITEPROTECT_MODE_WP)
    ctx.kernel.madvise(ctx.addr(7), ctx.ps, F.MADV_DONTNEED)
    if ctx.mem is MemType.ANON:
        assert ctx.written_scan() == {7}
        assert ctx.written_scan(rearm=True) == {7}
        assert ctx.read(7) == bytes(ctx.ps)
    else:
        assert ctx.written_scan() == set()
        check(ctx, [7], 1)
    assert ctx.written_scan() == set()
    ctx.expect_quiet()


def wp_move_rearmed_hole(ctx: Ctx) -> None:
    """The WP strategy's eviction on anon: a page MOVEd out leaves a hole that reads as
    WRITTEN; PM_SCAN_WP_MATCHING then installs a uffd-wp marker in the hole, after which
    MOVE back is EEXIST (COPY still works) until WRITEPROTECT(clear) drops the marker."""
    k, ps, fd = ctx.kernel, ctx.ps, ctx.uffd
    fill(ctx)
    ctx.register(MISSING | uapi.UFFDIO_REGISTER_MODE_WP)
    k.uffd_writeprotect(fd, ctx.region.addr, ctx.length, F.UFFDIO_WRITEPROTECT_MODE_WP)
    st = ctx.map(4, MemType.ANON)
    ctx.register(MISSING, st)
    assert k.uffd_move(fd, ctx.addr(0, st), ctx.addr(7), ps) == ps
    assert k.uffd_move(fd, ctx.addr(1, st), ctx.addr(8), ps) == ps
    assert ctx.written_scan() == {7, 8}
    assert ctx.written_scan(rearm=True) == {7, 8}
    assert ctx.written_scan() == set()
    a = ctx.access(ctx.addr(7), AccessKind.READ)
    f = ctx.wait_fault()
    assert (f.address, f.missing, f.wp) == (ctx.addr(7), True, False), f
    ctx.expect_error(errno.EEXIST, lambda: k.uffd_move(fd, ctx.addr(7), ctx.addr(0, st), ps))
    k.uffd_writeprotect(fd, ctx.addr(7), ps, F.UFFDIO_WRITEPROTECT_MODE_DONTWAKE)
    assert k.uffd_move(fd, ctx.addr(7), ctx.addr(0, st), ps) == ps
    r = ctx.wait_access(a)
    assert r.status is AccessStatus.OK and r.data == data(7, 1)
    assert k.uffd_copy(fd, ctx.addr(8), data(8, 1)) == ps  # COPY onto the marker is fine
    check(ctx, range(16), 1)
    ctx.expect_quiet()


# ---- MOVE ---------------------------------------------------------------------------------
def move_roundtrip(ctx: Ctx) -> None:
    k, ps = ctx.kernel, ctx.ps
    fill(ctx)
    ctx.register(MISSING)
    st = ctx.map(4, MemType.ANON)
    ctx.register(MISSING, st)  # only the destination must be registered, same uffd
    assert k.uffd_move(ctx.uffd, ctx.addr(0, st), ctx.addr(2), ps) == ps
    assert ctx.read(0, st) == data(2, 1)
    p = F.PAGE_IS_PRESENT
    assert ctx.scan_pages(category_mask=p, return_mask=p) == set(range(16)) - {2}
    a = ctx.access(ctx.addr(2), AccessKind.READ)
    fault_at(ctx, 2, missing=True)
    assert k.uffd_move(ctx.uffd, ctx.addr(2), ctx.addr(0, st), ps) == ps
    r = ctx.wait_access(a)
    assert r.status is AccessStatus.OK and r.data == data(2, 1)
    check(ctx, range(16), 1)
    ctx.expect_quiet()


def move_errors(ctx: Ctx) -> None:
    k, ps, fd = ctx.kernel, ctx.ps, ctx.uffd
    fill(ctx)
    ctx.register(MISSING)
    st = ctx.map(4, MemType.ANON)
    ctx.register(MISSING, st)
    unreg = ctx.map(2, MemType.ANON)
    ctx.expect_error(errno.EINVAL, lambda: k.uffd_move(fd, ctx.addr(0, unreg), ctx.addr(1), ps))
    assert k.uffd_copy(fd, ctx.addr(1, st), data(99, 1)) == ps
    ctx.expect_error(errno.EEXIST, lambda: k.uffd_move(fd, ctx.addr(1, st), ctx.addr(1), ps))
    assert k.uffd_move(fd, ctx.addr(0, st), ctx.addr(3), ps) == ps  # page 3 is now a hole
    ctx.expect_error(errno.ENOENT, lambda: k.uffd_move(fd, ctx.addr(2, st), ctx.addr(3), ps))
    assert k.uffd_move(fd, ctx.addr(2, st), ctx.addr(3), ps,
                       F.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES) == ps
    p = F.PAGE_IS_PRESENT
    assert ctx.scan_pages(st, category_mask=p, return_mask=p) == {0, 1}
    check(ctx, [1, 2, 4], 1)
    assert ctx.read(0, st) == data(3, 1) and ctx.read(1, st) == data(99, 1)


def move_memfd(ctx: Ctx) -> None:
    """UFFDIO_MOVE is anonymous-only: either end on a memfd mapping is EINVAL."""
    k, ps, fd = ctx.kernel, ctx.ps, ctx.uffd
    fill(ctx, [1])
    ctx.register(MISSING)
    st = ctx.map(2, MemType.ANON)
    ctx.register(MISSING, st)
    ctx.expect_error(errno.EINVAL, lambda: k.uffd_move(fd, ctx.addr(0, st), ctx.addr(1), ps))
    assert k.uffd_copy(fd, ctx.addr(1, st), data(7, 1)) == ps
    ctx.expect_error(errno.EINVAL, lambda: k.uffd_move(fd, ctx.addr(2), ctx.addr(1, st), ps))
    check(ctx, [1], 1)
    assert ctx.read(1, st) == data(7, 1)


# ---- POISON -------------------------------------------------------------------------------
def poison(ctx: Ctx) -> None:
    k, ps = ctx.kernel, ctx.ps
    ctx.register(MISSING)
    assert k.uffd_poison(ctx.uffd, ctx.addr(5), ps) == ps
    for kind, payload in ((AccessKind.READ, b""), (AccessKind.WRITE, data(5, 1))):
        r = ctx.wait_access(ctx.access(ctx.addr(5), kind, payload))
        assert r.status is AccessStatus.SIGBUS, f"{kind.value} of a poisoned page: {r}"
    ctx.expect_quiet()  # a poisoned page never raises a uffd fault
    a = ctx.access(ctx.addr(6), AccessKind.READ)
    fault_at(ctx, 6, missing=True)
    assert k.uffd_copy(ctx.uffd, ctx.addr(6), data(6, 1)) == ps
    r = ctx.wait_access(a)
    assert r.status is AccessStatus.OK and r.data == data(6, 1)
    ctx.expect_error(errno.EEXIST, lambda: k.uffd_poison(ctx.uffd, ctx.addr(6), ps), done=0)


# ---- non-cooperative REMOVE -----------------------------------------------------------------
def remove_event(ctx: Ctx) -> None:
    k, ps, fd = ctx.kernel, ctx.ps, ctx.uffd
    fill(ctx, range(8))
    ctx.register(MISSING)
    # madvise blocks until its REMOVE event is read, so it runs in a helper thread.
    h = ctx.in_thread(lambda: k.madvise(ctx.addr(4), 3 * ps, F.MADV_DONTNEED))
    # While the event is unread every page op fails EAGAIN (mmap_changing); before it is
    # queued, ZEROPAGE onto present page 0 fails EEXIST.
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            k.uffd_zeropage(fd, ctx.addr(0), ps)
            raise AssertionError("ZEROPAGE onto a present page succeeded")
        except KernelError as e:
            if e.errno == errno.EAGAIN:
                break
            assert e.errno == errno.EEXIST, e
        assert time.monotonic() < deadline, "no EAGAIN while the REMOVE event was pending"
        time.sleep(0.001)
    assert not h.done(), "madvise returned before its REMOVE event was read"
    ev = ctx.wait_event()
    assert ev == RemoveEvent(ctx.addr(4), ctx.addr(7)), ev
    h.join()
    assert k.uffd_zeropage(fd, ctx.addr(12), ps) == ps
    ctx.expect_error(errno.EEXIST, lambda: k.uffd_zeropage(fd, ctx.addr(0), ps), done=0)
    if ctx.mem is MemType.ANON:  # the pages are gone: they fault MISSING again
        a = ctx.access(ctx.addr(5), AccessKind.READ)
        fault_at(ctx, 5, missing=True)
        assert k.uffd_copy(fd, ctx.addr(5), data(5, 2)) == ps
        assert ctx.wait_access(a).data == data(5, 2)
    else:  # only the mapping went; the page cache still has the content
        check(ctx, [4, 5, 6], 1)
    ctx.expect_quiet()


# ---- what each dialect lacks ----------------------------------------------------------------
def dialect_absent_ops(ctx: Ctx) -> None:
    """An ioctl the kernel lacks fails EINVAL: the uffd ioctl switch's default answer on
    a real kernel (6.18 for RWPROTECT/SET_MODE; the RFC as posted for RWPROTECT, whose
    command number differs from DEACTIVATE's). DEACTIVATE is never issued to a real
    kernel (7.3 reuses nr 0x09), so backends refuse it themselves with ENOTTY."""
    k, ps, fd = ctx.kernel, ctx.ps, ctx.uffd
    addr = ctx.region.addr
    if ctx.dialect is not Dialect.RWP:  # no register mode bit 3 before 7.3, nor in the RFC
        ctx.expect_error(errno.EINVAL,
                         lambda: k.uffd_register(fd, addr, ps, F.UFFDIO_REGISTER_MODE_RWP))
        ctx.expect_error(errno.EINVAL, lambda: k.uffd_rwprotect(
            fd, addr, ps, F.UFFDIO_RWPROTECT_MODE_RWP))
    if ctx.dialect is not Dialect.RFC:
        ctx.expect_error(errno.ENOTTY, lambda: k.uffd_deactivate(fd, addr, ps))
    if ctx.dialect is Dialect.NONE:  # no SET_MODE, and bits 17/18 are refused, before 7.3
        ctx.expect_error(errno.EINVAL, lambda: k.uffd_set_mode(fd, 0, F.UFFD_FEATURE_RWP_ASYNC))
        fd2 = k.uffd_open()
        try:
            ctx.expect_error(errno.EINVAL, lambda: k.uffd_api(fd2, F.UFFD_FEATURE_RWP))
        finally:
            k.uffd_close(fd2)


CASES: tuple[Case, ...] = (
    Case("missing-copy", missing_copy, BASIC),
    Case("missing-zeropage", missing_zeropage, BASIC),
    Case("missing-close", missing_close, BASIC),
    Case("missing-unregister", missing_unregister, BASIC),
    Case("wp-async-written", wp_async_written, WP_ASYNC,
         wants=F.UFFD_FEATURE_THREAD_ID | F.UFFD_FEATURE_WP_UNPOPULATED),
    Case("wp-async-dontneed", wp_async_dontneed, WP_ASYNC,
         wants=F.UFFD_FEATURE_THREAD_ID | F.UFFD_FEATURE_WP_UNPOPULATED),
    Case("wp-move-rearmed-hole", wp_move_rearmed_hole,
         WP_ASYNC | Needs(common=F.UFFD_FEATURE_MOVE), ANON_ONLY,
         "MOVE is anonymous-only (the memfd WP path is detach-memfd-wp)"),
    Case("move-roundtrip", move_roundtrip, Needs(common=F.UFFD_FEATURE_MOVE), ANON_ONLY,
         "MOVE is anonymous-only (move-memfd-einval asserts the EINVAL)"),
    Case("move-errors", move_errors, Needs(common=F.UFFD_FEATURE_MOVE), ANON_ONLY,
         "MOVE is anonymous-only (move-memfd-einval asserts the EINVAL)"),
    Case("move-memfd-einval", move_memfd, BASIC | Needs(common=F.UFFD_FEATURE_MOVE),
         MEMFD_ONLY, "MOVE on anon is covered by move-roundtrip/move-errors"),
    Case("poison", poison, BASIC | Needs(common=F.UFFD_FEATURE_POISON)),
    Case("remove-event", remove_event, BASIC | Needs(common=F.UFFD_FEATURE_EVENT_REMOVE)),
    Case("rwp-async", rwp_async, RWP),
    Case("rwp-sync", rwp_sync, RWP),
    Case("rwp-cold-scan", rwp_cold_scan, RWP),
    Case("rwp-gup", rwp_gup, RWP),
    Case("rwp-toggle", rwp_toggle, RWP),
    Case("rwp-close", rwp_close, RWP),
    Case("rwp-unregister", rwp_unregister, RWP),
    Case("rwp-missing-hole", rwp_missing_hole, RWP),
    Case("rwp-register-combos", rwp_register_combos, RWP, dialects=(Dialect.RWP,),
         dialect_reason="register mode bit 3 is the 7.3 RWP API"),
    Case("rwp-move-detach", rwp_move_detach, RWP | Needs(common=F.UFFD_FEATURE_MOVE),
         ANON_ONLY, "MOVE is anonymous-only (memfd: detach-memfd-rwp)"),
    Case("wp-unregister", wp_unregister,
         Needs(common=F.UFFD_FEATURE_PAGEFAULT_FLAG_WP, memfd=F.UFFD_FEATURE_WP_HUGETLBFS_SHMEM)),
    Case("detach-memfd-wp", detach_memfd_wp,
         WP_ASYNC | Needs(memfd=F.UFFD_FEATURE_MINOR_SHMEM | F.UFFD_FEATURE_MISSING_SHMEM),
         MEMFD_ONLY, "anon detaches by UFFDIO_MOVE (move-roundtrip)"),
    Case("detach-memfd-rwp", detach_memfd_rwp, RWP, MEMFD_ONLY,
         "anon detaches by UFFDIO_MOVE (move-roundtrip)"),
    Case("dialect-absent-ops", dialect_absent_ops),
)
