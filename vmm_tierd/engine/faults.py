"""The fault path: uffd readable → read many messages → serve each fault by the page's
state in the page table (pages.py) → store (get → checksum → decompress) → UFFDIO_COPY.

Every fault is served by the page's engine state, not by the fault's flags: a message
read late may describe a page whose state changed since (e.g. an RWP fault on a victim
that has been moved to staging or committed and punched in the meantime).
"""

from __future__ import annotations

import errno
import heapq
import logging
import time
from collections import deque

import trio

from ..kernel.api import KernelError, PageFault, RemoveEvent, UffdEvent, UnmapEvent
from .pagebits import EVICTED, KIND, POISONED
from .region import RegionCtx
from .store import RecordError

log = logging.getLogger("vmm_tierd.engine")

DONE, RETRY, AGAIN = 0, 1, 2
TRANSIENT = (errno.EAGAIN, errno.ENOMEM, errno.EINTR)
MAX_READ = 64
YIELD_EVERY = 256
FLUSH_AT = 4096  # pages served back before the fault server flushes them itself


class FaultServer:
    def __init__(self, r: RegionCtx) -> None:
        self.r = r
        self.backlog: deque[tuple[PageFault, float]] = deque()
        # Faults whose service failed (ENOMEM, a POISON that fails...): retried when due,
        # with a backoff per page, while the others are served.
        self.later: list[tuple[float, int, PageFault, float]] = []
        self.tries: dict[int, int] = {}
        self.waiting: set[int] = set()  # addresses in ``later``
        # fault-around runs [lo, hi) owed by this burst's faults, filled once every fault
        # of the burst has its own page (fill_around)
        self.around: list[tuple[int, int]] = []
        self.reads = 0
        self.msgs = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        r = self.r
        # the region is registered before serving starts and never moves
        self.base, self.ps, self.npages = r.uffd.base, r.uffd.ps, r.npages
        self.fd, self.copy = r.uffd.fd, r.uffd.k.uffd_copy
        self.st = r.pages.view  # the per-page state byte, scalar access
        task_status.started()
        served = 0
        while True:
            if not self.backlog:
                with trio.move_on_at(self.later[0][0] if self.later else float("inf")):
                    await trio.lowlevel.wait_readable(r.uffd.fd)
            self.pull()
            self.due()
            while self.backlog:
                fault, t_read = self.backlog[0]
                res = self.serve_one(fault, t_read)
                if res == AGAIN:
                    # mmap_changing stays raised until the thread that posted the event
                    # has run on; give it a moment. Not exponential: it's short.
                    self.flush()
                    await trio.sleep(0.0002)
                    self.pull()
                    continue
                self.backlog.popleft()
                if res == RETRY:  # ENOMEM and friends: back off, keep the page
                    self.defer(fault, t_read)
                    continue
                if self.tries:
                    self.tries.pop(fault.address, None)
                served += 1
                if not served % YIELD_EVERY:  # a fault storm must not starve the cycle
                    self.fill_around()
                    self.flush()
                    await trio.lowlevel.checkpoint()
                    self.pull()
            self.fill_around()
            # No read here: wait_readable returns at once if more faults came meanwhile,
            # and a read that finds nothing (every single-fault burst) costs a syscall.
            # No flush either, unless many pages came back: the page table flushes itself
            # before anything reads what a flush changes (observe, take_deletes, discard,
            # restore), and BACK pages are never victims meanwhile.
            if len(r.pages.back) >= FLUSH_AT:
                self.flush()
            r.store.release_reader()
            # no checkpoint here: wait_readable above always yields to the other tasks

    def defer(self, fault: PageFault, t_read: float) -> None:
        """Retry ``fault`` later, 1 ms doubling up to 100 ms per page. A second fault on
        a page already waiting is not queued twice: whatever resolves the page wakes
        every thread waiting on it."""
        a = fault.address
        if a in self.waiting:
            return
        n = self.tries[a] = self.tries.get(a, 0) + 1
        due = trio.current_time() + min(0.0005 * (1 << min(n, 8)), 0.1)
        heapq.heappush(self.later, (due, id(fault), fault, t_read))
        self.waiting.add(a)

    def due(self) -> None:
        now = trio.current_time()
        while self.later and self.later[0][0] <= now:
            _, _, fault, t_read = heapq.heappop(self.later)
            self.waiting.discard(fault.address)
            self.backlog.append((fault, t_read))

    def flush(self) -> None:
        n = self.r.pages.flush()
        if n:
            self.r.report.obs.refault(self.r.name, n)

    def pull(self) -> None:
        """Read every pending message; events are handled at once, faults queued."""
        k, fd = self.r.uffd.k, self.r.uffd.fd
        while True:
            msgs = k.uffd_read(fd, MAX_READ)
            if not msgs:
                return
            self.reads += 1
            self.msgs += len(msgs)
            now = time.perf_counter()
            for m in msgs:
                if isinstance(m, PageFault):
                    self.backlog.append((m, now))
                else:
                    self.event(m)
            if len(msgs) < MAX_READ:
                return

    def event(self, ev: UffdEvent) -> None:
        r = self.r
        if isinstance(ev, RemoveEvent):
            # MADV_DONTNEED/MADV_REMOVE. On shared memory DONTNEED only drops PTEs (the data
            # stays in the file) and the event doesn't say which advice it was, so only
            # private anonymous memory treats it as a discard (memfd uffds don't ask for
            # EVENT_REMOVE at all).
            if not r.memfd:
                self.discard(ev.start, ev.end)
        elif isinstance(ev, UnmapEvent):
            self.discard(ev.start, ev.end)
            if ev.start <= self.base and ev.end >= self.base + self.npages * self.ps:
                r.dead = True
        else:
            r.report.log.warning(f"{r.name}:event", "region %s: unexpected uffd event %r "
                                 "ignored", r.name, ev)

    def discard(self, start: int, end: int) -> None:
        """The guest discarded [start, end): absent now means zero."""
        first = max(0, (start - self.base) // self.ps)
        last = min(self.npages, (end - self.base + self.ps - 1) // self.ps)
        if first < last:
            n = self.r.pages.discarded(first, last)
            self.r.report.obs.discarded(self.r.name, last - first, n)

    # ---- one fault -----------------------------------------------------------------
    def serve_one(self, f: PageFault, t_read: float) -> int:
        r = self.r
        ps = self.ps
        p = (f.address - self.base) // ps
        if not 0 <= p < self.npages:
            r.report.log.warning(f"{r.name}:outside", "region %s: fault at 0x%x outside "
                                 "the region", r.name, f.address)
            return DONE
        addr = self.base + p * ps
        try:
            if r.pages.inflight and p in r.pages.inflight:
                return self._from_batch(p, addr, t_read)
            kind = self.st[p] & KIND
            if kind == EVICTED:
                return self._from_store(p, addr, t_read)
            if kind == POISONED:
                return self._poison(p, addr, "poisoned earlier", t_read)
            if f.missing:
                if not r.memfd and r.pages.once(p):  # BACK pages count as once
                    return self._missing_after_eviction(p, addr, t_read)
                # Never evicted since last known empty: legitimately zero memory. On memfd
                # the file is the truth: only our punch (after a commit, EVICTED) makes a
                # hole there, so any other hole was punched by the guest and reads as zero.
                if r.uffd.zero(addr):
                    r.pages.zero_filled()
                    r.report.fault("zero", t_read)
                else:
                    r.report.fault("wake", t_read)
                return DONE
            # a tracking fault on a resident page: EEXIST (CONTINUE of a page a racing
            # fault mapped already) only means wake
            r.uffd.resolve(lambda: r.tracker.resolve(addr), addr)
            r.report.fault("rwp", t_read)
            return DONE
        except KernelError as e:
            return self._failed(e, p, addr, t_read)

    def _failed(self, e: KernelError, p: int, addr: int, t_read: float) -> int:
        r = self.r
        if e.errno == errno.EAGAIN:
            # A non-cooperative event (REMOVE/UNMAP) is pending: mfill refuses with EAGAIN
            # until it has been read. Drain and retry.
            self.pull()
            return AGAIN
        if e.errno in TRANSIENT or self.st[p] & KIND == POISONED:
            # transient, or a POISON that failed: never wake a poisoned page's thread
            # (it would re-fault into the same state); keep trying with a backoff
            r.report.error(e, f"fault on page {p} (will retry)")
            return RETRY
        if e.errno in (errno.ENOENT, errno.EFAULT) and self.st[p] & KIND != EVICTED:
            # Resolving a tracking fault on a page that is absent by now (moved to staging,
            # or punched): wake it; it re-faults as MISSING and is served by state.
            r.uffd.wake(addr)
            r.report.fault("wake", t_read)
            return DONE
        r.report.error(e, f"serving fault on page {p}")
        r.uffd.wake(addr)  # it re-faults; the page state is intact
        return DONE

    def _from_batch(self, p: int, addr: int, t_read: float) -> int:
        """The page was detached but its record isn't committed: give it back as it is."""
        r = self.r
        batch, i = r.pages.inflight[p]
        if batch.staging:
            try:
                r.uffd.move_in(addr, batch.staging + i * self.ps)  # there already: woken
            except KernelError as e:
                if e.errno != errno.ENOENT:
                    raise
                # Its slot is empty: nothing empties a slot in flight, so its content is
                # gone. A memory error, never zeros.
                r.pages.reclaimed(p)
                return self._poison(p, addr, f"its copy is gone from staging slot {i}",
                                    t_read)
        else:
            # memfd: the page is still in the page cache (punch comes after the commit).
            r.uffd.resolve(lambda: r.tracker.resolve(addr), addr)
        r.pages.reclaimed(p)
        r.report.fault("staging", t_read)
        return DONE

    def _from_store(self, p: int, addr: int, t_read: float) -> int:
        """The hot path: get → checksum → decompress (in get) → UFFDIO_COPY."""
        r = self.r
        pages = r.pages
        n = pages.params.prefetch
        if n > 1:
            lo, hi = pages.evicted_with(p, n)
            if hi - lo > 1:
                self.around.append((lo, hi))
        try:
            data = r.store.get(r.rid, p)
        except RecordError as e:
            return self._poison(p, addr, str(e), t_read)
        except KeyError:
            return self._poison(p, addr, "record missing", t_read)
        kind = "store"
        if data is None:
            kind = "zero" if r.uffd.zero(addr) else "wake"
        else:
            try:  # uffd.copy, inlined: this is the one call per fault that matters
                self.copy(self.fd, addr, data, 0)
            except KernelError as e:
                if e.errno != errno.EEXIST:
                    raise
                r.uffd.wake(addr)
                kind = "wake"
        pages.served_back(p)  # back in memory; the policy hears in bulk (flush)
        r.report.fault(kind, t_read)
        return DONE

    def fill_around(self) -> None:
        """Fault-around: the pages evicted in the same cycle as a page that faulted,
        copied back in one COPY per run, after every fault of the burst had its own page
        (a faulting thread waits for its page only, never for its neighbours' records).
        Only pages still EVICTED now: a fault, a discard or an eviction may have changed
        some since. A record that can't be read cuts the run; that page stays evicted and
        is poisoned when it faults itself."""
        runs, self.around = self.around, []
        st = self.st
        for lo, hi in runs:
            q = lo
            while q < hi:
                while q < hi and st[q] & KIND != EVICTED:
                    q += 1
                s = q
                while q < hi and st[q] & KIND == EVICTED:
                    q += 1
                if s < q and not self._fill(s, q):
                    break

    def _fill(self, lo: int, hi: int) -> bool:
        """Copy back the EVICTED pages [lo, hi); False if the kernel refused (the rest of
        the run stays evicted: each page is served when it faults)."""
        r = self.r
        zeros = bytes(self.ps)
        got: list[bytes] = []
        for d in r.store.get_many(r.rid, range(lo, hi)):
            if isinstance(d, (KeyError, RecordError)):
                break
            got.append(zeros if d is None else d)
        if not got:
            return True
        done = len(got)
        ok = True
        try:
            self.copy(self.fd, self.base + lo * self.ps, b"".join(got), 0)
        except KernelError as e:
            # EAGAIN (an event is pending) after the bytes done, or EEXIST: what was
            # copied is back, the rest stays evicted
            done, ok = e.done // self.ps, False
        for q in range(lo, lo + done):
            r.pages.served_back(q)
        if done:
            r.report.obs.prefetched(r.name, done)
        return ok

    def _poison(self, p: int, addr: int, why: str, t_read: float) -> int:
        """The page's content can't be recovered: the guest gets a memory error, not
        zeros, now and on every later fault until it discards the page."""
        r = self.r
        if r.pages.poisoned(p):
            r.report.log.error(f"{r.name}:poison", "region %s: page %d (addr 0x%x) "
                               "unrecoverable (%s): poisoned", r.name, p, addr, why)
            r.report.obs.poisoned(r.name, 1)
        r.uffd.poison(addr)
        r.report.fault("poison", t_read)
        return DONE

    def _missing_after_eviction(self, p: int, addr: int, t_read: float) -> int:
        """MISSING on a page the engine thinks is resident but which was evicted before.

        Normally a duplicate fault on a page already copied back: its content is in
        memory. The record, if still there (deleted in bulk), is copied again (EEXIST:
        wake). With no record, POISON decides: it fails with EEXIST if the page is
        present (wake); if it does NOT fail, the page really was absent with no record:
        a lost page, and the guest gets a memory error rather than zeros.
        """
        r = self.r
        try:
            data = r.store.get(r.rid, p)
        except (KeyError, RecordError):
            data = b""
        if data != b"":
            done = r.uffd.zero(addr) if data is None else r.uffd.copy(addr, data)
            r.report.fault(("zero" if data is None else "store") if done else "wake", t_read)
            return DONE
        if r.uffd.poison(addr):
            r.pages.poisoned(p)
            r.report.log.error(f"{r.name}:lost", "region %s: page %d (addr 0x%x) "
                               "unrecoverable (absent after eviction, no record): poisoned",
                               r.name, p, addr)
            r.report.obs.poisoned(r.name, 1)
            r.report.fault("poison", t_read)
        else:
            r.report.fault("wake", t_read)
        return DONE
