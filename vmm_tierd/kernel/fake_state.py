"""State of the in-process fake kernel: mappings, memfd files, uffd contexts.

Per-page state is one uint8 per page (``F_*`` bits) in a lazily zeroed numpy array per
mapping, so a 1 TiB mapping costs 256 MiB of virtual and almost no resident memory
until touched. Page contents are kept sparsely: ``bytes`` for data written through
COPY/access, or a ``(index, version)`` write stamp materialised by ``stamps.page_bytes``.
"""

from __future__ import annotations

import bisect
import errno
import os
import threading
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from . import stamps, uapi
from .api import Dialect, KernelError, MemType, UffdEvent

PAGE = 4096
PT_PAGES = 512  # pages per PTE table (2 MiB)
MMAP_MIN_ADDR = 65536
TASK_SIZE = 0x7FFFFFFFF000
ADDR_BASE = 0x100000000000  # where the fake allocates mappings (16 TiB)

# ---- per-page flag bits -------------------------------------------------------------
F_PRESENT = 1  # PTE maps a page (anon page, the zero page or a page-cache page)
F_ZERO = 2  # ...and it is the shared zero page (anon only)
F_WP = 4  # uffd bit: uffd-wp on a present PTE, or a uffd-wp PTE marker on a none PTE
F_RWP = 8  # 7.3 RWP: uffd bit + PAGE_NONE on a present PTE
F_PROTNONE = 16  # RFC: deactivated anon page (present, PROT_NONE)
F_POISON = 32  # UFFDIO_POISON PTE marker (non-present)
F_PT = 64  # a PTE table exists for this page's 2 MiB block (see pagemap_scan)

MODE_MISSING = uapi.UFFDIO_REGISTER_MODE_MISSING
MODE_WP = uapi.UFFDIO_REGISTER_MODE_WP
MODE_MINOR = uapi.UFFDIO_REGISTER_MODE_MINOR
MODE_RWP = uapi.UFFDIO_REGISTER_MODE_RWP

# outcome of one simulated access (fake_guest.fault_in)
OK, SIGBUS, EFAULT, GONE = 0, 1, 2, 3  # GONE: the accessing process has exited

Content = bytes | tuple[int, int]  # raw page, or write stamp (index, version)
CHUNK = 1 << 22  # pages per numpy pass over a flag array (bounds temporaries)


def spans(a: int, b: int) -> list[tuple[int, int]]:
    return [(x, min(b, x + CHUNK)) for x in range(a, b, CHUNK)]


def copy_bit(fl: np.ndarray, src: int, dst: int) -> None:
    """fl |= dst where fl has src (both single bits), in place, chunk by chunk."""
    shift = dst.bit_length() - src.bit_length()
    for x, y in spans(0, len(fl)):
        t = fl[x:y] & src
        t <<= shift
        fl[x:y] |= t


def clear_bits(fl: np.ndarray, bits: int) -> None:
    fl &= ~bits & 0xFF


@lru_cache(maxsize=4096)
def stamp_bytes(index: int, version: int) -> bytes:
    return stamps.page_bytes(index, version)


def materialize(c: Content | None) -> bytes:
    if c is None:
        return bytes(PAGE)
    if isinstance(c, tuple):
        return stamp_bytes(c[0], c[1])
    return c


