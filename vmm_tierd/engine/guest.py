"""Where a region's memory and its uffd come from, and where they go at the end.

A :class:`Guest` gives the engine a registered region: its descriptor, the address space
its page tables live in, and the uffds (``RegionUffd``). ``LocalGuest`` is memory of this
process, driven by the built-in demo workload (the only user of the guest-side facet of a
backend). Memory of another process (attach) is ``attach/guest.py``'s.
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING, Protocol

import trio

from ..kernel import uapi
from ..kernel.api import GuestSide, Kernel, KernelError, MemType, Region, Strategy, Workload
from ..kernel.space import AddressSpace, LocalSpace
from ..settings import RegionSettings
from .tracker import OPTIONAL_FEATURES, tracker_class
from .uffd import STAGING_PAGES, RegionUffd

if TYPE_CHECKING:
    from .region import RegionCtx

log = logging.getLogger("vmm_tierd.engine")


class Guest(Protocol):
    name: str
    vm: str  # the VM the region belongs to ("" for memory of this process)
    memtype: MemType
    space: AddressSpace
    # Who the region's store records belong to: None = this daemon instance (they die
    # with it); a VMM's identity for memory of another process (they outlive a daemon
    # crash, for the next one to take over, and die with that VMM).
    store_owner: str | None

    async def setup(self, strategy: Strategy, granted: int) -> tuple[RegionUffd, int]:
        """Map/find the memory, get a uffd on it, register; returns the uffds and the
        features enabled on the region's uffd. Async: reaching into another process
        (injected syscalls) must run in a worker thread while faults are served."""
        ...

    def adopt(self, r: RegionCtx) -> None:
        """Before serving: take over the state an earlier daemon left (evicted pages
        whose records the store holds); nothing for memory that is new."""

    def start(self) -> None:
        """The fault server is serving: guest activity may begin."""

    async def stop(self) -> None:
        """Stop guest activity of ours (the demo workload); may block on faults, so it
        runs in a thread while faults are served."""

    async def teardown(self, graceful: bool) -> None:
        """Unregister and close (graceful), or leave the uffds so that blocked guest
        threads stay blocked instead of reading zeros. Runs shielded from cancellation."""


class LocalGuest:
    """Memory this process maps, optionally driven by the built-in workload."""

    vm = ""
    store_owner: str | None = None

    def __init__(self, kernel: Kernel, rs: RegionSettings,
                 guest_side: GuestSide | None = None) -> None:
        self.k = kernel
        self.rs = rs
        self.name = rs.name
        self.memtype = rs.memtype
        self.space: AddressSpace = LocalSpace(kernel)
        self.guest_side = guest_side if rs.workload_enabled else None
        self.workload: Workload | None = None
        self.workload_stopped = True
        self.region: Region | None = None
        self.uffd: RegionUffd | None = None
        self._mode = 0

    def register_mode(self) -> int:
        return self._mode

    async def setup(self, strategy: Strategy, granted: int) -> tuple[RegionUffd, int]:
        k, rs = self.k, self.rs
        memfd = rs.memtype is MemType.MEMFD
        region = self.region = (k.map_memfd(rs.size_bytes, rs.name) if memfd
                                else k.map_anon(rs.size_bytes))
        cls = tracker_class(strategy)
        want = cls.wanted(k.dialect, rs.memtype)
        fd = k.uffd_open()
        optional = OPTIONAL_FEATURES
        if memfd:
            # On shared memory MADV_DONTNEED only drops PTEs (the data stays in the file),
            # so REMOVE means nothing to the store; and it would make every DONTNEED of
            # ours wait until the event is read, with mfill ioctls failing EAGAIN meanwhile.
            optional &= ~uapi.UFFD_FEATURE_EVENT_REMOVE
        try:
            info = k.uffd_api(fd, (want | optional) & granted)
            if want & ~info.features:
                raise KernelError("UFFDIO_API", errno.EINVAL,
                                  detail=f"region {rs.name}: missing features "
                                         f"0x{want & ~info.features:x}")
            self._mode = cls.register_mode_for(k.dialect, rs.memtype)
            k.uffd_register(fd, region.addr, region.length, self._mode)
        except BaseException:
            k.uffd_close(fd)
            raise
        u = RegionUffd(k, region, fd, zero_by_copy=strategy is Strategy.WP)
        self.uffd = u
        if not memfd:
            # Staging lives on a second uffd without EVENT_REMOVE: dropping staging pages
            # with MADV_DONTNEED would otherwise block until a REMOVE event is read.
            # UFFDIO_MOVE only needs the destination registered with the uffd it is issued
            # on (and both ends in the caller's address space).
            u.staging = k.map_anon(STAGING_PAGES * region.page_size)
            u.sfd = k.uffd_open()
            k.uffd_api(u.sfd, uapi.UFFD_FEATURE_MOVE)
            k.uffd_register(u.sfd, u.staging.addr, u.staging.length,
                            uapi.UFFDIO_REGISTER_MODE_MISSING)
        # UFFDIO_API answers with every feature the kernel has; the uffd's are in fdinfo
        enabled = k.uffd_features(fd) or (want | optional) & granted
        log.info("region %s: %d MiB %s, strategy %s, features 0x%x", rs.name,
                 rs.size_bytes >> 20, rs.memtype.value, strategy.value, enabled)
        return u, enabled

    def adopt(self, r: RegionCtx) -> None:
        pass  # memory mapped just now

    def start(self) -> None:
        if self.guest_side is not None and self.region is not None:
            self.workload = self.guest_side.start_workload(self.region, self.rs.workload)
            self.workload_stopped = False

    async def stop(self) -> None:
        # In a thread: stopping joins guest threads that may wait on faults we serve.
        if self.workload is not None and not self.workload_stopped:
            await trio.to_thread.run_sync(self.workload.stop, abandon_on_cancel=True)
            self.workload_stopped = True

    async def teardown(self, graceful: bool) -> None:
        k, u = self.k, self.uffd
        if u is not None:
            for fd, reg in ((u.sfd, u.staging), (u.fd, u.region)):
                if fd < 0 or reg is None:
                    continue
                if graceful:
                    try:
                        k.uffd_unregister(fd, reg.addr, reg.length)
                    except KernelError as e:
                        log.error("region %s: UFFDIO_UNREGISTER failed: %s", self.name, e)
                    # A uffd is closed only after a graceful stop: closing it earlier would
                    # let blocked guest threads re-fault without it and see zeros.
                    k.uffd_close(fd)
            if u.staging is not None:
                k.unmap(u.staging)
                u.staging = None
        if self.region is not None and graceful and self.workload_stopped:
            k.unmap(self.region)
            self.region = None
