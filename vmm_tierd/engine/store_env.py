"""Opening, closing and reopening the page store's LMDB environment in its checked
directory, with data.mdb's file layer beside it; loading the in-memory state."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

import lmdb

from .store_dir import StoreDir
from .store_file import DataFile
from .store_format import REGION_ID, StoreError
from .store_log import DECODE_ERRORS, SegmentLog, lmdb_errno
from .store_read import ReaderPool


class StoreEnv:
    """The environment part of StoreBase (attributes set up by StoreBase.__init__)."""

    path: Path
    map_size: int
    sync_mode: str
    _dir: StoreDir
    _pool: ReaderPool
    _env: lmdb.Environment
    _data: DataFile
    _log: SegmentLog
    _dbs: dict[str, Any]  # lmdb's DB handles (typed privately by its stubs)
    _meta: Any
    _idx: Any
    _seg: Any
    _seg_args: tuple[int, float, float]
    _closed: bool
    _sigbus_past: int
    _reopened: int
    _last_reopen: float
    _regions: dict[str, int]
    _names: dict[int, str]
    _owners: dict[int, str]
    keep_cache: bool

    def _open_env(self) -> None:
        try:
            self._env = lmdb.open(
                self._dir.lmdb_path(), map_size=self.map_size, max_dbs=4, subdir=True,
                lock=True, writemap=False, readahead=False, mode=0o600,
                sync=self.sync_mode == "commit", metasync=self.sync_mode == "commit")
        except lmdb.Error as e:
            raise StoreError(f"{self.path}: can't open the LMDB store: {e}; if it is "
                             "corrupt, it only holds pages of exited daemons: move it aside "
                             "to start afresh", path=str(self.path), op="open",
                             err=lmdb_errno(e)) from e
        try:
            self._dir.check_files()  # what LMDB created: ours, 0600
            self._dir.remember("data.mdb")
            # the flock keeps every other process out, so LMDB's lock file is only ours:
            # gone from the directory, it can't be truncated or replaced by name
            os.unlink("lock.mdb", dir_fd=self._dir.fd)
            # the guard before anything reads through LMDB's map (opening the DBs does)
            self._data = DataFile(self._dir, os.sysconf("SC_PAGESIZE"),
                                  drop_written=not self.keep_cache)
        except BaseException:
            self._env.close()
            raise
        try:
            if not self._data.map_len:
                raise StoreError(f"{self.path}: LMDB's map of data.mdb not found in "
                                 "/proc/self/maps", path=str(self.path), op="open")
            faults = self._data.thread_sigbus_events()
            try:
                dbs = {n: self._env.open_db(n.encode())
                       for n in ("meta", "index", "seg", "segmeta")}
                psize = self._env.stat()["psize"]
            except (lmdb.Error, *DECODE_ERRORS) as e:
                raise StoreError(f"{self.path}: can't open the LMDB store: {e}",
                                 path=str(self.path), op="open", err=lmdb_errno(e)) from e
            if self._data.thread_sigbus_events() != faults:
                raise StoreError(f"{self.path}: data.mdb is shorter than LMDB expects or "
                                 "unreadable (SIGBUS contained)", path=str(self.path),
                                 op="open", err=errno.EIO)
        except BaseException:
            self._data.close()
            self._env.close()
            raise
        self._data.psize = psize
        self._dbs = dbs
        self._meta, self._idx, self._seg = dbs["meta"], dbs["index"], dbs["seg"]
        pages, below, dead = self._seg_args
        # a value of V bytes takes ceil((V + 16) / psize) overflow pages (16 = page header)
        self._log = SegmentLog(dbs, pages * psize - 16, below, dead)
        self._pool.env = self._env
        self._closed = False

    def _close_env(self) -> None:
        with self._pool.quiesced():
            self._close_env_quiesced()

    def _sigbus(self) -> int:
        """SIGBUS faults contained in this store's maps so far."""
        return self._sigbus_past + (self._data.sigbus_events() if not self._closed else 0)

    def _close_env_quiesced(self) -> None:
        self._sigbus_past += self._data.sigbus_events()
        self._pool.env = None
        self._data.close()  # the SIGBUS guard goes before LMDB unmaps
        self._env.close()
        self._closed = True

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

    def _reopen(self) -> None:
        """After MDB_PANIC (LMDB refuses every txn once a meta write failed): open the
        environment again. Caller holds the write lock."""
        self._last_reopen = time.monotonic()
        with self._pool.quiesced():  # readers wait (they don't see a closed store)
            self._close_env_quiesced()
            self._open_env()
            self._load()
        self._reopened += 1

    def _used_bytes(self) -> int:
        """LMDB pages in use by the trees (the file minus LMDB's free pages)."""
        s = self._pool.slot()
        with s.lk:
            txn = self._pool.txn(s)
            used = 0
            for db in (self._meta, self._idx, self._seg, self._log.segmeta):
                t = txn.stat(db)
                used += t["branch_pages"] + t["leaf_pages"] + t["overflow_pages"]
        return used * self._data.psize

    def region_name(self, region: int) -> str:
        return self._names.get(region, f"#{region}")
