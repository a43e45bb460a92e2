"""Working-set tracking strategies: how a region is registered, protected, scanned, held
still for a detach, and how a tracking fault on a resident page is resolved.

- ``RwpTracker``: 7.3 RWP (RWPROTECT, SET_MODE, PAGE_IS_ACCESSED), or the RFC under its
  own names (DEACTIVATE, CONTINUE, PAGE_IS_UFFD_DEACTIVATED). Reads and writes count.
- ``WpTracker``: 6.8-7.2, WP_ASYNC + PAGEMAP_SCAN(PAGE_IS_WRITTEN, PM_SCAN_WP_MATCHING).
  Only writes count; reads are invisible (the policy's refault hold makes up for it).
"""

from __future__ import annotations

import numpy as np

from ..kernel import uapi
from ..kernel.api import Dialect, Kernel, MemType, Region, Strategy
from ..kernel.space import AddressSpace
from .ranges import ranges_to_mask

# Asked for on every uffd when granted; none of them is required.
OPTIONAL_FEATURES = (uapi.UFFD_FEATURE_THREAD_ID | uapi.UFFD_FEATURE_EVENT_REMOVE
                     | uapi.UFFD_FEATURE_EVENT_UNMAP | uapi.UFFD_FEATURE_MOVE
                     | uapi.UFFD_FEATURE_POISON)


class Tracker:
    """Base: what every strategy provides to the cycle and the fault server."""

    strategy: Strategy
    holds: bool = False  # detach needs SET_MODE(sync) around it

    def __init__(self, kernel: Kernel, space: AddressSpace, fd: int, region: Region,
                 features: int) -> None:
        self.k = kernel
        self.space = space  # where the region's page tables are (this or another process)
        self.fd = fd
        self.region = region
        self.features = features
        self.ps = region.page_size
        self.npages = region.npages
        self.memfd = region.memtype is MemType.MEMFD

    @staticmethod
    def wanted(dialect: Dialect, memtype: MemType) -> int:
        raise NotImplementedError

    @staticmethod
    def register_mode_for(dialect: Dialect, memtype: MemType) -> int:
        raise NotImplementedError

    def register_mode(self) -> int:
        return self.register_mode_for(self.k.dialect, self.region.memtype)

    def begin_interval(self) -> None:
        """Start an observation interval (rwp: protect everything, async)."""

    def scan(self) -> tuple[np.ndarray, np.ndarray]:
        """(cold, present), bool[npages] each: pages present and not used since
        ``begin_interval``/the last scan, and pages present at all."""
        raise NotImplementedError

    def _present(self) -> np.ndarray:
        return self._mask(self._scan(category_mask=uapi.PAGE_IS_PRESENT,
                                     return_mask=uapi.PAGE_IS_PRESENT))

    def hold(self) -> None:
        """From now on accesses to protected pages block until resolved by the handler."""

    def release(self) -> None:
        """Back to asynchronous tracking."""

    def unprotect(self, start: int, length: int, wake: bool) -> None:
        """Clear tracking protection on [start, start+length) (and wake if asked)."""

    def resolve(self, addr: int) -> None:
        """Resolve a tracking fault (RWP/MINOR/WP flag) on a page that stays resident."""
        self.k.uffd_wake(self.fd, addr, self.ps)

    def _scan(self, **kw: int) -> np.ndarray:
        return self.space.pagemap_scan(self.region.addr, self.region.end, **kw).regions

    def _mask(self, regions: np.ndarray, clear: np.ndarray | None = None) -> np.ndarray:
        return ranges_to_mask(regions, self.region.addr, self.npages, self.ps, clear)


