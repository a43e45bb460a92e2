"""Read+write tracking cases: the RFC's six selftests (minor-anon-async/-sync/-pagemap/
-gup/-async-toggle/-close) spelled per dialect by the harness (RWPROTECT vs DEACTIVATE,
RWP vs MINOR faults), UNREGISTER wake rules, and the engine's race-free detach paths.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from vmm_tierd.kernel import uapi
from vmm_tierd.kernel.api import Access, AccessKind, AccessStatus, Dialect, MemType

from .harness import Ctx, check, data, fault_at, fill

F = uapi
MISSING = uapi.UFFDIO_REGISTER_MODE_MISSING


# ---- read+write tracking: the RFC's six selftests ---------------------------------------
def rwp_setup(ctx: Ctx, extra_mode: int = 0) -> None:
    fill(ctx)
    ctx.register(ctx.rwp_mode | extra_mode)
    ctx.protect_all()


def rwp_async(ctx: Ctx) -> None:
    rwp_setup(ctx)
    check(ctx, range(16), 1)
    fill(ctx, [3], 2)
    check(ctx, [3], 2)
    ctx.expect_quiet()


def rwp_sync(ctx: Ctx) -> None:
    rwp_setup(ctx)
    ctx.set_async(False)
    a = ctx.access(ctx.addr(3), AccessKind.READ)
    fault_at(ctx, 3, rwp=True, write=False)
    assert not a.done()
    ctx.unprotect(3)
    r = ctx.wait_access(a)
    assert r.status is AccessStatus.OK and r.data == data(3, 1)
    w = ctx.access(ctx.addr(4), AccessKind.WRITE, data(4, 2))
    fault_at(ctx, 4, rwp=True, write=True)  # 7.3: flags RWP|WRITE (0x9)
    ctx.unprotect(4)
    assert ctx.wait_access(w).status is AccessStatus.OK
    check(ctx, [3], 1)
    check(ctx, [4], 2)
    ctx.expect_quiet()


def rwp_cold_scan(ctx: Ctx) -> None:
    rwp_setup(ctx)
    assert ctx.cold_scan() == set(range(16))
    check(ctx, range(4), 1)  # reads count: the point of RWP over WP
    fill(ctx, range(4, 8), 2)
    assert ctx.cold_scan() == set(range(8, 16))
    ctx.expect_quiet()


def rwp_gup(ctx: Ctx) -> None:
    rwp_setup(ctx)
    r = ctx.wait_access(ctx.access(ctx.addr(0), AccessKind.GUP_READ))
    assert r.status is AccessStatus.OK and r.data == data(0, 1), r
    assert 0 not in ctx.cold_scan()
    ctx.expect_quiet()
    ctx.set_async(False)  # GUP in sync mode blocks like any access
    a = ctx.access(ctx.addr(1), AccessKind.GUP_READ)
    fault_at(ctx, 1, rwp=True)
    ctx.unprotect(1)
    r = ctx.wait_access(a)
    assert r.status is AccessStatus.OK and r.data == data(1, 1), r


def rwp_toggle(ctx: Ctx) -> None:
    rwp_setup(ctx)
    check(ctx, range(8), 1)
    ctx.expect_quiet()
    ctx.set_async(False)
    a = ctx.access(ctx.addr(12), AccessKind.READ)
    fault_at(ctx, 12, rwp=True)
    assert not a.done()
    ctx.set_async(True)  # wakes the blocked fault, which then auto-resolves
    r = ctx.wait_access(a)
    assert r.status is AccessStatus.OK and r.data == data(12, 1)
    ctx.expect_quiet()
    assert ctx.cold_scan() == set(range(8, 16)) - {12}
    ctx.protect_all()
    check(ctx, range(16), 1)
    ctx.expect_quiet()


def rwp_close(ctx: Ctx) -> None:
    rwp_setup(ctx)
    ctx.set_async(False)
    a = ctx.access(ctx.addr(5), AccessKind.READ)
    fault_at(ctx, 5, rwp=True)
    ctx.close_uffd()
    r = ctx.wait_access(a)
    assert r.status is AccessStatus.OK and r.data == data(5, 1)
    check(ctx, range(16), 1)
    fill(ctx, [6], 2)
    check(ctx, [6], 2)


def unregister_wakes_only_missing(ctx: Ctx, mode: int, block: Callable[[int], Access],
                                  arm: Callable[[], None]) -> None:
    """UFFDIO_UNREGISTER wakes the range's blocked faults only where it was registered
    MISSING (fs/userfaultfd.c: ``if (userfaultfd_missing(vma)) wake_userfault(...)``);
    otherwise they stay blocked until UFFDIO_WAKE (or close)."""
    k, ps = ctx.kernel, ctx.ps
    ctx.register(mode)
    arm()
    a = block(9)
    ctx.unregister()
    assert a.wait(0.2).status is AccessStatus.PENDING, "UNREGISTER woke a non-MISSING fault"
    k.uffd_wake(ctx.uffd, ctx.addr(9), ps)
    assert ctx.wait_access(a).status is AccessStatus.OK
    ctx.register(mode | MISSING)
    arm()
    b = block(10)
    ctx.unregister()
    assert ctx.wait_access(b).status is AccessStatus.OK


def rwp_unregister(ctx: Ctx) -> None:
    fill(ctx)
    ctx.set_async(False)

    def block(page: int) -> Access:
        a = ctx.access(ctx.addr(page), AccessKind.READ)
        fault_at(ctx, page, rwp=True)
        return a

    unregister_wakes_only_missing(ctx, ctx.rwp_mode, block, ctx.protect_all)
    check(ctx, range(16), 1)
    ctx.expect_quiet()


def wp_unregister(ctx: Ctx) -> None:
    fill(ctx)

    def arm() -> None:
        ctx.kernel.uffd_writeprotect(ctx.uffd, ctx.region.addr, ctx.length,
                                     F.UFFDIO_WRITEPROTECT_MODE_WP)

    def block(page: int) -> Access:
        a = ctx.access(ctx.addr(page), AccessKind.WRITE, data(page, 2))
        f = ctx.wait_fault()
        assert (f.address, f.wp, f.write) == (ctx.addr(page), True, True), f
        return a

    unregister_wakes_only_missing(ctx, uapi.UFFDIO_REGISTER_MODE_WP, block, arm)
    check(ctx, [9, 10], 2)
    check(ctx, [0, 8, 11], 1)
    ctx.expect_quiet()


def rwp_move_detach(ctx: Ctx) -> None:
    """The rwp strategy's anon detach: MOVE a protected page out while in sync mode; an
    access then faults MISSING and MOVE back (with wake) serves it, content intact.
    7.3 quirk: a page MOVEd into an RWP range arrives protected (even if it had been
    accessed), so the woken access re-faults RWP and needs RWPROTECT(clear). The RFC left
    MOVE alone: it builds the PTE from vm_page_prot, so the page arrives accessible."""
    k, ps, fd = ctx.kernel, ctx.ps, ctx.uffd
    rwp_setup(ctx, MISSING)
    ctx.set_async(False)
    st = ctx.map(2, MemType.ANON)
    ctx.register(MISSING, st)
    assert k.uffd_move(fd, ctx.addr(0, st), ctx.addr(3), ps) == ps
    a = ctx.access(ctx.addr(3), AccessKind.READ)
    fault_at(ctx, 3, missing=True)
    assert ctx.read(0, st) == data(3, 1)  # staging is not tracked: no fault
    assert k.uffd_move(fd, ctx.addr(3), ctx.addr(0, st), ps) == ps
    if ctx.dialect is not Dialect.RFC:
        fault_at(ctx, 3, rwp=True)
        assert not a.done()
        ctx.unprotect(3)
    r = ctx.wait_access(a)
    assert r.status is AccessStatus.OK and r.data == data(3, 1)
    ctx.set_async(True)
    # Async: out and back leaves the page cold in 7.3 (accessible in the RFC).
    check(ctx, range(16), 1)
    assert k.uffd_move(fd, ctx.addr(1, st), ctx.addr(4), ps) == ps
    assert k.uffd_move(fd, ctx.addr(4), ctx.addr(1, st), ps) == ps
    assert (4 in ctx.cold_scan()) is (ctx.dialect is not Dialect.RFC)
    check(ctx, [4], 1)
    assert 4 not in ctx.cold_scan()
    ctx.expect_quiet()


def rwp_missing_hole(ctx: Ctx) -> None:
    """A hole in a range registered MISSING|RWP faults MISSING even when "protected";
    the page COPY installs counts as accessed."""
    k, ps = ctx.kernel, ctx.ps
    fill(ctx, range(8))
    ctx.register(ctx.rwp_mode | MISSING)
    ctx.protect_all()
    assert ctx.cold_scan() >= set(range(8))
    ctx.set_async(False)
    a = ctx.access(ctx.addr(9), AccessKind.READ)
    fault_at(ctx, 9, missing=True, write=False)
    assert k.uffd_copy(ctx.uffd, ctx.addr(9), data(9, 1)) == ps
    r = ctx.wait_access(a)
    assert r.status is AccessStatus.OK and r.data == data(9, 1)
    assert 9 not in ctx.cold_scan()
    ctx.expect_quiet()


def rwp_register_combos(ctx: Ctx) -> None:
    """7.3: RWP combines with MISSING; not with WP; with MINOR only on shmem."""
    k, r = ctx.kernel, ctx.region
    rwp = uapi.UFFDIO_REGISTER_MODE_RWP
    ctx.expect_error(errno.EINVAL, lambda: ctx.register(rwp | uapi.UFFDIO_REGISTER_MODE_WP))
    if ctx.mem is MemType.ANON:
        ctx.expect_error(errno.EINVAL,
                         lambda: ctx.register(rwp | uapi.UFFDIO_REGISTER_MODE_MINOR))
    else:
        ctx.register(rwp | uapi.UFFDIO_REGISTER_MODE_MINOR)
        k.uffd_unregister(ctx.uffd, r.addr, r.length)
    ioctls = ctx.register(rwp | MISSING)
    for name in ("RWPROTECT", "COPY", "WAKE"):
        assert ioctls >> uapi.IOCTL_BIT[name] & 1, f"{name} missing from 0x{ioctls:x}"


# ---- memfd race-free detach (the engine's design) -----------------------------------------
def detach_memfd_wp(ctx: Ctx) -> None:
    k, ps, fd, mfd = ctx.kernel, ctx.ps, ctx.uffd, ctx.region.fd
    fill(ctx)
    ctx.register(MISSING | uapi.UFFDIO_REGISTER_MODE_WP | uapi.UFFDIO_REGISTER_MODE_MINOR)
    k.uffd_writeprotect(fd, ctx.region.addr, ctx.length, F.UFFDIO_WRITEPROTECT_MODE_WP)
    fill(ctx, [5], 2)
    assert ctx.written_scan() == {5}
    # Zap the guest PTEs: with MINOR registered any access now blocks.
    k.madvise(ctx.addr(5), 2 * ps, F.MADV_DONTNEED)
    a = ctx.access(ctx.addr(5), AccessKind.READ)
    fault_at(ctx, 5, minor=True)
    assert k.pread(mfd, ctx.off(5), ps) == data(5, 2)
    k.punch_hole(mfd, ctx.off(5), ps)
    assert k.pread(mfd, ctx.off(5), ps) == bytes(ps)
    assert k.uffd_copy(fd, ctx.addr(5), data(5, 2)) == ps  # punched: serve by COPY
    r = ctx.wait_access(a)
    assert r.status is AccessStatus.OK and r.data == data(5, 2)
    b = ctx.access(ctx.addr(6), AccessKind.READ)
    fault_at(ctx, 6, minor=True)
    assert k.pread(mfd, ctx.off(6), ps) == data(6, 1)
    assert k.uffd_continue(fd, ctx.addr(6), ps) == ps  # not punched: CONTINUE
    r = ctx.wait_access(b)
    assert r.status is AccessStatus.OK and r.data == data(6, 1)
    ctx.expect_quiet()


def detach_memfd_rwp(ctx: Ctx) -> None:
    k, ps, fd, mfd = ctx.kernel, ctx.ps, ctx.uffd, ctx.region.fd
    rwp_setup(ctx, MISSING)
    ctx.set_async(False)  # hold faults on the page being detached
    a = ctx.access(ctx.addr(5), AccessKind.READ)
    fault_at(ctx, 5, rwp=True)
    assert k.pread(mfd, ctx.off(5), ps) == data(5, 1)
    k.punch_hole(mfd, ctx.off(5), ps)
    k.uffd_wake(fd, ctx.addr(5), ps)  # the retried access now finds a hole
    fault_at(ctx, 5, missing=True)
    assert k.uffd_copy(fd, ctx.addr(5), data(5, 1)) == ps
    r = ctx.wait_access(a)
    assert r.status is AccessStatus.OK and r.data == data(5, 1)
    ctx.set_async(True)
    check(ctx, range(16), 1)
    ctx.expect_quiet()
