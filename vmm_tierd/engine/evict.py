"""The eviction path: victims → detach race-free → pages (in flight) → compress + store
(one LMDB txn, off the loop) → commit → only then drop the page from memory → pages.

Detach per memory type:
- anon: UFFDIO_MOVE the victims (one ioctl per contiguous run) into a staging area. The
  move is atomic: a guest write either lands before it (and is moved) or faults (MISSING)
  after it and is served from staging. Staging is read with read_unregistered right after
  the move, before the loop can serve any fault, so the copy is exactly what was moved.
  MOVE only works inside the address space that owns the uffd: anon memory of another
  process can't be evicted from here (attach refuses it).
- memfd, wp: the range is registered MINOR too; MADV_DONTNEED zaps the victims' PTEs (the
  data stays in the page cache) so any access blocks as a MINOR fault; read through the
  memfd with pread; commit; FALLOC_FL_PUNCH_HOLE. For another process the zap is a
  syscall injected into the VMM (see kernel/space.py), the rest runs from here.
- memfd, rwp: SET_MODE(sync) holds every access to a still-protected page; re-scan so
  only victims protected at that point go; pread; commit; punch; SET_MODE(async).
A fault on a page in flight takes it back (MOVE from staging / CONTINUE / un-protect):
the page is then marked reclaimed, is not punched, and its record is deleted.
"""

from __future__ import annotations

import errno
import time

import numpy as np
import trio

from ..kernel import uapi
from ..kernel.api import KernelError
from .pages import Batch
from .ranges import runs
from .region import RegionCtx
from .store import StoreError
from .uffd import STAGING_PAGES

PAUSE_MIN_S, PAUSE_MAX_S = 1.0, 60.0