class RwpTracker(Tracker):
    strategy = Strategy.RWP
    holds = True

    def __init__(self, kernel: Kernel, space: AddressSpace, fd: int, region: Region,
                 features: int) -> None:
        super().__init__(kernel, space, fd, region, features)
        self.rfc = kernel.dialect is Dialect.RFC

    @staticmethod
    def wanted(dialect: Dialect, memtype: MemType) -> int:
        f = uapi.UFFD_FEATURE_RWP | uapi.UFFD_FEATURE_RWP_ASYNC  # = MINOR_ANON|MINOR_ASYNC
        if memtype is MemType.MEMFD:
            f |= uapi.UFFD_FEATURE_MISSING_SHMEM
            if dialect is Dialect.RFC:
                f |= uapi.UFFD_FEATURE_MINOR_SHMEM
        return f

    @staticmethod
    def register_mode_for(dialect: Dialect, memtype: MemType) -> int:
        # RFC: tracking faults are MINOR faults (protnone on anon, zapped PTE on shmem).
        track = (uapi.UFFDIO_REGISTER_MODE_MINOR if dialect is Dialect.RFC
                 else uapi.UFFDIO_REGISTER_MODE_RWP)
        return uapi.UFFDIO_REGISTER_MODE_MISSING | track

    def begin_interval(self) -> None:
        r = self.region
        if self.rfc:
            self.k.uffd_deactivate(self.fd, r.addr, r.length)
        else:
            self.k.uffd_rwprotect(self.fd, r.addr, r.length, uapi.UFFDIO_RWPROTECT_MODE_RWP)

    def scan(self) -> tuple[np.ndarray, np.ndarray]:
        present = self._present()
        if not self.rfc:
            accessed = self._scan(category_mask=uapi.PAGE_IS_ACCESSED,
                                  return_mask=uapi.PAGE_IS_ACCESSED)
            # Only a mapped (present) page is protected. On memfd a page that is cached but
            # unmapped would be mapped by an access without any uffd fault (no MINOR
            # registration here), even in sync mode: it must never be a victim.
            return self._mask(accessed, clear=present.copy()), present
        if self.memfd:
            # RFC: DEACTIVATE zaps shmem PTEs; a page still unmapped was not touched, but
            # it is not present either (and pages evicted or never populated are absent
            # too): the page table's state tells them apart, the scan can't.
            return ~present, present
        return self._mask(self._scan(category_mask=uapi.PAGE_IS_UFFD_DEACTIVATED,
                                     return_mask=uapi.PAGE_IS_UFFD_DEACTIVATED)), present

    def hold(self) -> None:
        self.k.uffd_set_mode(self.fd, 0, uapi.UFFD_FEATURE_RWP_ASYNC)

    def release(self) -> None:
        self.k.uffd_set_mode(self.fd, uapi.UFFD_FEATURE_RWP_ASYNC, 0)

    def unprotect(self, start: int, length: int, wake: bool) -> None:
        if self.rfc:
            # CONTINUE restores the protnone PTE (anon) or maps the cached page (shmem).
            mode = 0 if wake else uapi.UFFDIO_CONTINUE_MODE_DONTWAKE
            self.k.uffd_continue(self.fd, start, length, mode)
        else:
            mode = 0 if wake else uapi.UFFDIO_RWPROTECT_MODE_DONTWAKE
            self.k.uffd_rwprotect(self.fd, start, length, mode)

    def resolve(self, addr: int) -> None:
        self.unprotect(addr, self.ps, True)


class WpTracker(Tracker):
    strategy = Strategy.WP

    @staticmethod
    def wanted(dialect: Dialect, memtype: MemType) -> int:
        f = uapi.UFFD_FEATURE_WP_ASYNC | uapi.UFFD_FEATURE_PAGEFAULT_FLAG_WP
        if memtype is MemType.MEMFD:
            f |= (uapi.UFFD_FEATURE_MISSING_SHMEM | uapi.UFFD_FEATURE_MINOR_SHMEM
                  | uapi.UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
        return f

    @staticmethod
    def register_mode_for(dialect: Dialect, memtype: MemType) -> int:
        mode = uapi.UFFDIO_REGISTER_MODE_MISSING | uapi.UFFDIO_REGISTER_MODE_WP
        if memtype is MemType.MEMFD:
            # MINOR: once a victim's PTE is zapped (MADV_DONTNEED), any access blocks as a
            # MINOR fault until the eviction commits or the handler CONTINUEs it.
            mode |= uapi.UFFDIO_REGISTER_MODE_MINOR
        return mode

    def begin_interval(self) -> None:
        pass  # the previous scan re-protected what it reported (PM_SCAN_WP_MATCHING)

    def scan(self) -> tuple[np.ndarray, np.ndarray]:
        # PAGEMAP_SCAN sees writes only before 7.3: a page merely read looks cold.
        # Present first: a page faulted in between the two scans is then not "cold".
        present = self._present()
        written = self._scan(category_mask=uapi.PAGE_IS_WRITTEN,
                             return_mask=uapi.PAGE_IS_WRITTEN, flags=uapi.PM_SCAN_WP_MATCHING)
        return self._mask(written, clear=present.copy()), present

    def resolve(self, addr: int) -> None:
        if self.memfd:
            # A MINOR fault on a page still in the page cache: map it.
            self.k.uffd_continue(self.fd, addr, self.ps, 0)
        else:
            self.k.uffd_wake(self.fd, addr, self.ps)


def make_tracker(strategy: Strategy, kernel: Kernel, space: AddressSpace, fd: int,
                 region: Region, features: int) -> Tracker:
    return tracker_class(strategy)(kernel, space, fd, region, features)


def tracker_class(strategy: Strategy) -> type[Tracker]:
    return RwpTracker if strategy is Strategy.RWP else WpTracker
