"""Segment log of the page store: in-memory mirror of segment and counter state, and the
operations run inside one LMDB write txn (changes gathered in a ``Delta``, applied to
memory only after commit). ``geo`` holds each segment's place in data.mdb (file offset,
value length): learned after the commit that wrote it, persisted in segmeta with the next
write txn."""

from __future__ import annotations

import errno
import itertools
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeAlias

import lmdb
import numpy as np
import zstandard

from .store_format import (
    COUNT,
    IDX,
    KEY,
    KIND_RAW,
    KIND_ZERO,
    KIND_ZSTD,
    MAX_PAGE,
    PAGE,
    RAW_THRESHOLD,
    SEGKEY,
    SEGMETA,
    SEGMETA_V1,
    Counters,
    Delta,
    StoreFullError,
    StoreWriteError,
    crc32,
    encode_segment,
    record_crc,
    segment_keys,
)

Txn: TypeAlias = "lmdb.Transaction[bytes]"
Rec = tuple[bytes, int, int, bytes]  # index key, kind, crc32, payload (b"" for zero pages)
Seg = tuple[int, bytes, int]  # segment id, encoded value, payload bytes
SegReader = Callable[[Txn, int], "bytes | memoryview | None"]  # a segment's whole value


NBUCKETS = 16


def _bucket(seg: tuple[int, int]) -> int:
    return min(NBUCKETS - 1, seg[0] * NBUCKETS // max(seg[1], 1))


class SegmentLog:
    """Segments are garbage-collected sparsest first: always those below ``compact_below``
    live, and while dead bytes exceed ``gc_dead`` of the live ones, any with >5% dead."""

    def __init__(self, dbs: dict[str, Any], segment_bytes: int, compact_below: float,
                 gc_dead: float = 0.1) -> None:
        self.meta, self.idx, self.seg, self.segmeta = (
            dbs["meta"], dbs["index"], dbs["seg"], dbs["segmeta"])
        self.segment_bytes = segment_bytes
        self.compact_below = compact_below
        self.gc_dead = gc_dead
        self.counters = Counters()
        self.segs: dict[int, tuple[int, int]] = {}
        self.geo: dict[int, tuple[int, int]] = {}  # id -> (file offset or 0, value length)
        self.unsaved: set[int] = set()  # geo known, not yet in segmeta
        self.buckets: list[set[int]] = [set() for _ in range(NBUCKETS)]  # by live fraction
        self.dead = 0
        self._ids = itertools.count(1)

    def new_id(self) -> int:
        """A fresh segment id (itertools.count is atomic under the GIL; an aborted txn
        just leaves a gap)."""
        return next(self._ids)

    def load(self, txn: lmdb.Transaction[bytes]) -> None:
        self.counters = Counters.unpack(txn.get(b"counters", db=self.meta))
        self.segs.clear()
        self.geo.clear()
        self.unsaved.clear()
        for k, v in txn.cursor(db=self.segmeta):
            sid = SEGKEY.unpack(k)[0]
            if len(v) == SEGMETA.size:
                live, total, off, vlen = SEGMETA.unpack(v)
                if off:
                    self.geo[sid] = (off, vlen)
            else:
                live, total = SEGMETA_V1.unpack(v)
            self.segs[sid] = (live, total)
        cur = txn.cursor(db=self.seg)
        self._ids = itertools.count(SEGKEY.unpack(cur.key())[0] + 1 if cur.last() else 1)
        for b in self.buckets:
            b.clear()
        for sid, seg in self.segs.items():
            self.buckets[_bucket(seg)].add(sid)
        self.dead = sum(total - live for live, total in self.segs.values())

    def gc_below(self) -> float:
        """Live fraction under which a segment is worth rewriting now."""
        if self.dead > self.gc_dead * max(1, self.counters.compressed):
            return 0.95
        return self.compact_below

    def needs_gc(self) -> bool:
        top = int(self.gc_below() * NBUCKETS)
        return any(self.buckets[b] for b in range(min(top + 1, NBUCKETS)))

    def delta(self) -> Delta:
        c = self.counters
        return Delta(Counters(c.records, c.zero, c.raw, c.compressed))

    def finish(self, txn: Txn, d: Delta) -> None:
        """Write the delta's segment meta and counters (last step of every write txn),
        with the places of segments learned since the last one."""
        for sid, v in d.segs.items():
            k = SEGKEY.pack(sid)
            if v is None:
                txn.delete(k, db=self.seg)
                txn.delete(k, db=self.segmeta)
            else:
                off, vlen = self.geo.get(sid, (0, d.new.get(sid, 0)))
                txn.put(k, SEGMETA.pack(*v, off, vlen), db=self.segmeta)
                if off:
                    d.saved.append(sid)
        for sid in list(self.unsaved):
            seg = self.segs.get(sid)
            if sid not in d.segs and seg is not None:
                txn.put(SEGKEY.pack(sid), SEGMETA.pack(*seg, *self.geo[sid]), db=self.segmeta)
                d.saved.append(sid)
        txn.put(b"counters", d.counters.pack(), db=self.meta)

    def located(self, sid: int, off: int, vlen: int) -> None:
        """A committed segment's value starts at file offset ``off``."""
        if sid in self.segs:
            self.geo[sid] = (off, vlen)
            self.unsaved.add(sid)

    def apply(self, d: Delta) -> None:
        self.counters = d.counters
        self.unsaved.difference_update(d.saved)
        for sid, v in d.segs.items():
            old = self.segs.pop(sid, None)
            if old is not None:
                self.dead -= old[1] - old[0]
                self.buckets[_bucket(old)].discard(sid)
            if v is not None:
                self.segs[sid] = v
                self.dead += v[1] - v[0]
                self.buckets[_bucket(v)].add(sid)
            else:
                self.geo.pop(sid, None)
                self.unsaved.discard(sid)

    def reset(self) -> None:
        self.counters = Counters()
        self.segs.clear()
        self.geo.clear()
        self.unsaved.clear()
        for b in self.buckets:
            b.clear()
        self.dead = 0

    def write_segments(self, txn: Txn, d: Delta, recs: list[Rec],
                       count: bool = True) -> list[tuple[bytes, bytes]]:
        """Pack ``recs`` (sorted by key) into new segments; their index items, in order."""
        vals: list[bytes] = [b""] * len(recs)
        pend: list[int] = []
        payloads: list[bytes] = []
        size = 0

        def flush() -> None:
            sid = self.new_id()
            val = encode_segment(payloads, [recs[i][0] for i in pend])
            txn.put(SEGKEY.pack(sid), val, db=self.seg)
            d.segs[sid] = (size, size)
            d.new[sid] = len(val)
            off = 0
            for i, p in zip(pend, payloads, strict=True):
                vals[i] = IDX.pack(sid, off, len(p), recs[i][2], recs[i][1])
                off += len(p)

        for i, (_, kind, crc, p) in enumerate(recs):
            if count:
                d.counters.add(kind, len(p), 1)
            if kind == KIND_ZERO:
                vals[i] = IDX.pack(0, 0, 0, crc, KIND_ZERO)
                continue
            if pend and size + len(p) + KEY.size * (len(pend) + 1) + 4 > self.segment_bytes:
                flush()
                pend, payloads, size = [], [], 0
            pend.append(i)
            payloads.append(p)
            size += len(p)
        if pend:
            flush()
        return [(r[0], v) for r, v in zip(recs, vals, strict=True)]

    def kill(self, d: Delta, old: bytes) -> None:
        """Account an index value that was just removed or replaced."""
        sid, off, ln, _, kind = IDX.unpack(old)
        d.counters.add(kind, ln, -1)
        if kind == KIND_ZERO:
            return
        d.killed.append((sid, off, ln))
        seg = d.seg(sid, self.segs)
        if seg is not None:
            live = seg[0] - ln
            d.segs[sid] = None if live <= 0 else (live, seg[1])

    def put(self, txn: Txn, d: Delta, segs: list[Seg], items: list[tuple[bytes, bytes]],
            counts: Counters) -> None:
        """Store prepared segments and their index ``items`` (sorted by key)."""
        for sid, val, size in segs:
            txn.put(SEGKEY.pack(sid), val, db=self.seg)
            d.segs[sid] = (size, size)
            d.new[sid] = len(val)
        d.counters.merge(counts)
        _, added = txn.cursor(db=self.idx).putmulti(items, dupdata=False, overwrite=False)
        if added < len(items):  # some pages already had records: replace those
            replaced = 0
            for k, v in items:
                old = txn.get(k, db=self.idx)
                if old is not None and old != v:
                    self.kill(d, old)
                    txn.put(k, v, db=self.idx)
                    replaced += 1
            # the rest were zero records replaced by identical zero records
            for _ in range(len(items) - added - replaced):
                d.counters.add(KIND_ZERO, 0, -1)

    def delete(self, txn: Txn, d: Delta, keys: list[bytes]) -> int:
        n = 0
        for k in keys:
            old = txn.pop(k, db=self.idx)
            if old is not None:
                self.kill(d, old)
                n += 1
        return n

    def delete_range(self, txn: Txn, d: Delta, region: int, first: int, end: int) -> int:
        stop = KEY.pack(region, end) if end <= MAX_PAGE else KEY.pack(region + 1, 0)
        cur = txn.cursor(db=self.idx)
        n = 0
        if not cur.set_range(KEY.pack(region, first)):
            return 0
        while (k := cur.key()) and k < stop:
            self.kill(d, cur.value())
            n += 1
            cur.delete()  # moves to the next record (key() is b"" past the end)
        return n

    def compact(self, txn: Txn, d: Delta, read: SegReader, max_segments: int = 1 << 30,
                live_budget: int = 1 << 62) -> int:
        """Rewrite the live records of the sparsest segments (below ``gc_below``) into
        new ones: at most ``max_segments`` and about ``live_budget`` live bytes."""
        below = self.gc_below()
        pool: set[int] = set(d.segs)  # touched in this txn: their buckets are stale
        for b in range(min(int(below * NBUCKETS) + 1, NBUCKETS)):
            pool |= self.buckets[b]
        cands = []
        for sid in pool:
            seg = d.seg(sid, self.segs)
            if seg is not None and seg[0] < below * seg[1]:
                cands.append((seg[0] / max(1, seg[1]), sid, seg[0]))
        cands.sort()
        chosen: list[int] = []
        live = 0
        for _, sid, ln in cands[:max_segments]:
            if chosen and live + ln > live_budget:
                break
            chosen.append(sid)
            live += ln
        recs: list[Rec] = []
        for sid in chosen:
            val = read(txn, sid)
            d.segs[sid] = None
            if val is None:
                continue
            for k in segment_keys(val):
                iv = txn.get(k, db=self.idx)
                if iv is None:
                    continue
                s2, off, ln, crc, kind = IDX.unpack(iv)
                if s2 == sid:
                    recs.append((k, kind, crc, bytes(val[off:off + ln])))
        recs.sort(key=lambda r: r[0])
        for k, v in self.write_segments(txn, d, recs, count=False):
            txn.put(k, v, db=self.idx)
        return len(chosen)


def pack_pages(cctx: zstandard.ZstdCompressor, log: SegmentLog, region: int,
               mv: memoryview, order: np.ndarray, srt: np.ndarray, nz: list[bool]
               ) -> tuple[list[Seg], list[tuple[bytes, bytes]], Counters]:
    """Compress and crc pages (``mv`` page ``order[i]`` is page index ``srt[i]``, sorted)
    into new segments, outside the write lock. Returns segments, index items, counts."""
    compress = cctx.compress
    pack, ipack, ksize, crc = KEY.pack, IDX.pack, KEY.size, crc32
    limit = log.segment_bytes - COUNT.size
    items: list[tuple[bytes, bytes]] = []
    segs: list[Seg] = []
    payloads: list[bytes] = []
    keys: list[bytes] = []
    sid, size, raw, zero, total = log.new_id(), 0, 0, 0, 0
    for j, page in zip(order.tolist(), srt.tolist(), strict=True):
        key = pack(region, page)
        if not nz[j]:
            items.append((key, ipack(0, 0, 0, record_crc(key, None), KIND_ZERO)))
            zero += 1
            continue
        p = mv[j * PAGE:(j + 1) * PAGE]
        c = compress(p)
        ln, kind = len(c), KIND_ZSTD
        if ln >= RAW_THRESHOLD:
            c, ln, kind, raw = bytes(p), PAGE, KIND_RAW, raw + 1
        if size + ln + ksize * (len(keys) + 1) > limit and keys:
            segs.append((sid, encode_segment(payloads, keys), size))
            total += size
            sid, size, payloads, keys = log.new_id(), 0, [], []
        items.append((key, ipack(sid, size, ln, crc(p, crc(key)), kind)))  # record_crc
        payloads.append(c)
        keys.append(key)
        size += ln
    if keys:
        segs.append((sid, encode_segment(payloads, keys), size))
        total += size
    return segs, items, Counters(len(items), zero, raw, total)


# what decoding a damaged record can raise (SystemError: py-lmdb reporting LMDB's error
# badly, with the lmdb.Error as its __cause__)
DECODE_ERRORS = (struct.error, ValueError, IndexError, UnicodeDecodeError, SystemError)

_STRERROR = {os.strerror(e): e for e in sorted(errno.errorcode, reverse=True)}
# LMDB's own codes: its file is corrupt, or it can't go on (MDB_PANIC: a meta page write
# failed), rather than an operating-system error
_LMDB_CORRUPT = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.PageFullError,
                 lmdb.PanicError, lmdb.BadTxnError, lmdb.InvalidError,
                 lmdb.VersionMismatchError)


