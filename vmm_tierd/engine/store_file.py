"""data.mdb as the store touches it beside LMDB: payload reads, page cache, holes, faults.

- Payloads are read with pread at their segment's file offset (one index lookup per
  record, no 128 KiB value preload by py-lmdb, an EIO is an errno instead of a SIGBUS).
- What LMDB still reads through its map (B-tree pages) is covered by the SIGBUS guard of
  vmm_tierd.kernel.linux_store: a page past EOF or failing to read reads as zeros, LMDB
  reports corruption, ``repair()`` maps the file back.
- Page cache: each commit starts writeback of what it wrote (sync_file_range), and drops
  the previous commit's (then written back) plus the pages of records deleted or segments
  freed (POSIX_FADV_DONTNEED, after MADV_DONTNEED of any PTE of LMDB's map); see
  ``after_commit`` for why that takes B-tree pages near new segments along.
- Disk: ``trim()`` punches LMDB's reusable free runs (store_free), so the file uses
  what its live pages need, though LMDB never shrinks it.
"""

from __future__ import annotations

import errno
import os

import lmdb
import numpy as np

from vmm_tierd.kernel import linux_store as ls

from .store_dir import StoreDir
from .store_format import PAGE
from .store_free import FormatError, oldest_reader, read_free_list, runs

PAGEHDR = 16  # an overflow value starts 16 bytes into its first page
# Free runs at least this long are punched after commits; a full trim() punches all. A
# punch costs ext4 ~50 us per range, and LMDB reuses short runs at once for B-tree pages.
MIN_RUN = 8
WAIT = ls.SYNC_WAIT_BEFORE | ls.SYNC_WRITE | ls.SYNC_WAIT_AFTER
FOLIO = 2 << 20  # the largest page-cache folio a buffered write makes (PMD size)
BEHIND = 2  # commits whose writes may still be cached: their writeback has time to end


def _mapping(fd: int) -> tuple[int, int]:
    """(address, length) of LMDB's map of the file open as ``fd`` (from /proc/self/maps:
    py-lmdb doesn't say where it is)."""
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    best = (0, 0)
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) >= 5 and fields[4] == str(st.st_ino) and fields[3] == dev:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if hi - lo > best[1]:
                    best = (lo, hi - lo)
    return best


