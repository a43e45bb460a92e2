"""The context every conformance case runs in: one backend, one memory type, one uffd.

Guest-side accesses come only from the backend's accessor (C pthreads on linux,
simulated vCPUs on the fake): Python here never touches registered memory. Every wait
is bounded; teardown closes the uffd first, which wakes any fault still blocked, and a
case whose accessor stays blocked after that fails instead of hanging the run.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType

import numpy as np
import pytest

from vmm_tierd.kernel import open_kernel, stamps, uapi
from vmm_tierd.kernel.api import (
    Access,
    AccessKind,
    AccessResult,
    AccessStatus,
    Backend,
    Dialect,
    KernelError,
    MemType,
    PageFault,
    Region,
    ScanResult,
    UffdEvent,
    dialect_names,
)

BACKENDS = ("fake-rwp", "fake-rfc", "linux")
MEMTYPES = (MemType.ANON, MemType.MEMFD)
ALL_DIALECTS = (Dialect.NONE, Dialect.RWP, Dialect.RFC)
NPAGES = 16
# Generous: the guest selection may run under QEMU without KVM.
TIMEOUT = float(os.environ.get("VMM_TIERD_CONFORMANCE_TIMEOUT", "10"))

_EMPTY: Mapping[Dialect, int] = MappingProxyType({})


@dataclass(frozen=True)
class Needs:
    """Required features; the same capability is spelled differently per dialect."""

    common: int = 0
    per_dialect: Mapping[Dialect, int] = field(default_factory=lambda: _EMPTY)
    memfd: int = 0  # extra features when the memory is memfd-backed
    memfd_per_dialect: Mapping[Dialect, int] = field(default_factory=lambda: _EMPTY)

    def features(self, dialect: Dialect, mem: MemType) -> int:
        f = self.common | self.per_dialect.get(dialect, 0)
        if mem is MemType.MEMFD:
            f |= self.memfd | self.memfd_per_dialect.get(dialect, 0)
        return f

    def __or__(self, other: Needs) -> Needs:
        keys = set(self.per_dialect) | set(other.per_dialect)
        mkeys = set(self.memfd_per_dialect) | set(other.memfd_per_dialect)
        return Needs(
            self.common | other.common,
            {k: self.per_dialect.get(k, 0) | other.per_dialect.get(k, 0) for k in keys},
            self.memfd | other.memfd,
            {k: self.memfd_per_dialect.get(k, 0) | other.memfd_per_dialect.get(k, 0)
             for k in mkeys},
        )


@dataclass(frozen=True)
class Case:
    name: str
    fn: Callable[[Ctx], None]
    needs: Needs = Needs()
    mem: tuple[MemType, ...] = MEMTYPES
    mem_reason: str = ""  # why the other memory type does not apply
    dialects: tuple[Dialect, ...] = ALL_DIALECTS
    dialect_reason: str = ""
    wants: int = uapi.UFFD_FEATURE_THREAD_ID  # requested when granted, never required


class _Helper:
    """A Python thread for a syscall that blocks by design (e.g. madvise awaiting a
    non-cooperative event being read). It never touches registered memory."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.error: BaseException | None = None
        self._fn = fn
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        try:
            self._fn()
        except BaseException as e:  # reported by join()
            self.error = e

    def done(self) -> bool:
        return not self._t.is_alive()

    def join(self, timeout: float = TIMEOUT) -> None:
        self._t.join(timeout)
        if self._t.is_alive():
            raise AssertionError(f"helper thread still blocked after {timeout}s")
        if self.error is not None:
            raise self.error


