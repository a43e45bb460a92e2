"""Read side of the page store: per-thread read txns, and turning index values into pages.

Every thread keeps one read txn, reused across calls and bursts; it is renewed when a
commit happened since it began (so a page whose put_batch returned is always found). A
writer, after each commit, aborts the read txns that are stale and not in use, so an idle
thread never pins an old snapshot (which would keep LMDB from reusing freed pages). Each
slot has a lock held while its txn is in use: that is what lets the writer (and close,
and reopen) touch another thread's txn safely.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lmdb
import zstandard

from .store_format import KIND_RAW, KIND_ZERO, KIND_ZSTD, PAGE, crc32


class Slot:
    __slots__ = ("dctx", "gen", "lk", "txn")

    def __init__(self) -> None:
        self.lk = threading.Lock()
        self.txn: Any = None  # lmdb.Transaction
        self.gen = -1
        # a bounded window: a damaged frame can't ask for gigabytes (MemoryError)
        self.dctx = zstandard.ZstdDecompressor(max_window_size=1 << 20)


class ReaderPool:
    def __init__(self) -> None:
        self.env: lmdb.Environment | None = None
        self.gen = 0  # bumped after every commit
        self._local = threading.local()
        self._lock = threading.Lock()  # for _slots and begin(); never held across a wait
        self._slots: set[Slot] = set()

    def slot(self) -> Slot:
        s: Slot | None = getattr(self._local, "slot", None)
        if s is None:
            s = self._local.slot = Slot()
            with self._lock:
                self._slots.add(s)
        return s

    def txn(self, s: Slot) -> Any:
        """The slot's txn, renewed if stale. Call with ``s.lk`` held."""
        if s.txn is not None and s.gen == self.gen:
            return s.txn
        self.drop(s)
        with self._lock:
            if self.env is None:
                raise lmdb.Error("store is closed")
            gen = self.gen  # read before begin: a commit in between renews next time
            s.txn = self.env.begin(buffers=True)
            s.gen = gen
        return s.txn

    @staticmethod
    def drop(s: Slot) -> None:
        txn, s.txn = s.txn, None
        if txn is not None:
            try:
                txn.abort()
            except lmdb.Error:
                pass

    def committed(self) -> None:
        """After a commit: stale read txns not in use are let go at once."""
        self.gen += 1
        with self._lock:
            slots = list(self._slots)
        for s in slots:
            if s.txn is not None and s.lk.acquire(blocking=False):
                try:
                    if s.gen != self.gen:
                        self.drop(s)
                finally:
                    s.lk.release()

    @contextmanager
    def quiesced(self) -> Iterator[None]:
        """No read txn exists inside (each in-flight read finishes first): for closing or
        reopening the environment."""
        with self._lock:
            slots = list(self._slots)
        for s in slots:
            s.lk.acquire()
        try:
            for s in slots:
                self.drop(s)
            self.gen += 1
            yield
        finally:
            for s in slots:
                s.lk.release()


def decode(dctx: zstandard.ZstdDecompressor, key: bytes, kind: int, crc: int,
           payload: bytes | memoryview) -> tuple[bytes | None, str, int]:
    """(page, "", 0); (None, "", 0) for a zero page; or (None, reason, errno). The CRC
    covers the key too (store_format.record_crc)."""
    seed = crc32(key)
    if kind == KIND_ZERO:
        return (None, "", 0) if crc == seed else (None, "checksum mismatch", errno.EBADMSG)
    if kind == KIND_ZSTD:
        try:
            out = dctx.decompress(payload, max_output_size=PAGE)
        except (zstandard.ZstdError, MemoryError) as e:  # garbage can ask for any window
            return None, f"decompress failed: {e or 'frame needs too much memory'}", \
                errno.EBADMSG
    elif kind == KIND_RAW:
        out = bytes(payload)
    else:
        return None, f"unknown record kind {kind}", errno.EBADMSG
    if len(out) != PAGE:
        return None, f"{len(out)} bytes, not {PAGE}", errno.EBADMSG
    if crc32(out, seed) != crc:
        return None, "checksum mismatch", errno.EBADMSG
    return out, "", 0


def spans(items: list[tuple[int, int, int]], gap: int = PAGE, limit: int = 1 << 18
          ) -> list[tuple[int, int, list[int]]]:
    """(file offset, length, item index) sorted by offset -> (start, length, indexes) of
    reads that cover runs of nearby payloads with one pread each."""
    out: list[tuple[int, int, list[int]]] = []
    for off, ln, i in items:
        if out:
            start, length, idx = out[-1]
            if off <= start + length + gap and off + ln - start <= limit:
                out[-1] = (start, max(length, off + ln - start), idx)
                idx.append(i)
                continue
        out.append((off, ln, [i]))
    return out
