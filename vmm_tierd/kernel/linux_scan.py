"""PAGEMAP_SCAN over an open pagemap file: /proc/self/pagemap (``LinuxKernel``) or
/proc/PID/pagemap (``LinuxProcess``). One loop for both."""

from __future__ import annotations

import errno
import threading
from typing import Any

import numpy as np

from . import uapi
from .api import KernelError, ScanResult

from vmm_tierd._native import ffi, lib  # isort: skip


class PagemapScanner:
    """PAGEMAP_SCAN ioctls on ``fd`` (a pagemap file; not owned, never closed here)
    with one result vector of ``vec_len`` regions, allocated at the first scan."""

    def __init__(self, fd: int, page_size: int, vec_len: int = 65536) -> None:
        self.fd = fd
        self.page_size = page_size
        self.vec_len = vec_len
        self._vec: Any = None
        self._arg = ffi.new("struct pm_scan_arg *")
        self._lock = threading.Lock()

    def scan(self, start: int, end: int, *, category_mask: int = 0,
             category_inverted: int = 0, category_anyof_mask: int = 0,
             return_mask: int = 0, flags: int = 0, max_pages: int = 0) -> ScanResult:
        """Loops until [start, end) is really covered. The kernel stops a call when the
        vector is full (ret == vec_len) or max_pages were found. ``walk_end`` is not a
        reliable completion flag on long scans, so completion is ``ret < vec_len``; on a
        full vector the next call resumes at the end of the last region returned (never
        before, so WP_MATCHING never re-protects a page that was already reported)."""
        ps = self.page_size
        parts: list[np.ndarray] = []
        calls = found = 0
        cur = start
        walk_end = start
        with self._lock:
            if self._vec is None:
                self._vec = ffi.new("struct page_region[]", self.vec_len)
            arg, vec, vlen = self._arg, self._vec, self.vec_len
            while cur < end:
                arg.size = uapi.SIZEOF_PM_SCAN_ARG
                arg.flags = flags
                arg.start = cur
                arg.end = end
                arg.walk_end = 0
                arg.vec = int(ffi.cast("uintptr_t", vec))
                arg.vec_len = vlen
                arg.max_pages = max_pages - found if max_pages else 0
                arg.category_inverted = category_inverted
                arg.category_mask = category_mask
                arg.category_anyof_mask = category_anyof_mask
                arg.return_mask = return_mask
                ret = lib.vt_ioctl(self.fd, uapi.PAGEMAP_SCAN, arg)
                calls += 1
                if ret < 0:
                    raise KernelError("PAGEMAP_SCAN", -ret, 0,
                                      f"[0x{cur:x}, 0x{end:x}) after {calls - 1} calls")
                walk_end = int(arg.walk_end)
                if ret == 0:
                    break
                got = np.frombuffer(ffi.buffer(vec, ret * uapi.SIZEOF_PAGE_REGION),
                                    dtype=np.uint64).reshape(ret, 3).copy()
                parts.append(got)
                if max_pages:
                    found += int(((got[:, 1] - got[:, 0]) // ps).sum())
                    if found >= max_pages:
                        break
                if ret < vlen:
                    break
                nxt = int(got[-1, 1])
                if nxt <= cur:
                    raise KernelError("PAGEMAP_SCAN", errno.EIO, 0,
                                      f"no progress at 0x{cur:x} (walk_end 0x{walk_end:x})")
                cur = nxt
        regions = merge_regions(parts)
        if not max_pages or found < max_pages:
            walk_end = end
        return ScanResult(regions=regions, walk_end=walk_end, calls=calls)


def merge_regions(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate per-call results, re-merging a region a call boundary split (within
    one call the kernel already merges adjacent pages with equal categories)."""
    if not parts:
        return np.empty((0, 3), dtype=np.uint64)
    out = [parts[0]]
    for cur in parts[1:]:
        prev = out[-1]
        if prev[-1, 1] == cur[0, 0] and prev[-1, 2] == cur[0, 2]:
            prev[-1, 1] = cur[0, 1]
            cur = cur[1:]
        if len(cur):
            out.append(cur)
    return out[0] if len(out) == 1 else np.concatenate(out)
