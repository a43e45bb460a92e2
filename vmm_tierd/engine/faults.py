"""The fault server: uffd readable → read many messages → for each fault, by engine state:
staging (move it back) / store (get → checksum → decompress → UFFDIO_COPY) / resolve.

Every fault is served by the page's engine state, not by the fault's flags: a message
read late may describe a page whose state changed since (e.g. an RWP fault on a victim
that has been moved to staging or committed and punched in the meantime).
"""

from __future__ import annotations

import errno
import logging
import time
from collections import deque

import trio

from ..kernel.api import KernelError, PageFault, RemoveEvent, UffdEvent, UnmapEvent
from .policy import GONE, OUT
from .region import RegionCore
from .store import RecordError

log = logging.getLogger("vmm_tierd.engine")

DONE, RETRY, AGAIN = 0, 1, 2
TRANSIENT = (errno.EAGAIN, errno.ENOMEM, errno.EINTR)
NOT_OUT = ~OUT & 0xFF
MAX_READ = 64
YIELD_EVERY = 256


class FaultServer:
    def __init__(self, core: RegionCore) -> None:
        self.core = core
        self.backlog: deque[tuple[PageFault, float]] = deque()
        self.reads = 0
        self.msgs = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        core = self.core
        # the region is mapped and registered before serving starts and never moves
        self.base, self.ps, self.npages = core.base, core.ps, core.npages
        self.st = core.policy.view  # the per-page state byte, scalar access
        task_status.started()
        tries = served = 0
        while True:
            if not self.backlog:
                await trio.lowlevel.wait_readable(core.fd)
            self.pull()
            while self.backlog:
                fault, t_read = self.backlog[0]
                res = self.serve_one(fault, t_read)
                if res != DONE:
                    tries += 1
                    core.flush_back()
                    if res == AGAIN:
                        # mmap_changing stays raised until the thread that posted the event
                        # has run on; give it a moment. Not exponential: it's short.
                        await trio.sleep(0.0002)
                    else:  # ENOMEM and friends: back off, keep the page.
                        await trio.sleep(min(0.0005 * (1 << min(tries, 8)), 0.1))
                    self.pull()
                    continue
                tries = 0
                self.backlog.popleft()
                served += 1
                if not served % YIELD_EVERY:  # a fault storm must not starve the cycle
                    core.flush_back()
                    await trio.lowlevel.checkpoint()
                if not self.backlog:
                    self.pull()
            core.flush_back()  # the policy hears before any other task runs
            core.store.release_reader()
            # no checkpoint here: wait_readable above always yields to the other tasks

    def pull(self) -> None:
        """Read every pending message; events are handled at once, faults queued."""
        k, fd = self.core.k, self.core.fd
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
        core = self.core
        if isinstance(ev, RemoveEvent):
            # MADV_DONTNEED/MADV_REMOVE. On shared memory DONTNEED only drops PTEs (the data
            # stays in the file) and the event doesn't say which advice it was, so only
            # private anonymous memory treats it as a discard. The engine's own DONTNEEDs
            # on memfd victims arrive here too and must not drop anything.
            if not core.memfd:
                core.forget_range(ev.start, ev.end)
        elif isinstance(ev, UnmapEvent):
            core.forget_range(ev.start, ev.end)
            if ev.start <= core.base and ev.end >= core.base + core.npages * core.ps:
                core.dead = True
        else:
            log.warning("region %s: unexpected uffd event %r ignored", core.name, ev)

    # ---- one fault -----------------------------------------------------------------
    def serve_one(self, f: PageFault, t_read: float) -> int:
        core = self.core
        ps = self.ps
        p = (f.address - self.base) // ps
        if not 0 <= p < self.npages:
            log.warning("region %s: fault at 0x%x outside the region", core.name, f.address)
            return DONE
        addr = self.base + p * ps
        try:
            if core.inflight:
                ent = core.inflight.get(p)
                if ent is not None:
                    return self._from_batch(p, addr, ent[0].staging, ent[1], t_read)
            if self.st[p] & GONE == GONE:
                return self._from_store(p, addr, t_read)
            if f.missing:
                if not core.memfd and core.policy.once(p):
                    return self._missing_after_eviction(p, addr, t_read)
                # Never evicted since last known empty: legitimately zero memory. On memfd
                # the file is the truth: only our punch (after a commit, EVICTED) makes a
                # hole there, so any other hole was punched by the guest and reads as zero.
                return self._fill(p, addr, None, "zero", t_read)
            assert core.tracker is not None
            core.tracker.resolve(addr)
            core.count_fault("rwp", t_read)
            return DONE
        except KernelError as e:
            return self._failed(e, p, addr, t_read)

    def _failed(self, e: KernelError, p: int, addr: int, t_read: float) -> int:
        core = self.core
        if e.errno == errno.EAGAIN:
            # A non-cooperative event (REMOVE/UNMAP) is pending: mfill refuses with EAGAIN
            # until it has been read. Drain and retry.
            self.pull()
            return AGAIN
        if e.errno in TRANSIENT:
            core.kerr(e, f"fault on page {p} (will retry)")
            return RETRY
        if e.errno == errno.EEXIST:
            # Raced: the page is already there (a second fault on it, or restore). Wake.
            core.k.uffd_wake(core.fd, addr, core.ps)
            core.count_fault("wake", t_read)
            return DONE
        if e.errno in (errno.ENOENT, errno.EFAULT) and not core.policy.gone(p):
            # Resolving a tracking fault on a page that is absent by now (moved to staging,
            # or punched): wake it; it re-faults as MISSING and is served by state.
            core.k.uffd_wake(core.fd, addr, core.ps)
            core.count_fault("wake", t_read)
            return DONE
        core.kerr(e, f"serving fault on page {p}")
        core.k.uffd_wake(core.fd, addr, core.ps)  # it re-faults; the page state is intact
        return DONE

    def _from_batch(self, p: int, addr: int, staging: int, i: int, t_read: float) -> int:
        """The page was detached but its record isn't committed: give it back as it is."""
        core = self.core
        batch, _ = core.inflight[p]
        if staging:
            try:
                core.k.uffd_move(core.fd, addr, staging + i * core.ps, core.ps, 0)
            except KernelError as e:
                if e.errno not in (errno.EEXIST, errno.ENOENT):
                    raise
                core.k.uffd_wake(core.fd, addr, core.ps)
        else:
            # memfd: the page is still in the page cache (punch comes after the commit).
            assert core.tracker is not None
            try:
                core.tracker.resolve(addr)
            except KernelError as e:
                if e.errno != errno.EEXIST:
                    raise
                core.k.uffd_wake(core.fd, addr, core.ps)
        batch.reclaimed[i] = True
        del core.inflight[p]
        core.count_fault("staging", t_read)
        return DONE

    def _from_store(self, p: int, addr: int, t_read: float) -> int:
        """The hot path: get → checksum → decompress (in get) → UFFDIO_COPY."""
        core = self.core
        try:
            data = core.store.get(core.rid, p)
        except RecordError as e:
            core.poison(p, str(e))
            core.count_fault("poison", t_read)
            return DONE
        except KeyError:
            core.poison(p, "record missing")
            core.count_fault("poison", t_read)
            return DONE
        self._fill(p, addr, data, "zero" if data is None else "store", t_read)
        self.st[p] &= NOT_OUT  # back in memory; the policy hears in bulk (flush_back)
        core.back.append(p)
        return DONE

    def _fill(self, p: int, addr: int, data: bytes | None, kind: str, t_read: float) -> int:
        """COPY (or zero-fill) the page; EEXIST means it raced in already: just wake."""
        core = self.core
        try:
            if data is None:
                core.zero_fill(addr, core.ps)
            else:
                core.k.uffd_copy(core.fd, addr, data, 0)
        except KernelError as e:
            if e.errno != errno.EEXIST:
                raise
            core.k.uffd_wake(core.fd, addr, core.ps)
            kind = "wake"
        core.count_fault(kind, t_read)
        return DONE

    def _missing_after_eviction(self, p: int, addr: int, t_read: float) -> int:
        """MISSING on a page the engine thinks is resident but which was evicted before.

        Normally a duplicate fault on a page already copied back: its content is in
        memory and the record is deleted. POISON then fails with EEXIST and we wake. If
        it does NOT fail, the page really was absent with no record: that is a lost page,
        and the guest gets a memory error rather than zeros.
        """
        core = self.core
        try:
            data = core.store.get(core.rid, p)
        except KeyError:
            data = b""
        except Exception:  # a corrupt leftover record: POISON-or-EEXIST below decides
            data = b""
        if data != b"":
            return self._fill(p, addr, data, "store" if data else "zero", t_read)
        core.poison(p, "absent after eviction, no record")
        core.count_fault("wake", t_read)
        return DONE
