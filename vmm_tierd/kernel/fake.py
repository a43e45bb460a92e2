"""An in-process kernel with the semantics of Linux userfaultfd + PAGEMAP_SCAN.

``FakeKernel(dialect=Dialect.RWP)`` speaks the Linux 7.3 RWP API (``fake-rwp``);
``Dialect.RFC`` speaks the RFC as posted (MINOR_ANON/MINOR_ASYNC/DEACTIVATE,
``fake-rfc``). Everything else follows Linux 6.18 as measured on the host. uffd fds are
real eventfds, readable iff a message is pending, so trio's ``wait_readable`` works.

Modules: fake_state (address space, contexts), fake_uffd (API/register/read/events),
fake_ops (page ioctls), fake_scan (PAGEMAP_SCAN), fake_guest (vCPUs and workloads).

Semantics checked against the real 6.18 kernel (tests/test_fake_vs_linux.py), notably:
- a partial COPY/ZEROPAGE/CONTINUE/POISON/MOVE reports the bytes done and fails EAGAIN;
  the op's own errno (EEXIST, ENOENT, ...) only comes when nothing was done;
- every page op fails EAGAIN while a REMOVE/UNMAP event is unread, and the madvise/munmap
  that raised it blocks until the event is read (so never call it from the thread that
  reads the uffd when EVENT_REMOVE/EVENT_UNMAP is on);
- UNREGISTER unprotects, but wakes blocked faults only on MISSING-registered ranges;
  close wakes everything;
- PAGEMAP_SCAN: see fake_scan. PAGE_IS_ACCESSED (RWP dialect) is "present and no uffd
  bit" inside RWP VMAs, so a page never protected, or freshly COPY'd, reads as accessed.

Test hooks: ``inject(op, errno, count, after)`` fails the named op (the same op names
``KernelError.op`` carries, e.g. "UFFDIO_COPY", "madvise", "PAGEMAP_SCAN");
``calls[op]`` counts calls.
"""

from __future__ import annotations

import errno
import os

import numpy as np

from . import uapi
from .api import (
    Capabilities,
    Dialect,
    KernelError,
    MemType,
    Region,
    choose_strategy,
    dialect_names,
)
from .fake_guest import GuestMixin
from .fake_ops import OpsMixin
from .fake_scan import ScanMixin
from .fake_state import (
    F_PRESENT,
    F_PROTNONE,
    F_PT,
    F_RWP,
    F_WP,
    MODE_WP,
    PAGE,
    PT_PAGES,
    TASK_SIZE,
    Mapping,
    MemFile,
    materialize,
)
from .process import Process

_NOOP_ADVICE = {0, 1, 2, 3, uapi.MADV_HUGEPAGE, uapi.MADV_NOHUGEPAGE, uapi.MADV_COLD,
                uapi.MADV_PAGEOUT}  # NORMAL, RANDOM, SEQUENTIAL, WILLNEED, ...


