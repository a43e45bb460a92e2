"""On-disk layout of the page store, its errors and its result types.

LMDB sub-databases:
- ``meta``:    region names -> ids, region owners, persisted counters.
- ``index``:   (region u32, page u64) big-endian -> ``IDX`` (segment, offset, length, crc, kind).
- ``seg``:     segment id u64 big-endian -> payloads..., then the index key of every
               payload in order (12 bytes each), then their count (u32). LMDB stores any
               value over ~2 KiB in its own run of overflow pages (a 4 KiB value costs
               8 KiB), so pages are packed into ~128 KiB segments: one run, little waste.
- ``segmeta``: segment id -> (live payload bytes, total payload bytes, file offset of the
               segment's value in data.mdb, learned after the commit that wrote it (0
               until then), value length). Overflow pages never move while their value
               lives, so payloads are read with pread there: one index lookup per record.
"""

from __future__ import annotations

import errno
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

try:  # same CRC-32 as zlib.crc32, computed with PCLMUL: ~4x faster on 4 KiB pages
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # pragma: no cover
    _crc32 = zlib.crc32
crc32: Callable[..., int] = _crc32

PAGE = 4096
KIND_ZERO, KIND_ZSTD, KIND_RAW = 0, 1, 2
KIND_NAMES = {KIND_ZERO: "zero", KIND_ZSTD: "zstd", KIND_RAW: "raw"}
RAW_THRESHOLD = 4000  # a compressed page this big or bigger is stored raw
SYNC_MODES = ("commit", "periodic", "none")

KEY = struct.Struct(">IQ")  # region, page: big-endian so a region's pages sort together
IDX = struct.Struct("<QIHIB")  # segment id, offset, length, crc32, kind (19 bytes)
SEGKEY = struct.Struct(">Q")
SEGMETA = struct.Struct("<IIQI")  # live bytes, total payload bytes, file offset, value length
SEGMETA_V1 = struct.Struct("<II")  # live, total (stores written before offsets were kept)
COUNT = struct.Struct("<I")
COUNTERS = struct.Struct("<QQQQ")  # records, zero records, raw records, compressed bytes
REGION_ID = struct.Struct("<I")
MAX_PAGE = (1 << 64) - 1


def record_crc(key: bytes, page: bytes | memoryview | None) -> int:
    """A record's CRC: of its index key, then of the page (no page for a zero record).
    Keyed, so that a damaged index that hands out another page's record (a flipped key
    byte) fails the check instead of returning the other page's bytes."""
    seed = crc32(key)
    return seed if page is None else crc32(page, seed)


class StoreError(Exception):
    """The store can't be opened, trusted or written. ``path`` is the store directory,
    ``op`` what failed, ``errno`` the real errno (ENOSPC, EROFS, EIO, EPERM, ENOENT for a
    deleted directory, EUCLEAN for LMDB finding its own file corrupt, ...)."""

    def __init__(self, message: str, *, path: str = "", op: str = "",
                 err: int = errno.EIO) -> None:
        super().__init__(message)
        self.path = path
        self.op = op
        self.errno = err

    @property
    def errno_name(self) -> str:
        return errno.errorcode.get(self.errno, str(self.errno))


class StoreWriteError(StoreError):
    """A write failed and wrote nothing; reads go on. Pause eviction and retry later
    (``PageStore.health().writable`` says whether a retry can succeed before a restart)."""


class StoreFullError(StoreWriteError):
    """The LMDB map or the disk is full (errno ENOSPC); nothing of the batch was written."""


class RecordError(Exception):
    """A record that exists but is corrupt or unreadable: poison its page. ``errno``:
    EBADMSG (checksum, decompression, bad record), EIO (the read failed), EUCLEAN (LMDB
    found its B-tree corrupt)."""

    def __init__(self, region: str, page: int, reason: str, err: int = errno.EBADMSG) -> None:
        super().__init__(f"store record {region}:{page} unreadable: {reason}")
        self.region = region
        self.page = page
        self.reason = reason
        self.errno = err


@dataclass(frozen=True)
class StoreProblem:
    op: str
    errno: int
    message: str
    at: float  # time.monotonic()

    @property
    def errno_name(self) -> str:
        return errno.errorcode.get(self.errno, str(self.errno))


@dataclass(frozen=True)
class StoreHealth:
    """``writable``: False once writes can't succeed again before a restart (directory
    deleted or replaced, ownership or modes changed, data.mdb truncated); the reason says
    which. ``last_error``: the latest failure of any operation. ``errors``: failures per
    errno name since open. ``sigbus``: faults in LMDB's map that were contained."""

    writable: bool
    reason: str
    last_error: StoreProblem | None
    errors: dict[str, int]
    sigbus: int
    reopened: int


@dataclass
class PutResult:
    pages: int
    zero_pages: int
    raw_pages: int
    stored_bytes: int  # payload bytes written (compressed + raw)


@dataclass
class StoreStats:
    records: int
    zero_records: int
    raw_records: int
    compressed_bytes: int  # payload bytes of live records
    disk_bytes: int  # bytes the LMDB data file really occupies (st_blocks)
    guest_bytes: int  # records * 4096
    segments: int = 0
    dead_bytes: int = 0  # payload bytes of deleted records not yet compacted away
    file_bytes: int = 0  # apparent size of the LMDB data file
    used_bytes: int = 0  # LMDB pages in use (the rest of the file is LMDB's free list)
    # data.mdb's pages in the page cache (measured by stats(cache=True), else -1; left
    # out of comparisons)
    cache_bytes: int = field(default=-1, compare=False)


@dataclass
class Counters:
    records: int = 0
    zero: int = 0
    raw: int = 0
    compressed: int = 0

    def pack(self) -> bytes:
        return COUNTERS.pack(self.records, self.zero, self.raw, self.compressed)

    @classmethod
    def unpack(cls, b: bytes | None) -> Counters:
        return cls(*COUNTERS.unpack(b)) if b else cls()

    def merge(self, o: Counters) -> None:
        self.records += o.records
        self.zero += o.zero
        self.raw += o.raw
        self.compressed += o.compressed

    def add(self, kind: int, length: int, sign: int) -> None:
        self.records += sign
        self.zero += sign * (kind == KIND_ZERO)
        self.raw += sign * (kind == KIND_RAW)
        self.compressed += sign * length


@dataclass
class Delta:
    """State changes of one write txn, applied to the store's memory only after commit."""

    counters: Counters
    segs: dict[int, tuple[int, int] | None] = field(default_factory=dict)  # None = deleted
    new: dict[int, int] = field(default_factory=dict)  # segments written: id -> value length
    killed: list[tuple[int, int, int]] = field(default_factory=list)  # (seg, off, len) gone
    saved: list[int] = field(default_factory=list)  # segments whose offset was persisted

    def seg(self, sid: int, base: dict[int, tuple[int, int]]) -> tuple[int, int] | None:
        return self.segs[sid] if sid in self.segs else base.get(sid)


def encode_segment(payloads: list[bytes], keys: list[bytes]) -> bytes:
    return b"".join([*payloads, *keys, COUNT.pack(len(keys))])


def segment_keys(value: bytes | memoryview) -> list[bytes]:
    """The index keys recorded in a segment's trailer."""
    (n,) = COUNT.unpack_from(value, len(value) - COUNT.size)
    start = len(value) - COUNT.size - n * KEY.size
    return [bytes(value[start + i * KEY.size: start + (i + 1) * KEY.size]) for i in range(n)]


def region_key(name: str) -> bytes:
    return b"region/" + name.encode()


def owner_key(region: int) -> bytes:
    return b"owner/" + REGION_ID.pack(region)
