"""PAGEMAP_SCAN on the fake kernel (fs/proc/task_mmu.c: do_pagemap_scan), vectorised.

Categories of a page come from a 256-entry lookup table indexed by its flag byte, one table
per VMA, so a scan is a few numpy passes over the flag array, chunk by chunk; a chunk whose
flags are all equal costs one comparison. Behaviour measured on the 6.18 host (probe:
fake and linux backends side by side) and reproduced here:
- a none PTE inside an existing PTE table reads as PAGE_IS_WRITTEN (its uffd-wp bit is
  clear), on every VMA; that is why MADV_DONTNEED and a MOVE-out count as writes
  (unless the MADV_DONTNEED covered a whole 2 MiB table, which is then freed);
- a range with no PTE table at all (a "hole") reads as the VMA's category, plus
  PAGE_IS_WRITTEN when the VMA is registered MODE_WP (with or without WP_ASYNC);
- a uffd-wp or poison PTE marker reads as PAGE_IS_SWAPPED (poison: also WRITTEN);
- PM_SCAN_WP_MATCHING re-protects exactly the output pages that were WRITTEN (holes get
  markers, as uffd_wp_range does);
- VMAs that are not async-wp are skipped by WP_MATCHING, or fail with EPERM under
  PM_SCAN_CHECK_WPASYNC; end < start scans nothing.
Inside RWP VMAs (RWP dialect) the 7.3 rules apply: PAGE_IS_ACCESSED = !uffd bit, no
PAGE_IS_WRITTEN, none PTEs report nothing. Everywhere else the 6.18 rules apply.
"""

from __future__ import annotations

import errno

import numpy as np

from . import uapi
from .api import Dialect, KernelError, ScanResult
from .fake_state import (
    F_POISON,
    F_PRESENT,
    F_PROTNONE,
    F_PT,
    F_RWP,
    F_WP,
    F_ZERO,
    MODE_MINOR,
    MODE_RWP,
    MODE_WP,
    PAGE,
    TASK_SIZE,
    FakeState,
    Mapping,
    Mm,
    Seg,
)

CHUNK = 1 << 22  # pages per numpy pass (16 GiB of guest memory)
SENT = 0xFFFF  # "not interesting" in the output table
CATS_618 = (1 << 9) - 1
WRITTEN = uapi.PAGE_IS_WRITTEN
_F = np.arange(256)


