"""Guest-side accesses on the fake kernel: the fault logic of mm/memory.c as it concerns
userfaultfd, simulated vCPU threads, and write-stamp workloads.

A simulated access walks exactly where a real one would block: it queues a PageFault,
makes the uffd readable and waits until a COPY/ZEROPAGE/CONTINUE/MOVE/WAKE/RWPROTECT-clear/
SET_MODE-to-async/UNREGISTER/close wakes it, then retries the whole fault.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable

from . import uapi
from .api import (
    AccessKind,
    AccessResult,
    AccessStatus,
    PageFault,
    Region,
    WorkloadSpec,
)
from .fake_state import (
    EFAULT,
    F_POISON,
    F_PRESENT,
    F_PROTNONE,
    F_PT,
    F_RWP,
    F_WP,
    F_ZERO,
    GONE,
    MODE_MINOR,
    MODE_MISSING,
    MODE_RWP,
    MODE_WP,
    OK,
    PAGE,
    SIGBUS,
    Content,
    Mapping,
    Mm,
    Uffd,
    Waiter,
    materialize,
)
from .fake_uffd import UffdMixin
from .fake_workload import FakeWorkload

_W = uapi.UFFD_PAGEFAULT_FLAG_WRITE


class GuestMixin(UffdMixin):
    def _step(self, m: Mapping, pg: int, write: bool, gup: bool
              ) -> int | tuple[Uffd, int] | None:
        """One pass of the fault handler: None = accessible now, an int status, or
        (uffd, flags) when the fault must go to userspace."""
        f = int(m.flags[pg])
        s = m.seg_at(pg)
        u = s.ctx
        mode = s.mode if u is not None else 0
        w = _W if write else 0
        if f & F_POISON:  # PTE_MARKER_POISONED: SIGBUS, or EFAULT for a kernel access
            return EFAULT if gup else SIGBUS
        if not f & F_PRESENT:
            # a uffd-wp marker is inherited by the PTE the fault installs
            wpm = F_WP if f & F_WP and mode & MODE_WP else 0
            if m.file is None:
                if mode & MODE_MISSING:
                    assert u is not None
                    return (u, w)
                new = F_PRESENT | wpm | (0 if write else F_ZERO)
                m.set_content(pg, None)
            else:
                if not m.cached(pg):
                    if mode & MODE_MISSING:
                        assert u is not None
                        return (u, w)
                    m.file.cached[m.fpgoff + pg] = True  # shmem allocates a zeroed page
                    m.set_content(pg, None)
                elif mode & MODE_MINOR and not self.async_minor(u):
                    assert u is not None
                    return (u, uapi.UFFD_PAGEFAULT_FLAG_MINOR | w)
                new = F_PRESENT | wpm
            m.set_pt(pg, pg + 1)
            f = F_PT | new
            m.flags[pg] = f
        if f & F_PROTNONE:  # RFC deactivated anon page
            if mode & MODE_MINOR and not self.async_minor(u):
                assert u is not None
                return (u, uapi.UFFD_PAGEFAULT_FLAG_MINOR | w)
            f &= ~F_PROTNONE
        if f & F_RWP:  # 7.3 RWP: any access faults; async resolves (=> PAGE_IS_ACCESSED)
            if mode & MODE_RWP and u is not None and not u.has(uapi.UFFD_FEATURE_RWP_ASYNC):
                return (u, uapi.UFFD_PAGEFAULT_FLAG_RWP | w)
            f &= ~F_RWP
        if write and f & F_WP:
            if mode & MODE_WP and u is not None and not u.has(uapi.UFFD_FEATURE_WP_ASYNC):
                return (u, uapi.UFFD_PAGEFAULT_FLAG_WP | _W)
            f &= ~F_WP  # WP_ASYNC: the bit is dropped, the page now reads as WRITTEN
        if write and f & F_ZERO:
            f &= ~F_ZERO  # COW of the zero page
        m.flags[pg] = f
        return None

    def fault_in(self, addr: int, write: bool, gup: bool, tid: int, mm: Mm | None = None
                 ) -> tuple[int, Mapping | None, int]:
        """Make the page at ``addr`` of ``mm`` (default: this process's) accessible,
        blocking like handle_userfault(). Caller holds ``self.lock``; the wait releases it."""
        mm = self.mm if mm is None else mm
        while True:
            if mm.dead:
                return GONE, None, 0
            m = mm.find(addr)
            if m is None:
                return EFAULT, None, 0
            pg = (addr - m.addr) // PAGE
            r = self._step(m, pg, write, gup)
            if r is None:
                return OK, m, pg
            if isinstance(r, int):
                return r, m, pg
            u, flags = r
            if u.has(uapi.UFFD_FEATURE_SIGBUS):
                return (EFAULT if gup else SIGBUS), m, pg
            if gup and u.user_mode_only:
                return EFAULT, m, pg  # kernel-mode fault not delivered: copy fails
            report = addr if u.has(uapi.UFFD_FEATURE_EXACT_ADDRESS) else addr & ~(PAGE - 1)
            ptid = tid if u.has(uapi.UFFD_FEATURE_THREAD_ID) else 0
            waiter = Waiter(addr & ~(PAGE - 1), PageFault(report, flags, ptid))
            u.pending.append(waiter)
            self.queued(u)
            while not waiter.woken and not u.released and not mm.dead:
                self.cv.wait()

    def _do_access(self, addr: int, kind: AccessKind, length: int, data: bytes,
                   tid: int, mm: Mm | None = None) -> AccessResult:
        write = kind is AccessKind.WRITE
        with self.lock:
            st, out, _done = self.copy_vm(self.mm if mm is None else mm, addr, length,
                                          data if write else None,
                                          kind is AccessKind.GUP_READ, tid)
        if st == SIGBUS:
            return AccessResult(AccessStatus.SIGBUS, out)
        if st == GONE:
            return AccessResult(AccessStatus.ERROR, out, errno.ESRCH)
        if st != OK:
            return AccessResult(AccessStatus.ERROR, out, errno.EFAULT)
        return AccessResult(AccessStatus.OK, out)

    def copy_vm(self, mm: Mm, addr: int, length: int, data: bytes | None, gup: bool,
                tid: int) -> tuple[int, bytes, int]:
        """Read ``length`` bytes at ``addr`` of ``mm`` (``data`` None) or write ``data``
        there, faulting pages in as the accessor would (``gup``: as the kernel does for
        process_vm_readv/writev or copy_from_user, so UFFD_USER_MODE_ONLY and
        UFFD_FEATURE_SIGBUS give EFAULT). Returns (status, bytes read, bytes done).
        Caller holds the lock."""
        write = data is not None
        out = bytearray()
        pos, end = addr, addr + length
        while pos < end:
            st, m, pg = self.fault_in(pos, write, gup, tid, mm)
            if st != OK or m is None:
                return (st if st != OK else EFAULT), bytes(out), pos - addr
            off = pos % PAGE
            n = min(PAGE - off, end - pos)
            if data is not None:
                chunk = data[pos - addr:pos - addr + n]
                if n == PAGE:
                    m.set_content(pg, bytes(chunk))
                else:
                    page = bytearray(materialize(m.get_content(pg)))
                    page[off:off + n] = chunk
                    m.set_content(pg, bytes(page))
            else:
                out += materialize(m.get_content(pg))[off:off + n]
            pos += n
        return OK, bytes(out), length

    def start_access(self, addr: int, kind: AccessKind, length: int = 1,
                     data: bytes = b"") -> FakeAccess:
        return self.access_in(self.mm, self.new_tid, addr, kind, length, data)

    def access_in(self, mm: Mm, new_tid: Callable[[], int], addr: int, kind: AccessKind,
                  length: int, data: bytes) -> FakeAccess:
        """An access to ``mm`` by a thread whose tid ``new_tid()`` gives."""
        if kind is AccessKind.WRITE:
            data = bytes(data) if data else b"\x5a" * length
            length = len(data)
        if length < 0 or addr <= 0:
            raise ValueError(f"start_access: bad address 0x{addr:x} or length {length}")
        with self.lock:
            self.enter("start_access")
            tid = new_tid()
        acc = FakeAccess(tid)

        def run() -> None:
            acc.finish(self._do_access(addr, kind, length, data, tid, mm))

        threading.Thread(target=run, name=f"fake-vcpu-{tid}", daemon=True).start()
        return acc

    def touch(self, m_addr: int, write: bool, content: Content | None, tid: int,
              mm: Mm | None = None) -> int:
        """One whole-page access by a workload/verify thread; returns OK/SIGBUS/EFAULT/GONE."""
        with self.lock:
            st, m, pg = self.fault_in(m_addr, write, False, tid, mm)
            if st == OK and write and m is not None:
                m.set_content(pg, content)
            return st

    def read_page(self, addr: int, tid: int, mm: Mm | None = None
                  ) -> tuple[int, Content | None]:
        with self.lock:
            st, m, pg = self.fault_in(addr, False, False, tid, mm)
            if st != OK or m is None:
                return st, None
            return OK, m.get_content(pg)

    def start_workload(self, region: Region, spec: WorkloadSpec) -> FakeWorkload:
        mm, new_tid = self.owner_mm(region)
        return FakeWorkload(self, region, spec, mm, new_tid)

    def owner_mm(self, region: Region) -> tuple[Mm, Callable[[], int]]:
        """The address space ``region.owner`` names, and how its threads get tids."""
        if region.owner.is_self:
            return self.mm, self.new_tid
        raise ValueError(f"region at 0x{region.addr:x}: owner {region.owner} is not "
                         "a process of this fake kernel")


class FakeAccess:
    def __init__(self, tid: int) -> None:
        self._tid = tid
        self._ev = threading.Event()
        self._res = AccessResult(AccessStatus.PENDING)

    def finish(self, res: AccessResult) -> None:
        self._res = res
        self._ev.set()

    def done(self) -> bool:
        return self._ev.is_set()

    def wait(self, timeout: float) -> AccessResult:
        if self._ev.wait(timeout):
            return self._res
        return AccessResult(AccessStatus.PENDING)

    @property
    def tid(self) -> int:
        return self._tid

    def __repr__(self) -> str:
        return f"FakeAccess(tid={self._tid}, done={self.done()})"
