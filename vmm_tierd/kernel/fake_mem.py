"""Memory of the fake kernel: mmap/munmap/madvise, memfd files (pread, punch, SEEK_DATA),
and tearing an address space down. Address-space operations take the ``Mm`` they act
on: this process's for the Kernel methods, a simulated VMM's for injected syscalls."""

from __future__ import annotations

import errno
import os

import numpy as np

from . import uapi
from .api import KernelError, MemType, Region
from .fake_ops import OpsMixin
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
    Mm,
    materialize,
)

_NOOP_ADVICE = {0, 1, 2, 3, uapi.MADV_HUGEPAGE, uapi.MADV_NOHUGEPAGE, uapi.MADV_COLD,
                uapi.MADV_PAGEOUT}  # NORMAL, RANDOM, SEQUENTIAL, WILLNEED, ...


class MemMixin(OpsMixin):
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
            f = MemFile(name, length, self.new_ino())
            m = Mapping(self.alloc_addr(length), length, MemType.MEMFD, f, 0)
            f.maps.append(m)
            self._add(m)
            fd = self.add_file(f)
            return Region(m.addr, length, MemType.MEMFD, fd=fd, offset=0)

    # -- this process's fds of fake memfds
    def add_file(self, f: MemFile) -> int:
        """A new fd of this process referring to ``f``. The fd is a real, empty memfd
        (a unique inode), so an fd closed with os.close and its number reused is told
        from the one handed out: lookups check the inode (see ``memfile``)."""
        fd = os.memfd_create(f"fake:{f.name}", os.MFD_CLOEXEC)
        self.files[fd] = f
        self.file_ino[fd] = os.fstat(fd).st_ino
        return fd

    def memfile(self, op: str, fd: int) -> MemFile:
        f = self.files.get(fd)
        if f is not None:
            try:
                same = os.fstat(fd).st_ino == self.file_ino[fd]
            except OSError:
                same = False
            if same:
                return f
            del self.files[fd], self.file_ino[fd]  # closed behind our back
        raise KernelError(op, errno.EBADF, 0, f"fd {fd} is not a fake memfd")

    def close_file(self, fd: int) -> None:
        if self.files.pop(fd, None) is not None:
            ino = self.file_ino.pop(fd)
            try:
                if os.fstat(fd).st_ino == ino:
                    os.close(fd)
            except OSError:
                pass

    @staticmethod
    def _check_len(op: str, length: int) -> None:
        if length <= 0 or length % PAGE or length > TASK_SIZE:
            raise KernelError(op, errno.EINVAL, 0, f"length {length}")

    def _add(self, m: Mapping) -> None:
        self.mm.add(m)

    def unmap(self, region: Region) -> None:
        with self.lock:
            self.enter("munmap")
            m = self.find(region.addr)
            if m is None or m.addr != region.addr or m.length != region.length:
                raise KernelError("munmap", errno.EINVAL, 0, f"no mapping 0x{region.addr:x}")
            if region.fd >= 0:
                self.close_file(region.fd)
            self.munmap_one(self.mm, m)

    def munmap_one(self, mm: Mm, m: Mapping) -> None:
        """Remove mapping ``m`` of ``mm`` whole (the caller holds the lock)."""
        events = self.unmap_events(m, m.addr, m.end)
        self.drop_mapping(mm, m)
        self.post_events(events)  # munmap returns once UNMAP was read

    def drop_mapping(self, mm: Mm, m: Mapping) -> None:
        mm.maps.remove(m)
        for u in {id(s.ctx): s.ctx for s in m.segs if s.ctx is not None}.values():
            # blocked accessors retry and find no mapping (SIGSEGV -> EFAULT)
            self.wake_range(u, m.addr, m.length)
        if m.file is not None:
            m.file.maps.remove(m)

    def teardown_mm(self, mm: Mm) -> None:
        """exit_mmap(): the process is gone; no UNMAP events are sent at exit."""
        for m in list(mm.maps):
            self.drop_mapping(mm, m)
        mm.dead = True
        self.cv.notify_all()

    def madvise(self, addr: int, length: int, advice: int) -> None:
        op = f"madvise({advice})"
        with self.lock:
            self.enter(op)
            self.madvise_mm(self.mm, op, addr, length, advice)

    def madvise_mm(self, mm: Mm, op: str, addr: int, length: int, advice: int) -> None:
        """madvise() (or one process_madvise iovec) on ``mm``; the caller holds the lock."""
        if addr % PAGE or length < 0:
            raise KernelError(op, errno.EINVAL)
        length = -(-length // PAGE) * PAGE
        if length == 0:
            return
        if advice not in _NOOP_ADVICE and advice not in (uapi.MADV_DONTNEED,
                                                         uapi.MADV_REMOVE):
            raise KernelError(op, errno.EINVAL, 0, f"advice {advice} not modelled")
        end = addr + length
        parts = mm.maps_in(addr, end)
        covered = sum((hi - lo) * PAGE for _m, lo, hi in parts)
        if advice == uapi.MADV_REMOVE:
            if any(m.file is None for m, _lo, _hi in parts):
                raise KernelError(op, errno.EINVAL, 0, "MADV_REMOVE on private memory")
        if advice in (uapi.MADV_DONTNEED, uapi.MADV_REMOVE):
            for m, lo, hi in parts:
                # userfaultfd_remove(): REMOVE is queued and madvise waits until it
                # is read; meanwhile page ops fail with EAGAIN (mmap_changing).
                self.post_events(self.remove_events(m, lo, hi))
                if m not in mm.maps:
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
            f = self.memfile(op, fd)
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
            f = self.memfile("pread", fd)
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
            f = self.memfile("lseek(SEEK_DATA)", fd)
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

