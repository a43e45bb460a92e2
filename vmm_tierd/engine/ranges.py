"""Page ranges and masks: PAGEMAP_SCAN regions to per-page masks, sorted pages to runs.
Pure numpy, no Python loop over pages."""

from __future__ import annotations

import numpy as np

FEW_RANGES = 32


def ranges_to_mask(regions: np.ndarray, base: int, npages: int,
                   page_size: int = 4096, clear: np.ndarray | None = None
                   ) -> np.ndarray:
    """bool[npages]: pages covered by PAGEMAP_SCAN ``regions`` ((n, 3): start, end, cat).
    With ``clear`` (bool[npages]): set the covered pages False in it and return it
    (``clear & ~mask`` without building the mask where that is cheaper)."""
    r = np.asarray(regions, dtype=np.uint64).reshape(-1, 3)
    out = np.zeros(npages, dtype=bool) if clear is None else clear
    val = clear is None
    if not len(r):
        return out
    # user addresses are < 2**63: an int64 view is exact, and >> floors like //
    lo = r[:, 0].view(np.int64) - base
    hi = r[:, 1].view(np.int64) - (base - page_size + 1)  # ceil
    if page_size & (page_size - 1):
        lo //= page_size
        hi //= page_size
    else:
        shift = page_size.bit_length() - 1
        lo >>= shift
        hi >>= shift
    if int(lo.min()) < 0 or int(hi.max()) > npages:
        np.clip(lo, 0, npages, out=lo)
        np.clip(hi, 0, npages, out=hi)
    if len(lo) <= FEW_RANGES:  # e.g. PAGE_IS_PRESENT: a few long runs
        for a, b in zip(lo.tolist(), hi.tolist(), strict=True):
            out[a:b] = val
        return out
    keep = hi > lo
    if not keep.all():
        lo, hi = lo[keep], hi[keep]
    lens = hi - lo
    total = int(lens.sum())
    if total * 3 < npages:  # sparse: set each page, cheaper than a scan of npages
        out[np.arange(total, dtype=np.int64) + np.repeat(lo - (np.cumsum(lens) - lens),
                                                          lens)] = val
        return out
    if bool(np.all(lo[1:] >= hi[:-1])):  # sorted, disjoint: as returned
        edges = np.zeros(npages + 1, dtype=np.int8)
        edges[lo] = 1
        edges[hi] -= 1  # a range may start where the previous one ends
        m = np.cumsum(edges[:-1], dtype=np.int8).view(bool)
    else:
        edges32 = np.bincount(lo, minlength=npages + 1).astype(np.int32)
        edges32 -= np.bincount(hi, minlength=npages + 1).astype(np.int32)
        m = np.cumsum(edges32[:-1], dtype=np.int32) > 0
    if clear is None:
        return m
    np.logical_not(m, out=m)
    clear &= m
    return clear


def runs(pages: np.ndarray) -> list[tuple[int, int, int]]:
    """Contiguous runs of sorted page indexes: (first_page, count, index_in_pages)."""
    n = len(pages)
    if n == 0:
        return []
    brk = np.flatnonzero(np.diff(pages.astype(np.int64)) != 1) + 1
    starts = np.concatenate(([0], brk))
    ends = np.concatenate((brk, [n]))
    return [(int(pages[s]), int(e - s), int(s)) for s, e in zip(starts, ends, strict=True)]
