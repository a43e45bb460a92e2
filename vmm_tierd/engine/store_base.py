"""The page store's foundation: opening (and reopening) LMDB in a trusted directory,
reclaiming what exited daemons left, the write txn, failures and health. The public API
is ``store.PageStore``.

A store opened without ``instance_id`` is a new instance: every record already there
belongs to an exited daemon, so data.mdb is replaced by an empty one at open (the count is
``reclaimed``; region ids are kept). With an ``instance_id``, records of other instances'
regions are deleted instead; if that fails they stay for the next open, as after kill -9.
"""

from __future__ import annotations

import errno
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

import lmdb
import zstandard

from .store_dir import StoreDir
from .store_env import StoreEnv
from .store_format import (
    MAX_PAGE,
    REGION_ID,
    SEGKEY,
    SYNC_MODES,
    Delta,
    StoreError,
    StoreFullError,
    StoreHealth,
    StoreProblem,
    StoreWriteError,
    owner_key,
    region_key,
)
from .store_log import DECODE_ERRORS, Txn, lmdb_errno, write_error
from .store_read import ReaderPool

T = TypeVar("T")

TRIM_EVERY = 0.0  # s between free-page punches after commits, at least
TRIM_SLACK = 1 << 20  # punch once the file holds this much more than LMDB uses,
TRIM_SHARE = 0.01  # or this share of it (free pages LMDB reuses soon cost a punch each)


class _Faulted(Exception):
    """A read of LMDB's map faulted (SIGBUS contained) during a write txn."""


