"""FakeKernel PAGEMAP_SCAN: categories, masks, merging, max_pages, WP_MATCHING, RWP/RFC
categories, and a simulated 1 TiB region."""

from __future__ import annotations

import errno
import faulthandler
import sys
from collections.abc import Iterator

import numpy as np
import pytest

from vmm_tierd.kernel import uapi as U
from vmm_tierd.kernel.api import AccessKind, Dialect, KernelError
from vmm_tierd.kernel.fake import FakeKernel

PS = 4096
W, P, Z, WA = U.PAGE_IS_WRITTEN, U.PAGE_IS_PRESENT, U.PAGE_IS_PFNZERO, U.PAGE_IS_WPALLOWED


@pytest.fixture(autouse=True)
def _hang_guard() -> Iterator[None]:
    faulthandler.dump_traceback_later(120, exit=True, file=sys.__stderr__ or sys.stderr)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(params=[Dialect.RWP, Dialect.RFC])
def k(request: pytest.FixtureRequest) -> Iterator[FakeKernel]:
    kern = FakeKernel(request.param)
    yield kern
    kern.close()


def _rss_mib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 >> 20


def rel(k: FakeKernel, base: int, scan: object) -> list[tuple[int, int, int]]:
    regs = scan.regions  # type: ignore[attr-defined]
    return [(int(a - base) // PS, int(b - base) // PS, int(c)) for a, b, c in regs]


def write(k: FakeKernel, addr: int, n: int = 1) -> None:
    assert k.start_access(addr, AccessKind.WRITE, n).wait(5).data == b""


def test_unregistered_categories_and_merging(k: FakeKernel) -> None:
    r = k.map_anon(1024 * PS)
    for p in (0, 1, 2, 5):
        write(k, r.addr + p * PS)
    k.start_access(r.addr + 3 * PS, AccessKind.READ).wait(5)
    s = k.pagemap_scan(r.addr, r.addr + r.length, return_mask=0x3FF)
    # none PTEs inside the populated 2 MiB table read as WRITTEN (6.18); no table: nothing
    assert rel(k, r.addr, s) == [(0, 3, P | W), (3, 4, P | W | Z), (4, 5, W), (5, 6, P | W),
                                 (6, 512, W), (512, 1024, 0)]
    s = k.pagemap_scan(r.addr, r.addr + r.length, category_mask=P, return_mask=P)
    assert rel(k, r.addr, s) == [(0, 4, P), (5, 6, P)]
    s = k.pagemap_scan(r.addr, r.addr + r.length, category_mask=P, category_inverted=Z,
                       return_mask=P)  # inverted bits outside the mask change nothing
    assert rel(k, r.addr, s) == [(0, 4, P), (5, 6, P)]
    s = k.pagemap_scan(r.addr, r.addr + r.length, category_mask=P | Z, category_inverted=Z,
                       return_mask=P)
    assert rel(k, r.addr, s) == [(0, 3, P), (5, 6, P)]
    s = k.pagemap_scan(r.addr, r.addr + r.length, category_anyof_mask=Z | U.PAGE_IS_SWAPPED,
                       return_mask=0x3FF)
    assert rel(k, r.addr, s) == [(3, 4, P | W | Z)]
    assert s.walk_end == r.addr + r.length and s.pages() == 1


def test_args_validation(k: FakeKernel) -> None:
    r = k.map_anon(4 * PS)
    for kw in ({"flags": 4}, {"return_mask": 1 << 10}, {"category_mask": 1 << 12}):
        with pytest.raises(KernelError) as ei:
            k.pagemap_scan(r.addr, r.addr + PS, **kw)
        assert ei.value.errno == errno.EINVAL and ei.value.op == "PAGEMAP_SCAN"
    with pytest.raises(KernelError) as ei:
        k.pagemap_scan(r.addr + 1, r.addr + PS)
    assert ei.value.errno == errno.EINVAL
    s = k.pagemap_scan(r.addr + PS, r.addr)  # end < start: nothing, like the kernel
    assert len(s.regions) == 0 and s.walk_end == r.addr
    s = k.pagemap_scan(r.addr, r.addr + 5, return_mask=P)  # end rounds up
    assert s.walk_end == r.addr + PS


def test_max_pages_and_walk_end(k: FakeKernel) -> None:
    r = k.map_anon(64 * PS)
    for p in (1, 2, 3, 7, 8):
        write(k, r.addr + p * PS)
    s = k.pagemap_scan(r.addr, r.addr + r.length, category_mask=P, return_mask=P, max_pages=4)
    assert rel(k, r.addr, s) == [(1, 4, P), (7, 8, P)]
    assert s.walk_end == r.addr + 8 * PS
    s = k.pagemap_scan(r.addr, r.addr + r.length, category_mask=P, return_mask=P, max_pages=3)
    assert rel(k, r.addr, s) == [(1, 4, P)] and s.walk_end == r.addr + 7 * PS


def test_wp_async_matching_reprotects(k: FakeKernel) -> None:
    r = k.map_anon(64 * PS)
    u = r.addr
    fd = k.uffd_open()
    k.uffd_api(fd, U.UFFD_FEATURE_WP_ASYNC)
    for p in range(8):
        write(k, u + p * PS)
    k.uffd_register(fd, u, r.length, U.UFFDIO_REGISTER_MODE_WP)
    k.uffd_writeprotect(fd, u, r.length, U.UFFDIO_WRITEPROTECT_MODE_WP)
    for p in (2, 3, 6):
        write(k, u + p * PS)  # WP_ASYNC: no fault, page becomes WRITTEN
    assert k.uffd_read(fd) == []
    kw = {"category_mask": W, "return_mask": W, "flags": U.PM_SCAN_WP_MATCHING
          | U.PM_SCAN_CHECK_WPASYNC}
    assert rel(k, u, k.pagemap_scan(u, u + r.length, **kw)) == [(2, 4, W), (6, 7, W)]
    assert rel(k, u, k.pagemap_scan(u, u + r.length, **kw)) == []  # re-protected
    s = k.pagemap_scan(u, u + 12 * PS, return_mask=0x3FF)
    assert rel(k, u, s) == [(0, 8, WA | P), (8, 12, WA | U.PAGE_IS_SWAPPED)]  # wp markers
    other = k.map_anon(4 * PS)
    with pytest.raises(KernelError) as ei:
        k.pagemap_scan(other.addr, other.addr + PS, flags=U.PM_SCAN_CHECK_WPASYNC)
    assert ei.value.errno == errno.EPERM
    assert len(k.pagemap_scan(other.addr, other.addr + PS,
                              flags=U.PM_SCAN_WP_MATCHING).regions) == 0  # VMA skipped


def test_memfd_file_category(k: FakeKernel) -> None:
    m = k.map_memfd(8 * PS)
    write(k, m.addr + 2 * PS)
    k.start_access(m.addr + 3 * PS, AccessKind.READ).wait(5)  # shmem: a real page, not pfn 0
    s = k.pagemap_scan(m.addr, m.addr + 4 * PS, category_mask=P, return_mask=0x3FF)
    assert rel(k, m.addr, s) == [(2, 4, P | W | U.PAGE_IS_FILE)]


def test_access_tracking_categories(k: FakeKernel) -> None:
    """RWP: cold = PRESENT & !ACCESSED. RFC: cold = UFFD_DEACTIVATED (same bit 9)."""
    r = k.map_anon(16 * PS)
    fd = k.uffd_open()
    if k.dialect is Dialect.RWP:
        k.uffd_api(fd, U.UFFD_FEATURE_RWP | U.UFFD_FEATURE_RWP_ASYNC)
        mode = U.UFFDIO_REGISTER_MODE_RWP
    else:
        k.uffd_api(fd, U.UFFD_FEATURE_MINOR_ANON | U.UFFD_FEATURE_MINOR_ASYNC)
        mode = U.UFFDIO_REGISTER_MODE_MINOR
    for p in range(8):
        write(k, r.addr + p * PS)
    k.uffd_register(fd, r.addr, r.length, mode)
    if k.dialect is Dialect.RWP:
        fresh = k.pagemap_scan(r.addr, r.addr + 8 * PS, return_mask=0x3FF)
        assert rel(k, r.addr, fresh) == [(0, 8, P | U.PAGE_IS_ACCESSED)]  # never protected
        k.uffd_rwprotect(fd, r.addr, r.length, U.UFFDIO_RWPROTECT_MODE_RWP)
    else:
        k.uffd_deactivate(fd, r.addr, r.length)
    k.start_access(r.addr + PS, AccessKind.READ).wait(5)  # async: auto-resolved
    write(k, r.addr + 4 * PS)
    assert k.uffd_read(fd) == []
    bit = 1 << 9
    if k.dialect is Dialect.RWP:
        s = k.pagemap_scan(r.addr, r.addr + r.length, category_mask=P | bit,
                           category_inverted=bit, return_mask=P)
    else:
        s = k.pagemap_scan(r.addr, r.addr + r.length, category_mask=bit, return_mask=P)
    assert rel(k, r.addr, s) == [(0, 1, P), (2, 4, P), (5, 8, P)]


def test_one_tib_region_scan_is_cheap() -> None:
    """1 TiB of guest memory: flags live in a lazily zeroed array, contents are sparse."""
    rss0 = _rss_mib()
    k = FakeKernel(Dialect.RWP)
    r = k.map_anon(1 << 40)
    fd = k.uffd_open()
    k.uffd_api(fd, U.UFFD_FEATURE_WP_ASYNC)
    pages = [0, 1, 777, 1 << 20, (1 << 28) - 1]
    for p in pages:
        write(k, r.addr + p * PS, 8)
    k.uffd_register(fd, r.addr, r.length, U.UFFDIO_REGISTER_MODE_MISSING)
    s = k.pagemap_scan(r.addr, r.addr + r.length, category_mask=P, return_mask=P)
    got = sorted(int(a - r.addr) // PS for a in s.regions[:, 0])
    assert got == [0, 777, 1 << 20, (1 << 28) - 1] and s.pages() == len(pages)
    s = k.pagemap_scan(r.addr, r.addr + r.length, category_mask=P | W, category_inverted=W,
                       return_mask=P)
    assert s.pages() == 0  # every present page reads as written (not wr-protected)
    grew = _rss_mib() - rss0
    assert grew < 512, f"1 TiB simulated region grew RSS by {grew} MiB"
    fl = k.maps[0].flags  # PTE tables exist for pages 0-1023 (pages 0, 1, 777) only
    assert np.count_nonzero(fl[:1024]) == 1024 and np.count_nonzero(fl[1024:4096]) == 0
    k.close()


def test_faulted_page_keeps_its_pte_table(k: FakeKernel) -> None:
    """A page populated by a fault, then zapped, is a none PTE in an existing table
    (WRITTEN), not a hole: MADV_DONTNEED does not free PTE tables."""
    r = k.map_anon(1024 * PS)
    write(k, r.addr)
    k.madvise(r.addr, PS, U.MADV_DONTNEED)
    s = k.pagemap_scan(r.addr, r.addr + r.length, return_mask=0x3FF)
    assert rel(k, r.addr, s) == [(0, 512, W), (512, 1024, 0)]


def test_dontneed_of_whole_table_frees_it(k: FakeKernel) -> None:
    """PT reclaim (measured on 6.18): zapping a whole, then empty, 2 MiB table frees it."""
    r = k.map_anon(1024 * PS)
    write(k, r.addr + 5 * PS)
    write(k, r.addr + 600 * PS)
    k.madvise(r.addr, 512 * PS, U.MADV_DONTNEED)
    s = k.pagemap_scan(r.addr, r.addr + r.length, return_mask=0x3FF)
    assert rel(k, r.addr, s) == [(0, 512, 0), (512, 600, W), (600, 601, P | W),
                                 (601, 1024, W)]