class Evictor:
    def __init__(self, r: RegionCtx) -> None:
        self.r = r
        self.staging_dirty = False
        self.paused_until = 0.0  # a store that can't be written: no eviction till then
        self.pause_s = 0.0

    def paused(self) -> bool:
        """Eviction waits while the store can't be written (full disk, read-only or
        deleted directory, EIO): faults go on being served from what it holds."""
        if time.monotonic() < self.paused_until:
            return True
        h = self.r.store.health()
        if not h.writable:
            self._pause("store.put", errno.EROFS, f"the store can't be written: {h.reason}")
            return True
        return False

    def _pause(self, op: str, err: int, why: str) -> None:
        self.pause_s = min(PAUSE_MAX_S, max(PAUSE_MIN_S, self.pause_s * 2))
        self.paused_until = time.monotonic() + self.pause_s
        self.r.report.failed(op, err, f"{why}; eviction paused for {self.pause_s:g}s, "
                                      "faults are still served")

    async def evict(self, victims: np.ndarray, phases: dict[str, float]) -> int:
        r = self.r
        if self.paused():
            return 0
        victims = r.pages.evictable(np.unique(victims.astype(np.uint64)))
        total = 0
        for off in range(0, len(victims), STAGING_PAGES):
            chunk = victims[off:off + STAGING_PAGES]
            if r.memfd:
                total += await self._evict_memfd(chunk, phases)
            else:
                total += await self._evict_anon(chunk, phases)
        return total

    async def flush_deletes(self) -> None:
        r = self.r
        pages = r.pages.take_deletes()
        if len(pages):
            try:
                await trio.to_thread.run_sync(r.store.delete, r.rid, pages)
            except Exception as e:  # records of resident pages: harmless, reclaimed at reopen
                r.report.failed("store.delete", getattr(e, "errno", None) or errno.EIO,
                                f"deleting {len(pages)} stale records failed: {e}")

    def _put(self, pages: np.ndarray, data: bytes) -> np.ndarray:
        """Worker thread: one LMDB txn for the batch (zstandard and lmdb release the GIL)."""
        self.r.store.put_batch(self.r.rid, pages, data)
        words = np.frombuffer(data, dtype=np.uint64).reshape(len(pages), -1)
        return np.logical_not(words.any(axis=1))  # which pages were zero

    @staticmethod
    def _add(phases: dict[str, float], name: str, t0: float) -> float:
        t = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + t - t0
        return t

    async def _store(self, batch: Batch, data: bytes, phases: dict[str, float], t: float,
                     t_hold: float) -> tuple[np.ndarray | None, float]:
        """Compress + commit the batch off the loop; None if the store failed (the
        pages stay in flight for the caller to put back)."""
        self.r.report.held(t_hold)
        t = self._add(phases, "detach", t)
        try:
            zero = await trio.to_thread.run_sync(self._put, batch.pages, data)
        except StoreError as e:  # nothing of the batch was written: it stays resident
            self._pause("store.put", e.errno or errno.EIO,
                        f"storing {len(batch.pages)} pages in {e.path or 'the store'} "
                        f"failed ({e.errno_name}), they stay resident: {e}")
            return None, t
        except Exception as e:
            self.r.report.failed("store.put", getattr(e, "errno", None) or errno.EIO,
                                 f"storing {len(batch.pages)} pages failed, they stay "
                                 f"resident: {e}")
            return None, t
        self.pause_s = 0.0
        return zero, self._add(phases, "store", t)

    def _committed(self, batch: Batch, zero: np.ndarray) -> int:
        ev = self.r.pages.committed(batch, zero)
        if len(ev):
            self.r.report.obs.evicted(self.r.name, len(ev), len(ev) * self.r.uffd.ps)
        return len(ev)

    # ---- anon --------------------------------------------------------------------
    async def _evict_anon(self, victims: np.ndarray, phases: dict[str, float]) -> int:
        r = self.r
        u, tr = r.uffd, r.tracker
        assert u.staging is not None
        staging, ps = u.staging.addr, u.ps
        if self.staging_dirty and not self._clean_staging():
            return 0
        t = time.perf_counter()
        moved: list[np.ndarray] = []
        slot = 0
        if tr.holds:
            tr.hold()
        try:
            for first, count, _ in runs(victims):
                if tr.holds:
                    # Clear RWP on the victims first: the moved PTE must not carry a
                    # protection the staging range isn't registered for.
                    self._unprotect_run(first, count)
                off = 0
                while off < count:
                    n = count - off
                    try:
                        u.k.uffd_move(u.sfd, staging + slot * ps, u.addr(first + off), n * ps,
                                      uapi.UFFDIO_MOVE_MODE_DONTWAKE)
                        got, skip = n, 0
                    except KernelError as e:
                        got = e.done // ps
                        # A move that stopped partway is EAGAIN with the bytes done: go on
                        # from there. ENOENT: a hole (discarded by the guest, or never
                        # touched); EBUSY: a page shared with a fork()ed child. Either way
                        # that page stays where it is.
                        if e.errno == errno.EAGAIN and got:
                            skip = 0
                        elif e.errno not in (errno.ENOENT, errno.EBUSY):
                            r.report.error(e, f"UFFDIO_MOVE of pages [{first + off}, "
                                              f"{first + count})")
                            skip = n - got
                        else:
                            skip = 1
                    if got:
                        moved.append(np.arange(first + off, first + off + got, dtype=np.uint64))
                    slot += got
                    off += got + skip
        except KernelError as e:  # stop detaching; what was moved goes on below
            r.report.error(e, "detaching victims")
        finally:
            if tr.holds:
                self._release()
        if not slot:
            return 0
        batch = r.pages.detached(np.concatenate(moved), staging)
        try:
            # Staging pages are present and registered MISSING only: reading can't fault.
            data = u.k.read_unregistered(staging, slot * ps)
        except KernelError as e:
            r.report.error(e, "reading staging")
            self._rollback_anon(batch)
            self.staging_dirty = True
            return 0
        zero, t = await self._store(batch, data, phases, t, t)
        if zero is None:
            self._rollback_anon(batch)
            self.staging_dirty = True
            return 0
        n = self._committed(batch, zero)
        self.staging_dirty = True
        self._clean_staging()
        self._add(phases, "drop", t)
        self.r.report.held(t)
        return n

    def _release(self) -> None:
        try:
            self.r.tracker.release()
        except KernelError as e:
            self.r.report.error(e, "SET_MODE(async)")

    def _unprotect_run(self, first: int, count: int) -> None:
        u, tr = self.r.uffd, self.r.tracker
        try:
            tr.unprotect(u.addr(first), count * u.ps, False)
            return
        except KernelError:
            pass
        # Some page of the run was touched meanwhile (accessible again: CONTINUE refuses it
        # with EFAULT/EEXIST) or discarded (a hole): page by page, errors don't matter.
        for p in range(first, first + count):
            try:
                tr.unprotect(u.addr(p), u.ps, False)
            except KernelError:
                pass

    def _clean_staging(self) -> bool:
        """Drop what staging holds once no page in it is in flight (committed ones only)."""
        u = self.r.uffd
        assert u.staging is not None
        if self.r.pages.inflight:
            self._return_stuck()
            if self.r.pages.inflight:
                return False  # a page a rollback left there can't go back yet: keep it
        try:
            u.k.madvise(u.staging.addr, u.staging.length, uapi.MADV_DONTNEED)
        except KernelError as e:  # a populated slot would fail the next MOVE (EEXIST)
            self.r.report.error(e, "MADV_DONTNEED staging")
            return False
        self.staging_dirty = False
        return True

    def _rollback_anon(self, batch: Batch) -> None:
        """The store failed: move every page still in staging back where it was."""
        self._move_back(batch, [(p, i) for i, p in enumerate(batch.pages.tolist())
                                if not batch.reclaimed[i]])

    def _return_stuck(self) -> None:
        """Pages a rollback could not move back (EAGAIN while a guest discard's event was
        unread, ...) are still in flight: try again, now that the loop has run."""
        by_batch: dict[int, tuple[Batch, list[tuple[int, int]]]] = {}
        for p, (batch, i) in self.r.pages.inflight.items():
            if batch.staging:
                by_batch.setdefault(id(batch), (batch, []))[1].append((p, i))
        for batch, items in by_batch.values():
            self._move_back(batch, items)

    def _move_back(self, batch: Batch, items: list[tuple[int, int]]) -> None:
        r = self.r
        u = r.uffd
        back: list[int] = []
        for p, i in items:
            try:
                u.move_in(u.addr(p), batch.staging + i * u.ps)  # False: there already
            except KernelError as e:
                r.report.error(e, f"moving page {p} back from staging")
                continue  # still in staging: keep it in flight so a fault finds it
            back.append(p)
        r.pages.returned(batch, np.asarray(back, dtype=np.uint64))

    # ---- memfd -------------------------------------------------------------------
    async def _evict_memfd(self, victims: np.ndarray, phases: dict[str, float]) -> int:
        """The victims are in flight before anything else: from then on a fault on one
        takes it back (CONTINUE / un-protect) and marks it reclaimed, so it is never
        punched, whatever the scans and reads in worker threads saw of it. So the loop
        that serves faults is held only for bookkeeping and the punches."""
        r = self.r
        u, tr = r.uffd, r.tracker
        reg = u.region
        ps = u.ps
        t = t_hold = time.perf_counter()
        held = tr.holds
        if held:
            tr.hold()
        try:
            batch = r.pages.detached(victims, 0)
            if held:
                # Between the scan and hold() a victim may have been touched and
                # un-protected asynchronously (no fault, no reclaim): only pages still
                # protected now are safe to take.
                t_hold = r.report.held(t_hold)
                cold, _ = await trio.to_thread.run_sync(tr.scan)
                t_hold = time.perf_counter()
                keep = cold[batch.pages] & ~batch.reclaimed
                r.pages.returned(batch)
                if not keep.any():
                    return 0
                batch = r.pages.detached(batch.pages[keep], 0)
            rr = runs(batch.pages)
            t_hold = r.report.held(t_hold)
            if not held:
                try:
                    # memfd uffds don't take EVENT_REMOVE, so a local madvise can't block
                    # on us; in another process it is an injected syscall, which waits
                    # until the VMM's thread stops, and that may wait on a fault of ours:
                    # a worker thread, while the loop serves faults.
                    await trio.to_thread.run_sync(
                        r.space.discard, [(u.addr(first), count * ps) for first, count, _ in rr])
                except KernelError as e:
                    r.report.error(e, "MADV_DONTNEED of victims")
                    self._give_back(batch, held)  # some may be zapped: map them again
                    return 0
            try:
                # pread reads the page cache, never a mapping: it can't fault.
                data = await trio.to_thread.run_sync(self._pread, reg.fd, reg.offset, rr)
            except KernelError as e:
                r.report.error(e, "pread of victims")
                self._give_back(batch, held)
                return 0
            zero, t = await self._store(batch, data, phases, t, time.perf_counter())
            if zero is None:
                self._give_back(batch, held)
                return 0
            unpunched = self._punch(batch)
            n = self._committed(batch, zero)
            if len(unpunched) and not held:
                self._remap(unpunched)
            self._add(phases, "drop", t)
            r.report.held(t)
            return n
        finally:
            if held:
                self._release()

    def _pread(self, fd: int, offset: int, rr: list[tuple[int, int, int]]) -> bytes:
        ps, k = self.r.uffd.ps, self.r.uffd.k
        return b"".join(k.pread(fd, offset + first * ps, count * ps) for first, count, _ in rr)

    def _give_back(self, batch: Batch, held: bool) -> None:
        self.r.pages.returned(batch)
        if not held:
            self._remap(batch.pages[~batch.reclaimed])

    def _remap(self, pages: np.ndarray) -> None:
        """Map zapped victims that stay resident again: an unmapped page looks neither
        present nor written to PAGEMAP_SCAN, so it would never be considered again."""
        u = self.r.uffd
        for first, count, _ in runs(pages):
            for p in range(first, first + count):
                try:
                    u.k.uffd_continue(u.fd, u.addr(p), u.ps, 0)
                except KernelError as e:
                    if e.errno != errno.EEXIST:  # EEXIST: already mapped again by a fault
                        self.r.report.error(e, f"UFFDIO_CONTINUE page {p} after a failed "
                                               "eviction")

    def _punch(self, batch: Batch) -> np.ndarray:
        """After the commit: free the victims nobody took back in the meantime. Pages
        that could not be punched stay resident: they are marked reclaimed (their records
        are deleted) and returned."""
        u = self.r.uffd
        reg = u.region
        keep = batch.pages[~batch.reclaimed]
        failed: list[np.ndarray] = []
        for first, count, _ in runs(keep):
            try:
                u.k.punch_hole(reg.fd, reg.offset + first * u.ps, count * u.ps)
            except KernelError as e:
                self.r.report.error(e, f"PUNCH_HOLE pages [{first}, {first + count})")
                pages = np.arange(first, first + count, dtype=np.uint64)
                batch.reclaimed[np.searchsorted(batch.pages, pages)] = True
                failed.append(pages)
        return np.concatenate(failed) if failed else np.zeros(0, dtype=np.uint64)
