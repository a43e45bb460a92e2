"""One region of another process's guest RAM (a shared memfd mapping of a VMM), as the
engine's :class:`~vmm_tierd.engine.guest.Guest`.

Where its uffd comes from:
- ``inject``: created inside the VMM by an injected ``userfaultfd()``, copied out with
  pidfd_getfd. The VMM keeps its reference on purpose: should this daemon die, faults
  on evicted pages then wait (a restarted daemon takes the uffd back) instead of reading
  zeros, which is what a uffd whose last reference closes does.
- ``takeover``: a restarted daemon takes the VMM's uffd back by its fd number (recorded
  in the store), with its API features and registration as the dead daemon left them.
- ``handoff``: the VMM created the uffd itself and sent it (handoff.py).

Everything runs from here (uffd ioctls act on the VMM's mm; PAGEMAP_SCAN on
/proc/PID/pagemap; pread and punch on our copy of the memfd) except what the kernel only
lets the VMM do, which RemoteSpace injects: MADV_DONTNEED of its PTEs (wp strategy) and
closing its copy of the uffd at detach. Injections block until the VMM's thread stops,
and that thread may be blocked on a fault this daemon serves: they run in worker threads.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import trio

from ..engine.region import RegionCtx
from ..engine.tracker import tracker_class
from ..engine.uffd import RegionUffd
from ..kernel import uapi
from ..kernel.api import Kernel, KernelError, MemType, Region, ScanResult, Strategy
from ..kernel.process import Process
from ..kernel.remote import RemoteSpace
from ..kernel.space import AddressSpace

log = logging.getLogger("vmm_tierd.attach")

# Never EVENT_REMOVE on memfd (DONTNEED only drops PTEs there, and REMOVE would make the
# VMM's madvise wait for us); UNMAP tells us the RAM mapping went away.
OPTIONAL = (uapi.UFFD_FEATURE_THREAD_ID | uapi.UFFD_FEATURE_EVENT_UNMAP
            | uapi.UFFD_FEATURE_POISON)


class ProcessSpace:
    """The VMM's address space: scans through its pagemap, PTE zaps injected."""

    def __init__(self, proc: Process, remote: RemoteSpace) -> None:
        self.proc = proc
        self.remote = remote

    def pagemap_scan(self, start: int, end: int, **kw: int) -> ScanResult:
        return self.proc.pagemap_scan(start, end, **kw)

    def discard(self, ranges: Sequence[tuple[int, int]],
                advice: int = uapi.MADV_DONTNEED) -> int:
        return self.remote.discard(ranges, advice)


