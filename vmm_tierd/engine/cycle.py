"""The working-set cycle of one region: begin interval (rwp: RWPROTECT all, async) →
sleep(interval) → tracker scan → pages.observe (policy ageing) → pages.select (policy)
→ evict → pages → store; then record deletes and store compaction.

A reload (SIGHUP) wakes the interval sleep: the new interval counts from the start of
the current one, so shortening it from 1 h to 3 s takes effect at once.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable

import trio

from ..kernel.api import KernelError
from ..settings import TrackingSettings
from .evict import Evictor
from .region import RegionCtx

COMPACT_DEAD = 0.10  # compact once dead payload bytes exceed this share of the live ones
COMPACT_SEGMENTS = 8  # segments rewritten per cycle at most


class Cycle:
    def __init__(self, r: RegionCtx, evictor: Evictor,
                 after: Callable[[], object] | None = None) -> None:
        self.r = r
        self.evictor = evictor
        self.after = after  # debug: called at the end of every cycle (invariant checks)
        self.pending: TrackingSettings | None = None
        self.stopping = False
        self.done = trio.Event()
        self._wake = trio.Event()

    def update(self, tracking: TrackingSettings) -> None:
        """New tracking settings (trio thread): in force from now on."""
        self.pending = tracking
        self._wake.set()

    def stop(self) -> None:
        self.stopping = True
        self._wake.set()

    def _apply(self) -> None:
        if self.pending is not None:
            self.r.tracking = self.pending
            self.pending = None
            self.r.pages.set_tracking(self.r.tracking)

    async def _sleep_interval(self) -> float:
        """Until the interval (as it is now, after any reload) has passed since now;
        returns the seconds slept, or -1 when stopping."""
        start = trio.current_time()
        while not self.stopping:
            self._apply()
            with trio.move_on_at(start + self.r.tracking.interval_s):
                await self._wake.wait()
            if self._wake.is_set():
                self._wake = trio.Event()
                continue  # a reload or a stop: re-check, with the new interval
            return trio.current_time() - start
        return -1.0

    async def run(self) -> None:
        r = self.r
        rep = r.report
        tr = r.tracker
        try:
            while not self.stopping and not r.dead:
                self._apply()
                t0 = time.perf_counter()
                phases: dict[str, float] = {}
                try:  # RWPROTECT over the region: ~20 ms/GiB, off the loop
                    await trio.to_thread.run_sync(tr.begin_interval)
                except KernelError as e:
                    rep.error(e, "begin interval (protect)")
                phases["protect"] = time.perf_counter() - t0
                slept = await self._sleep_interval()
                if slept < 0:
                    break
                t = time.perf_counter()
                try:
                    await self.one(slept, phases)
                except KernelError as e:  # whatever wasn't committed stays resident
                    rep.error(e, "cycle")
                rep.c.cycles += 1
                rep.c.last_cycle_s = time.perf_counter() - t
                rep.obs.cycle(r.name, phases, rep.c.last_cycle_s + phases["protect"])
                if self.after is not None:
                    self.after()
        finally:
            self.done.set()

    async def one(self, interval: float, phases: dict[str, float]) -> None:
        r = self.r
        t = time.perf_counter()
        await self.evictor.flush_deletes()  # before any put: a re-evicted page's record lives
        phases["delete"] = time.perf_counter() - t
        t = time.perf_counter()
        # PAGEMAP_SCAN and the masks touch no page state: a worker thread, so a large
        # region's scans never hold the loop that serves faults
        cold, present = await trio.to_thread.run_sync(r.tracker.scan)
        phases["scan"] = time.perf_counter() - t
        t = time.perf_counter()
        r.pages.observe(cold, present)
        victims = r.pages.select(interval)
        phases["select"] = r.report.held(t) - t
        if len(victims):
            await self.evictor.evict(victims, phases)
        t = time.perf_counter()
        await self.compact()
        phases["compact"] = time.perf_counter() - t
        if r.pages.counts.evicted and not self.evictor.paused():
            await self.trim()

    async def trim(self) -> None:
        """LMDB's free pages back to the file system, so disk use follows the records."""
        try:
            await trio.to_thread.run_sync(self.r.store.trim)
        except Exception as e:  # only space: the next cycle tries again
            self.r.report.failed("store.trim", getattr(e, "errno", None) or errno.EIO,
                                 f"store trim failed: {e}")

    async def compact(self) -> int:
        """Deletes (restores, discards) leave dead bytes in the store's segments; once
        they pass COMPACT_DEAD of the live bytes, rewrite a bounded number of segments."""
        store = self.r.store
        st = store.stats()
        if st.dead_bytes <= COMPACT_DEAD * max(1, st.compressed_bytes):
            return 0
        try:
            return await trio.to_thread.run_sync(store.compact, COMPACT_SEGMENTS)
        except Exception as e:  # only space is lost; the next cycle tries again
            self.r.report.failed("store.compact", getattr(e, "errno", None) or errno.EIO,
                                 f"store compaction failed: {e}")
            return 0
