"""Guest-side accesses on the fake kernel: the fault logic of mm/memory.c as it concerns
userfaultfd, simulated vCPU threads, and write-stamp workloads.

A simulated access walks exactly where a real one would block: it queues a PageFault,
makes the uffd readable and waits until a COPY/ZEROPAGE/CONTINUE/MOVE/WAKE/RWPROTECT-clear/
SET_MODE-to-async/UNREGISTER/close wakes it, then retries the whole fault.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from . import uapi
from .api import (
    AccessKind,
    AccessResult,
    AccessStatus,
    PageFault,
    Pattern,
    Region,
    VerifyReport,
    WorkloadSpec,
    WorkloadStats,
)
from .fake_state import (
    F_POISON,
    F_PRESENT,
    F_PROTNONE,
    F_PT,
    F_RWP,
    F_WP,
    F_ZERO,
    MODE_MINOR,
    MODE_MISSING,
    MODE_RWP,
    MODE_WP,
    PAGE,
    Content,
    Mapping,
    Uffd,
    Waiter,
    materialize,
)
from .fake_uffd import UffdMixin
from .stamps import workload_layout

OK, SIGBUS, EFAULT = 0, 1, 2
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

    def fault_in(self, addr: int, write: bool, gup: bool, tid: int
                 ) -> tuple[int, Mapping | None, int]:
        """Make the page at ``addr`` accessible, blocking like handle_userfault().
        Caller holds ``self.lock``; the wait releases it."""
        while True:
            m = self.find(addr)
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
            u.sync_readiness()
            while not waiter.woken and not u.released:
                self.cv.wait()

    def _do_access(self, addr: int, kind: AccessKind, length: int, data: bytes,
                   tid: int) -> AccessResult:
        write = kind is AccessKind.WRITE
        gup = kind is AccessKind.GUP_READ
        out = bytearray()
        pos = addr
        end = addr + length
        with self.lock:
            while pos < end:
                st, m, pg = self.fault_in(pos, write, gup, tid)
                if st == SIGBUS:
                    return AccessResult(AccessStatus.SIGBUS, bytes(out))
                if st == EFAULT or m is None:
                    return AccessResult(AccessStatus.ERROR, bytes(out), 14)  # EFAULT
                off = pos % PAGE
                n = min(PAGE - off, end - pos)
                if write:
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
        return AccessResult(AccessStatus.OK, bytes(out))

    def start_access(self, addr: int, kind: AccessKind, length: int = 1,
                     data: bytes = b"") -> FakeAccess:
        if kind is AccessKind.WRITE:
            data = bytes(data) if data else b"\x5a" * length
            length = len(data)
        if length < 0 or addr <= 0:
            raise ValueError(f"start_access: bad address 0x{addr:x} or length {length}")
        with self.lock:
            self.enter("start_access")
            tid = self.new_tid()
        acc = FakeAccess(tid)

        def run() -> None:
            acc.finish(self._do_access(addr, kind, length, data, tid))

        threading.Thread(target=run, name=f"fake-vcpu-{tid}", daemon=True).start()
        return acc

    def touch(self, m_addr: int, write: bool, content: Content | None, tid: int) -> int:
        """One whole-page access by a workload/verify thread; returns OK/SIGBUS/EFAULT."""
        with self.lock:
            st, m, pg = self.fault_in(m_addr, write, False, tid)
            if st == OK and write and m is not None:
                m.set_content(pg, content)
            return st

    def read_page(self, addr: int, tid: int) -> tuple[int, Content | None]:
        with self.lock:
            st, m, pg = self.fault_in(addr, False, False, tid)
            if st != OK or m is None:
                return st, None
            return OK, m.get_content(pg)

    def start_workload(self, region: Region, spec: WorkloadSpec) -> FakeWorkload:
        return FakeWorkload(self, region, spec)


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


class FakeWorkload:
    """``spec.threads`` simulated vCPUs stamping one region. Page ``p`` is written only by
    thread ``p % threads``, so each page's versions are totally ordered."""

    def __init__(self, kernel: GuestMixin, region: Region, spec: WorkloadSpec) -> None:
        if region.length % PAGE or region.length <= 0:
            raise ValueError(f"workload: region length {region.length} is not whole pages")
        if spec.threads < 1:
            raise ValueError(f"workload: threads must be >= 1, not {spec.threads}")
        self.k = kernel
        self.region = region
        self.spec = spec
        self.npages = region.length // PAGE
        self.zero_mask, self.perm, self.cdf = workload_layout(self.npages, spec)
        self.last = np.zeros(self.npages, dtype=np.uint64)
        self._stats = WorkloadStats()
        self._slock = threading.Lock()
        self._stop = threading.Event()
        self._touched = 0
        self._t0 = time.monotonic()
        self._threads = [threading.Thread(target=self._run, args=(t,), daemon=True,
                                          name=f"fake-workload-{t}")
                         for t in range(spec.threads)]
        for th in self._threads:
            th.start()

    def _access(self, p: int, write: bool, tid: int) -> None:
        addr = self.region.addr + p * PAGE
        if write:
            v = int(self.last[p]) + 1
            st = self.k.touch(addr, True, (p, v), tid)
            if st == OK:
                self.last[p] = v
        else:
            st = self.k.touch(addr, False, None, tid)
        with self._slock:
            if st == SIGBUS:
                self._stats.sigbus += 1
            elif st != OK:
                pass  # unmapped under us (kernel closed): not an access
            elif write:
                self._stats.writes += 1
            else:
                self._stats.reads += 1

    def _picks(self, rng: np.random.Generator, t: int, cursor: int) -> np.ndarray:
        n, spec = self.npages, self.spec
        hot = max(1, int(spec.hot_fraction * n))
        size = 256
        if spec.pattern is Pattern.ZIPF:
            assert self.perm is not None and self.cdf is not None
            ranks = np.minimum(np.searchsorted(self.cdf, rng.random(size)), n - 1)
            pages = self.perm[ranks].astype(np.int64)
        elif spec.pattern is Pattern.SEQUENTIAL:
            pages = (cursor + np.arange(size, dtype=np.int64) * spec.threads) % n
        elif spec.pattern is Pattern.SHIFTING:
            shift = int((time.monotonic() - self._t0) / max(spec.shift_period_s, 1e-3))
            pages = (shift * hot + rng.integers(0, hot, size)) % n
        else:
            pages = rng.integers(0, hot, size)
        pages = pages - pages % spec.threads + t
        return np.where(pages >= n, pages - spec.threads, pages)

    def _run(self, t: int) -> None:
        spec = self.spec
        tid = 0
        with self.k.lock:
            tid = self.k.new_tid()
        rng = np.random.default_rng([spec.seed, t])
        if spec.touch_all_first:
            for p in range(t, self.npages, spec.threads):
                if self._stop.is_set():
                    break
                if not self.zero_mask[p]:
                    self._access(p, True, tid)
        with self._slock:
            self._touched += 1
        cursor = t
        delay = 1.0 / spec.ops_per_sec if spec.ops_per_sec > 0 else 0.0
        while not self._stop.is_set():
            pages = self._picks(rng, t, cursor)
            cursor = int(pages[-1]) + spec.threads
            writes = rng.random(len(pages)) < spec.write_fraction
            for p, w in zip(pages.tolist(), writes.tolist(), strict=True):
                if self._stop.is_set() or p < 0:
                    break
                self._access(p, bool(w) and not self.zero_mask[p], tid)
                if delay:
                    time.sleep(delay)
            time.sleep(0)  # let the daemon's threads have the GIL

    def stats(self) -> WorkloadStats:
        with self._slock:
            s = self._stats
            return WorkloadStats(reads=s.reads, writes=s.writes, sigbus=s.sigbus)

    def touched(self) -> bool:
        with self._slock:
            return self._touched == self.spec.threads

    def running(self) -> int:
        return sum(th.is_alive() for th in self._threads)

    def stop(self) -> WorkloadStats:
        """Stop and join (a thread blocked on a fault needs the fault served first)."""
        self._stop.set()
        for th in self._threads:
            while th.is_alive():
                th.join(0.5)
        return self.stats()

    def versions(self) -> np.ndarray:
        return self.last.copy()

    def set_version_for_test(self, page: int, version: int) -> None:
        if not 0 <= page < self.npages:
            raise IndexError(f"page {page} outside the workload's {self.npages} pages")
        self.last[page] = version

    def verify(self) -> VerifyReport:
        """Read every page (faulting evicted ones back in) and check its stamp."""
        rep = VerifyReport(pages=self.npages)
        with self.k.lock:
            tid = self.k.new_tid()
        for p in range(self.npages):
            st, c = self.k.read_page(self.region.addr + p * PAGE, tid)
            want = int(self.last[p])
            bad = False
            if st != OK:
                rep.poisoned_pages += 1
                bad = True
            else:
                idx, ver = _stamp_of(c)
                if want == 0:
                    bad = c is not None and any(materialize(c))
                    rep.corrupt_pages += bad
                elif idx == -1 and ver == 0 and not any(materialize(c)):
                    rep.lost_writes += 1
                    bad = True
                elif idx != p or ver > want or (isinstance(c, bytes)
                                                and c != materialize((p, ver))):
                    rep.corrupt_pages += 1
                    bad = True
                elif ver < want:
                    rep.lost_writes += 1
                    bad = True
            if bad and len(rep.bad) < 16:
                rep.bad.append(p)
        return rep


def _stamp_of(c: Content | None) -> tuple[int, int]:
    if c is None:
        return -1, 0
    if isinstance(c, tuple):
        return c
    head = np.frombuffer(c[:16], dtype="<u8")
    return int(head[0]) - 1, int(head[1])