class Ctx:
    def __init__(self, kernel: Backend, backend: str, mem: MemType, case: Case,
                 granted: int) -> None:
        self.kernel = kernel
        self.backend = backend
        self.mem = mem
        self.case = case
        self.dialect = kernel.dialect
        self.granted = granted
        self.ps = kernel.page_size
        self.npages = NPAGES
        self.uffd = -1
        self.features = 0
        self.regions: list[Region] = []
        self.accesses: list[Access] = []
        self.helpers: list[_Helper] = []
        self._queue: list[UffdEvent] = []

    # ---- setup / teardown ----------------------------------------------------------
    def open_uffd(self) -> None:
        self.uffd = self.kernel.uffd_open()
        need = self.case.needs.features(self.dialect, self.mem)
        info = self.kernel.uffd_api(self.uffd, need | (self.case.wants & self.granted))
        self.features = info.features
        assert info.features & need == need, (
            f"UFFDIO_API granted 0x{info.features:x}, lacks 0x{need & ~info.features:x}")
        self.region = self.map(self.npages)

    def map(self, npages: int, mem: MemType | None = None) -> Region:
        mem = mem or self.mem
        length = npages * self.ps
        r = (self.kernel.map_anon(length) if mem is MemType.ANON
             else self.kernel.map_memfd(length, name="conformance"))
        self.regions.append(r)
        return r

    def close_uffd(self) -> None:
        if self.uffd >= 0:
            fd, self.uffd = self.uffd, -1
            self.kernel.uffd_close(fd)

    def teardown(self) -> None:
        problems: list[str] = []
        try:
            self.close_uffd()  # wakes every fault still blocked on it
        except Exception as e:
            problems.append(f"uffd_close: {e!r}")
        deadline = time.monotonic() + TIMEOUT
        stuck = [a for a in self.accesses
                 if a.wait(max(deadline - time.monotonic(), 0.0)).status
                 is AccessStatus.PENDING]
        if stuck:
            problems.append(f"{len(stuck)} accessor(s) still blocked after the uffd was closed")
        for h in self.helpers:
            try:
                h.join()
            except Exception as e:
                problems.append(f"helper: {e!r}")
        if not stuck:  # never pull memory from under a blocked accessor
            for r in self.regions:
                try:
                    self.kernel.unmap(r)
                except Exception as e:
                    problems.append(f"unmap: {e!r}")
            self.kernel.close()
        if problems:
            raise AssertionError("teardown: " + "; ".join(problems))

    # ---- addresses -----------------------------------------------------------------
    def addr(self, page: int, region: Region | None = None) -> int:
        return (region or self.region).addr + page * self.ps

    def off(self, page: int) -> int:
        return self.region.offset + page * self.ps

    @property
    def length(self) -> int:
        return self.npages * self.ps

    # ---- registration --------------------------------------------------------------
    @property
    def rwp_mode(self) -> int:
        """The registration mode of read+write tracking: RWP (7.3) or MINOR (RFC)."""
        if self.dialect is Dialect.RFC:
            return uapi.UFFDIO_REGISTER_MODE_MINOR
        return uapi.UFFDIO_REGISTER_MODE_RWP

    def register(self, mode: int, region: Region | None = None) -> int:
        r = region or self.region
        return self.kernel.uffd_register(self.uffd, r.addr, r.length, mode)

    def unregister(self) -> None:
        self.kernel.uffd_unregister(self.uffd, self.region.addr, self.length)

    # ---- guest-side accesses (the backend's accessor only) -------------------------
    def access(self, addr: int, kind: AccessKind, data: bytes = b"",
               length: int | None = None) -> Access:
        n = length if length is not None else (len(data) if data else self.ps)
        a = self.kernel.start_access(addr, kind, n, data)
        self.accesses.append(a)
        return a

    def wait_access(self, a: Access, timeout: float = TIMEOUT) -> AccessResult:
        res = a.wait(timeout)
        assert res.status is not AccessStatus.PENDING, f"access still blocked after {timeout}s"
        return res

    def read(self, page: int, region: Region | None = None) -> bytes:
        res = self.wait_access(self.access(self.addr(page, region), AccessKind.READ))
        assert res.status is AccessStatus.OK, f"read of page {page}: {res}"
        return res.data

    def write(self, page: int, data: bytes, region: Region | None = None) -> None:
        res = self.wait_access(self.access(self.addr(page, region), AccessKind.WRITE, data))
        assert res.status is AccessStatus.OK, f"write of page {page}: {res}"

    def in_thread(self, fn: Callable[[], object]) -> _Helper:
        h = _Helper(fn)
        self.helpers.append(h)
        return h

    # ---- uffd messages -------------------------------------------------------------
    def wait_event(self, timeout: float = TIMEOUT) -> UffdEvent:
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.uffd, select.POLLIN)
        while not self._queue:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no uffd message within {timeout}s")
            t0 = time.monotonic()
            ready = poller.poll(int(min(left, 0.05) * 1000) + 1)
            self._queue.extend(self.kernel.uffd_read(self.uffd))
            if ready and not self._queue and time.monotonic() - t0 < 0.001:
                time.sleep(0.002)  # a fake's fd may poll ready without a message
        return self._queue.pop(0)

    def wait_fault(self, timeout: float = TIMEOUT) -> PageFault:
        ev = self.wait_event(timeout)
        assert isinstance(ev, PageFault), f"expected a page fault, got {ev!r}"
        return ev

    def expect_quiet(self) -> None:
        """No message is queued (checked after accesses completed, so nothing is late)."""
        self._queue.extend(self.kernel.uffd_read(self.uffd))
        assert not self._queue, f"unexpected uffd messages: {self._queue}"

    # ---- read+write tracking, dialect-neutral --------------------------------------
    def protect_all(self) -> None:
        self.protect(0, self.npages)

    def protect(self, first: int, n: int) -> None:
        """RWPROTECT (RWP) / DEACTIVATE (RFC) pages [first, first+n)."""
        if self.dialect is Dialect.RFC:
            self.kernel.uffd_deactivate(self.uffd, self.addr(first), n * self.ps)
        else:
            self.kernel.uffd_rwprotect(self.uffd, self.addr(first), n * self.ps,
                                       uapi.UFFDIO_RWPROTECT_MODE_RWP)

    def unprotect(self, page: int) -> None:
        """Resolve a protected page and wake: RWPROTECT clear (RWP) / CONTINUE (RFC)."""
        if self.dialect is Dialect.RFC:
            self.kernel.uffd_continue(self.uffd, self.addr(page), self.ps)
        else:
            self.kernel.uffd_rwprotect(self.uffd, self.addr(page), self.ps, 0)

    def set_async(self, on: bool) -> None:
        bit = uapi.UFFD_FEATURE_RWP_ASYNC  # MINOR_ASYNC in the RFC: the same bit
        self.kernel.uffd_set_mode(self.uffd, bit if on else 0, 0 if on else bit)

    def is_rwp_fault(self, f: PageFault) -> bool:
        return f.minor if self.dialect is Dialect.RFC else f.rwp

    def scan_pages(self, region: Region | None = None, **kw: int) -> set[int]:
        """Page indexes (within ``region``) that PAGEMAP_SCAN returns."""
        r = region or self.region
        res = self.pagemap_scan(r.addr, r.addr + r.length, **kw)
        out: set[int] = set()
        for start, end, _cat in np.asarray(res.regions, dtype=np.uint64).reshape(-1, 3):
            out.update(range((int(start) - r.addr) // self.ps, (int(end) - r.addr) // self.ps))
        return out

    def pagemap_scan(self, start: int, end: int, **kw: int) -> ScanResult:
        """PAGEMAP_SCAN over the address space the uffd's memory lives in."""
        return self.kernel.pagemap_scan(start, end, **kw)

    def cold_scan(self) -> set[int]:
        """Pages not accessed since they were protected."""
        if self.dialect is Dialect.RFC:
            if self.mem is MemType.ANON:
                bit = uapi.PAGE_IS_UFFD_DEACTIVATED
                return self.scan_pages(category_mask=bit, return_mask=bit)
            # RFC DEACTIVATE zaps shmem PTEs: cold = not present.
            p = uapi.PAGE_IS_PRESENT
            return self.scan_pages(category_mask=p, category_inverted=p, return_mask=p)
        m = uapi.PAGE_IS_PRESENT | uapi.PAGE_IS_ACCESSED
        return self.scan_pages(category_mask=m, category_inverted=uapi.PAGE_IS_ACCESSED,
                               return_mask=m)

    def written_scan(self, *, rearm: bool = False) -> set[int]:
        w = uapi.PAGE_IS_WRITTEN
        flags = (uapi.PM_SCAN_WP_MATCHING | uapi.PM_SCAN_CHECK_WPASYNC) if rearm else 0
        return self.scan_pages(category_mask=w, return_mask=w, flags=flags)

    def expect_error(self, err: int, fn: Callable[[], object], done: int | None = None
                     ) -> KernelError:
        with pytest.raises(KernelError) as ei:
            fn()
        e = ei.value
        assert e.errno == err, f"expected errno {err}, got {e!r}"
        if done is not None:
            assert e.done == done, f"expected done={done}, got {e!r}"
        return e


# ---- content and fault helpers shared by the cases ------------------------------------
@lru_cache(maxsize=256)
def data(page: int, version: int) -> bytes:
    return stamps.page_bytes(page, version)


def fill(ctx: Ctx, pages: range | list[int] | None = None, version: int = 1) -> None:
    """Write known content through the accessor (before registration: never faults)."""
    pages = range(ctx.npages) if pages is None else pages
    acc = [(p, ctx.access(ctx.addr(p), AccessKind.WRITE, data(p, version))) for p in pages]
    for p, a in acc:
        r = ctx.wait_access(a)
        assert r.status is AccessStatus.OK, f"fill page {p}: {r}"


def check(ctx: Ctx, pages: range | list[int], version: int) -> None:
    acc = [(p, ctx.access(ctx.addr(p), AccessKind.READ)) for p in pages]
    for p, a in acc:
        r = ctx.wait_access(a)
        assert r.status is AccessStatus.OK, f"read page {p}: {r}"
        assert r.data == data(p, version), f"page {p}: content is not version {version}"


def fault_at(ctx: Ctx, page: int, *, rwp: bool = False, missing: bool = False,
             minor: bool = False, write: bool | None = None) -> PageFault:
    f = ctx.wait_fault()
    assert f.address == ctx.addr(page), f"fault at 0x{f.address:x}, expected page {page}"
    if rwp:
        assert ctx.is_rwp_fault(f), f"expected an {ctx.dialect.value} tracking fault: {f}"
    if missing:
        assert f.missing, f"expected a MISSING fault: {f}"
    if minor:
        assert f.minor, f"expected a MINOR fault: {f}"
    if write is not None:
        assert f.write is write, f"expected WRITE={write}: {f}"
    return f


def skip_reason(case: Case, backend: str, mem: MemType, dialect: Dialect,
                granted: int) -> str | None:
    if dialect not in case.dialects:
        which = ", ".join(d.value for d in case.dialects)
        return (f"{backend} (dialect {dialect.value}): applies to dialect {which} only"
                + (f" ({case.dialect_reason})" if case.dialect_reason else ""))
    need = case.needs.features(dialect, mem)
    if need & ~granted:
        names = ", ".join(uapi.feature_names(need & ~granted, dialect_names(dialect)))
        return f"{backend} (dialect {dialect.value}): needs {names} (granted 0x{granted:x})"
    return None


def open_backend(backend: str) -> Backend:
    module = "vmm_tierd.kernel." + ("linux" if backend == "linux" else "fake")
    try:
        return open_kernel(backend)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        pytest.skip(f"backend {backend}: {module} does not exist yet")


@contextlib.contextmanager
def context(backend: str, mem: MemType, case: Case) -> Iterator[Ctx]:
    if mem not in case.mem:
        pytest.skip(f"{backend}-{mem.value}: {case.mem_reason or 'not applicable'}")
    kernel = open_backend(backend)
    try:
        granted = kernel.capabilities().features
        reason = skip_reason(case, backend, mem, kernel.dialect, granted)
    except BaseException:
        kernel.close()
        raise
    if reason:
        kernel.close()
        pytest.skip(reason)
    ctx = Ctx(kernel, backend, mem, case, granted)
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
