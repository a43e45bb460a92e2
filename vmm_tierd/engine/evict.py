"""Eviction: victims → detach race-free → compress + store (one LMDB txn, off the loop)
→ commit → only then drop the page from memory.

Detach per memory type:
- anon: UFFDIO_MOVE the victims (one ioctl per contiguous run) into a staging area. The
  move is atomic: a guest write either lands before it (and is moved) or faults (MISSING)
  after it and is served from staging. Staging is read with read_unregistered right after
  the move, before the loop can serve any fault, so the copy is exactly what was moved.
- memfd, wp: the range is registered MINOR too; MADV_DONTNEED zaps the victims' PTEs (the
  data stays in the page cache) so any access blocks as a MINOR fault; read through the
  memfd with pread; commit; FALLOC_FL_PUNCH_HOLE.
- memfd, rwp: SET_MODE(sync) holds every access to a still-protected page; re-scan so
  only victims protected at that point go; pread; commit; punch; SET_MODE(async).
A fault on a page in flight takes it back (MOVE from staging / CONTINUE / un-protect):
the page is then marked reclaimed, is not punched, and its record is deleted.
"""

from __future__ import annotations

import errno
import logging
import time

import numpy as np
import trio

from ..kernel import uapi
from ..kernel.api import KernelError
from .region import STAGING_PAGES, Batch, RegionCore
from .tracker import runs

log = logging.getLogger("vmm_tierd.engine")


