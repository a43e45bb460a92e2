"""An optional record of what happened to guest pages, for stress tests and torture runs.

Two sources feed one :class:`PageTrace` per region:

- :class:`~vmm_tierd.engine.pages.PageTable` notes every transition when a trace is
  installed (``PageTable.trace``; None by default, so the cost when off is one attribute
  test per transition);
- :class:`TracingKernel`, a pass-through around the backend, notes every kernel
  operation on the region and on its staging area, naming each address by page or by
  staging slot: every UFFDIO_MOVE into or out of staging with its slot numbers, every
  COPY/ZEROPAGE/POISON/WAKE, the staging's MADV_DONTNEED, PAGEMAP_SCANs that re-protect.

On a failure, :meth:`PageTrace.history` prints every event that touched a page, plus
everything that happened meanwhile to the staging slots that page was moved into. The
record is a ring bounded in events and in bytes (bulk transitions keep their page
arrays), so a long run keeps its most recent history.

``before_drop`` (if set) is called with the staging address right before the staging
area is dropped (MADV_DONTNEED), for the invariant audit of what it still holds.
"""

from __future__ import annotations

import errno as _errno
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from ..kernel import uapi
from ..kernel.api import Kernel, KernelError

# What an event touched: one page, a run (first, count), or an array of pages.
Pages = int | tuple[int, int] | np.ndarray | None


@dataclass(slots=True)
class Event:
    seq: int
    t: float
    op: str
    pages: Pages
    slots: tuple[int, int] | None = None  # staging slots (first, count)
    result: str = ""
    detail: str = ""

    def touches(self, p: int) -> bool:
        pg = self.pages
        if pg is None:
            return False
        if isinstance(pg, int):
            return pg == p
        if isinstance(pg, tuple):
            return pg[0] <= p < pg[0] + pg[1]
        return bool(np.any(pg == p))

    def slot_of(self, p: int) -> int | None:
        """The staging slot page ``p`` went to (or came from) in this event, if any."""
        if self.slots is None or self.pages is None:
            return None
        pg = self.pages
        if isinstance(pg, int):
            return self.slots[0] if pg == p else None
        if isinstance(pg, tuple):
            return self.slots[0] + p - pg[0] if pg[0] <= p < pg[0] + pg[1] else None
        i = np.flatnonzero(pg == p)
        return self.slots[0] + int(i[0]) if len(i) else None

    def touches_slot(self, s: int) -> bool:
        return self.slots is not None and self.slots[0] <= s < self.slots[0] + self.slots[1]

    def __str__(self) -> str:
        pg = self.pages
        if pg is None:
            where = ""
        elif isinstance(pg, int):
            where = f"page {pg}"
        elif isinstance(pg, tuple):
            where = f"pages [{pg[0]}, {pg[0] + pg[1]})"
        else:
            where = f"{len(pg)} pages" + (f" [{int(pg[0])}..{int(pg[-1])}]" if len(pg) else "")
        if self.slots is not None:
            s0, n = self.slots
            where += f" slot{'s' if n != 1 else ''} {s0}" + (f"..{s0 + n - 1}" if n > 1 else "")
        out = f"#{self.seq} {self.t:.6f} {self.op} {where}"
        if self.result:
            out += f" -> {self.result}"
        if self.detail:
            out += f" ({self.detail})"
        return out