class MemFile:
    """A fake memfd (the inode): its page cache is shared by every mapping of it, in
    any process; fd tables refer to it."""

    def __init__(self, name: str, size: int, ino: int) -> None:
        self.name = name
        self.size = size
        self.ino = ino
        self.cached = np.zeros((size + PAGE - 1) // PAGE, dtype=np.bool_)
        self.data: dict[int, Content] = {}
        self.maps: list[Mapping] = []


@dataclass(slots=True)
class Seg:
    """A run of pages of one mapping with the same uffd registration (one kernel VMA)."""

    lo: int  # page index within the mapping
    hi: int
    ctx: Uffd | None = None
    mode: int = 0


class Mapping:
    def __init__(self, addr: int, length: int, memtype: MemType,
                 file: MemFile | None = None, fpgoff: int = 0) -> None:
        self.addr = addr
        self.length = length
        self.npages = length // PAGE
        self.end = addr + length
        self.memtype = memtype
        self.file = file
        self.fpgoff = fpgoff  # file page of the mapping's first page
        self.flags = np.zeros(self.npages, dtype=np.uint8)  # calloc: lazily zeroed
        self.data: dict[int, Content] = {}  # anon contents, by page index
        self.segs: list[Seg] = [Seg(0, self.npages)]

    @property
    def anon(self) -> bool:
        return self.file is None

    # -- registration segments (VMAs)
    def seg_at(self, pg: int) -> Seg:
        i = bisect.bisect_right([s.lo for s in self.segs], pg) - 1
        return self.segs[i]

    def segs_in(self, lo: int, hi: int) -> list[tuple[Seg, int, int]]:
        out = []
        for s in self.segs:
            a, b = max(s.lo, lo), min(s.hi, hi)
            if a < b:
                out.append((s, a, b))
        return out

    def set_reg(self, lo: int, hi: int, ctx: Uffd | None, mode: int) -> None:
        """Split segments at lo/hi, set (ctx, mode) on [lo, hi), merge equal neighbours."""
        new: list[Seg] = []
        for s in self.segs:
            if s.hi <= lo or s.lo >= hi:
                new.append(s)
                continue
            if s.lo < lo:
                new.append(Seg(s.lo, lo, s.ctx, s.mode))
            new.append(Seg(max(s.lo, lo), min(s.hi, hi), ctx, mode))
            if s.hi > hi:
                new.append(Seg(hi, s.hi, s.ctx, s.mode))
        merged: list[Seg] = []
        for s in new:
            if merged and merged[-1].ctx is s.ctx and merged[-1].mode == s.mode:
                merged[-1].hi = s.hi
            else:
                merged.append(s)
        self.segs = merged

    # -- contents
    def get_content(self, pg: int) -> Content | None:
        if self.file is None:
            return self.data.get(pg)
        return self.file.data.get(self.fpgoff + pg)

    def set_content(self, pg: int, c: Content | None) -> None:
        d, k = (self.data, pg) if self.file is None else (self.file.data, self.fpgoff + pg)
        if c is None:
            d.pop(k, None)
        else:
            d[k] = c

    def cached(self, pg: int) -> bool:
        return self.file is not None and bool(self.file.cached[self.fpgoff + pg])

    def set_pt(self, lo: int, hi: int) -> None:
        """A PTE table now exists for every 2 MiB block touching pages [lo, hi)."""
        a = (lo // PT_PAGES) * PT_PAGES
        b = min(-(-hi // PT_PAGES) * PT_PAGES, self.npages)
        self.flags[a:b] |= F_PT


class Mm:
    """One address space (struct mm_struct): mappings sorted by address. ``dead`` once
    its process exited (exit_mmap): every mapping is gone and uffd contexts bound to it
    answer ESRCH (page ops) or ENOMEM (register), as mmget_not_zero() fails."""

    def __init__(self, base: int = ADDR_BASE, limit: int = TASK_SIZE) -> None:
        self.maps: list[Mapping] = []
        self.next_addr = base
        self.limit = limit
        self.dead = False

    def find(self, addr: int) -> Mapping | None:
        i = bisect.bisect_right([m.addr for m in self.maps], addr) - 1
        if i >= 0 and self.maps[i].addr <= addr < self.maps[i].end:
            return self.maps[i]
        return None

    def maps_in(self, start: int, end: int) -> list[tuple[Mapping, int, int]]:
        """(mapping, first page, end page) for every mapping meeting [start, end)."""
        out = []
        for m in self.maps:
            if m.end <= start or m.addr >= end:
                continue
            lo = (max(start, m.addr) - m.addr) // PAGE
            hi = -(-(min(end, m.end) - m.addr) // PAGE)
            out.append((m, lo, hi))
        return out

    def alloc_addr(self, length: int) -> int:
        addr = self.next_addr
        # 2 MiB aligned with a 2 MiB gap so separate mappings never merge
        nxt = addr + -(-length // (2 << 20)) * (2 << 20) + (2 << 20)
        if nxt > self.limit:
            raise KernelError("mmap", errno.ENOMEM)
        self.next_addr = nxt
        return addr

    def add(self, m: Mapping) -> None:
        self.maps.append(m)
        self.maps.sort(key=lambda x: x.addr)


@dataclass(eq=False)
class Waiter:
    """A thread blocked in handle_userfault (or an event's originator)."""

    addr: int  # page-aligned fault address
    msg: UffdEvent
    woken: bool = False


@dataclass(eq=False)
class Uffd:
    """A userfaultfd context (and its one struct file). ``fd`` is the context's own
    eventfd, the readiness every fd referring to it shares (each is a dup of it);
    ``refs`` counts those fds in every process's fd table. ``mm`` is the address space
    of the process that created it: every ioctl acts there, whoever calls."""

    fd: int
    user_mode_only: bool
    mm: Mm
    features: int | None = None  # None until UFFDIO_API
    pending: list[Waiter] = field(default_factory=list)  # faults not yet read
    waiting: list[Waiter] = field(default_factory=list)  # faults read, not yet woken
    events: deque[Waiter] = field(default_factory=deque)  # non-pagefault events unread
    mmap_changing: int = 0
    released: bool = False
    readable: bool = False  # eventfd counter is non-zero
    refs: int = 1  # fds referring to this context, in every process
    nonblock: bool = True  # O_NONBLOCK of the file (shared by every copy of the fd)
    readers: int = 0  # threads blocked in read() on a blocking copy

    def has(self, feature: int) -> bool:
        return bool((self.features or 0) & feature)

    def sync_readiness(self) -> None:
        """Keep the eventfd readable iff a message is pending (so poll/trio see it)."""
        want = bool(self.pending or self.events) and not self.released
        if want and not self.readable:
            os.eventfd_write(self.fd, 1)
            self.readable = True
        elif not want and self.readable:
            try:
                os.eventfd_read(self.fd)
            except BlockingIOError:
                pass
            self.readable = False


def check_range(op: str, start: int, length: int) -> None:
    """validate_range() of fs/userfaultfd.c."""
    if start % PAGE or length % PAGE or length == 0 or start < MMAP_MIN_ADDR:
        raise KernelError(op, errno.EINVAL)
    if start >= TASK_SIZE or length > TASK_SIZE - start:
        raise KernelError(op, errno.EINVAL)


class FakeState:
    """Everything the mixins share. One RLock guards it all; ``cv`` wakes blocked faults."""

    name: str

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.lock = threading.RLock()
        self.cv = threading.Condition(self.lock)
        self.mm = Mm()  # this process's address space
        self.files: dict[int, MemFile] = {}  # this process's memfd fds
        self.file_ino: dict[int, int] = {}  # fd -> st_ino of the placeholder memfd
        self.uffds: dict[int, Uffd] = {}  # this process's uffd fds (dups of Uffd.fd)
        self.next_ino = 40000  # fake inode numbers of memfds
        self.calls: dict[str, int] = {}
        self.injections: dict[str, list[list[int]]] = {}  # op -> [[errno, count, after]]
        self.next_tid = 100000

    # -- bookkeeping
    def enter(self, op: str) -> None:
        """Count a call of ``op`` and raise an injected error if one is due."""
        self.calls[op] = self.calls.get(op, 0) + 1
        for inj in self.injections.get(op, []):
            err, count, after = inj
            if count <= 0:
                continue
            if after > 0:
                inj[2] -= 1
                continue
            inj[1] -= 1
            raise KernelError(op, err, 0, "injected")

    def ctx(self, op: str, fd: int, *, need_api: bool = True) -> Uffd:
        u = self.uffds.get(fd)
        if u is None:
            raise KernelError(op, errno.EBADF)
        if need_api and u.features is None:
            raise KernelError(op, errno.EINVAL, 0, "UFFDIO_API not done")
        return u

    # -- this process's address space
    @property
    def maps(self) -> list[Mapping]:
        return self.mm.maps

    def find(self, addr: int) -> Mapping | None:
        return self.mm.find(addr)

    def maps_in(self, start: int, end: int) -> list[tuple[Mapping, int, int]]:
        return self.mm.maps_in(start, end)

    def alloc_addr(self, length: int) -> int:
        return self.mm.alloc_addr(length)

    def new_ino(self) -> int:
        self.next_ino += 1
        return self.next_ino

    # -- fds
    def unref(self, u: Uffd) -> None:
        """One fd referring to ``u`` was closed, in whichever process; the last one
        releases the context (userfaultfd_release)."""
        u.refs -= 1
        if u.refs == 0:
            self.release(u)
            os.close(u.fd)

    def release(self, u: Uffd) -> None:
        raise NotImplementedError  # fake_uffd

    # -- waking
    def wake_range(self, u: Uffd, start: int, length: int) -> None:
        """wake_userfault(): wake blocked faults in [start, start+len); len 0 = all.

        A woken fault that was not read yet disappears from the queue, as in the
        kernel (userfaultfd_wake_function removes it from fault_pending_wqh)."""
        def hit(w: Waiter) -> bool:
            return length == 0 or start <= w.addr < start + length

        woke = False
        for lst in (u.pending, u.waiting):
            keep = []
            for w in lst:
                if hit(w):
                    w.woken = True
                    woke = True
                else:
                    keep.append(w)
            lst[:] = keep
        if woke:
            u.sync_readiness()
            self.cv.notify_all()

    def queued(self, u: Uffd) -> None:
        """A message was queued on ``u``: readiness, and wake blocking readers."""
        u.sync_readiness()
        if u.readers:
            self.cv.notify_all()

    def new_tid(self) -> int:
        self.next_tid += 1
        return self.next_tid
