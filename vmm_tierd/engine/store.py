"""The cold-page store: zstd-compressed 4 KiB pages in log-structured LMDB segments.

Layout: ``store_format``; segment bookkeeping: ``store_log``; the write txn and
failures: ``store_base``; the environment: ``store_env``; the directory and its trust:
``store_dir``; data.mdb beside LMDB (pread, page cache, holes, SIGBUS): ``store_file``
and ``store_free``; read txns: ``store_read``. One LMDB write txn per call, and in-memory
state changes only after it committed: a page given to ``put_batch`` may be dropped from
memory once that returned. Writers are serialised by a lock; reads run concurrently in
per-thread read txns. The directory holds an exclusive flock for the life of the store.

Failures: a write raises ``StoreWriteError`` (``StoreFullError`` for ENOSPC) with the
real errno and leaves nothing written; a read gives ``RecordError`` for that page only;
``health()`` says whether writes can work again before a restart.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Any, cast

import lmdb
import numpy as np
import zstandard

from .store_base import StoreBase
from .store_format import (
    IDX,
    KEY,
    KIND_RAW,
    KIND_ZERO,
    KIND_ZSTD,
    MAX_PAGE,
    PAGE,
    REGION_ID,
    SEGKEY,
    Counters,
    Delta,
    PutResult,
    RecordError,
    StoreError,
    StoreFullError,
    StoreHealth,
    StoreStats,
    StoreWriteError,
    crc32,
    owner_key,
    region_key,
)
from .store_log import Txn, lmdb_errno, pack_pages
from .store_read import decode, spans

Result = bytes | None | KeyError | RecordError

__all__ = ["PageStore", "PutResult", "RecordError", "StoreError", "StoreFullError",
           "StoreHealth", "StoreStats", "StoreWriteError"]


class PageStore(StoreBase):
    # ---- public API: writes ------------------------------------------------------------
    def region_id(self, name: str, owner: str | None = None) -> int:
        """The region's id, claimed for ``owner`` (default: this instance). Records the
        region holds for another owner are dead and go in the same txn."""
        owner = owner or self.instance_id
        rid = self._regions.get(name)
        if rid is not None and self._owners.get(rid) == owner and rid in self._claimed:
            return rid

        def claim(txn: Txn, d: Delta) -> int:
            r = rid
            if r is None:
                r = max(self._names, default=0) + 1
                txn.put(region_key(name), REGION_ID.pack(r), db=self._meta)
            elif self._owners.get(r, owner) != owner:
                self._log.delete_range(txn, d, r, 0, MAX_PAGE + 1)
            txn.put(owner_key(r), owner.encode(), db=self._meta)
            return r

        rid = self._write(f"region_id({name!r})", claim)
        self._regions[name] = rid
        self._names[rid] = name
        self._owners[rid] = owner
        self._claimed.add(rid)
        return rid

    def region_owner(self, name: str) -> str | None:
        rid = self._regions.get(name)
        return None if rid is None else self._owners.get(rid)

    # ---- small metadata of the daemon's own (which uffd a VMM holds for us, ...) ------
    def get_meta(self, key: str) -> bytes | None:
        with self._env.begin() as txn:
            v = txn.get(b"user/" + key.encode(), db=self._meta)
        return None if v is None else bytes(v)

    def put_meta(self, key: str, value: bytes) -> None:
        self._write(f"put_meta({key!r})",
                    lambda txn, d: txn.put(b"user/" + key.encode(), value, db=self._meta))

    def delete_meta(self, key: str) -> None:
        self._write(f"delete_meta({key!r})",
                    lambda txn, d: txn.delete(b"user/" + key.encode(), db=self._meta))

    def meta_keys(self, prefix: str = "") -> list[str]:
        start = b"user/" + prefix.encode()
        out = []
        with self._env.begin() as txn:
            cur = txn.cursor(db=self._meta)
            if cur.set_range(start):
                for k in cur.iternext(values=False):
                    if not k.startswith(start):
                        break
                    out.append(bytes(k)[len(b"user/"):].decode())
        return out

    def put_batch(self, region: int, pages: np.ndarray,
                  data: bytes | bytearray | memoryview) -> PutResult:
        idx = np.asarray(pages, dtype=np.uint64).ravel()
        mv = memoryview(data).cast("B")
        n = len(idx)
        if mv.nbytes != n * PAGE:
            raise ValueError(f"put_batch: {n} pages need {n * PAGE} bytes, got {mv.nbytes}")
        if region not in self._claimed:
            raise ValueError(f"put_batch: region id {region} not claimed with region_id()")
        if n == 0:
            return PutResult(0, 0, 0, 0)
        order = np.argsort(idx, kind="stable")
        srt = idx[order]
        if n > 1 and bool((srt[1:] == srt[:-1]).any()):
            raise ValueError("put_batch: duplicate page indexes in one batch")
        nonzero = np.frombuffer(mv, dtype=np.uint64).reshape(n, PAGE // 8).any(axis=1)
        nz = cast(list[bool], nonzero.tolist())
        segs, items, counts = pack_pages(self._compressor(), self._log, region, mv,
                                         order, srt, nz)
        gc = self.compact_in_put > 0

        def put(txn: Txn, d: Delta) -> None:
            self._log.put(txn, d, segs, items, counts)
            if gc:  # rewrite up to compact_in_put x this batch's bytes of sparse segments
                self._log.compact(txn, d, self._read_segment, live_budget=int(
                    self.compact_in_put * (counts.compressed + 1)))

        what = f"put_batch({self.region_name(region)}, {n} pages)"
        try:
            self._write(what, put)
        except StoreFullError:
            if not gc:
                raise
            gc = False  # the GC rewrite made the txn bigger: once more without it
            self._write(what, put)
        return PutResult(n, counts.zero, counts.raw, counts.compressed)

    def delete(self, region: int, pages: np.ndarray) -> int:
        keys = [KEY.pack(region, p) for p in np.unique(np.asarray(pages, np.uint64)).tolist()]
        if not keys:
            return 0
        return self._write(f"delete({self.region_name(region)}, {len(keys)} pages)",
                           lambda txn, d: self._log.delete(txn, d, keys), bump=True)

    def delete_range(self, region: int, first: int, end: int) -> int:
        """Delete the region's records of pages [first, end): a stop's last step. A
        failure (StoreWriteError) leaves them for the next start to reclaim."""
        if end <= first:
            return 0
        self._check_writable(f"delete_range({self.region_name(region)})")
        self._check_range(region, first, end)
        return self._write(f"delete_range({self.region_name(region)})",
                           lambda txn, d: self._log.delete_range(txn, d, region, first, end),
                           bump=True)

    def _check_range(self, region: int, first: int, end: int) -> None:
        """Walk the range read-only before deleting it: LMDB's delete rewrites the pages it
        walks, and on a damaged B-tree that can crash rather than fail. A damaged one
        marks the store corrupt: no write happens on it again."""
        stop = KEY.pack(region, end) if end <= MAX_PAGE else KEY.pack(region + 1, 0)
        s = self._pool.slot()
        with s.lk:
            try:
                cur = self._pool.txn(s).cursor(db=self._idx)
                if cur.set_range(KEY.pack(region, first)):
                    for k, v in cur.iternext():
                        if bytes(k) >= stop:
                            break
                        if len(k) != KEY.size or len(v) != IDX.size:
                            raise lmdb.CorruptedError(f"index entry {bytes(k)!r}")
            except (lmdb.Error, SystemError) as e:
                self._pool.drop(s)
                self._corrupt(f"checking before delete_range: {e}")
        self._check_writable(f"delete_range({self.region_name(region)})")

    def compact(self, max_segments: int = 8) -> int:
        """Rewrite the live records of up to ``max_segments`` sparse segments; how many."""
        if not self._log.needs_gc():
            return 0
        return self._write("compact", lambda txn, d: self._log.compact(
            txn, d, self._read_segment, max_segments), bump=True)

    def trim(self) -> int:
        """Give LMDB's free pages back to the file system (punch holes); bytes punched.
        Commits do it for what they freed; this also re-punches pages LMDB reused and freed
        again in between. Call it from a maintenance step, e.g. once a cycle in a worker
        thread (it waits for the write lock). It commits an empty txn first, so that pages
        freed by the last commit can go too."""
        with self._wlock:
            if self._closed or self._broken is not None:
                return 0
            try:
                with self._env.begin(write=True) as txn:
                    txn.put(b"counters", self._log.counters.pack(), db=self._meta)
                self._pool.committed()
                punched, _ = self._data.trim(self._env, list(self._dbs.values()), full=True)
            except (lmdb.Error, OSError) as e:
                self._problem("trim", lmdb_errno(e), f"{self.path}: trim: {e}")
                return 0
            self.punched_bytes += punched
            return punched

    def _read_segment(self, txn: Txn, sid: int) -> bytes | memoryview | None:
        """A segment's whole value for compaction: pread where it is known (no map
        touched, nothing left mapped), else through LMDB."""
        g = self._log.geo.get(sid)
        if g is not None:
            return self._data.read(*g)
        return txn.get(SEGKEY.pack(sid), db=self._seg)

    def sync(self) -> None:
        with self._wlock:
            if not self._closed:
                self._env.sync(True)

    # ---- public API: reads ---------------------------------------------------------------
    def get(self, region: int, page: int) -> bytes | None:
        """The page; None for a zero page. KeyError: no record. RecordError: the record
        can't be read (poison the page); nothing else fails. The fault path's one call:
        one index lookup in this thread's reused read txn, one pread. Anything unusual
        goes to ``get_many``, which says precisely what is wrong."""
        pool = self._pool
        s = pool.slot()
        key = KEY.pack(region, page)
        payload = None
        with s.lk:
            try:
                txn = s.txn
                if txn is None or s.gen != pool.gen:
                    self._data.ensure_guard()  # before this thread touches LMDB's map
                    txn = pool.txn(s)
                iv = txn.get(key, db=self._idx)
                if iv is None:
                    raise KeyError((region, page))
                if len(iv) == IDX.size:
                    sid, off, ln, crc, kind = IDX.unpack(iv)
                    if kind == KIND_ZERO and crc == crc32(key):
                        return None
                    g = self._log.geo.get(sid)
                    if g is not None:
                        payload = os.pread(self._data.fd, ln, g[0] + off)
            except (lmdb.Error, SystemError, OSError):
                payload = None
        if payload is not None and len(payload) == ln:
            try:
                if kind == KIND_ZSTD:
                    out = s.dctx.decompress(payload, max_output_size=PAGE)
                    if len(out) == PAGE and crc32(out, crc32(key)) == crc:
                        return out
                elif kind == KIND_RAW and ln == PAGE and crc32(payload, crc32(key)) == crc:
                    return payload
            except (zstandard.ZstdError, MemoryError):
                pass
        res = self.get_many(region, (page,))[0]
        if isinstance(res, KeyError | RecordError):
            raise res
        return res

    def get_many(self, region: int, pages: Sequence[int] | np.ndarray) -> list[Result]:
        """Pages of one region in one read txn (keys sorted, nearby payloads read with one
        pread), in the order asked: bytes, None (zero page), KeyError (no record) or
        RecordError (unreadable record) each."""
        plist = [int(p) for p in pages]
        out: list[Result] = [None] * len(plist)
        order = sorted(range(len(plist)), key=plist.__getitem__)
        keys = [KEY.pack(region, plist[i]) for i in order]
        name = self.region_name(region)
        panic = False
        s = self._pool.slot()
        faults = self._data.thread_sigbus_events()
        with s.lk:
            try:
                if s.txn is None or s.gen != self._pool.gen:
                    self._data.ensure_guard()  # before this thread touches LMDB's map
                txn = self._pool.txn(s)
                found = dict(txn.cursor(db=self._idx).getmulti(keys))
                reads: list[tuple[int, int, int, int, int]] = []  # file off, len, i, kind, crc
                geo = self._log.geo
                for key, i in zip(keys, order, strict=True):
                    iv = found.get(key)
                    if iv is None:
                        out[i] = KeyError((region, plist[i]))
                        continue
                    if len(iv) != IDX.size:
                        out[i] = self._bad_index(region, plist[i], len(iv))
                        continue
                    sid, off, ln, crc, kind = IDX.unpack(iv)
                    g = geo.get(sid)
                    if kind == KIND_ZERO:
                        out[i] = self._decoded(region, plist[i], kind, crc, b"")
                    elif g is not None:
                        reads.append((g[0] + off, ln, i, kind, crc))
                    else:
                        out[i] = self._get_slow(txn, region, plist[i], sid, off, ln, crc, kind)
                reads.sort()
                for start, length, idx in spans([(r[0], r[1], j) for j, r in enumerate(reads)]):
                    self._read_span(region, plist, out, start, length, [reads[j] for j in idx])
            except (lmdb.Error, SystemError) as e:  # SystemError: py-lmdb over an LMDB error
                self._pool.drop(s)
                err = lmdb_errno(e.__cause__ or e if isinstance(e, SystemError) else e)
                if (self._data.thread_sigbus_events() != faults
                        or self._sigbus() != self._sigbus_seen):
                    err = errno.EIO  # LMDB read zeros where the file faulted
                    self._after_sigbus()
                elif err == errno.EUCLEAN:
                    self._corrupt(f"reading the index: {e}")
                panic = isinstance(e, lmdb.PanicError)
                self._problem("get", err, f"{self.path}: reading the index: {e}")
                out = [RecordError(name, p, f"lmdb: {e}", err) for p in plist]
        if panic and self._recover():
            return self.get_many(region, pages)
        return out

    def _bad_index(self, region: int, page: int, n: int) -> RecordError:
        why = f"index entry of {n} bytes, not {IDX.size}"
        self._corrupt(f"{self.region_name(region)}:{page}: {why}")
        self._problem("get", errno.EBADMSG, f"{self.path}: {self.region_name(region)}:"
                      f"{page}: {why}")
        return RecordError(self.region_name(region), page, why, errno.EBADMSG)

    def _decoded(self, region: int, page: int, kind: int, crc: int,
                 payload: bytes | memoryview) -> bytes | RecordError | None:
        got, why, err = decode(self._pool.slot().dctx, KEY.pack(region, page), kind, crc,
                               payload)
        if why:
            name = self.region_name(region)
            self._problem("get", err, f"{self.path}: record {name}:{page}: {why}")
            return RecordError(name, page, why, err)
        return got

    def _read_span(self, region: int, plist: list[int], out: list[Result], start: int,
                   length: int, reads: list[tuple[int, int, int, int, int]]) -> None:
        try:
            buf: bytes | None = self._data.read(start, length)
        except OSError as e:
            buf = self._data.read_mapped(start, length)  # what the page cache still has
            if buf is None:
                err = e.errno or errno.EIO
                self._problem("get", err, f"{self.path}: reading data.mdb: {e}")
                name = self.region_name(region)
                for _, _, i, _, _ in reads:
                    out[i] = RecordError(name, plist[i], f"read failed: {e.strerror}", err)
                return
        mv = memoryview(cast(bytes, buf))
        dctx, pack = self._pool.slot().dctx, KEY.pack
        for off, ln, i, kind, crc in reads:
            p = mv[off - start:off - start + ln]
            if kind == KIND_ZSTD:  # the common case inline; anything else says why below
                try:
                    got = dctx.decompress(p, max_output_size=PAGE)
                except (zstandard.ZstdError, MemoryError):
                    got = b""
                if len(got) == PAGE and crc32(got, crc32(pack(region, plist[i]))) == crc:
                    out[i] = got
                    continue
            out[i] = self._decoded(region, plist[i], kind, crc, p)

    def _get_slow(self, txn: Any, region: int, page: int, sid: int, off: int, ln: int,
                  crc: int, kind: int) -> bytes | RecordError | None:
        """A record whose segment's place is not known yet: through LMDB (two lookups)."""
        sv = txn.get(SEGKEY.pack(sid), db=self._seg)
        if sv is None or off + ln > len(sv):
            return RecordError(self.region_name(region), page, f"segment {sid} missing",
                               errno.EBADMSG)
        foff = self._data.offset_of(sv)
        if foff:
            self._log.located(sid, foff, len(sv))
        return self._decoded(region, page, kind, crc, bytes(sv[off:off + ln]))

    def release_reader(self) -> None:
        """Let go of this thread's read snapshot if a commit made it stale (kept for
        callers that ended each burst with it; writers now release idle stale ones)."""
        s = self._pool.slot()
        if s.txn is not None and s.gen != self._pool.gen:
            with s.lk:
                self._pool.drop(s)

    def stats(self, cache: bool = False) -> StoreStats:
        """Counters and sizes (cheap: fstat and four LMDB stats). ``cache``: also measure
        data.mdb's pages in the page cache (mincore over LMDB's map, ~1 ms per GiB of
        store; under systemd the unit's SystemCallFilter must allow mincore)."""
        c = self._log.counters
        try:
            st = os.fstat(self._data.fd)
            disk, size = st.st_blocks * 512, st.st_size
        except (OSError, AttributeError):
            disk = size = 0
        used = self._used_bytes() if not self._closed else 0
        cached = self._data.cached() if cache and not self._closed else -1
        return StoreStats(c.records, c.zero, c.raw, c.compressed, disk, c.records * PAGE,
                          len(self._log.segs), self._log.dead, size, used, cached)

    def pages(self, region: int) -> np.ndarray:
        """Page indexes with a record in ``region`` (sorted uint64)."""
        out: list[int] = []
        s = self._pool.slot()
        with s.lk:
            cur = self._pool.txn(s).cursor(db=self._idx)
            if cur.set_range(KEY.pack(region, 0)):
                for k in cur.iternext(keys=True, values=False):
                    r, p = KEY.unpack(k)
                    if r != region:
                        break
                    out.append(p)
        return np.array(out, dtype=np.uint64)

    def scan_stats(self) -> StoreStats:
        """Counters recomputed by a full index scan (slow; for checks)."""
        c = Counters()
        s = self._pool.slot()
        with s.lk:
            for _, v in self._pool.txn(s).cursor(db=self._idx):
                _, _, ln, _, kind = IDX.unpack(v)
                c.add(kind, ln, 1)
        st = self.stats()
        return StoreStats(c.records, c.zero, c.raw, c.compressed, st.disk_bytes,
                          c.records * PAGE, st.segments, st.dead_bytes, st.file_bytes,
                          st.used_bytes)

    def corrupt_for_test(self, region: int, page: int) -> None:
        """Flip a byte of the record's payload (or of a zero record's crc), committed."""
        key = KEY.pack(region, page)

        def flip(txn: Txn, d: Delta) -> None:
            iv = txn.get(key, db=self._idx)
            if iv is None:
                raise KeyError((region, page))
            sid, off, ln, crc, kind = IDX.unpack(iv)
            if kind == KIND_ZERO:
                txn.put(key, IDX.pack(sid, off, ln, crc ^ 1, kind), db=self._idx)
                return
            g = self._log.geo.get(sid)
            if g is not None:  # in place, where pread finds it (the file, not a new value)
                b = os.pread(self._data.fd, 1, g[0] + off + ln // 2)
                os.pwrite(self._data.fd, bytes([b[0] ^ 0x5A]), g[0] + off + ln // 2)
                return
            sk = SEGKEY.pack(sid)
            val = bytearray(txn.get(sk, db=self._seg) or b"")
            val[off + ln // 2] ^= 0x5A
            txn.put(sk, bytes(val), db=self._seg)

        self._write("corrupt_for_test", flip)
        self.sync()

    def __enter__(self) -> PageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