class Evictor:
    def __init__(self, core: RegionCore) -> None:
        self.core = core
        self.staging_dirty = False

    async def evict(self, victims: np.ndarray, phases: dict[str, float]) -> int:
        core = self.core
        victims = np.sort(victims.astype(np.uint64))
        victims = victims[~core.policy.gone_mask(victims)]
        total = 0
        for off in range(0, len(victims), STAGING_PAGES):
            chunk = victims[off:off + STAGING_PAGES]
            if core.memfd:
                total += await self._evict_memfd(chunk, phases)
            else:
                total += await self._evict_anon(chunk, phases)
        return total

    async def flush_deletes(self) -> None:
        core = self.core
        pages = core.take_deletes()
        if len(pages):
            try:
                await trio.to_thread.run_sync(core.store.delete, core.rid, pages)
            except Exception as e:  # records of resident pages: harmless, reclaimed at reopen
                log.error("region %s: deleting %d stale records failed: %s",
                          core.name, len(pages), e)

    def _put(self, pages: np.ndarray, data: bytes) -> np.ndarray:
        """Worker thread: one LMDB txn for the batch (zstandard and lmdb release the GIL)."""
        self.core.store.put_batch(self.core.rid, pages, data)
        words = np.frombuffer(data, dtype=np.uint64).reshape(len(pages), -1)
        zero = np.logical_not(words.any(axis=1))  # which pages were zero
        return np.asarray(zero, dtype=bool)

    def _add(self, phases: dict[str, float], name: str, t0: float) -> float:
        t = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + t - t0
        return t

    # ---- anon --------------------------------------------------------------------
    async def _evict_anon(self, victims: np.ndarray, phases: dict[str, float]) -> int:
        core = self.core
        k, ps, tr = core.k, core.ps, core.tracker
        assert tr is not None and core.staging is not None
        staging = core.staging.addr
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
                        k.uffd_move(core.sfd, staging + slot * ps, core.base + (first + off) * ps,
                                    n * ps, uapi.UFFDIO_MOVE_MODE_DONTWAKE)
                        got, skip = n, 0
                    except KernelError as e:
                        got = e.done // ps
                        # ENOENT: a hole (discarded by the guest); EBUSY: a page shared with a
                        # fork()ed child. Either way that page stays where it is.
                        if e.errno not in (errno.ENOENT, errno.EBUSY):
                            core.kerr(e, f"UFFDIO_MOVE of pages [{first + off}, {first + count})")
                            skip = n - got
                        else:
                            skip = 1
                    if got:
                        moved.append(np.arange(first + off, first + off + got, dtype=np.uint64))
                    slot += got
                    off += got + skip
        except KernelError as e:  # stop detaching; what was moved goes on below
            core.kerr(e, "detaching victims")
        finally:
            if tr.holds:
                try:
                    tr.release()
                except KernelError as e:
                    core.kerr(e, "SET_MODE(async)")
        if not slot:
            return 0
        pages = np.concatenate(moved)
        batch = Batch(pages, staging, np.zeros(slot, dtype=bool))
        core.inflight.update(zip(pages.tolist(), ((batch, i) for i in range(slot)), strict=True))
        try:
            # Staging pages are present and registered MISSING only: reading can't fault.
            data = k.read_unregistered(staging, slot * ps)
        except KernelError as e:
            core.kerr(e, "reading staging")
            self._rollback_anon(batch)
            self.staging_dirty = True
            return 0
        t = self._add(phases, "detach", t)
        try:
            zero = await trio.to_thread.run_sync(self._put, pages, data)
        except Exception as e:
            self._store_failed(e, len(pages))
            self._rollback_anon(batch)
            self.staging_dirty = True
            return 0
        t = self._add(phases, "store", t)
        n = self._committed(batch, zero)
        self.staging_dirty = True
        self._clean_staging()
        self._add(phases, "drop", t)
        return n

    def _unprotect_run(self, first: int, count: int) -> None:
        core = self.core
        tr = core.tracker
        assert tr is not None
        try:
            tr.unprotect(core.base + first * core.ps, count * core.ps, False)
            return
        except KernelError:
            pass
        # Some page of the run was touched meanwhile (accessible again: CONTINUE refuses it
        # with EFAULT/EEXIST) or discarded (a hole): page by page, errors don't matter.
        for p in range(first, first + count):
            try:
                tr.unprotect(core.base + p * core.ps, core.ps, False)
            except KernelError:
                pass

    def _clean_staging(self) -> bool:
        """Drop what staging holds once no page in it is in flight (committed ones only)."""
        core = self.core
        assert core.staging is not None
        if core.inflight:
            return False  # a failed rollback left a page there: keep it for its fault
        try:
            core.k.madvise(core.staging.addr, core.staging.length, uapi.MADV_DONTNEED)
        except KernelError as e:  # a populated slot would fail the next MOVE (EEXIST)
            core.kerr(e, "MADV_DONTNEED staging")
            return False
        self.staging_dirty = False
        return True

    def _rollback_anon(self, batch: Batch) -> None:
        """The store failed: move every page still in staging back where it was."""
        core = self.core
        ps = core.ps
        for i, p in enumerate(batch.pages.tolist()):
            if batch.reclaimed[i]:
                continue
            try:
                core.k.uffd_move(core.fd, core.base + p * ps, batch.staging + i * ps, ps, 0)
            except KernelError as e:
                if e.errno != errno.EEXIST:
                    core.kerr(e, f"moving page {p} back from staging")
                    continue  # still in staging: keep it in flight so a fault finds it
            core.inflight.pop(p, None)

    # ---- memfd -------------------------------------------------------------------
    async def _evict_memfd(self, victims: np.ndarray, phases: dict[str, float]) -> int:
        core = self.core
        k, ps, tr = core.k, core.ps, core.tracker
        assert tr is not None and core.region is not None
        reg = core.region
        t = time.perf_counter()
        held = False
        if tr.holds:
            tr.hold()
            held = True
        try:
            if held:
                # Between the scan and hold() a victim may have been touched and
                # un-protected asynchronously; only pages still protected now are safe.
                victims = victims[tr.scan_cold()[victims]]
            if not len(victims):
                return 0
            rr = runs(victims)
            batch = Batch(victims, 0, np.zeros(len(victims), dtype=bool))
            core.inflight.update(zip(victims.tolist(), ((batch, i) for i in range(len(victims))),
                                     strict=True))
            if not held:
                try:
                    # memfd uffds don't take EVENT_REMOVE, so this can't block on us.
                    self._zap(rr)
                except KernelError as e:
                    core.kerr(e, "MADV_DONTNEED of victims")
                    self._drop_batch(batch)
                    return 0
            try:
                data = b"".join(k.pread(reg.fd, reg.offset + first * ps, count * ps)
                                for first, count, _ in rr)
            except KernelError as e:
                core.kerr(e, "pread of victims")
                self._drop_batch(batch)
                if not held:
                    self._remap(batch.pages[~batch.reclaimed])
                return 0
            t = self._add(phases, "detach", t)
            try:
                zero = await trio.to_thread.run_sync(self._put, victims, data)
            except Exception as e:
                self._store_failed(e, len(victims))
                self._drop_batch(batch)
                if not held:
                    self._remap(batch.pages[~batch.reclaimed])
                return 0
            t = self._add(phases, "store", t)
            unpunched = self._punch(batch)
            if not held and len(unpunched):
                self._remap(unpunched)
            n = self._committed(batch, zero)
            self._add(phases, "drop", t)
            return n
        finally:
            if held:
                try:
                    tr.release()
                except KernelError as e:
                    core.kerr(e, "SET_MODE(async)")

    def _zap(self, rr: list[tuple[int, int, int]]) -> None:
        core = self.core
        for first, count, _ in rr:
            core.k.madvise(core.base + first * core.ps, count * core.ps, uapi.MADV_DONTNEED)

    def _remap(self, pages: np.ndarray) -> None:
        """Map zapped victims that stay resident again: an unmapped page looks neither
        present nor written to PAGEMAP_SCAN, so it would never be considered again."""
        core = self.core
        for first, count, _ in runs(pages):
            for p in range(first, first + count):
                try:
                    core.k.uffd_continue(core.fd, core.base + p * core.ps, core.ps, 0)
                except KernelError as e:
                    if e.errno != errno.EEXIST:  # EEXIST: already mapped again by a fault
                        core.kerr(e, f"UFFDIO_CONTINUE page {p} after a failed eviction")

    def _punch(self, batch: Batch) -> np.ndarray:
        """After the commit: free the victims nobody took back in the meantime.
        Returns the pages that could not be punched (they stay resident)."""
        core = self.core
        reg = core.region
        assert reg is not None
        ps = core.ps
        keep = batch.pages[~batch.reclaimed]
        failed: list[np.ndarray] = []
        for first, count, _ in runs(keep):
            try:
                core.k.punch_hole(reg.fd, reg.offset + first * ps, count * ps)
            except KernelError as e:
                # Not freed: the pages stay resident (their records get deleted).
                core.kerr(e, f"PUNCH_HOLE pages [{first}, {first + count})")
                pages = np.arange(first, first + count, dtype=np.uint64)
                batch.reclaimed[np.searchsorted(batch.pages, pages)] = True
                failed.append(pages)
        return np.concatenate(failed) if failed else np.zeros(0, dtype=np.uint64)

    def _drop_batch(self, batch: Batch) -> None:
        for p in batch.pages.tolist():
            self.core.inflight.pop(p, None)

    # ---- common ------------------------------------------------------------------
    def _store_failed(self, e: BaseException, n: int) -> None:
        core = self.core
        core.c.errors += 1
        log.error("region %s: storing %d pages failed, they stay resident: %s", core.name, n, e)
        core.obs.error("store.put", getattr(e, "errno", None) or errno.EIO)

    def _committed(self, batch: Batch, zero: np.ndarray) -> int:
        """The pages not reclaimed during the store are now gone from memory."""
        core = self.core
        self._drop_batch(batch)
        keep = ~batch.reclaimed
        ev = batch.pages[keep]
        core.policy.mark_evicted(ev)  # sets GONE: faults on them are served from the store
        z = ev[zero[keep]]
        if len(z):
            core.policy.mark_zero(z)
        core.pending_delete.extend(batch.pages[batch.reclaimed].tolist())
        core.c.evictions += len(ev)
        if len(ev):
            core.obs.evicted(core.name, len(ev), len(ev) * core.ps)
        return len(ev)
