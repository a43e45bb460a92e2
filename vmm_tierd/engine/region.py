"""One guest region: its uffd, per-page engine state, and the trio tasks that own them
(the fault server and the working-set cycle), from setup to graceful stop."""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field
from time import perf_counter
from typing import TYPE_CHECKING

import numpy as np
import trio

from ..kernel import uapi
from ..kernel.api import Kernel, KernelError, MemType, Region, Strategy
from ..settings import RegionSettings, TrackingSettings
from . import policy as policy_bits
from .observer import NullObserver, Observer
from .store import RecordError
from .tracker import OPTIONAL_FEATURES, Tracker, make_tracker, runs, tracker_class

if TYPE_CHECKING:
    from .policy import PagePolicy
    from .store import PageStore

log = logging.getLogger("vmm_tierd.engine")

# Bits of the ``flags`` view (tests, benchmarks); the state itself lives in the policy's
# state byte (PagePolicy.gone / once), so the engine keeps no per-page bytes of its own.
EVICTED = 1  # the record is committed and the page is gone from memory
ONCE = 2  # evicted since it was last known empty: an absent page is NOT zero memory
STAGING_PAGES = 4096  # pages per eviction batch (16 MiB of staging for anon)
RESTORE_CHUNK = 256
FEW = 64  # up to this many pages faulted back, the policy hears page by page (cheaper)


@dataclass(eq=False)
class Batch:
    """Pages detached from the guest whose records are not committed yet."""

    pages: np.ndarray  # uint64 page indexes, ascending
    staging: int  # anon: address of slot 0 (slot i holds pages[i]); memfd: 0
    reclaimed: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))


@dataclass
class Counters:
    faults: dict[str, int] = field(default_factory=dict)
    evictions: int = 0
    refaults: int = 0
    poisoned: int = 0
    cycles: int = 0
    last_cycle_s: float = 0.0
    errors: int = 0


