"""Cross-process cases: this process tiers the memfd RAM of another process (the target)
through a uffd created inside the target by injection, as the daemon does with a VMM
(facts: shared/kernel-facts.md, "Another process's memory"). Run on every backend by
test_conformance.py with :mod:`harness_remote`; accesses are the target's vCPU threads'.
"""

from __future__ import annotations

import errno
import functools
import select
from collections.abc import Callable

from vmm_tierd.kernel import uapi
from vmm_tierd.kernel.api import AccessKind, AccessStatus, KernelError, MemType
from vmm_tierd.kernel.process import (
    SYS_CLOSE,
    SYS_GETPID,
    SYS_MMAP,
    SYS_MUNMAP,
    SYS_PIDFD_OPEN,
    SYS_PROCESS_MADVISE,
    UIO_MAXIOV,
)

from .harness import TIMEOUT, Case, Ctx, Needs, check, data, fault_at, fill
from .harness_remote import RemoteCtx, iovecs

F = uapi
MISSING = F.UFFDIO_REGISTER_MODE_MISSING
MINOR = F.UFFDIO_REGISTER_MODE_MINOR
MEMFD = Needs(common=F.UFFD_FEATURE_MISSING_SHMEM)
WP_ASYNC = Needs(common=F.UFFD_FEATURE_PAGEFAULT_FLAG_WP | F.UFFD_FEATURE_WP_ASYNC
                 | F.UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
RAM_PAGES = 16


def remote(ctx: Ctx) -> RemoteCtx:
    assert isinstance(ctx, RemoteCtx), f"a cross-process case needs a RemoteCtx, got {ctx!r}"
    return ctx


def _present(ctx: RemoteCtx) -> set[int]:
    p = F.PAGE_IS_PRESENT
    return ctx.scan_pages(category_mask=p, return_mask=p)


def remote_missing_copy(c: Ctx) -> None:
    """Its RAM registered from here: its read of a hole is a MISSING fault that a COPY
    from here serves (the source buffer is ours); its write into a hole too."""
    ctx = remote(c)
    k, ps = ctx.kernel, ctx.ps
    ctx.register(MISSING)
    a = ctx.access(ctx.addr(3), AccessKind.READ)
    f = fault_at(ctx, 3, missing=True, write=False)
    if ctx.features & F.UFFD_FEATURE_THREAD_ID:
        assert f.tid and f.tid == a.tid, f"fault tid {f.tid}, target access tid {a.tid}"
    assert not a.done()
    assert k.uffd_copy(ctx.uffd, ctx.addr(3), data(3, 1)) == ps
    r = ctx.wait_access(a)
    assert r.status is AccessStatus.OK and r.data == data(3, 1)
    assert k.pread(ctx.region.fd, ctx.off(3), ps) == data(3, 1)  # it is in its memfd
    w = ctx.access(ctx.addr(7), AccessKind.WRITE, data(7, 2))
    fault_at(ctx, 7, missing=True, write=True)
    assert k.uffd_zeropage(ctx.uffd, ctx.addr(7), ps) == ps
    assert ctx.wait_access(w).status is AccessStatus.OK
    check(ctx, [3], 1)
    check(ctx, [7], 2)
    ctx.expect_quiet()


def remote_move_einval(c: Ctx) -> None:
    """UFFDIO_MOVE is refused across mms, whatever the ranges: the same move inside one
    mm succeeds (move-roundtrip), here nothing moves."""
    ctx = remote(c)
    k, ps, fd = ctx.kernel, ctx.ps, ctx.uffd
    st = ctx.map(2, MemType.ANON)  # anonymous scratch in the target
    ctx.p.write_memory(st.addr, data(0, 1))  # its page 0 is present, page 1 a hole
    ctx.register(MISSING, st)
    for mode in (0, F.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES):
        ctx.expect_error(errno.EINVAL, functools.partial(
            k.uffd_move, fd, ctx.addr(1, st), ctx.addr(0, st), ps, mode))
    assert ctx.p.read_memory(st.addr, ps) == data(0, 1)
    p = F.PAGE_IS_PRESENT
    assert ctx.scan_pages(st, category_mask=p, return_mask=p) == {0}
    ctx.register(MISSING)
    ctx.expect_error(errno.EINVAL, lambda: k.uffd_move(fd, ctx.addr(2), ctx.addr(0, st), ps))
    assert ctx.syscall(SYS_MUNMAP, st.addr, st.length) == 0
    ctx.expect_quiet()


def remote_wp_async_scan(c: Ctx) -> None:
    """PAGEMAP_SCAN of its pagemap with async write protection sees exactly its writes,
    and PM_SCAN_WP_MATCHING re-protects its page tables."""
    ctx = remote(c)
    fill(ctx)
    ctx.register(F.UFFDIO_REGISTER_MODE_WP)
    ctx.kernel.uffd_writeprotect(ctx.uffd, ctx.region.addr, ctx.length,
                                 F.UFFDIO_WRITEPROTECT_MODE_WP)
    assert ctx.written_scan() == set()
    written = [1, 5, 9]
    fill(ctx, written, 2)
    check(ctx, [2, 3], 1)  # reads are invisible to PAGE_IS_WRITTEN
    assert ctx.written_scan() == set(written)
    ctx.expect_quiet()  # async: its writes never blocked
    assert ctx.written_scan(rearm=True) == set(written)
    assert ctx.written_scan() == set()
    fill(ctx, [3], 3)
    assert ctx.written_scan() == {3}
    check(ctx, written, 2)
    check(ctx, [3], 3)


def remote_discard_minor(c: Ctx) -> None:
    """DONTNEED inside it (an injected process_madvise on itself, iovecs in its memory)
    drops its PTEs and keeps the page cache: with MINOR registration its next access is
    a MINOR fault that CONTINUE resolves with the content intact."""
    ctx = remote(c)
    k, ps = ctx.kernel, ctx.ps
    fill(ctx)
    ctx.register(MISSING | MINOR)
    assert ctx.syscall(SYS_GETPID) == ctx.target.pid
    pidfd = ctx.syscall(SYS_PIDFD_OPEN, ctx.target.pid, 0)
    assert pidfd >= 0, f"injected pidfd_open() = {pidfd}"
    nvec = UIO_MAXIOV + 1
    scratch = ctx.syscall(SYS_MMAP, 0, nvec * 16, F.PROT_READ | F.PROT_WRITE,
                          F.MAP_PRIVATE | F.MAP_ANONYMOUS, -1, 0)
    assert scratch > 0, f"injected mmap() = {scratch}"
    ranges = [(ctx.addr(2), ps), (ctx.addr(5), 2 * ps)]
    ctx.p.write_memory(scratch, iovecs(ranges, nvec))
    assert ctx.syscall(SYS_PROCESS_MADVISE, pidfd, scratch, UIO_MAXIOV + 1,
                       F.MADV_DONTNEED, 0) == -errno.EINVAL  # more than UIO_MAXIOV
    assert _present(ctx) == set(range(16)), "a refused process_madvise dropped pages"
    # UIO_MAXIOV iovecs: the two ranges, then empty ones
    assert ctx.syscall(SYS_PROCESS_MADVISE, pidfd, scratch, UIO_MAXIOV,
                       F.MADV_DONTNEED, 0) == 3 * ps
    assert _present(ctx) == set(range(16)) - {2, 5, 6}
    assert k.file_data_runs(ctx.region.fd, 0, ctx.length).tolist() == [[0, ctx.length]]
    a = ctx.access(ctx.addr(5), AccessKind.READ)
    fault_at(ctx, 5, minor=True, write=False)
    assert not a.done()
    assert k.uffd_continue(ctx.uffd, ctx.addr(5), ps) == ps
    r = ctx.wait_access(a)
    assert r.status is AccessStatus.OK and r.data == data(5, 1)
    assert k.uffd_continue(ctx.uffd, ctx.addr(6), ps) == ps  # map it back before access
    assert k.uffd_continue(ctx.uffd, ctx.addr(2), ps) == ps
    check(ctx, range(16), 1)
    ctx.expect_quiet()
    assert ctx.syscall(SYS_MUNMAP, scratch, nvec * 16) == 0
    assert ctx.syscall(SYS_CLOSE, pidfd) == 0


def remote_punch_missing(c: Ctx) -> None:
    """Eviction from here alone: pread through our copy of its memfd, punch the hole;
    its next access is a MISSING fault served by COPY of what was read."""
    ctx = remote(c)
    k, ps, mfd = ctx.kernel, ctx.ps, ctx.region.fd
    fill(ctx)
    ctx.register(MISSING)
    saved = k.pread(mfd, ctx.off(4), 2 * ps)
    assert saved == data(4, 1) + data(5, 1)
    k.punch_hole(mfd, ctx.off(4), 2 * ps)
    runs = k.file_data_runs(mfd, 0, ctx.length).tolist()
    assert runs == [[0, ctx.off(4)], [ctx.off(6), ctx.length]], runs
    assert _present(ctx) == set(range(16)) - {4, 5}
    a = ctx.access(ctx.addr(5), AccessKind.READ)
    fault_at(ctx, 5, missing=True)
    assert k.uffd_copy(ctx.uffd, ctx.addr(4), saved) == 2 * ps
    r = ctx.wait_access(a)
    assert r.status is AccessStatus.OK and r.data == data(5, 1)
    check(ctx, range(16), 1)
    ctx.expect_quiet()


def remote_death_kept_ref(c: Ctx) -> None:
    """This side dies (its copy of the uffd closed) while the target keeps its own fd:
    the context survives, the target's fault waits in it, and a restarted side gets it
    back with a second pidfd_getfd and serves it with nothing lost."""
    ctx = remote(c)
    k, ps = ctx.kernel, ctx.ps
    fill(ctx)
    ctx.register(MISSING)
    saved = k.pread(ctx.region.fd, ctx.off(2), ps)
    k.punch_hole(ctx.region.fd, ctx.off(2), ps)
    ctx.close_uffd()  # death of this side: its only fd of the uffd goes
    a = ctx.access(ctx.addr(2), AccessKind.READ)
    ctx.uffd = ctx.p.getfd(ctx.vfd)  # the restarted side
    fault_at(ctx, 2, missing=True)  # queued while this side held no fd
    assert not a.done(), "the access completed without its fault being served"
    assert ctx.p.uffd_features(ctx.vfd) == k.uffd_features(ctx.uffd)
    assert k.uffd_copy(ctx.uffd, ctx.addr(2), saved) == ps
    r = ctx.wait_access(a)
    assert r.status is AccessStatus.OK and r.data == data(2, 1)
    check(ctx, range(16), 1)
    ctx.expect_quiet()


def remote_death_no_ref(c: Ctx) -> None:
    """THE HAZARD THE DAEMON AVOIDS: if this side holds the only reference to the uffd
    (the target closed its own fd) and dies, the context is released with its
    registration: the fault blocked at that moment completes, and every evicted page,
    a hole in the memfd, silently reads as zeros. The daemon therefore never closes
    the VMM's own fd of the uffd while pages are evicted."""
    ctx = remote(c)
    ps = ctx.ps
    fill(ctx)
    ctx.register(MISSING)
    for page in (2, 6):  # evicted; their content now lives only on this side
        ctx.kernel.punch_hole(ctx.region.fd, ctx.off(page), ps)
    ctx.close_target_uffd()  # the target no longer holds the uffd
    a = ctx.access(ctx.addr(2), AccessKind.READ)
    fault_at(ctx, 2, missing=True)
    ctx.close_uffd()  # ... and this side dies
    r = ctx.wait_access(a)
    assert r.status is AccessStatus.OK and r.data == bytes(ps), "blocked fault: zeros"
    assert ctx.read(6) == bytes(ps), "evicted page: zeros"
    check(ctx, [1, 3, 5, 7], 1)


def remote_exit(c: Ctx) -> None:
    """The target exiting makes the pidfd readable, the handle answers ESRCH, our uffd
    copy outlives its address space (page ops ESRCH) and our memfd copy the RAM."""
    ctx = remote(c)
    k, ps, p = ctx.kernel, ctx.ps, ctx.p
    fill(ctx, [1])
    ctx.register(MISSING)
    assert p.alive()
    assert not select.select([p.pidfd], [], [], 0)[0], "pidfd readable while running"
    ctx.target.close()
    assert select.select([p.pidfd], [], [], TIMEOUT)[0], "pidfd not readable after exit"
    assert not p.alive()
    addr = ctx.addr(0)
    calls: list[tuple[str, Callable[[], object]]] = [
        ("maps", p.maps), ("fds", p.fds), ("threads", p.threads),
        ("getfd", lambda: p.getfd(ctx.target.ram_fd)),
        ("inject", lambda: ctx.syscall(SYS_GETPID)),
        ("read_memory", lambda: p.read_memory(addr, ps)),
        ("pagemap_scan", lambda: p.pagemap_scan(addr, addr + ps))]
    for what, fn in calls:
        try:
            fn()
        except KernelError as e:
            assert e.errno == errno.ESRCH, f"{what} on an exited process: {e!r}"
        else:
            raise AssertionError(f"{what} succeeded on an exited process")
    ctx.expect_error(errno.ESRCH, lambda: k.uffd_copy(ctx.uffd, addr, data(0, 1)))
    assert k.uffd_read(ctx.uffd) == []
    assert k.pread(ctx.region.fd, ctx.off(1), ps) == data(1, 1)


REMOTE_CASES: tuple[Case, ...] = tuple(
    Case(name, fn, needs, (MemType.MEMFD,), "the target's RAM is a memfd")
    for name, fn, needs in (
        ("remote-missing-copy", remote_missing_copy, MEMFD),
        ("remote-move-einval", remote_move_einval,
         MEMFD | Needs(common=F.UFFD_FEATURE_MOVE)),
        ("remote-wp-async-scan", remote_wp_async_scan, WP_ASYNC),
        ("remote-discard-minor", remote_discard_minor,
         MEMFD | Needs(common=F.UFFD_FEATURE_MINOR_SHMEM)),
        ("remote-punch-missing", remote_punch_missing, MEMFD),
        ("remote-death-kept-ref", remote_death_kept_ref, MEMFD),
        ("remote-death-no-ref", remote_death_no_ref, MEMFD),
        ("remote-exit", remote_exit, MEMFD),
    )
)