class ScanMixin(FakeState):
    def _page_lut(self, m: Mapping, s: Seg) -> np.ndarray:
        rwp_vma = self.dialect is Dialect.RWP and s.ctx is not None and bool(s.mode & MODE_RWP)
        deact = (self.dialect is Dialect.RFC and m.anon and s.ctx is not None
                 and bool(s.mode & MODE_MINOR))
        clean = uapi.PAGE_IS_ACCESSED if rwp_vma else WRITTEN  # what !uffd-bit means here
        f = _F
        present = (f & F_PRESENT) != 0
        marker = ~present & ((f & (F_WP | F_POISON)) != 0)
        none = ~present & ~marker
        uffd = (f & (F_WP | F_RWP)) != 0
        c = np.zeros(256, dtype=np.int64)
        c[present] = uapi.PAGE_IS_PRESENT
        c[present & ~uffd] |= clean
        if m.file is not None:
            c[present] |= uapi.PAGE_IS_FILE
        c[present & ((f & F_ZERO) != 0)] |= uapi.PAGE_IS_PFNZERO
        if deact:
            c[present & ((f & F_PROTNONE) != 0)] |= uapi.PAGE_IS_UFFD_DEACTIVATED
        c[marker] = uapi.PAGE_IS_SWAPPED
        c[marker & ((f & F_WP) == 0)] |= clean
        if not rwp_vma:
            c[none & ((f & F_PT) != 0)] = WRITTEN
            if s.ctx is not None and s.mode & MODE_WP:
                c[none] = WRITTEN
        return c

    def pagemap_scan(self, start: int, end: int, *, category_mask: int = 0,
                     category_inverted: int = 0, category_anyof_mask: int = 0,
                     return_mask: int = 0, flags: int = 0, max_pages: int = 0
                     ) -> ScanResult:
        return self.scan_mm(self.mm, start, end, category_mask, category_inverted,
                            category_anyof_mask, return_mask, flags, max_pages)

    def scan_mm(self, mm: Mm, start: int, end: int, category_mask: int,
                category_inverted: int, category_anyof_mask: int, return_mask: int,
                flags: int, max_pages: int) -> ScanResult:
        """PAGEMAP_SCAN over ``mm`` (this process's, or /proc/PID/pagemap's)."""
        op = "PAGEMAP_SCAN"
        with self.lock:
            self.enter(op)
            if mm.dead:
                raise KernelError(op, errno.ESRCH, 0, "the process has exited")
            cats = CATS_618 | (1 << 9 if self.dialect is not Dialect.NONE else 0)
            if flags & ~(uapi.PM_SCAN_WP_MATCHING | uapi.PM_SCAN_CHECK_WPASYNC):
                raise KernelError(op, errno.EINVAL, 0, f"flags 0x{flags:x}")
            if (category_mask | category_inverted | category_anyof_mask | return_mask) & ~cats:
                raise KernelError(op, errno.EINVAL, 0, "unknown category bits")
            if start % PAGE:
                raise KernelError(op, errno.EINVAL, 0, f"start 0x{start:x} not aligned")
            if end > TASK_SIZE:
                raise KernelError(op, errno.EFAULT, 0, f"bad range 0x{start:x}-0x{end:x}")
            if end <= start:
                return ScanResult(np.zeros((0, 3), dtype=np.uint64), end)
            end = -(-end // PAGE) * PAGE
            limit = max_pages if max_pages > 0 else 1 << 62
            return self._scan(mm, start, end, category_mask, category_inverted,
                              category_anyof_mask, return_mask, flags, limit)

    def _scan(self, mm: Mm, start: int, end: int, mask: int, inv: int, anyof: int,
              ret: int, flags: int, limit: int) -> ScanResult:
        wpm = bool(flags & uapi.PM_SCAN_WP_MATCHING)
        outs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        found = 0
        walk_end = end
        for m, lo, hi in mm.maps_in(start, end):
            for s, a, b in m.segs_in(lo, hi):
                wp_allowed = (s.ctx is not None and bool(s.mode & MODE_WP)
                              and s.ctx.has(uapi.UFFD_FEATURE_WP_ASYNC))
                if not wp_allowed:
                    if flags & uapi.PM_SCAN_CHECK_WPASYNC:
                        raise KernelError("PAGEMAP_SCAN", errno.EPERM, 0,
                                          "VMA without async write-protect")
                    if wpm:
                        continue
                vcat = uapi.PAGE_IS_WPALLOWED if wp_allowed else 0
                req = mask & uapi.PAGE_IS_WPALLOWED
                if ((vcat ^ inv) & req) != req:
                    continue
                c = self._page_lut(m, s) | vcat
                x = c ^ inv
                hit = ((x & mask) == mask) & ((x & anyof) != 0 if anyof else True)
                out_lut = np.where(hit, c & ret, SENT).astype(np.uint16)
                hole = (_F & (F_PRESENT | F_WP | F_POISON | F_PT)) == 0
                wp_lut = hit & (((c & WRITTEN) != 0) | hole)
                for ca in range(a, b, CHUNK):
                    cb = min(b, ca + CHUNK)
                    got, cut = self._scan_chunk(m, ca, cb, out_lut, wp_lut if wpm else None,
                                                limit - found, outs)
                    found += got
                    if cut is not None:
                        walk_end = m.addr + cut * PAGE
                        return self._result(outs, walk_end)
        return self._result(outs, walk_end)

    def _scan_chunk(self, m: Mapping, a: int, b: int, out_lut: np.ndarray,
                    wp_lut: np.ndarray | None, room: int,
                    outs: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
                    ) -> tuple[int, int | None]:
        """Emit the runs of pages [a, b) of ``m``; returns (pages found, cut page or None)."""
        fl = m.flags[a:b]
        n = b - a
        if _uniform(fl):
            v = int(out_lut[fl[0]])
            starts = np.zeros(1 if v != SENT else 0, dtype=np.int64)
            ends = np.full(len(starts), n, dtype=np.int64)
            vals = np.full(len(starts), v, dtype=np.uint16)
        else:
            ov = out_lut[fl]
            chg = np.flatnonzero(ov[1:] != ov[:-1]) + 1
            starts = np.concatenate(([0], chg))
            ends = np.concatenate((chg, [n]))
            vals = ov[starts]
            keep = vals != SENT
            starts, ends, vals = starts[keep], ends[keep], vals[keep]
        sizes = ends - starts
        total = int(sizes.sum())
        cut = None
        if total > room:
            # max_pages (pagemap_scan_output): the page that would exceed the limit ends the
            # walk there (ENOSPC); walk_end is where output stopped.
            csum = np.cumsum(sizes)
            k = int(np.searchsorted(csum, room, side="left"))
            if room > 0 and int(csum[k]) == room:
                cut = a + int(starts[k + 1])  # limit reached exactly: next run stops it
                starts, ends, vals = starts[:k + 1], ends[:k + 1], vals[:k + 1]
            else:
                starts, ends, vals = starts[:k + 1], ends[:k + 1].copy(), vals[:k + 1]
                ends[k] -= int(csum[k]) - room
                cut = a + int(ends[k])
                if ends[k] <= starts[k]:
                    starts, ends, vals = starts[:k], ends[:k], vals[:k]
            total = room
        if wp_lut is not None and len(starts):
            self._wp_matched(m, a, fl, wp_lut, starts, ends)
        base = np.uint64(m.addr + a * PAGE)
        outs.append((base + starts.astype(np.uint64) * np.uint64(PAGE),
                     base + ends.astype(np.uint64) * np.uint64(PAGE), vals))
        return total, cut

    def _wp_matched(self, m: Mapping, a: int, fl: np.ndarray, wp_lut: np.ndarray,
                    starts: np.ndarray, ends: np.ndarray) -> None:
        """PM_SCAN_WP_MATCHING: write-protect the output pages that were WRITTEN (and
        matched holes), atomically with the scan."""
        sel = np.zeros(len(fl) + 1, dtype=np.int8)
        np.add.at(sel, starts, 1)
        np.add.at(sel, ends, -1)
        inrun = np.cumsum(sel[:-1]) > 0
        do = inrun & wp_lut[fl]
        if not do.any():
            return
        hole = do & ((fl & (F_PRESENT | F_WP | F_POISON | F_PT)) == 0)
        fl[do] |= F_WP
        if hole.any():
            idx = np.flatnonzero(hole)
            m.set_pt(a + int(idx[0]), a + int(idx[-1]) + 1)

    @staticmethod
    def _result(outs: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                walk_end: int) -> ScanResult:
        if not outs:
            return ScanResult(np.zeros((0, 3), dtype=np.uint64), walk_end)
        s = np.concatenate([o[0] for o in outs])
        e = np.concatenate([o[1] for o in outs])
        v = np.concatenate([o[2] for o in outs]).astype(np.uint64)
        if len(s) == 0:
            return ScanResult(np.zeros((0, 3), dtype=np.uint64), walk_end)
        # pagemap_scan_push_range(): merge with the previous region when adjacent and equal
        new = np.ones(len(s), dtype=np.bool_)
        new[1:] = (s[1:] != e[:-1]) | (v[1:] != v[:-1])
        g = np.flatnonzero(new)
        last = np.append(g[1:], len(s)) - 1
        regions = np.stack([s[g], e[last], v[g]], axis=1).astype(np.uint64)
        return ScanResult(regions, walk_end)


def _uniform(fl: np.ndarray) -> bool:
    n = len(fl)
    if n == 0:
        return True
    v = int(fl[0])
    k = n - n % 8
    if k and not np.all(fl[:k].view(np.uint64) == np.uint64(v * 0x0101010101010101)):
        return False
    return bool(np.all(fl[k:] == v))
