"""LMDB's free pages, read from data.mdb with pread, so that the store can punch them out.

LMDB never shrinks its file and keeps freed pages in its free-list B-tree (the "freeDB",
core DB 0): key = id of the txn that freed them, value = an IDL (count, then page numbers).
py-lmdb can't open that DB, so this reads it from the file (format of LMDB 0.9, 64-bit:
see mdb.c's MDB_meta, MDB_db, MDB_page and MDB_node). Pages freed by txn T may still be
seen by a reader whose snapshot is older than T, so only records with T < ``oldest`` (the
oldest snapshot any reader holds, and never the last commit: LMDB's own rule for reusing
them, mdb_page_alloc/mdb_find_oldest) are returned. The caller holds the write lock, so
no write txn changes the file meanwhile, and cross-checks the count against the page
totals before punching anything.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = 0xBEEFC0DE
PAGEHDR = 16  # pgno u64, pad u16, flags u16, lower/upper u16 (or overflow page count u32)
P_BRANCH, P_LEAF, P_OVERFLOW = 0x01, 0x02, 0x04
F_BIGDATA = 0x01
P_INVALID = (1 << 64) - 1
MDB_DB = struct.Struct("<IHHQQQQQ")  # pad, flags, depth, branch, leaf, overflow, entries, root
META = struct.Struct("<IIQQ")  # magic, version, address, mapsize; then 2 MDB_DB, last_pg, txnid
NODE = struct.Struct("<HHHH")  # lo, hi, flags, ksize


@dataclass
class FreeList:
    txnid: int  # of the meta page read
    last_pg: int
    free_db_pages: int  # pages of the freeDB's own tree
    pages: np.ndarray  # free pages reusable now (sorted uint64)
    total_free: int  # all free pages, also those a reader may still see


class FormatError(Exception):
    pass


def _pread(fd: int, n: int, off: int) -> bytes:
    b = os.pread(fd, n, off)
    if len(b) != n:
        raise FormatError(f"short read at {off} ({len(b)} of {n} bytes)")
    return b


def _meta(fd: int, psize: int) -> tuple[int, int, tuple[int, ...]]:
    """(txnid, last_pg, freeDB MDB_db) of the newer valid meta page."""
    best: tuple[int, int, tuple[int, ...]] | None = None
    for m in (0, 1):
        b = _pread(fd, PAGEHDR + META.size + 2 * MDB_DB.size + 16, m * psize)
        magic, version, _, _ = META.unpack_from(b, PAGEHDR)
        if magic != MAGIC or version != 1:
            continue
        at = PAGEHDR + META.size
        free_db = MDB_DB.unpack_from(b, at)
        last_pg, txnid = struct.unpack_from("<QQ", b, at + 2 * MDB_DB.size)
        if best is None or txnid > best[0]:
            best = (txnid, last_pg, free_db)
    if best is None:
        raise FormatError("no valid meta page")
    return best


def read_free_list(fd: int, psize: int, oldest: int) -> FreeList:
    txnid, last_pg, free_db = _meta(fd, psize)
    root = free_db[7]
    tree_pages = free_db[3] + free_db[4] + free_db[5]
    usable: list[np.ndarray] = []
    total = 0
    todo = [] if root == P_INVALID else [root]
    seen = 0
    while todo:
        pgno = todo.pop()
        seen += 1
        if pgno > last_pg or seen > tree_pages + 1:
            raise FormatError(f"freeDB page {pgno} out of range")
        page = _pread(fd, psize, pgno * psize)
        flags, lower = struct.unpack_from("<HH", page, 10)
        nkeys = (lower - PAGEHDR) >> 1
        ptrs = struct.unpack_from(f"<{nkeys}H", page, PAGEHDR)
        for p in ptrs:
            if p + NODE.size > psize:
                raise FormatError(f"node offset {p} on page {pgno}")
            lo, hi, nflags, ksize = NODE.unpack_from(page, p)
            if flags & P_BRANCH:
                todo.append(lo | hi << 16 | nflags << 32)
                continue
            if not flags & P_LEAF or ksize != 8:
                raise FormatError(f"freeDB page {pgno}: flags 0x{flags:x}, key size {ksize}")
            (key,) = struct.unpack_from("<Q", page, p + NODE.size)
            dsize = lo | hi << 16
            at = p + NODE.size + ksize
            if nflags & F_BIGDATA:
                (ov,) = struct.unpack_from("<Q", page, at)
                data = _pread(fd, dsize, ov * psize + PAGEHDR)
            else:
                data = page[at:at + dsize]
            idl = np.frombuffer(data, dtype=np.uint64, count=len(data) // 8)
            n = int(idl[0]) if len(idl) else 0
            if n > len(idl) - 1:
                raise FormatError(f"freeDB record {key}: {n} pages in {len(idl) - 1} slots")
            total += n
            if key < oldest:
                usable.append(idl[1:1 + n])
    pages = np.sort(np.concatenate(usable)) if usable else np.zeros(0, np.uint64)
    if len(pages) and int(pages[-1]) > last_pg:
        raise FormatError(f"free page {int(pages[-1])} beyond the last page {last_pg}")
    return FreeList(txnid, last_pg, tree_pages, pages, total)


def runs(pages: np.ndarray, min_pages: int) -> np.ndarray:
    """Sorted page numbers -> (first, count) rows of consecutive runs >= min_pages."""
    if not len(pages):
        return np.zeros((0, 2), dtype=np.uint64)
    p = pages.astype(np.int64)
    cut = np.flatnonzero(np.diff(p) != 1) + 1
    starts = np.concatenate(([0], cut))
    ends = np.concatenate((cut, [len(p)]))
    out = np.stack([p[starts], ends - starts], axis=1)
    return out[out[:, 1] >= min_pages].astype(np.uint64)


def oldest_reader(readers_text: str) -> int | None:
    """Smallest snapshot txnid in py-lmdb's ``Environment.readers()`` table."""
    best: int | None = None
    for line in readers_text.splitlines()[1:]:
        f = line.split()
        if len(f) == 3 and f[2].isdigit():
            t = int(f[2])
            best = t if best is None else min(best, t)
    return best