class PageTrace:
    """The recent history of one region's pages and staging slots."""

    def __init__(self, name: str = "", *, max_events: int = 1_000_000,
                 max_bytes: int = 256 << 20) -> None:
        self.name = name
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.events: deque[Event] = deque()
        self._bytes = 0
        self._seq = itertools.count()
        self.t0 = time.perf_counter()
        self.base = 0
        self.npages = 0
        self.ps = 4096
        self.staging = 0
        self.staging_pages = 0
        self.fd = -1  # memfd
        self.offset = 0
        self.dropped = 0  # events pushed out of the ring
        self.last_batch: dict[int, np.ndarray] = {}  # staging address -> its last batch
        self.before_drop: Callable[[int], object] | None = None

    def bind(self, base: int, npages: int, page_size: int, *, staging: int = 0,
             staging_pages: int = 0, fd: int = -1, offset: int = 0) -> None:
        """Where the region (and its staging area, for anon) is: for naming addresses."""
        self.base, self.npages, self.ps = base, npages, page_size
        self.staging, self.staging_pages = staging, staging_pages
        self.fd, self.offset = fd, offset

    # ---- recording ------------------------------------------------------------------
    def note(self, op: str, pages: Pages, slots: tuple[int, int] | None = None,
             result: str = "", detail: str = "") -> None:
        if isinstance(pages, np.ndarray):
            pages = pages.copy()
            self._bytes += pages.nbytes
        ev = Event(next(self._seq), time.perf_counter() - self.t0, op, pages, slots,
                   result, detail)
        self.events.append(ev)
        while len(self.events) > self.max_events or self._bytes > self.max_bytes:
            old = self.events.popleft()
            self.dropped += 1
            if isinstance(old.pages, np.ndarray):
                self._bytes -= old.pages.nbytes

    def detached(self, pages: np.ndarray, staging: int) -> None:
        self.note("detached", pages, (0, len(pages)) if staging else None)
        if staging:
            self.last_batch[staging] = pages.copy()

    # ---- naming addresses ---------------------------------------------------------------
    def page_run(self, addr: int, length: int) -> tuple[int, int] | None:
        if self.npages and self.base <= addr < self.base + self.npages * self.ps:
            return (addr - self.base) // self.ps, max(1, -(-length // self.ps))
        return None

    def slot_run(self, addr: int, length: int) -> tuple[int, int] | None:
        if self.staging and self.staging <= addr < self.staging + self.staging_pages * self.ps:
            return (addr - self.staging) // self.ps, max(1, -(-length // self.ps))
        return None

    def owns(self, addr: int) -> bool:
        return self.page_run(addr, 1) is not None or self.slot_run(addr, 1) is not None

    # ---- reading --------------------------------------------------------------------------
    def history(self, p: int, *, limit: int = 200) -> list[str]:
        """Every recorded event that touched page ``p``, and the events that touched the
        staging slots it was moved into, between that move and the slot's next drop."""
        evs = list(self.events)
        mine: dict[int, Event] = {}
        slots: list[tuple[int, int]] = []  # (slot, seq of the move into it)
        for ev in evs:
            if ev.touches(p):
                mine[ev.seq] = ev
                if ev.op.startswith("MOVE") and "out" in ev.op and ev.result.startswith("ok"):
                    s = ev.slot_of(p)
                    if s is not None:
                        slots.append((s, ev.seq))
        for s, since in slots:
            for ev in evs:
                if ev.seq <= since:
                    continue
                if ev.touches_slot(s):
                    mine.setdefault(ev.seq, ev)
                    if ev.op == "MADV_DONTNEED staging":
                        break
        out = _collapse([mine[k] for k in sorted(mine)])
        head = f"region {self.name} page {p}: {len(mine)} events"
        if self.dropped:
            head += f" (the oldest {self.dropped} events of the region were dropped)"
        if len(out) > limit:
            out = out[-limit:]
            head += f", last {limit} shown"
        return [head, *out]

    def format_histories(self, pages: Iterable[int], *, each: int = 60) -> str:
        return "\n".join("\n  ".join(self.history(int(p), limit=each)) for p in pages)


def _collapse(evs: list[Event]) -> list[str]:
    """One line per event, runs of the same whole-region operation (the cycle's scans)
    folded into one line."""
    out: list[str] = []
    i = 0
    while i < len(evs):
        j = i + 1
        while (j < len(evs) and isinstance(evs[i].pages, tuple) and evs[j].op == evs[i].op
               and evs[j].pages == evs[i].pages and evs[j].result == evs[i].result):
            j += 1
        line = str(evs[i])
        if j - i > 1:
            line += f" x{j - i}, the last #{evs[j - 1].seq} at {evs[j - 1].t:.6f}"
        out.append(line)
        i = j
    return out


def _res(e: KernelError | None, n: int = 0) -> str:
    if e is None:
        return f"ok {n}" if n else "ok"
    name = _errno.errorcode.get(e.errno or 0, str(e.errno))
    return f"{name} after {e.done} bytes" if e.done else name


