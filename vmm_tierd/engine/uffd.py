"""A region's userfaultfds and the operations that resolve faults on them.

``fd`` is the uffd registered over the guest region. Its context is the address space
of the process that created it, so for a region of another process (attach) every
operation here acts on that process's memory, whoever calls (except MOVE, which the
kernel refuses across address spaces). ``sfd`` is a second uffd, in this process, over the
anonymous staging area that UFFDIO_MOVE detaches victims into (see evict.py).

Every resolving operation has the same race: a second fault on the same page, or the
restore at stop, may have put the page in place first. The kernel then answers EEXIST and
the faulting thread still sleeps, so EEXIST always means "wake it instead" (``resolve``).
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from ..kernel import uapi
from ..kernel.api import Kernel, KernelError, Region

# Pages per eviction batch (4 MiB of staging for anon): the MOVEs and the copy out of
# staging run on the loop that serves faults, so a batch bounds how long it is held.
STAGING_PAGES = 1024


class RegionUffd:
    def __init__(self, kernel: Kernel, region: Region, fd: int, *, zero_by_copy: bool,
                 sfd: int = -1, staging: Region | None = None) -> None:
        self.k = kernel
        self.region = region
        self.fd = fd
        self.sfd = sfd
        self.staging = staging
        self.base = region.addr
        self.ps = region.page_size
        self.npages = region.npages
        self.zero_by_copy = zero_by_copy
        self._zeros = bytes(self.ps)

    def addr(self, p: int) -> int:
        return self.base + p * self.ps

    def wake(self, addr: int, length: int = 0) -> None:
        self.k.uffd_wake(self.fd, addr, length or self.ps)

    def resolve(self, op: Callable[[], object], addr: int, length: int = 0) -> bool:
        """Run ``op`` (a resolving uffd ioctl on [addr, addr+length)); on EEXIST, the page
        is there already (a racing fault or the restore won): wake instead. True if ``op``
        resolved it, False if it only woke."""
        try:
            op()
            return True
        except KernelError as e:
            if e.errno != errno.EEXIST:
                raise
        self.wake(addr, length)
        return False

    def fill(self, addr: int, data: bytes | bytearray | memoryview | None,
             length: int = 0) -> None:
        """COPY ``data`` to ``addr``, or zeros over ``length`` when it is None; raises
        KernelError as the kernel answers (EEXIST included).

        UFFDIO_ZEROPAGE refuses (EEXIST) a PTE holding a uffd-wp marker, which
        PAGEMAP_SCAN(PM_SCAN_WP_MATCHING) leaves in every hole, while UFFDIO_COPY
        overwrites markers: so the wp strategy copies zeros, and elsewhere an EEXIST from
        ZEROPAGE is retried as a COPY (which gives EEXIST if the page is really there)."""
        if data is not None:
            self.k.uffd_copy(self.fd, addr, data, 0)
            return
        length = length or self.ps
        if not self.zero_by_copy:
            try:
                self.k.uffd_zeropage(self.fd, addr, length, 0)
                return
            except KernelError as e:
                if e.errno != errno.EEXIST:
                    raise
        if len(self._zeros) < length:
            self._zeros = bytes(length)
        self.k.uffd_copy(self.fd, addr, memoryview(self._zeros)[:length], 0)

    def copy(self, addr: int, data: bytes | bytearray | memoryview) -> bool:
        return self.resolve(lambda: self.fill(addr, data), addr, len(data))

    def zero(self, addr: int, length: int = 0) -> bool:
        """Resolve MISSING with zeros (see ``fill``)."""
        return self.resolve(lambda: self.fill(addr, None, length), addr, length)

    def poison(self, addr: int) -> bool:
        """UFFDIO_POISON one page: the guest gets a memory error, never zeros. False if
        the page turned out to be present (EEXIST: woken instead)."""
        if self.zero_by_copy:
            # UFFDIO_POISON refuses any non-none PTE, uffd-wp markers included (EEXIST);
            # un-write-protecting the page clears a marker. Failing that only means the
            # POISON below answers EEXIST and the fault re-faults: nothing is lost.
            try:
                self.k.uffd_writeprotect(self.fd, addr, self.ps,
                                         uapi.UFFDIO_WRITEPROTECT_MODE_DONTWAKE)
            except KernelError:
                pass
        return self.resolve(lambda: self.k.uffd_poison(self.fd, addr, self.ps, 0), addr)