class StoreBase(StoreEnv):
    def __init__(self, path: str | os.PathLike[str], *, map_size: int = 8 << 30,
                 zstd_level: int = 1, sync: str = "none", instance_id: str | None = None,
                 segment_pages: int = 32, compact_below: float = 0.5,
                 gc_dead: float = 0.05, compact_in_put: float = 2.0,
                 keep_owner: Callable[[str], bool] | None = None,
                 keep_cache: bool = False) -> None:
        """``keep_owner``: records of a region owned by anyone but this instance are
        reclaimed at open, except those whose owner this says to keep (a VMM that still
        runs, whose uffd outlived the daemon that evicted its pages: see attach/vm.py).
        A store holding such records is opened as it is, never replaced."""
        if sync not in SYNC_MODES:
            raise ValueError(f"store sync must be one of {', '.join(SYNC_MODES)}, not {sync!r}")
        self.map_size = map_size
        self.sync_mode = sync
        self.zstd_level = zstd_level
        self.fresh = instance_id is None
        self.instance_id = instance_id or uuid.uuid4().hex
        self.compact_in_put = compact_in_put
        self._seg_args = (segment_pages, compact_below, gc_dead)
        self._wlock = threading.Lock()
        self._local = threading.local()
        self._pool = ReaderPool()
        self._closed = True
        self._broken: tuple[int, str] | None = None  # writes refused until restart
        self._last: StoreProblem | None = None
        self._errors: Counter[str] = Counter()
        self._reopened = 0
        self._last_reopen = 0.0
        self._sigbus_seen = 0  # of _sigbus(), when last looked at
        self._sigbus_past = 0  # contained in maps closed since (reopen)
        self._last_trim = 0.0
        self._trim_due = False
        self.punched_bytes = 0
        self.notes: list[str] = []  # what open found and did (for the log)
        self.reclaimed = 0
        self._regions: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._owners: dict[int, str] = {}
        self._claimed: set[int] = set()  # regions claimed by region_id() since open
        self._keep_owner = keep_owner
        self.keep_cache = keep_cache  # store.page_cache = "keep": written pages stay cached
        self._dir = StoreDir(path)  # trust checks and the flock; raises StoreError
        self.path = self._dir.path
        try:
            if self.fresh and not self._start_afresh():
                self.fresh = False  # it holds pages of a VMM that still runs: keep them
            if not self.fresh:
                self._open_env()
                try:
                    self._load()
                except (lmdb.Error, *DECODE_ERRORS) as e:
                    raise StoreError(f"{self.path}: store unreadable at open ({e}); it only "
                                     "holds pages of exited daemons: move it aside to start "
                                     "afresh", path=str(self.path), op="open",
                                     err=errno.EUCLEAN) from e
                self.reclaimed = self._reclaim()
        except BaseException:
            self.close()
            raise

    # ---- open-time state -------------------------------------------------------------
    def _start_afresh(self) -> bool:
        """A new instance: keep the region ids, drop every record (all of dead daemons).
        False (nothing changed) if some record belongs to an owner ``keep_owner`` keeps."""
        exists = True
        try:
            os.stat("data.mdb", dir_fd=self._dir.fd, follow_symlinks=False)
        except FileNotFoundError:
            exists = False
        if exists:
            try:
                self._open_env()
                try:
                    self._load()
                    kept = self._keep_owner
                    if kept is not None and any(kept(o) for o in self._owners.values()):
                        self._regions.clear()
                        self._names.clear()
                        self._owners.clear()
                        return False
                    self.reclaimed = self._log.counters.records
                finally:
                    self._close_env()
            except (StoreError, lmdb.Error, OSError, *DECODE_ERRORS) as e:
                self._regions.clear()
                self._names.clear()
                self.notes.append(f"{self.path}/data.mdb was unreadable ({e}); it only "
                                  "held pages of exited daemons: replaced by an empty one")
            for name in ("data.mdb", "lock.mdb"):
                try:
                    os.unlink(name, dir_fd=self._dir.fd)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    raise StoreError(f"{self.path}: can't replace {name} (records of exited "
                                     f"daemons): {e.strerror}", path=str(self.path),
                                     op="open", err=e.errno or errno.EIO) from e
        if self.reclaimed:
            self.notes.append(f"reclaimed {self.reclaimed} store records left by an "
                              "earlier instance")
        self._open_env()
        self._sigbus_seen = self._sigbus()  # faults in the old file don't count: it's gone
        self._owners.clear()
        names = dict(self._regions)
        if names:
            def keep(txn: Txn, d: Delta) -> None:
                for name, rid in names.items():
                    txn.put(region_key(name), REGION_ID.pack(rid), db=self._meta)

            self._write("open", keep)
        return True

    def _reclaim(self) -> int:
        """Delete every record of regions owned by other (dead) instances. A failure
        leaves them for the next open, like a kill -9 would."""
        kept = self._keep_owner or (lambda owner: False)
        foreign = {r for r in self._names if self._owners.get(r) != self.instance_id
                   and not kept(self._owners.get(r, ""))}
        before = self._log.counters.records
        if not foreign or not before:
            return 0

        def ranges(txn: Txn, d: Delta) -> None:
            for r in foreign:
                self._log.delete_range(txn, d, r, 0, MAX_PAGE + 1)
                txn.delete(owner_key(r), db=self._meta)

        try:
            self._write("reclaim", ranges, bump=True)
        except StoreError as e:
            self.notes.append(f"reclaiming records of exited daemons failed: {e}")
            return 0
        for r in foreign:
            self._owners.pop(r, None)
        return before - self._log.counters.records

    # ---- failures --------------------------------------------------------------------
    def _problem(self, op: str, err: int, message: str) -> None:
        self._last = StoreProblem(op, err, message, time.monotonic())
        self._errors[errno.errorcode.get(err, str(err))] += 1

    def _fail(self, e: StoreError) -> StoreError:
        self._problem(e.op, e.errno, str(e))
        return e

    def _corrupt(self, what: str) -> None:
        """LMDB's own structure is damaged: writing on it could make it worse or crash
        inside LMDB, so no write happens again (the next start replaces the file)."""
        if self._broken is None:
            self._broken = (errno.EUCLEAN, f"LMDB found data.mdb corrupt ({what})")

    def _check_writable(self, what: str) -> None:
        if self._closed:
            raise StoreWriteError(f"{self.path}: store is closed", path=str(self.path),
                                  op=what, err=errno.EBADF)
        if self._broken is None:
            p = self._dir.problem()
            if p is not None:
                self._broken = p
            elif self._sigbus() != self._sigbus_seen:
                self._after_sigbus()
        if self._broken is not None:
            err, why = self._broken
            raise self._fail(StoreWriteError(
                f"{self.path}: {what} refused: {why}; records already stored stay "
                "readable; restart the daemon to use the store again",
                path=str(self.path), op=what, err=err))

    def _truncated(self) -> bool:
        """Is data.mdb shorter than LMDB's last page?"""
        try:
            return self._data.size() < (self._env.info()["last_pgno"] + 1) * self._data.psize
        except (OSError, lmdb.Error):
            return True

    def _after_sigbus(self) -> None:
        """Reads of LMDB's map faulted (SIGBUS contained): restore the map, and write no
        more. The file is truncated or the disk fails reads; either way a write txn would
        build on pages LMDB can't read, and LMDB asserts (aborts the process) on some of
        the zero pages it would see there. Reads go on; a restart replaces the file."""
        self._sigbus_seen = self._sigbus()
        self._data.repair()
        if self._broken is None:
            if self._data.map_damaged:
                why = "LMDB's map of data.mdb can't be restored after a read error"
            elif self._truncated():
                why = "data.mdb was truncated under the daemon"
            else:
                why = "reading data.mdb failed (I/O error)"
            self._broken = (errno.EIO, why + "; the store is read-only until a restart")

    def _recover(self) -> bool:
        """A read hit MDB_PANIC: reopen (at most once a second); True if it did."""
        with self._wlock:
            if self._closed or time.monotonic() - self._last_reopen < 1.0:
                return False
            try:
                self._reopen()
                return True
            except (StoreError, lmdb.Error, OSError) as e:
                self._broken = (lmdb_errno(e), f"LMDB can't be reopened: {e}")
                return False

    # ---- the write path --------------------------------------------------------------
    def _write(self, what: str, fn: Callable[[Txn, Delta], T], bump: bool = False) -> T:
        """Run ``fn`` in one write txn. ``bump``: if it freed segments, commit one more tiny
        txn: LMDB reuses pages freed by txn N only from txn N+2 on (N+1 must still be able
        to open the snapshot of N-1), so without it the next put would grow the file."""
        with self._wlock:
            self._check_writable(what)
            data = self._data
            data.ensure_guard()
            faults = data.thread_sigbus_events()
            delta = self._log.delta()
            try:
                txn = self._env.begin(write=True)
                try:
                    result = fn(txn, delta)
                    self._log.finish(txn, delta)
                    if data.thread_sigbus_events() != faults:
                        raise _Faulted
                except BaseException:
                    txn.abort()
                    raise
                txn.commit()
            except DECODE_ERRORS as e:  # records didn't decode
                why: BaseException = e
                if isinstance(e, SystemError) and isinstance(e.__cause__, lmdb.Error):
                    why = e.__cause__  # py-lmdb raised this over LMDB's own error
                self._corrupt(f"{what}: {why}")
                raise self._fail(StoreWriteError(
                    f"{self.path}: {what} failed, nothing of it was written: the store's "
                    f"records are corrupt ({why}); they are reclaimed at the next start",
                    path=str(self.path), op=what, err=errno.EUCLEAN)) from e
            except (_Faulted, lmdb.Error, OSError) as e:
                if data.thread_sigbus_events() != faults:  # whatever LMDB made of zeros
                    self._after_sigbus()
                    raise self._fail(StoreWriteError(
                        f"{self.path}: {what} failed, nothing of it was written: reading "
                        "data.mdb faulted (SIGBUS contained: truncated or unreadable)",
                        path=str(self.path), op=what, err=errno.EIO)) from None
                if isinstance(e, lmdb.MapFullError):
                    raise self._fail(StoreFullError(
                        f"{self.path}: LMDB map full during {what}, nothing of it was "
                        f"written; raise store.map_size (now {self.map_size})",
                        path=str(self.path), op=what, err=errno.ENOSPC)) from e
                err = write_error(self.path, what, e)
                if err.errno == errno.EUCLEAN and not isinstance(e, lmdb.PanicError):
                    self._corrupt(f"{what}: {e}")
                if isinstance(e, lmdb.PanicError):
                    try:
                        self._reopen()
                    except (StoreError, lmdb.Error, OSError) as e2:
                        self._broken = (err.errno, f"LMDB can't go on ({e}; reopen: {e2})")
                raise self._fail(err) from e
            gone = self._gone(delta)
            self._log.apply(delta)
            self._pool.committed()
            self._after_commit(delta, gone)
            if bump and None in delta.segs.values():
                try:
                    with self._env.begin(write=True) as txn:
                        txn.put(b"counters", self._log.counters.pack(), db=self._meta)
                    self._pool.committed()
                except lmdb.Error:
                    pass  # only an optimisation; the data txn above is committed
            return result

    def _gone(self, d: Delta) -> list[tuple[int, int]]:
        """Page spans of payloads deleted and segments freed by ``d`` (before apply)."""
        geo, out = self._log.geo, []
        for sid, v in d.segs.items():
            if v is None and sid in geo:
                out.append(self._data.value_pages(*geo[sid]))
        for sid, off, ln in d.killed:
            g = geo.get(sid)
            if g is not None and d.segs.get(sid, 0) is not None:
                out.append(self._data.page_span(g[0] + off, ln))
        return out

    def _after_commit(self, d: Delta, gone: list[tuple[int, int]]) -> None:
        """Learn where the new segments are, write them behind, drop what went, punch
        free space. Committed already: a failure here costs memory or disk, no data."""
        try:
            written = []
            if d.new:
                with self._env.begin(buffers=True) as txn:
                    for sid, vlen in d.new.items():
                        if sid not in self._log.segs:
                            continue
                        mv = txn.get(SEGKEY.pack(sid), db=self._seg)
                        off = self._data.offset_of(mv) if mv is not None else 0
                        if off and mv is not None and len(mv) == vlen:
                            self._log.located(sid, off, vlen)
                            written.append(self._data.value_pages(off, vlen))
            self._data.after_commit(written, gone)
            now = time.monotonic()
            if self._trim_due or now - self._last_trim >= TRIM_EVERY:
                st = os.fstat(self._data.fd)
                used = self._used_bytes()
                if st.st_blocks * 512 > used + max(TRIM_SLACK, TRIM_SHARE * used):
                    self._last_trim = now
                    punched, waiting = self._data.trim(self._env, list(self._dbs.values()))
                    self.punched_bytes += punched
                    self._trim_due = waiting > TRIM_SLACK  # freed just now: next commit
        except (OSError, lmdb.Error) as e:
            self._problem("write-behind", lmdb_errno(e), f"{self.path}: after a commit: {e}")

    def _compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "cctx", None)
        if c is None:
            c = self._local.cctx = zstandard.ZstdCompressor(
                level=self.zstd_level, write_content_size=False, write_checksum=False)
        return c

    def health(self) -> StoreHealth:
        """Whether writes can work, the last failure, failures per errno, SIGBUS count.
        Cheap (a few stat calls): fine once per cycle or scrape."""
        with self._wlock:
            if not self._closed and self._broken is None:
                p = self._dir.problem()
                if p is None and self._sigbus() != self._sigbus_seen:
                    self._after_sigbus()
                    p = self._broken
                if p is not None:
                    self._broken = p
                    self._problem("health", p[0], f"{self.path}: {p[1]}")
            if not self._closed:
                self._data.ensure_guard()
        return StoreHealth(
            writable=self._broken is None and not self._closed,
            reason=self._broken[1] if self._broken else ("closed" if self._closed else ""),
            last_error=self._last, errors=dict(self._errors),
            sigbus=self._sigbus(), reopened=self._reopened)

    def close(self) -> None:
        with self._wlock:
            if not self._closed:
                self._close_env()
            self._dir.close()
