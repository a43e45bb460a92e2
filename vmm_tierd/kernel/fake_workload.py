"""Write-stamp workloads on the fake kernel: simulated vCPU threads touching a region of
one address space (this process's, or a simulated VMM's)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from .api import Pattern, Region, VerifyReport, WorkloadSpec, WorkloadStats
from .fake_state import F_PRESENT, OK, PAGE, SIGBUS, Content, Mm, materialize
from .stamps import workload_layout

if TYPE_CHECKING:
    from .fake_guest import GuestMixin


class FakeWorkload:
    """``spec.threads`` simulated vCPUs stamping one region. Page ``p`` is written only by
    thread ``p % threads``, so each page's versions are totally ordered."""

    def __init__(self, kernel: GuestMixin, region: Region, spec: WorkloadSpec,
                 mm: Mm | None = None, new_tid: Callable[[], int] | None = None) -> None:
        if region.length % PAGE or region.length <= 0:
            raise ValueError(f"workload: region length {region.length} is not whole pages")
        if spec.threads < 1:
            raise ValueError(f"workload: threads must be >= 1, not {spec.threads}")
        self.k = kernel
        self.mm = kernel.mm if mm is None else mm  # whose address space it runs in
        self.new_tid = kernel.new_tid if new_tid is None else new_tid
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
            st = self.k.touch(addr, True, (p, v), tid, self.mm)
            if st == OK:
                self.last[p] = v
        else:
            st = self.k.touch(addr, False, None, tid, self.mm)
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

    def _absent(self) -> np.ndarray:
        """Pages of the region not mapped now, as mincore() tells a guest (memfd: not in
        the page cache)."""
        with self.k.lock:
            m = self.mm.find(self.region.addr)
            if m is None:
                return np.zeros(0, dtype=np.int64)
            lo = (self.region.addr - m.addr) // PAGE
            if m.file is None:
                there = (m.flags[lo:lo + self.npages] & F_PRESENT) != 0
            else:
                f0 = m.fpgoff + lo
                there = np.asarray(m.file.cached[f0:f0 + self.npages], dtype=bool)
            return np.flatnonzero(~there)

    def _hammer(self, rng: np.random.Generator, t: int) -> tuple[np.ndarray, np.ndarray]:
        """HAMMER (as native/guest_workload.c): writes on absent pages this thread owns,
        some reads of other absent pages, hot-set accesses, and now and then a burst of
        consecutive reads."""
        n, spec = self.npages, self.spec
        absent = self._absent()
        if len(absent):
            absent = np.roll(absent, -int(rng.integers(0, len(absent))))
        mine = absent[(absent % spec.threads == t) & (self.zero_mask[absent] == 0)][:64]
        others = absent[absent % spec.threads != t][:16]
        hot = max(1, int(spec.hot_fraction * n))
        hp = rng.integers(0, hot, 64)
        hw = rng.random(64) < spec.write_fraction
        hp = np.where(hw, hp - hp % spec.threads + t, hp)
        hp = np.where(hp >= n, hp - spec.threads, hp)
        hw &= hp >= 0
        parts = [mine, others, hp]
        writes = [np.ones(len(mine), dtype=bool), np.zeros(len(others), dtype=bool), hw]
        if rng.integers(0, 8) == 0:
            burst = (int(rng.integers(0, n)) + np.arange(min(64, n))) % n
            parts.append(burst)
            writes.append(np.zeros(len(burst), dtype=bool))
        return np.concatenate(parts).astype(np.int64), np.concatenate(writes)

    def _run(self, t: int) -> None:
        spec = self.spec
        tid = 0
        with self.k.lock:
            tid = self.new_tid()
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
            if spec.pattern is Pattern.HAMMER:
                pages, writes = self._hammer(rng, t)
            else:
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

    def halt(self) -> None:
        """Ask the threads to stop without waiting (their process has exited)."""
        self._stop.set()

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
            tid = self.new_tid()
        for p in range(self.npages):
            st, c = self.k.read_page(self.region.addr + p * PAGE, tid, self.mm)
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