class RegionCore:
    """State shared by the fault server, the evictor and the cycle (all on one trio loop)."""

    def __init__(self, kernel: Kernel, rs: RegionSettings, strategy: Strategy,
                 tracking: TrackingSettings, store: PageStore, observer: Observer | None,
                 policy: PagePolicy) -> None:
        self.k = kernel
        self.name = rs.name
        self.settings = rs
        self.strategy = strategy
        self.tracking = tracking
        self.pending_tracking: TrackingSettings | None = None
        self.store = store
        self.rid = store.region_id(rs.name)
        self.obs: Observer = observer or NullObserver()
        self.policy = policy
        self.ps = kernel.page_size
        self.npages = rs.size_bytes // self.ps
        self.inflight: dict[int, tuple[Batch, int]] = {}
        self.pending_delete: list[int] = []
        self.back: list[int] = []  # faulted back from the store (OUT cleared), policy not told yet
        self.poisoned_pages: set[int] = set()
        self.c = Counters()
        self.region: Region | None = None
        self.fd = -1
        self.sfd = -1  # second uffd owning the anon staging area (see _setup)
        self.staging: Region | None = None
        self.features = 0
        self.tracker: Tracker | None = None
        self.stopping = False
        self.zero_by_copy = strategy is Strategy.WP
        self.zeros = bytes(self.ps)
        self.dead = False  # the guest unmapped the whole region

    # ---- helpers used by every path --------------------------------------------------
    @property
    def base(self) -> int:
        assert self.region is not None
        return self.region.addr

    @property
    def memfd(self) -> bool:
        return self.settings.memtype is MemType.MEMFD

    @property
    def flags(self) -> np.ndarray:
        """uint8[npages] of EVICTED | ONCE, derived from the policy's state (a copy)."""
        st = self.policy.state
        once = (st & (policy_bits.EVICTED | policy_bits.ONCE)) != 0
        return self.policy.gone_mask().view(np.uint8) | (once.view(np.uint8) << 1)

    @property
    def metadata_bytes_per_page(self) -> float:
        """Every per-page byte the engine keeps for this region (policy + engine)."""
        return self.policy.metadata_bytes_per_page

    def count_fault(self, kind: str, t_read: float) -> None:
        f = self.c.faults
        f[kind] = f.get(kind, 0) + 1
        self.obs.fault_served(self.name, kind, perf_counter() - t_read)

    def kerr(self, e: KernelError, where: str) -> None:
        self.c.errors += 1
        log.error("region %s: %s failed: %s", self.name, where, e)
        self.obs.error(e.op, e.errno or 0)

    def zero_fill(self, addr: int, length: int) -> None:
        """Resolve MISSING with zeros. UFFDIO_ZEROPAGE refuses (EEXIST) a PTE holding a
        uffd-wp marker, which PAGEMAP_SCAN(PM_SCAN_WP_MATCHING) leaves in every hole, while
        UFFDIO_COPY overwrites markers: so the wp strategy copies zeros, and elsewhere an
        EEXIST from ZEROPAGE is retried as a COPY (which gives EEXIST if really present)."""
        if not self.zero_by_copy:
            try:
                self.k.uffd_zeropage(self.fd, addr, length, 0)
                return
            except KernelError as e:
                if e.errno != errno.EEXIST:
                    raise
        if len(self.zeros) < length:
            self.zeros = bytes(length)
        self.k.uffd_copy(self.fd, addr, memoryview(self.zeros)[:length], 0)

    def poison(self, p: int, why: str) -> None:
        """The page's content can't be recovered: the guest gets a memory error, not zeros."""
        addr = self.base + p * self.ps
        if self.zero_by_copy:
            # UFFDIO_POISON refuses any non-none PTE, uffd-wp markers included (EEXIST);
            # un-write-protecting the page clears a marker.
            try:
                self.k.uffd_writeprotect(self.fd, addr, self.ps,
                                         uapi.UFFDIO_WRITEPROTECT_MODE_DONTWAKE)
            except KernelError as e:
                self.kerr(e, f"UFFDIO_WRITEPROTECT(clear) before poisoning page {p}")
        try:
            self.k.uffd_poison(self.fd, addr, self.ps, 0)
        except KernelError as e:
            if e.errno != errno.EEXIST:  # EEXIST: the page is there after all (a raced fault)
                self.kerr(e, f"UFFDIO_POISON page {p}")
                return
            self.k.uffd_wake(self.fd, addr, self.ps)
            return
        log.error("region %s: page %d (addr 0x%x) unrecoverable (%s): poisoned",
                  self.name, p, addr, why)
        self.policy.back_one(p)  # no longer served from the store; the policy keeps it evicted
        self.poisoned_pages.add(p)
        self.pending_delete.append(p)
        self.c.poisoned += 1
        self.obs.poisoned(self.name, 1)

    def mark_back(self, pages: np.ndarray) -> None:
        """Pages that came back into memory from the store."""
        refaults = self.policy.mark_resident(pages)
        if refaults:
            self.c.refaults += refaults
            self.obs.refault(self.name, refaults)
        self.pending_delete.extend(pages.tolist())

    def flush_back(self) -> None:
        back = self.back
        if back:
            self.back = []
            if len(back) <= FEW:
                refaults = self.policy.mark_resident_few(back)
            else:
                refaults = self.policy.mark_resident(np.asarray(back, dtype=np.uint64))
            if refaults:
                self.c.refaults += refaults
                self.obs.refault(self.name, refaults)
            self.pending_delete.extend(back)

    def forget_range(self, start: int, end: int) -> None:
        """The guest discarded [start, end) (REMOVE on anon, UNMAP): absent now means zero."""
        first = max(0, (start - self.base) // self.ps)
        last = min(self.npages, (end - self.base + self.ps - 1) // self.ps)
        if first >= last:
            return
        hit = ([p for p in self.inflight if first <= p < last]
               if len(self.inflight) < last - first else range(first, last))
        for p in hit:
            ent = self.inflight.pop(p, None)
            if ent is not None:
                batch, i = ent
                batch.reclaimed[i] = True  # its record is deleted after the commit
        self.flush_back()
        was = np.flatnonzero(self.policy.gone_mask(slice(first, last))) + first
        if len(was):
            self.policy.mark_resident(was.astype(np.uint64))
            self.pending_delete.extend(was.tolist())
        self.policy.forget(first, last)
        log.info("region %s: guest discarded pages [%d, %d): %d records dropped",
                 self.name, first, last, len(was))

    def take_deletes(self) -> np.ndarray:
        """Pending record deletions, minus pages evicted again since (their record is live)."""
        if not self.pending_delete:
            return np.zeros(0, dtype=np.uint64)
        pages = np.unique(np.asarray(self.pending_delete, dtype=np.uint64))
        self.pending_delete = []
        return pages[~self.policy.gone_mask(pages)]

    def apply_tracking(self) -> None:
        if self.pending_tracking is not None:
            self.tracking = self.pending_tracking
            self.pending_tracking = None
            self.policy.set_tracking(self.tracking)

    # ---- setup / teardown ------------------------------------------------------------
    def setup(self, features_granted: int) -> None:
        k = self.k
        rs = self.settings
        self.region = (k.map_memfd(rs.size_bytes, rs.name) if self.memfd
                       else k.map_anon(rs.size_bytes))
        cls = tracker_class(self.strategy)
        want = cls.wanted(k.dialect, rs.memtype)
        self.fd = k.uffd_open()
        optional = OPTIONAL_FEATURES
        if self.memfd:
            # On shared memory MADV_DONTNEED only drops PTEs (the data stays in the file),
            # so REMOVE means nothing to the store; and it would make every DONTNEED of
            # ours wait until the event is read, with mfill ioctls failing EAGAIN meanwhile.
            optional &= ~uapi.UFFD_FEATURE_EVENT_REMOVE
        info = k.uffd_api(self.fd, (want | optional) & features_granted)
        if want & ~info.features:
            raise KernelError("UFFDIO_API", errno.EINVAL,
                              detail=f"region {rs.name}: missing features "
                                     f"0x{want & ~info.features:x}")
        self.features = info.features
        tr = make_tracker(self.strategy, k, self.fd, self.region, info.features)
        k.uffd_register(self.fd, self.region.addr, self.region.length, tr.register_mode())
        self.tracker = tr
        if not self.memfd:
            # Staging lives on a second uffd without EVENT_REMOVE: dropping staging pages
            # with MADV_DONTNEED would otherwise block until a REMOVE event is read.
            # UFFDIO_MOVE only needs the destination registered with the uffd it is issued on.
            self.staging = k.map_anon(STAGING_PAGES * self.ps)
            self.sfd = k.uffd_open()
            k.uffd_api(self.sfd, uapi.UFFD_FEATURE_MOVE)
            k.uffd_register(self.sfd, self.staging.addr, self.staging.length,
                            uapi.UFFDIO_REGISTER_MODE_MISSING)
        log.info("region %s: %d MiB %s, strategy %s, features 0x%x", rs.name,
                 rs.size_bytes >> 20, rs.memtype.value, self.strategy.value, info.features)

    def teardown(self, graceful: bool, workload_stopped: bool) -> None:
        k = self.k
        for fd, reg in ((self.sfd, self.staging), (self.fd, self.region)):
            if fd < 0 or reg is None:
                continue
            if graceful:
                try:
                    k.uffd_unregister(fd, reg.addr, reg.length)
                except KernelError as e:
                    self.kerr(e, "UFFDIO_UNREGISTER")
                # A uffd is closed only after a graceful stop: closing it earlier would let
                # blocked guest threads re-fault without it and see zeros.
                k.uffd_close(fd)
        if self.staging is not None:
            k.unmap(self.staging)
            self.staging = None
        if self.region is not None and graceful and workload_stopped:
            k.unmap(self.region)
            self.region = None

    # ---- graceful stop: everything back into memory ----------------------------------
    async def restore_all(self) -> int:
        """Bring every evicted page back (COPY/ZEROPAGE in runs); returns pages restored."""
        done = 0
        ps = self.ps
        ev = np.flatnonzero(self.policy.gone_mask()).astype(np.uint64)
        for first, count, _ in runs(ev):
            for off in range(0, count, RESTORE_CHUNK):
                n = min(RESTORE_CHUNK, count - off)
                done += self._restore_run(first + off, n, ps)
                await trio.lowlevel.checkpoint()
        left = int(np.count_nonzero(self.policy.gone_mask()))
        if left:
            log.error("region %s: %d pages could not be restored; their records stay",
                      self.name, left)
        return done

    def _restore_run(self, first: int, n: int, ps: int) -> int:
        pages = np.arange(first, first + n, dtype=np.uint64)
        pages = pages[self.policy.gone_mask(pages)]  # the fault server may have won
        got: list[tuple[int, bytes | None]] = []
        for p in pages.tolist():
            try:
                got.append((p, self.store.get(self.rid, p)))
            except (KeyError, RecordError) as e:
                self.poison(p, str(e) if isinstance(e, RecordError) else "no record")
        i = 0
        restored: list[int] = []
        while i < len(got):  # group adjacent pages of the same kind into one ioctl
            j = i + 1
            zero = got[i][1] is None
            while (j < len(got) and got[j][0] == got[j - 1][0] + 1
                   and (got[j][1] is None) == zero):
                j += 1
            addr = self.base + got[i][0] * ps
            try:
                if zero:
                    self.zero_fill(addr, (j - i) * ps)
                else:
                    self.k.uffd_copy(self.fd, addr, b"".join(d for _, d in got[i:j]), 0)  # type: ignore[misc]
                restored.extend(p for p, _ in got[i:j])
            except KernelError:
                for p, d in got[i:j]:  # one by one: EEXIST means a fault got there first
                    a = self.base + p * ps
                    try:
                        if d is None:
                            self.zero_fill(a, ps)
                        else:
                            self.k.uffd_copy(self.fd, a, d, 0)
                        restored.append(p)
                    except KernelError as e:
                        if e.errno == errno.EEXIST:
                            restored.append(p)
                        else:
                            self.kerr(e, f"restore page {p}")
            i = j
        if restored:
            self.mark_back(np.asarray(restored, dtype=np.uint64))
        return len(restored)
