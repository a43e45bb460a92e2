"""Segment log of the page store: in-memory mirror of segment and counter state, and the
operations run inside one LMDB write txn (changes gathered in a ``Delta``, applied to
memory only after commit)."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, TypeAlias

from .store_format import (
    IDX,
    KEY,
    KIND_ZERO,
    MAX_PAGE,
    SEGKEY,
    SEGMETA,
    Counters,
    Delta,
    encode_segment,
    segment_keys,
)

if TYPE_CHECKING:
    import lmdb

Txn: TypeAlias = "lmdb.Transaction[bytes]"
Rec = tuple[bytes, int, int, bytes]  # index key, kind, crc32, payload (b"" for zero pages)
Seg = tuple[int, bytes, int]  # segment id, encoded value, payload bytes


class SegmentLog:
    def __init__(self, dbs: dict[str, Any], segment_bytes: int, compact_below: float) -> None:
        self.meta, self.idx, self.seg, self.segmeta = (
            dbs["meta"], dbs["index"], dbs["seg"], dbs["segmeta"])
        self.segment_bytes = segment_bytes
        self.compact_below = compact_below
        self.counters = Counters()
        self.segs: dict[int, tuple[int, int]] = {}
        self.sparse: set[int] = set()
        self.dead = 0
        self._ids = itertools.count(1)

    def new_id(self) -> int:
        """A fresh segment id (itertools.count is atomic under the GIL; an aborted txn
        just leaves a gap)."""
        return next(self._ids)

    def load(self, txn: lmdb.Transaction[bytes]) -> None:
        self.counters = Counters.unpack(txn.get(b"counters", db=self.meta))
        self.segs.clear()
        for k, v in txn.cursor(db=self.segmeta):
            live, total = SEGMETA.unpack(v)
            self.segs[SEGKEY.unpack(k)[0]] = (live, total)
        cur = txn.cursor(db=self.seg)
        self._ids = itertools.count(SEGKEY.unpack(cur.key())[0] + 1 if cur.last() else 1)
        self.sparse = {s for s, v in self.segs.items() if self.is_sparse(v)}
        self.dead = sum(total - live for live, total in self.segs.values())

    def is_sparse(self, seg: tuple[int, int] | None) -> bool:
        return seg is not None and seg[0] < self.compact_below * seg[1]

    def delta(self) -> Delta:
        c = self.counters
        return Delta(Counters(c.records, c.zero, c.raw, c.compressed))

    def finish(self, txn: Txn, d: Delta) -> None:
        """Write the delta's segment meta and counters (last step of every write txn)."""
        for sid, v in d.segs.items():
            k = SEGKEY.pack(sid)
            if v is None:
                txn.delete(k, db=self.seg)
                txn.delete(k, db=self.segmeta)
            else:
                txn.put(k, SEGMETA.pack(*v), db=self.segmeta)
        txn.put(b"counters", d.counters.pack(), db=self.meta)

    def apply(self, d: Delta) -> None:
        self.counters = d.counters
        for sid, v in d.segs.items():
            old = self.segs.pop(sid, None)
            if old is not None:
                self.dead -= old[1] - old[0]
            self.sparse.discard(sid)
            if v is not None:
                self.segs[sid] = v
                self.dead += v[1] - v[0]
                if self.is_sparse(v):
                    self.sparse.add(sid)

    def reset(self) -> None:
        self.counters = Counters()
        self.segs.clear()
        self.sparse.clear()
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
            txn.put(SEGKEY.pack(sid), encode_segment(payloads, [recs[i][0] for i in pend]),
                    db=self.seg)
            d.segs[sid] = (size, size)
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
        sid, _, ln, _, kind = IDX.unpack(old)
        d.counters.add(kind, ln, -1)
        if kind == KIND_ZERO:
            return
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

    def compact(self, txn: Txn, d: Delta, max_segments: int) -> int:
        """Rewrite the live records of the sparsest segments into new ones."""
        cands = [s for s in self.sparse | set(d.segs) if self.is_sparse(d.seg(s, self.segs))]
        cands.sort(key=lambda s: _fraction(d.seg(s, self.segs)))
        recs: list[Rec] = []
        for sid in cands[:max_segments]:
            val = txn.get(SEGKEY.pack(sid), db=self.seg)
            d.segs[sid] = None
            if val is None:
                continue
            for k in segment_keys(val):
                iv = txn.get(k, db=self.idx)
                if iv is None:
                    continue
                s2, off, ln, crc, kind = IDX.unpack(iv)
                if s2 == sid:
                    recs.append((k, kind, crc, val[off:off + ln]))
        recs.sort(key=lambda r: r[0])
        for k, v in self.write_segments(txn, d, recs, count=False):
            txn.put(k, v, db=self.idx)
        return min(len(cands), max_segments)


def _fraction(seg: tuple[int, int] | None) -> float:
    return seg[0] / max(1, seg[1]) if seg else 0.0
