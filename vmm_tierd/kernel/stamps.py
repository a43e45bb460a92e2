"""The write-stamp format every guest workload uses (C threads on linux, simulated vCPUs
on the fake), and a pure reference implementation for checking pages.

Page layout after a write of ``version`` (>= 1) to page ``index`` (within its region):
- bytes 0..7:     u64 little-endian ``index + 1``
- bytes 8..15:    u64 little-endian ``version``
- bytes 16..2047: xorshift64 stream seeded with ``seed(index, version)`` (incompressible)
- bytes 2048..:   the u64 ``seed(index, version)`` repeated (compressible)
A page never written is all zeros and has expected version 0.
"""

from __future__ import annotations

import numpy as np

from .api import Pattern, WorkloadSpec

PAGE = 4096
GOLDEN = 0x9E3779B97F4A7C15
MASK = (1 << 64) - 1


def seed(index: int, version: int) -> int:
    s = ((index + 1) * GOLDEN ^ (version * 0xBF58476D1CE4E5B9)) & MASK
    return s or GOLDEN


def page_bytes(index: int, version: int) -> bytes:
    """The exact 4 KiB a write of ``version`` leaves in page ``index``."""
    if version == 0:
        return bytes(PAGE)
    s = seed(index, version)
    out = np.zeros(PAGE // 8, dtype=np.uint64)
    out[0] = index + 1
    out[1] = version
    x = s
    for i in range(2, 256):
        x ^= (x << 13) & MASK
        x ^= x >> 7
        x ^= (x << 17) & MASK
        out[i] = x
    out[256:] = s
    return out.tobytes()


def read_stamp(page: bytes) -> tuple[int, int]:
    """(index, version) stamped in ``page``; (-1, 0) for an all-zero page."""
    head = np.frombuffer(page[:16], dtype="<u8")
    return int(head[0]) - 1, int(head[1])


def workload_layout(npages: int, spec: WorkloadSpec
                    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Deterministic from ``spec.seed``: the never-written zero pages (uint8 mask), and for
    ZIPF the page of each popularity rank and the CDF over ranks."""
    rng = np.random.default_rng(spec.seed)
    zero = np.zeros(npages, dtype=np.uint8)
    nzero = min(npages, round(spec.zero_fraction * npages)) if spec.zero_fraction > 0 else 0
    if nzero:
        zero[rng.choice(npages, size=nzero, replace=False)] = 1
    if spec.pattern is not Pattern.ZIPF:
        return zero, None, None
    perm = rng.permutation(npages).astype(np.uint64)
    weights = np.arange(1, npages + 1, dtype=np.float64) ** -spec.zipf_s
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    cdf[-1] = 1.0
    return zero, perm, cdf
