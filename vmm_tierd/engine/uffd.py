"""A region's userfaultfds and the operations that resolve faults on them.

``fd`` is the uffd registered over the guest region. Its context is the address space
of the process that created it, so for a region of another process (attach) every
operation here acts on that process's memory, whoever calls (except MOVE, which the
kernel refuses across address spaces). ``sfd`` is a second uffd, in this process, over the
anonymous staging area that UFFDIO_MOVE detaches victims into (see evict.py).

Every resolving operation has the same race: a second fault on the same page, or the
restore at stop, may have put the page in place first. The kernel then answers EEXIST and
the faulting thread still sleeps, so EEXIST means "wake it instead" (``resolve``), except
where a uffd-wp PTE marker can be the reason (ZEROPAGE, POISON, MOVE: see ``fill``,
``poison``, ``move_in``).
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

    def move_in(self, addr: int, src: int) -> bool:
        """UFFDIO_MOVE one page from ``src`` (its staging slot) back to ``addr`` and wake
        the faulting threads. True if it moved; False if the page was there already (a
        racing fault won: woken instead). KernelError otherwise (ENOENT: ``src`` is empty).

        MOVE, unlike COPY, refuses any destination PTE that is not none with EEXIST, a
        uffd-wp marker included, and under the wp strategy every PAGEMAP_SCAN
        (PM_SCAN_WP_MATCHING) leaves such a marker in each hole it walks: also in the
        hole of a page that is still in staging, if a cycle's scan ran since the page was
        moved out (a rollback that could not move it back leaves it there). Such a page
        is absent, not there: taking that EEXIST for "there already" woke the thread
        into a MISSING fault on a page whose only copy stayed in staging, to be dropped
        with it (measured on 6.18). So on EEXIST clear a marker (un-protect, as for
        POISON) and move again; only a second EEXIST means the page really is there."""
        try:
            self.k.uffd_move(self.fd, addr, src, self.ps, 0)
            return True
        except KernelError as e:
            if e.errno != errno.EEXIST:
                raise
        if self.zero_by_copy:  # the wp strategy: its scans leave markers in holes
            try:
                self.k.uffd_writeprotect(self.fd, addr, self.ps,
                                         uapi.UFFDIO_WRITEPROTECT_MODE_DONTWAKE)
                self.k.uffd_move(self.fd, addr, src, self.ps, 0)
                return True
            except KernelError as e:
                if e.errno != errno.EEXIST:
                    raise
        self.wake(addr)
        return False

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