class TracingKernel:
    """The backend, with every operation on a traced region or staging area recorded in
    that region's :class:`PageTrace`. Everything else passes through untouched."""

    def __init__(self, kernel: Kernel) -> None:
        self._k = kernel
        self.traces: list[PageTrace] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._k, name)

    def as_kernel(self) -> Kernel:
        return cast(Kernel, self)

    def add(self, trace: PageTrace) -> None:
        self.traces.append(trace)

    def _find(self, addr: int) -> PageTrace | None:
        for t in self.traces:
            if t.owns(addr):
                return t
        return None

    def _call(self, op: str, addr: int, length: int, fn: Callable[[], Any],
              detail: str = "") -> Any:
        t = self._find(addr)
        if t is None:
            return fn()
        pages, slots = t.page_run(addr, length), t.slot_run(addr, length)
        try:
            out = fn()
        except KernelError as e:
            t.note(op, pages, slots, _res(e), detail)
            raise
        t.note(op, pages, slots, _res(None), detail)
        return out

    # ---- uffd operations on pages -------------------------------------------------------
    def uffd_move(self, fd: int, dst: int, src: int, length: int, mode: int = 0) -> int:
        t = self._find(dst) or self._find(src)
        if t is None:
            return self._k.uffd_move(fd, dst, src, length, mode)
        if t.slot_run(dst, length) is not None:  # out of the guest into staging
            op, pages, slots = "MOVE out", t.page_run(src, length), t.slot_run(dst, length)
        else:
            op, pages, slots = "MOVE in", t.page_run(dst, length), t.slot_run(src, length)
        wake = "" if mode & uapi.UFFDIO_MOVE_MODE_DONTWAKE else "wake"
        try:
            n = self._k.uffd_move(fd, dst, src, length, mode)
        except KernelError as e:
            t.note(op, pages, slots, _res(e), wake)
            if e.done and pages is not None and slots is not None:
                got = e.done // t.ps  # the part that did move, as its own event
                t.note(op, (pages[0], got), (slots[0], got), f"ok {got} (partial)", wake)
            raise
        t.note(op, pages, slots, _res(None, length // t.ps), wake)
        return n

    def uffd_copy(self, fd: int, dst: int, src: bytes | bytearray | memoryview,
                  mode: int = 0) -> int:
        return int(self._call("COPY", dst, len(src),
                              lambda: self._k.uffd_copy(fd, dst, src, mode)))

    def uffd_zeropage(self, fd: int, start: int, length: int, mode: int = 0) -> int:
        return int(self._call("ZEROPAGE", start, length,
                              lambda: self._k.uffd_zeropage(fd, start, length, mode)))

    def uffd_poison(self, fd: int, start: int, length: int, mode: int = 0) -> int:
        return int(self._call("POISON", start, length,
                              lambda: self._k.uffd_poison(fd, start, length, mode)))

    def uffd_continue(self, fd: int, start: int, length: int, mode: int = 0) -> int:
        return int(self._call("CONTINUE", start, length,
                              lambda: self._k.uffd_continue(fd, start, length, mode)))

    def uffd_wake(self, fd: int, start: int, length: int) -> None:
        self._call("WAKE", start, length, lambda: self._k.uffd_wake(fd, start, length))

    def uffd_writeprotect(self, fd: int, start: int, length: int, mode: int) -> None:
        op = "WRITEPROTECT" if mode & uapi.UFFDIO_WRITEPROTECT_MODE_WP else "UNPROTECT"
        self._call(op, start, length,
                   lambda: self._k.uffd_writeprotect(fd, start, length, mode))

    def uffd_rwprotect(self, fd: int, start: int, length: int, mode: int) -> None:
        op = "RWPROTECT" if mode & uapi.UFFDIO_RWPROTECT_MODE_RWP else "UNRWPROTECT"
        self._call(op, start, length,
                   lambda: self._k.uffd_rwprotect(fd, start, length, mode))

    # ---- memory ----------------------------------------------------------------------------
    def madvise(self, addr: int, length: int, advice: int) -> None:
        t = self._find(addr)
        if t is not None and advice == uapi.MADV_DONTNEED and t.slot_run(addr, length):
            if t.before_drop is not None:
                t.before_drop(addr)
            self._call("MADV_DONTNEED staging", addr, length,
                       lambda: self._k.madvise(addr, length, advice))
            return
        self._call(f"madvise({advice})", addr, length,
                   lambda: self._k.madvise(addr, length, advice))

    def read_unregistered(self, addr: int, length: int) -> bytes:
        return cast(bytes, self._call("READ", addr, length,
                                      lambda: self._k.read_unregistered(addr, length)))

    def punch_hole(self, fd: int, offset: int, length: int) -> None:
        t = next((t for t in self.traces if t.fd == fd and t.fd >= 0), None)
        if t is None:
            self._k.punch_hole(fd, offset, length)
            return
        addr = t.base + (offset - t.offset)
        self._call("PUNCH", addr, length, lambda: self._k.punch_hole(fd, offset, length))

    def pread(self, fd: int, offset: int, length: int) -> bytes:
        t = next((t for t in self.traces if t.fd == fd and t.fd >= 0), None)
        if t is None:
            return self._k.pread(fd, offset, length)
        addr = t.base + (offset - t.offset)
        return cast(bytes, self._call("PREAD", addr, length,
                                      lambda: self._k.pread(fd, offset, length)))

    def pagemap_scan(self, start: int, end: int, **kw: int) -> Any:
        if not kw.get("flags", 0) & uapi.PM_SCAN_WP_MATCHING:
            return self._k.pagemap_scan(start, end, **kw)
        return self._call("SCAN+WP", start, end - start,
                          lambda: self._k.pagemap_scan(start, end, **kw))
