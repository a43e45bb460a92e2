"""The restore path (graceful stop, detach): every evicted page back into guest memory,
in runs: store → pages (served back) → COPY/ZEROPAGE, while the fault server keeps
serving whatever the guest touches meanwhile."""

from __future__ import annotations

import numpy as np
import trio

from ..kernel.api import KernelError
from .ranges import runs
from .region import RegionCtx
from .store import RecordError

RESTORE_CHUNK = 256


async def restore_all(r: RegionCtx) -> int:
    """Bring every evicted page back; returns the pages restored. Pages whose record is
    bad are poisoned (they stay POISONED: nothing to restore)."""
    done = 0
    for first, count, _ in runs(r.pages.evicted_pages_array()):
        for off in range(0, count, RESTORE_CHUNK):
            done += _restore_run(r, first + off, min(RESTORE_CHUNK, count - off))
            await trio.lowlevel.checkpoint()
    r.pages.flush()
    left = r.pages.evicted_pages
    if left:
        r.report.log.error(f"{r.name}:restore", "region %s: %d pages could not be "
                           "restored; their records stay", r.name, left)
    return done


def _restore_run(r: RegionCtx, first: int, n: int) -> int:
    u = r.uffd
    pages = np.arange(first, first + n, dtype=np.uint64)
    pages = pages[r.pages.evicted_mask(pages)]  # the fault server may have won
    got: list[tuple[int, bytes | None]] = []
    for p in pages.tolist():
        try:
            got.append((p, r.store.get(r.rid, p)))
        except (KeyError, RecordError) as e:
            if r.pages.poisoned(p):
                r.report.obs.poisoned(r.name, 1)
            try:
                u.poison(u.addr(p))
            except KernelError as pe:  # the next fault on it poisons again
                r.report.error(pe, f"UFFDIO_POISON page {p} ({e})")
    restored = 0
    i = 0
    while i < len(got):  # adjacent pages of the same kind: one ioctl
        j = i + 1
        zero = got[i][1] is None
        while (j < len(got) and got[j][0] == got[j - 1][0] + 1
               and (got[j][1] is None) == zero):
            j += 1
        addr = u.addr(got[i][0])
        try:
            u.fill(addr, None if zero else b"".join(d for _, d in got[i:j] if d is not None),
                   (j - i) * u.ps)
            for p, _ in got[i:j]:
                r.pages.served_back(p)
            restored += j - i
        except KernelError:
            restored += _one_by_one(r, got[i:j])  # EEXIST inside a run: a fault was first
        i = j
    return restored


def _one_by_one(r: RegionCtx, got: list[tuple[int, bytes | None]]) -> int:
    u = r.uffd
    n = 0
    for p, d in got:
        a = u.addr(p)
        try:
            if d is None:
                u.zero(a)
            else:
                u.copy(a, d)
        except KernelError as e:
            r.report.error(e, f"restore page {p}")
            continue
        r.pages.served_back(p)
        n += 1
    return n