class DataFile:
    def __init__(self, sdir: StoreDir, psize: int, drop_written: bool = True) -> None:
        self.psize = psize
        self.drop_written = drop_written  # False: store.page_cache = "keep"
        self.fd = sdir.open_file("data.mdb", os.O_RDWR)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead on pread
        self.map_base, self.map_len = _mapping(self.fd)
        self.guard: ls.MapGuard | None = None
        if self.map_len:
            self.guard = ls.MapGuard(self.map_base, self.map_len, self.fd)
        self.pending: list[np.ndarray] = []  # written by the last commits, to drop
        self.punched = np.zeros(0, dtype=bool)  # per LMDB page: a hole we punched
        self.punch_ok = True
        self.map_damaged = False
        self.mincore_ok = True

    # ---- reads -----------------------------------------------------------------------
    def read(self, off: int, n: int) -> bytes:
        b = os.pread(self.fd, n, off)
        if len(b) != n:
            raise OSError(errno.EIO, f"short read of data.mdb at {off} ({len(b)} of {n} "
                          "bytes): truncated?")
        return b

    def read_mapped(self, off: int, n: int) -> bytes | None:
        """The same bytes through LMDB's map (what the page cache still holds when the
        file system refuses reads, e.g. after an ext4 shutdown); None if that faults."""
        if not self.map_len or off + n > self.map_len or self.map_damaged:
            return None  # damaged: zero pages may remain where reads faulted
        got = ls.copy_guarded(self.map_base + off, n)
        if self.repair() and self.map_damaged:
            return None
        return got

    def offset_of(self, value: memoryview) -> int:
        """File offset of a value py-lmdb returned as a buffer into LMDB's map (0 if it
        is not one, e.g. a dirty page of a write txn)."""
        addr = int(np.frombuffer(value, dtype=np.uint8).__array_interface__["data"][0])
        off = addr - self.map_base
        if not self.map_len or not 0 < off < self.map_len or (off - PAGEHDR) % self.psize:
            return 0
        return off

    def value_pages(self, off: int, vlen: int) -> tuple[int, int]:
        """(start, length) of the pages holding a value at ``off`` of ``vlen`` bytes."""
        start = off - PAGEHDR
        return start, -(-(vlen + PAGEHDR) // self.psize) * self.psize

    def page_span(self, off: int, n: int) -> tuple[int, int]:
        lo = off // PAGE * PAGE
        return lo, -(-(off + n) // PAGE) * PAGE - lo

    # ---- faults ----------------------------------------------------------------------
    @staticmethod
    def ensure_guard() -> None:
        ls.guard_ensure()

    def sigbus_events(self) -> int:
        """SIGBUS faults contained in this map of the file."""
        return self.guard.events() if self.guard is not None else 0

    @staticmethod
    def thread_sigbus_events() -> int:
        return ls.guard_thread_events()

    def repair(self) -> bool:
        """Map the file back where SIGBUS left zero pages; True if there were any. If the
        file system refuses the mmap (shut down), the zero pages stay: LMDB then finds
        those pages corrupt, and ``map_damaged`` keeps every write away."""
        if self.guard is None:
            return False
        try:
            return self.guard.repair()
        except OSError:
            self.map_damaged = True
            return True

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    # ---- page cache ------------------------------------------------------------------
    def after_commit(self, written: list[tuple[int, int]], gone: list[tuple[int, int]]
                     ) -> None:
        """Start writeback of what this commit wrote; drop what the commit BEHIND commits
        ago wrote (written back by now), and the pages of what this one deleted or freed.

        LMDB writes runs of dirty pages with one pwritev, and ext4 caches such writes in
        large folios (up to 2 MiB) that hold segments and B-tree pages alike; a folio is
        dropped whole or not at all (POSIX_FADV_DONTNEED skips one that sticks out of the
        range, or that any PTE maps). So written ranges are widened to 2 MiB and their PTEs
        in LMDB's map dropped first: B-tree pages in there are read again when a lookup
        needs them, as small folios (the map is MADV_RANDOM). Deleted payloads were read
        with pread (small folios too) and are dropped exactly."""
        new = _merge(_widen(np.array(written, dtype=np.uint64).reshape(-1, 2), FOLIO))
        if len(new):
            ls.writeback(self.fd, new, sync_flags=ls.SYNC_WRITE)
        if self.drop_written:
            self.pending.append(new)
        old = self.pending.pop(0) if len(self.pending) > BEHIND else None
        if old is not None and len(old):
            ls.writeback(self.fd, old, map_base=self.map_base, map_len=self.map_len,
                         sync_flags=WAIT, drop=True)
        if gone:
            ls.writeback(self.fd, _merge(np.array(gone, dtype=np.uint64).reshape(-1, 2)),
                         map_base=self.map_base, map_len=self.map_len, sync_flags=WAIT,
                         drop=True)

    def cached(self) -> int:
        """Bytes of data.mdb in the page cache (mincore over LMDB's map), -1 if not
        permitted (a seccomp filter without mincore)."""
        if self.mincore_ok and self.map_len:
            try:
                return ls.resident(self.map_base, min(self.size(), self.map_len))
            except OSError:
                self.mincore_ok = False
        return -1

    # ---- disk ------------------------------------------------------------------------
    def trim(self, env: lmdb.Environment, dbs: list[object], full: bool = False
             ) -> tuple[int, int]:
        """Punch LMDB's reusable free pages. Returns bytes newly punched, and bytes free
        but not punchable yet (a reader or the last commit may still see them). Caller
        holds the write lock (no write txn runs: the free list on disk is the current
        one). ``full``: also re-punch free pages that may have been reused meanwhile."""
        if not self.punch_ok:
            return 0, 0
        info = env.info()
        oldest = min(info["last_txnid"], oldest_reader(env.readers()) or 1 << 62)
        try:
            fl = read_free_list(self.fd, self.psize, oldest)
        except (FormatError, OSError):
            return 0, 0
        with env.begin() as txn:
            used = 2 + fl.free_db_pages
            for st in [env.stat()] + [txn.stat(db) for db in dbs]:  # type: ignore[arg-type]
                used += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        if fl.txnid != info["last_txnid"] or used + fl.total_free != fl.last_pg + 1:
            return 0, 0  # not the state we think it is: punch nothing
        waiting = (fl.total_free - len(fl.pages)) * self.psize
        free = np.zeros(fl.last_pg + 1, dtype=bool)
        for a, n in runs(fl.pages, 1 if full else MIN_RUN).tolist():
            free[a:a + n] = True
        # Punch only what isn't a hole yet. A page free now and at the last trim is
        # taken to be a hole still; but LMDB may have reused and freed it again in
        # between (written, so not a hole: rare when this runs after every commit). With
        # ``full``, the file's block count tells: if it holds more than the pages in use
        # plus the unpunchable ones, every free page is punched again.
        old = self.punched
        if len(old) < len(free):
            old = np.concatenate([old, np.zeros(len(free) - len(old), dtype=bool)])
        old = old[:len(free)] & free
        done = self._punch(free & ~old)
        if done < 0:
            return 0, 0
        expect = (used + fl.total_free - len(fl.pages)) * self.psize
        if full and os.fstat(self.fd).st_blocks * 512 > expect + (1 << 20):
            more = self._punch(free & old)
            done += max(more, 0)
        self.punched = free
        return done, waiting

    def _punch(self, pages: np.ndarray) -> int:
        """Punch the pages set in a per-page mask; bytes, or -1 if the file system can't."""
        rows = runs(np.flatnonzero(pages).astype(np.uint64), 1)
        if not len(rows):
            return 0
        try:
            ls.punch(self.fd, rows * np.uint64(self.psize))
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                self.punch_ok = False
                return -1
            raise
        return int(rows[:, 1].sum()) * self.psize

    def close(self) -> None:
        if self.guard is not None:
            self.guard.close()
            self.guard = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _widen(r: np.ndarray, align: int) -> np.ndarray:
    """(start, length) rows grown outwards to multiples of ``align``."""
    a = np.uint64(align)
    lo = r[:, 0] // a * a
    hi = (r[:, 0] + r[:, 1] + a - np.uint64(1)) // a * a
    return np.stack([lo, hi - lo], axis=1) if len(r) else r


def _merge(r: np.ndarray) -> np.ndarray:
    """(start, length) rows -> sorted, with overlapping or touching rows merged."""
    if len(r) < 2:
        return r
    r = r[np.argsort(r[:, 0], kind="stable")]
    ends = r[:, 0] + r[:, 1]
    run_end = np.maximum.accumulate(ends)
    new = np.concatenate(([True], r[1:, 0] > run_end[:-1]))
    idx = np.flatnonzero(new)
    starts = r[idx, 0]
    last = np.concatenate((idx[1:], [len(r)])) - 1
    return np.stack([starts, run_end[last] - starts], axis=1)