class FakeKernel(OpsMixin, ScanMixin, GuestMixin):
    page_size = PAGE

    def __init__(self, dialect: Dialect = Dialect.RWP) -> None:
        if dialect is Dialect.NONE:
            name = "fake-618"
        else:
            name = "fake-rwp" if dialect is Dialect.RWP else "fake-rfc"
        super().__init__(dialect)
        self.name = name
        self._closed = False

    # ---- test hooks -----------------------------------------------------------------
    def inject(self, op: str, err: int, count: int = 1, after: int = 0) -> None:
        """Make ``op`` fail with ``err`` for its next ``count`` calls after ``after``."""
        with self.lock:
            self.injections.setdefault(op, []).append([err, count, after])

    def enter(self, op: str) -> None:
        super().enter(op)
        base = op.split("(", 1)[0]
        if base != op:  # "madvise(4)" also answers to "madvise"
            self.calls[base] = self.calls.get(base, 0) + 1
            for inj in self.injections.get(base, []):
                if inj[1] > 0:
                    if inj[2] > 0:
                        inj[2] -= 1
                        continue
                    inj[1] -= 1
                    raise KernelError(op, inj[0], 0, "injected")

    # ---- memory -----------------------------------------------------------------------
    def map_anon(self, length: int) -> Region:
        with self.lock:
            self.enter("mmap(anon)")
            self._check_len("mmap(anon)", length)
            m = Mapping(self.alloc_addr(length), length, MemType.ANON)
            self._add(m)
            return Region(m.addr, length, MemType.ANON)

    def map_memfd(self, length: int, name: str = "guest") -> Region:
        with self.lock:
            self.enter("mmap(memfd)")
            self._check_len("mmap(memfd)", length)
            fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)  # reserves a unique fd
            f = MemFile(fd, name, length)
            self.files[fd] = f
            m = Mapping(self.alloc_addr(length), length, MemType.MEMFD, f, 0)
            f.maps.append(m)
            self._add(m)
            return Region(m.addr, length, MemType.MEMFD, fd=fd, offset=0)

    @staticmethod
    def _check_len(op: str, length: int) -> None:
        if length <= 0 or length % PAGE or length > TASK_SIZE:
            raise KernelError(op, errno.EINVAL, 0, f"length {length}")

    def _add(self, m: Mapping) -> None:
        self.maps.append(m)
        self.maps.sort(key=lambda x: x.addr)

    def unmap(self, region: Region) -> None:
        with self.lock:
            self.enter("munmap")
            m = self.find(region.addr)
            if m is None or m.addr != region.addr or m.length != region.length:
                raise KernelError("munmap", errno.EINVAL, 0, f"no mapping 0x{region.addr:x}")
            events = self.unmap_events(m, region.addr, region.addr + region.length)
            self.maps.remove(m)
            for u in {id(s.ctx): s.ctx for s in m.segs if s.ctx is not None}.values():
                # blocked accessors retry and find no mapping (SIGSEGV -> EFAULT)
                self.wake_range(u, m.addr, m.length)
            if m.file is not None:
                m.file.maps.remove(m)
                if region.fd >= 0:
                    self.files.pop(region.fd, None)
                    os.close(region.fd)
            self.post_events(events)  # munmap returns once UNMAP was read

    def madvise(self, addr: int, length: int, advice: int) -> None:
        op = f"madvise({advice})"
        with self.lock:
            self.enter(op)
            if addr % PAGE or length < 0:
                raise KernelError(op, errno.EINVAL)
            length = -(-length // PAGE) * PAGE
            if length == 0:
                return
            if advice not in _NOOP_ADVICE and advice not in (uapi.MADV_DONTNEED,
                                                             uapi.MADV_REMOVE):
                raise KernelError(op, errno.EINVAL, 0, f"advice {advice} not modelled")
            end = addr + length
            parts = self.maps_in(addr, end)
            covered = sum((hi - lo) * PAGE for _m, lo, hi in parts)
            if advice == uapi.MADV_REMOVE:
                if any(m.file is None for m, _lo, _hi in parts):
                    raise KernelError(op, errno.EINVAL, 0, "MADV_REMOVE on private memory")
            if advice in (uapi.MADV_DONTNEED, uapi.MADV_REMOVE):
                for m, lo, hi in parts:
                    # userfaultfd_remove(): REMOVE is queued and madvise waits until it
                    # is read; meanwhile page ops fail with EAGAIN (mmap_changing).
                    self.post_events(self.remove_events(m, lo, hi))
                    if m not in self.maps:
                        continue
                    if advice == uapi.MADV_DONTNEED:
                        self._zap(m, lo, hi)
                    else:
                        assert m.file is not None
                        self._punch(m.file, m.fpgoff + lo, m.fpgoff + hi)
            if covered != length:
                raise KernelError(op, errno.ENOMEM, 0, "part of the range is not mapped")

    def _zap(self, m: Mapping, lo: int, hi: int) -> None:
        if m.file is None:
            # zap on anonymous memory drops everything, markers included
            m.flags[lo:hi] &= F_PT
            for pg in [k for k in m.data if lo <= k < hi]:
                del m.data[pg]
        else:
            for s, a, b in m.segs_in(lo, hi):
                self.zap_shmem(m, s, a, b)
        # PT reclaim (measured): a PTE table whose whole 2 MiB the zap covered, and that
        # is empty afterwards, is freed; its pages become a hole again.
        for x in range(-(-lo // PT_PAGES) * PT_PAGES, hi - PT_PAGES + 1, PT_PAGES):
            blk = m.flags[x:x + PT_PAGES]
            if not np.any(blk & (~F_PT & 0xFF)):
                blk[:] = 0

    def _punch(self, f: MemFile, lo: int, hi: int) -> None:
        """Drop file pages [lo, hi): page cache and every mapping's PTEs."""
        f.cached[lo:hi] = False
        for k in [k for k in f.data if lo <= k < hi]:
            del f.data[k]
        for m in f.maps:
            a, b = max(lo - m.fpgoff, 0), min(hi - m.fpgoff, m.npages)
            for s, x, y in m.segs_in(a, b):
                fl = m.flags[x:y]
                keep = F_PT | (F_WP if s.mode & MODE_WP else 0)
                present_or_wp = (fl & (F_PRESENT | F_WP)) != 0
                fl[present_or_wp] &= keep
                fl &= ~(F_RWP | F_PROTNONE) & 0xFF

    def punch_hole(self, fd: int, offset: int, length: int) -> None:
        op = "fallocate(PUNCH_HOLE)"
        with self.lock:
            self.enter(op)
            f = self.files.get(fd)
            if f is None:
                raise KernelError(op, errno.EBADF, 0, f"fd {fd} is not a fake memfd")
            if offset < 0 or length <= 0:
                raise KernelError(op, errno.EINVAL)
            end = min(offset + length, f.size)
            lo, hi = -(-offset // PAGE), end // PAGE
            for pg in {offset // PAGE, end // PAGE}:  # partial pages are zeroed in place
                if pg < len(f.cached) and not lo <= pg < hi and f.cached[pg]:
                    a = max(offset, pg * PAGE) - pg * PAGE
                    b = min(end, (pg + 1) * PAGE) - pg * PAGE
                    if a < b:
                        page = bytearray(materialize(f.data.get(pg)))
                        page[a:b] = bytes(b - a)
                        f.data[pg] = bytes(page)
            if lo < hi:
                self._punch(f, lo, hi)

    def pread(self, fd: int, offset: int, length: int) -> bytes:
        with self.lock:
            self.enter("pread")
            f = self.files.get(fd)
            if f is None:
                raise KernelError("pread", errno.EBADF, 0, f"fd {fd} is not a fake memfd")
            if offset < 0 or length < 0:
                raise KernelError("pread", errno.EINVAL)
            end = min(offset + length, f.size)
            out = bytearray()
            pos = offset
            while pos < end:
                pg, off = divmod(pos, PAGE)
                n = min(PAGE - off, end - pos)
                out += materialize(f.data.get(pg))[off:off + n]
                pos += n
            if len(out) < length:
                raise KernelError("pread", errno.EIO, len(out), f"short read at offset {end}")
            return bytes(out)

    def file_data_runs(self, fd: int, offset: int, length: int) -> np.ndarray:
        with self.lock:
            self.enter("lseek(SEEK_DATA)")
            f = self.files.get(fd)
            if f is None:
                raise KernelError("lseek(SEEK_DATA)", errno.EBADF, 0, f"fd {fd}")
            lo, hi = offset // PAGE, min(-(-(offset + length) // PAGE), len(f.cached))
            c = f.cached[lo:hi].view(np.int8)
            edges = np.flatnonzero(np.diff(c, prepend=0, append=0))
            runs = edges.reshape(-1, 2).astype(np.int64) + lo
            runs *= PAGE
            np.clip(runs, offset, offset + length, out=runs)
            return runs

    def read_unregistered(self, addr: int, length: int) -> bytes:
        """Bytes of present, accessible pages; EFAULT where a real load would fault."""
        op = "read_unregistered"
        with self.lock:
            self.enter(op)
            out = bytearray()
            pos, end = addr, addr + length
            while pos < end:
                m = self.find(pos)
                if m is None:
                    raise KernelError(op, errno.EFAULT, len(out), f"0x{pos:x} not mapped")
                pg, off = divmod(pos - m.addr, PAGE)
                f = int(m.flags[pg])
                if not f & F_PRESENT or f & (F_RWP | F_PROTNONE):
                    raise KernelError(op, errno.EFAULT, len(out), f"0x{pos:x} would fault")
                n = min(PAGE - off, end - pos)
                out += materialize(m.get_content(pg))[off:off + n]
                pos += n
            return bytes(out)

    # ---- other processes --------------------------------------------------------------
    def open_process(self, pid: int) -> Process:
        raise NotImplementedError("open_process: not implemented yet")

    # ---- capabilities / close -----------------------------------------------------------
    def capabilities(self) -> Capabilities:
        fd = self.uffd_open()
        try:
            info = self.uffd_api(fd, 0)
        finally:
            self.uffd_close(fd)
        strategy, reason = choose_strategy(self.dialect, info.features)
        names = uapi.feature_names(info.features, dialect_names(self.dialect))
        return Capabilities(self.name, "fake", self.dialect, info.features, info.ioctls,
                            names, strategy, reason)

    def close(self) -> None:
        with self.lock:
            if self._closed:
                return
            self._closed = True
            for u in list(self.uffds.values()):
                self._release(u)
                os.close(u.fd)
            for fd in list(self.files):
                os.close(fd)
            self.files.clear()
            self.maps.clear()
            self.cv.notify_all()

    def __enter__(self) -> FakeKernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