def lmdb_errno(e: BaseException) -> int:
    """The errno behind an LMDB failure: py-lmdb formats "what: strerror(rc)"."""
    if isinstance(e, OSError) and e.errno:
        return e.errno
    if isinstance(e, lmdb.MapFullError):
        return errno.ENOSPC
    if isinstance(e, _LMDB_CORRUPT):
        return errno.EUCLEAN
    text = str(e)
    for msg, num in _STRERROR.items():
        if text.endswith(msg):
            return num
    return errno.EIO


def write_error(path: Path, what: str, e: BaseException, err: int | None = None
                ) -> StoreWriteError:
    """A failed write txn as a typed error with its real errno. LMDB reports a short
    write (what ENOSPC becomes when part of a pwrite fitted) as EIO: the file system's
    state tells which it was."""
    num = err if err is not None else lmdb_errno(e)
    free, ro = -1, False
    try:
        vfs = os.statvfs(path)
        free, ro = vfs.f_bavail * vfs.f_frsize, bool(vfs.f_flag & os.ST_RDONLY)
    except OSError:
        pass
    if num == errno.EIO and ro:
        num = errno.EROFS
    elif num == errno.EIO and 0 <= free < 64 << 20:
        num = errno.ENOSPC
    msg = f"{path}: {what} failed, nothing of it was written: {e}"
    if isinstance(e, lmdb.MapFullError):
        return StoreFullError(f"{path}: LMDB map full during {what}, nothing of it was "
                              "written; raise store map_size_bytes", path=str(path), op=what,
                              err=errno.ENOSPC)
    if num == errno.ENOSPC:
        return StoreFullError(f"{msg}; the disk is full ({free} bytes free): free disk space",
                              path=str(path), op=what, err=num)
    if num == errno.EROFS:
        msg += "; the file system is read-only (remounted after an error?)"
    return StoreWriteError(msg, path=str(path), op=what, err=num)
