"""The cold-page store: zstd-compressed 4 KiB pages in log-structured LMDB segments.

Layout: ``store_format``; segment bookkeeping: ``store_log``. One LMDB write txn per call,
and in-memory counters change only after it committed: a page given to ``put_batch`` may
be dropped from memory once that returned. Writers are serialised by a lock; ``get`` runs
concurrently in its own read txn. The directory holds an exclusive flock for the life of
the PageStore, so records of any other instance id are dead and are reclaimed at open.
"""

from __future__ import annotations

import fcntl
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar, cast

import lmdb
import numpy as np
import zstandard

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
    SYNC_MODES,
    ZERO_CRC,
    Counters,
    Delta,
    PutResult,
    RecordError,
    StoreError,
    StoreFullError,
    StoreStats,
    crc32,
    owner_key,
    region_key,
)
from .store_log import SegmentLog, Txn, pack_pages, write_error

T = TypeVar("T")

__all__ = ["PageStore", "PutResult", "RecordError", "StoreError", "StoreFullError",
           "StoreStats"]


class PageStore:
    def __init__(self, path: Path, *, map_size: int = 8 << 30, zstd_level: int = 1,
                 sync: str = "commit", instance_id: str | None = None,
                 segment_pages: int = 32, compact_below: float = 0.5,
                 gc_dead: float = 0.1, compact_in_put: float = 2.0,
                 keep_owner: Callable[[str], bool] | None = None) -> None:
        """``keep_owner``: at open, records of regions owned by anyone but this instance
        are reclaimed, except those whose owner this says to keep (a VMM still running
        whose uffd outlived the daemon that evicted its pages)."""
        if sync not in SYNC_MODES:
            raise ValueError(f"store sync must be one of {', '.join(SYNC_MODES)}, not {sync!r}")
        self.path = Path(path).expanduser()
        self.map_size = map_size
        self.sync_mode = sync
        self.zstd_level = zstd_level
        self.instance_id = instance_id or uuid.uuid4().hex
        self.compact_in_put = compact_in_put
        self._wlock = threading.Lock()
        self._local = threading.local()
        self._gen = 0  # bumped after every commit: a reused read txn renews when it moved
        self._readers: set[lmdb.Transaction] = set()  # every thread's, aborted at close
        self._rlock = threading.Lock()  # for _readers: never waits for a write txn
        self._closed = True
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.path, 0o700)
            self._lockfd = os.open(self.path / "store.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StoreError(f"{self.path}: can't create the store directory: {e}") from e
        try:
            fcntl.flock(self._lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._lockfd)
            raise StoreError(f"{self.path}: store is in use by another process") from e
        try:
            self._env = lmdb.open(
                str(self.path), map_size=map_size, max_dbs=4, subdir=True, lock=True,
                writemap=False, readahead=False, mode=0o600,
                sync=sync == "commit", metasync=sync == "commit")
            for name in ("data.mdb", "lock.mdb", "store.lock"):
                os.chmod(self.path / name, 0o600)
            dbs = {n: self._env.open_db(n.encode()) for n in ("meta", "index", "seg", "segmeta")}
        except (lmdb.Error, OSError) as e:
            if hasattr(self, "_env"):
                self._env.close()
            os.close(self._lockfd)
            raise StoreError(f"{self.path}: can't open the LMDB store: {e}; if it is "
                             "corrupt, it only holds pages of exited daemons: move it aside "
                             "to start afresh") from e
        self._closed = False
        self._meta, self._idx, self._seg = dbs["meta"], dbs["index"], dbs["seg"]
        psize = self._env.stat()["psize"]
        # a value of V bytes takes ceil((V + 16) / psize) overflow pages (16 = page header)
        self._log = SegmentLog(dbs, segment_pages * psize - 16, compact_below, gc_dead)
        self._data_file = self.path / "data.mdb"
        self._regions: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._owners: dict[int, str] = {}
        self._claimed: set[int] = set()  # regions claimed by region_id() since open
        self._keep_owner = keep_owner
        try:
            self._load()
            self.reclaimed = self._reclaim()
        except (lmdb.Error, StoreError) as e:
            self.close()
            raise StoreError(f"{self.path}: store unreadable at open ({e}); it only holds "
                             "pages of exited daemons: move it aside to start afresh") from e

    # ---- open-time state -------------------------------------------------------------
    def _load(self) -> None:
        with self._env.begin() as txn:
            self._log.load(txn)
            cur = txn.cursor(db=self._meta)
            if cur.set_range(b"owner/"):
                for k, v in cur:
                    if not k.startswith(b"owner/"):
                        break
                    self._owners[REGION_ID.unpack(k[6:])[0]] = v.decode()
            if cur.set_range(b"region/"):
                for k, v in cur:
                    if not k.startswith(b"region/"):
                        break
                    rid = REGION_ID.unpack(v)[0]
                    self._regions[k[7:].decode()] = rid
                    self._names[rid] = k[7:].decode()

    def _reclaim(self) -> int:
        """Delete every record of regions owned by other (dead) instances."""
        keep = self._keep_owner or (lambda owner: False)
        foreign = {r for r in self._names if self._owners.get(r) != self.instance_id
                   and not keep(self._owners.get(r, ""))}
        before = self._log.counters.records
        if not foreign or not before:
            return 0
        if not set(self._owners) - foreign:  # nothing is ours: drop everything at once

            def drop(txn: Txn, d: Delta) -> None:
                for db in (self._log.idx, self._log.seg, self._log.segmeta):
                    txn.drop(db, delete=False)
                for r in foreign:
                    txn.delete(owner_key(r), db=self._meta)
                d.counters = Counters()

            self._write("reclaim", drop)
            self._log.reset()
        else:

            def ranges(txn: Txn, d: Delta) -> None:
                for r in foreign:
                    self._log.delete_range(txn, d, r, 0, MAX_PAGE + 1)
                    txn.delete(owner_key(r), db=self._meta)

            self._write("reclaim", ranges)
        for r in foreign:
            self._owners.pop(r, None)
        return before - self._log.counters.records

    # ---- the write path --------------------------------------------------------------
    def _write(self, what: str, fn: Callable[[Txn, Delta], T], bump: bool = False) -> T:
        """Run ``fn`` in one write txn. ``bump``: if it freed segments, commit one more tiny
        txn: LMDB reuses pages freed by txn N only from txn N+2 on (N+1 must still be able
        to open the snapshot of N-1), so without it the next put would grow the file."""
        with self._wlock:
            if self._closed:
                raise StoreError(f"{self.path}: store is closed")
            delta = self._log.delta()
            try:
                with self._env.begin(write=True) as txn:
                    result = fn(txn, delta)
                    self._log.finish(txn, delta)
                self._gen += 1
            except lmdb.MapFullError as e:
                raise StoreFullError(
                    f"{self.path}: LMDB map full during {what}, nothing of it was written; "
                    f"raise store map_size_bytes (now {self.map_size})") from e
            except lmdb.Error as e:
                raise write_error(self.path, what, e) from e
            self._log.apply(delta)
            if bump and None in delta.segs.values():
                try:
                    with self._env.begin(write=True) as txn:
                        txn.put(b"counters", self._log.counters.pack(), db=self._meta)
                except lmdb.Error:
                    pass  # only an optimisation; the data txn above is committed
            return result

    def _compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "cctx", None)
        if c is None:
            c = self._local.cctx = zstandard.ZstdCompressor(
                level=self.zstd_level, write_content_size=False, write_checksum=False)
        return c

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "dctx", None)
        if d is None:
            d = self._local.dctx = zstandard.ZstdDecompressor()
        return d

    # ---- public API --------------------------------------------------------------------
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
            elif self._owners.get(r) != owner:
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

    # ---- small metadata of the daemon's own (e.g. which uffd a VMM holds for us) ------
    def get_meta(self, key: str) -> bytes | None:
        with self._env.begin() as txn:
            v = txn.get(b"user/" + key.encode(), db=self._meta)
        return None if v is None else bytes(v)

    def put_meta(self, key: str, value: bytes) -> None:
        self._write(f"put_meta({key!r})",
                    lambda txn, d: txn.put(b"user/" + key.encode(), value, db=self._meta))

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

    def delete_meta(self, key: str) -> None:
        self._write(f"delete_meta({key!r})",
                    lambda txn, d: txn.delete(b"user/" + key.encode(), db=self._meta))

    def region_name(self, region: int) -> str:
        return self._names.get(region, f"#{region}")

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
                self._log.compact(txn, d, live_budget=int(self.compact_in_put *
                                                          (counts.compressed + 1)))

        what = f"put_batch({self.region_name(region)}, {n} pages)"
        try:
            self._write(what, put)
        except StoreFullError:
            if not gc:
                raise
            gc = False  # the GC rewrite made the txn bigger: once more without it
            self._write(what, put)
        return PutResult(n, counts.zero, counts.raw, counts.compressed)

    def _reader(self) -> lmdb.Transaction:
        """This thread's read txn, reused until released or until a write committed (so a
        page whose put_batch returned is always found). py-lmdb has no reset()/renew(), but
        keeps an aborted read txn as a spare that the next begin() renews: same effect."""
        loc = self._local
        txn = getattr(loc, "rtxn", None)
        if txn is not None:
            if loc.gen == self._gen:
                return txn
            self.release_reader()
        with self._rlock:
            if self._closed:
                raise lmdb.Error("store is closed")
            gen = self._gen  # read before begin: a commit in between renews next time
            txn = self._env.begin(buffers=True)
            self._readers.add(txn)
        loc.rtxn, loc.gen = txn, gen
        return txn

    def release_reader(self) -> None:
        """Let go of this thread's read snapshot (the engine calls it after each burst of
        faults): a long-held snapshot keeps LMDB from reusing freed pages."""
        loc = self._local
        txn = getattr(loc, "rtxn", None)
        if txn is not None:
            loc.rtxn = None
            with self._rlock:
                self._readers.discard(txn)
                if not self._closed:
                    txn.abort()

    def get(self, region: int, page: int) -> bytes | None:
        key = KEY.pack(region, page)
        try:
            txn = self._reader()
            try:
                iv = txn.get(key, db=self._idx)
                if iv is None:
                    raise KeyError((region, page))
                sid, off, ln, crc, kind = IDX.unpack(iv)
                if kind == KIND_ZERO:
                    if crc != ZERO_CRC:
                        raise self._bad(region, page, "checksum mismatch")
                    return None
                sv = txn.get(SEGKEY.pack(sid), db=self._seg)
                if sv is None or off + ln > len(sv):
                    raise self._bad(region, page, f"segment {sid} missing")
                if kind == KIND_ZSTD:
                    try:
                        out = self._decompressor().decompress(sv[off:off + ln],
                                                              max_output_size=PAGE)
                    except zstandard.ZstdError as e:
                        raise self._bad(region, page, f"decompress failed: {e}") from e
                elif kind == KIND_RAW:
                    out = bytes(sv[off:off + ln])
                else:
                    raise self._bad(region, page, f"unknown record kind {kind}")
            except lmdb.Error:
                self.release_reader()  # don't reuse a txn in an unknown state
                raise
        except lmdb.Error as e:
            raise self._bad(region, page, f"lmdb: {e}") from e
        if len(out) != PAGE:
            raise self._bad(region, page, f"{len(out)} bytes, not {PAGE}")
        if crc32(out) != crc:
            raise self._bad(region, page, "checksum mismatch")
        return out

    def _bad(self, region: int, page: int, reason: str) -> RecordError:
        return RecordError(self.region_name(region), page, reason)

    def delete(self, region: int, pages: np.ndarray) -> int:
        keys = [KEY.pack(region, p) for p in np.unique(np.asarray(pages, np.uint64)).tolist()]
        if not keys:
            return 0
        return self._write(f"delete({self.region_name(region)}, {len(keys)} pages)",
                           lambda txn, d: self._log.delete(txn, d, keys), bump=True)

    def delete_range(self, region: int, first: int, end: int) -> int:
        if end <= first:
            return 0
        return self._write(f"delete_range({self.region_name(region)})",
                           lambda txn, d: self._log.delete_range(txn, d, region, first, end),
                           bump=True)

    def pages(self, region: int) -> np.ndarray:
        """Page indexes with a record in ``region`` (sorted uint64)."""
        out: list[int] = []
        with self._env.begin() as txn:
            cur = txn.cursor(db=self._idx)
            if cur.set_range(KEY.pack(region, 0)):
                for k in cur.iternext(keys=True, values=False):
                    r, p = KEY.unpack(k)
                    if r != region:
                        break
                    out.append(p)
        return np.array(out, dtype=np.uint64)

    def compact(self, max_segments: int = 8) -> int:
        """Rewrite the live records of up to ``max_segments`` sparse segments; how many."""
        if not self._log.needs_gc():
            return 0
        return self._write("compact", lambda txn, d: self._log.compact(txn, d, max_segments),
                           bump=True)

    def sync(self) -> None:
        with self._wlock:
            if not self._closed:
                self._env.sync(True)

    def stats(self) -> StoreStats:
        c = self._log.counters
        try:
            st = os.stat(self._data_file)
            disk, size = st.st_blocks * 512, st.st_size
        except OSError:
            disk = size = 0
        used = 0
        if not self._closed:
            with self._env.begin() as txn:  # pages in use by the trees: the file minus free
                for db in (self._meta, self._idx, self._seg, self._log.segmeta):
                    t = txn.stat(db)
                    used += t["branch_pages"] + t["leaf_pages"] + t["overflow_pages"]
        return StoreStats(c.records, c.zero, c.raw, c.compressed, disk, c.records * PAGE,
                          len(self._log.segs), self._log.dead, size, used * PAGE)

    def scan_stats(self) -> StoreStats:
        """Counters recomputed by a full index scan (slow; for checks)."""
        c = Counters()
        with self._env.begin(buffers=True) as txn:
            for _, v in txn.cursor(db=self._idx):
                _, _, ln, _, kind = IDX.unpack(v)
                c.add(kind, ln, 1)
        s = self.stats()
        return StoreStats(c.records, c.zero, c.raw, c.compressed, s.disk_bytes,
                          c.records * PAGE, s.segments, s.dead_bytes, s.file_bytes,
                          s.used_bytes)

    def corrupt_for_test(self, region: int, page: int) -> None:
        key = KEY.pack(region, page)

        def flip(txn: Txn, d: Delta) -> None:
            iv = txn.get(key, db=self._idx)
            if iv is None:
                raise KeyError((region, page))
            sid, off, ln, crc, kind = IDX.unpack(iv)
            if kind == KIND_ZERO:  # no payload: flip a bit of the stored crc instead
                txn.put(key, IDX.pack(sid, off, ln, crc ^ 1, kind), db=self._idx)
                return
            sk = SEGKEY.pack(sid)
            val = bytearray(txn.get(sk, db=self._seg) or b"")
            val[off + ln // 2] ^= 0x5A
            txn.put(sk, bytes(val), db=self._seg)

        self._write("corrupt_for_test", flip)
        self.sync()

    def close(self) -> None:
        with self._wlock:
            if self._closed:
                return
            with self._rlock:
                self._closed = True
                self._gen += 1
                for txn in self._readers:  # no read txn may outlive its env
                    try:
                        txn.abort()
                    except lmdb.Error:
                        pass
                self._readers.clear()
            self._env.close()
            os.close(self._lockfd)

    def __enter__(self) -> PageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