class RemoteGuest:
    memtype = MemType.MEMFD

    def __init__(self, kernel: Kernel, space: ProcessSpace, ram: Region, *, vm: str,
                 name: str, source: str, remote_fd: int = -1, local_uffd: int = -1,
                 local_memfd: int = -1, vmm_keeps_uffd: bool = True,
                 store_owner: str | None = None) -> None:
        if source not in ("inject", "takeover", "handoff"):
            raise ValueError(f"uffd source {source!r}")
        self.k = kernel
        self.space: AddressSpace = space
        self.remote = space.remote
        self.proc = space.proc
        self.ram = ram
        self.vm = vm
        self.name = name
        self.source = source
        self.remote_fd = remote_fd  # the VMM's fd number of the uffd (-1: unknown)
        self.local_uffd = local_uffd
        self.local_memfd = local_memfd
        self.vmm_keeps_uffd = vmm_keeps_uffd
        self.store_owner = store_owner  # the VMM's identity (see attach/vm.py)
        self.strategy: Strategy | None = None
        self.features = 0
        self.uffd: RegionUffd | None = None

    # ---- setup ---------------------------------------------------------------------------
    async def setup(self, strategy: Strategy, granted: int) -> tuple[RegionUffd, int]:
        k, ram = self.k, self.ram
        self.strategy = strategy
        if self.local_memfd < 0:
            self.local_memfd = self.proc.getfd(ram.owner_fd)
        if self.source == "inject":
            self.remote_fd, self.local_uffd = await trio.to_thread.run_sync(
                self.remote.create_uffd)
        elif self.source == "takeover":
            self.local_uffd = self.proc.getfd(self.remote_fd)
        cls = tracker_class(strategy)
        want = cls.wanted(k.dialect, MemType.MEMFD)
        have = k.uffd_features(self.local_uffd)
        if have is None:  # a fresh uffd: ours to set up
            # (UFFDIO_API answers with every feature the kernel has; fdinfo says which
            # ones this uffd has now)
            k.uffd_api(self.local_uffd, (want | OPTIONAL) & granted)
            have = k.uffd_features(self.local_uffd) or (want | OPTIONAL) & granted
        if want & ~have:
            raise KernelError("UFFDIO_API", errno.EINVAL, 0,
                              f"{self.name}: the uffd lacks features 0x{want & ~have:x} "
                              f"for the {strategy.value} strategy (it has 0x{have:x})")
        self.features = have
        mode = cls.register_mode_for(k.dialect, MemType.MEMFD)
        # Registering a range the same uffd registered before (takeover, a VMM that
        # registered it itself) just sets the modes; another uffd's range is EBUSY
        # (e.g. QEMU during postcopy).
        k.uffd_register(self.local_uffd, ram.addr, ram.length, mode)
        region = replace(ram, fd=self.local_memfd)
        self.uffd = RegionUffd(k, region, self.local_uffd,
                               zero_by_copy=strategy is Strategy.WP)
        log.info("%s: %d MiB of pid %d at 0x%x (memfd fd %d, uffd %s fd %d), strategy %s, "
                 "features 0x%x", self.name, ram.length >> 20, self.proc.pid, ram.addr,
                 ram.owner_fd, self.source, self.remote_fd, strategy.value, have)
        return self.uffd, have

    def adopt(self, r: RegionCtx) -> None:
        """Records of this region in the store stand for pages a dead daemon evicted:
        those still holes in the memfd are evicted; a record whose page is back in the
        file (restored, or committed but never punched) is stale and goes."""
        recorded = r.store.pages(r.rid)
        if not len(recorded):
            return
        data = self.k.file_data_runs(self.local_memfd, self.ram.offset, self.ram.length)
        ps = self.ram.page_size
        present = np.zeros(r.npages, dtype=bool)
        for lo, hi in ((data - self.ram.offset) // ps).tolist():
            present[lo:hi] = True
        rec = recorded.astype(np.int64)
        rec = rec[rec < r.npages]
        stale = rec[present[rec]]
        evicted = rec[~present[rec]]
        r.pages.adopt(evicted.astype(np.uint64), np.zeros(len(evicted), dtype=bool))
        r.pages.forget_records(stale.astype(np.uint64))
        log.info("%s: took over %d evicted pages from the store (%d stale records)",
                 self.name, len(evicted), len(stale))

    def start(self) -> None:
        if self.source != "takeover" or self.uffd is None:
            return
        u = self.uffd
        if self.strategy is Strategy.RWP:
            # A daemon killed inside an eviction left the uffd in sync mode.
            try:
                self.k.uffd_set_mode(u.fd, uapi.UFFD_FEATURE_RWP_ASYNC, 0)
            except KernelError as e:
                log.error("%s: SET_MODE(async) at takeover: %s", self.name, e)
        # A fault the dead daemon had read is not delivered again: wake every waiter so
        # that it faults anew, and this daemon reads it.
        u.wake(self.ram.addr, self.ram.length)

    async def stop(self) -> None:
        pass  # the guest is the VMM's: it goes on

    # ---- teardown ------------------------------------------------------------------------
    async def teardown(self, graceful: bool) -> None:
        """Graceful (every page back): unregister, and close the uffd on both sides, so
        the VMM is as it was found. Otherwise close only our copies: the VMM's own
        reference keeps blocked guest threads blocked for the next daemon."""
        k = self.k
        alive = self.proc.alive()
        if graceful and alive and self.local_uffd >= 0:
            try:
                k.uffd_unregister(self.local_uffd, self.ram.addr, self.ram.length)
            except KernelError as e:
                log.error("%s: UFFDIO_UNREGISTER at detach: %s", self.name, e)
        if self.local_uffd >= 0 and (graceful or self.vmm_keeps_uffd or not alive):
            k.uffd_close(self.local_uffd)
            self.local_uffd = -1
        if graceful and alive and self.remote_fd >= 0:
            try:
                await trio.to_thread.run_sync(self.remote.close_remote,
                                              [self.remote_fd])
            except KernelError as e:
                log.error("%s: closing the VMM's uffd (fd %d): %s", self.name,
                          self.remote_fd, e)
            self.remote_fd = -1
        if self.local_memfd >= 0:
            os.close(self.local_memfd)
            self.local_memfd = -1
