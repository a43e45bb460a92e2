"""The real kernel, through the cffi wrappers in ``native/kernel.c``.

cffi releases the GIL around every call into ``vmm_tierd._native``, so a thread blocked in
an ioctl or a read never stalls the fault server. Nothing here touches guest memory from
Python; ``start_access``/``start_workload`` are C threads (``linux_guest``).
"""

from __future__ import annotations

import errno
import os
import struct
import threading
from typing import Any, NoReturn

import numpy as np

from . import uapi
from .api import (
    Access,
    AccessKind,
    ApiInfo,
    Capabilities,
    Dialect,
    ForkEvent,
    KernelError,
    MemType,
    PageFault,
    Region,
    RemapEvent,
    RemoveEvent,
    ScanResult,
    UffdEvent,
    UnmapEvent,
    Workload,
    WorkloadSpec,
    choose_strategy,
    dialect_names,
)
from .linux_scan import PagemapScanner
from .process import Process

from vmm_tierd._native import ffi, lib  # isort: skip

_MSG = struct.Struct("<B7xQQQ")  # uffd_msg: event, pad, then the 24-byte union
_U32 = 0xFFFFFFFF
_PROT_RW = uapi.PROT_READ | uapi.PROT_WRITE


def _check(op: str, ret: int, detail: str = "") -> int:
    if ret < 0:
        raise KernelError(op, -ret, 0, detail)
    return ret


_alloc = ffi.new_allocator(should_clear_after_alloc=False)


def _where(fd: int, start: int, length: int) -> str:
    return f"fd {fd}, [0x{start:x}, 0x{start + length:x})"


def _rcheck(op: str, ret: int, fd: int, start: int, length: int) -> None:
    if ret < 0:
        raise KernelError(op, -ret, 0, _where(fd, start, length))


def _failed(op: str, ret: int, fd: int, start: int, length: int) -> NoReturn:
    """Raise for a scalar fast-path call; the result field (bytes done, or -errno when
    nothing was done) is kept per thread by the C side."""
    done = max(int(lib.vt_last_done()), 0)
    raise KernelError(op, -ret, done, _where(fd, start, length))


class LinuxKernel:
    """The :class:`~vmm_tierd.kernel.api.Kernel` Protocol on the running Linux kernel."""

    name = "linux"

    def __init__(self, *, scan_vec_len: int = 65536) -> None:
        self.page_size = os.sysconf("SC_PAGE_SIZE")
        self._pagemap = _check("open /proc/self/pagemap",
                               lib.vt_open(b"/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC))
        self._scanner = PagemapScanner(self._pagemap, self.page_size, scan_vec_len)
        self._tls = threading.local()
        self._caps = self._probe()
        self.dialect = self._caps.dialect

    # ---- memory ---------------------------------------------------------------------
    def map_anon(self, length: int) -> Region:
        flags = uapi.MAP_PRIVATE | uapi.MAP_ANONYMOUS | uapi.MAP_NORESERVE
        addr = _check("mmap(anon)", lib.vt_mmap(0, length, _PROT_RW, flags, -1, 0),
                      f"{length} bytes")
        return Region(addr, length, MemType.ANON)

    def map_memfd(self, length: int, name: str = "guest") -> Region:
        fd = _check("memfd_create", lib.vt_memfd_create(name.encode(), uapi.MFD_CLOEXEC))
        try:
            _check("ftruncate(memfd)", lib.vt_ftruncate(fd, length), f"{name}: {length} bytes")
            addr = _check("mmap(memfd)",
                          lib.vt_mmap(0, length, _PROT_RW, uapi.MAP_SHARED, fd, 0))
        except KernelError:
            lib.vt_close(fd)
            raise
        return Region(addr, length, MemType.MEMFD, fd=fd, offset=0)

    # With EVENT_UNMAP / EVENT_REMOVE enabled on a uffd registered over the range, munmap
    # and MADV_DONTNEED/REMOVE block until that event is read from the uffd: never call
    # them from the thread that serves it.
    def unmap(self, region: Region) -> None:
        _rcheck("munmap", lib.vt_munmap(region.addr, region.length), region.fd, region.addr,
                region.length)
        if region.fd >= 0:
            _check("close(memfd)", lib.vt_close(region.fd))

    def madvise(self, addr: int, length: int, advice: int) -> None:
        _rcheck(f"madvise({advice})", lib.vt_madvise(addr, length, advice), -1, addr, length)

    def punch_hole(self, fd: int, offset: int, length: int) -> None:
        mode = uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE
        _rcheck("fallocate(PUNCH_HOLE)", lib.vt_fallocate(fd, mode, offset, length),
                fd, offset, length)

    def pread(self, fd: int, offset: int, length: int) -> bytes:
        buf = _alloc("char[]", length)
        n = _check("pread", lib.vt_pread_full(fd, buf, length, offset),
                   f"fd {fd}, offset 0x{offset:x}, {length} bytes")
        if n != length:
            raise KernelError("pread", errno.EIO, n, f"short read at offset {offset + n}")
        return ffi.buffer(buf, length)[:]

    def file_data_runs(self, fd: int, offset: int, length: int) -> np.ndarray:
        return _data_runs(fd, offset, offset + length)

    def read_unregistered(self, addr: int, length: int) -> bytes:
        buf = _alloc("char[]", length)
        lib.vt_memcpy_out(buf, addr, length)
        return ffi.buffer(buf, length)[:]

    # ---- userfaultfd ------------------------------------------------------------------
    def uffd_open(self, *, user_mode_only: bool = False) -> int:
        flags = uapi.O_CLOEXEC | uapi.O_NONBLOCK
        if user_mode_only:
            flags |= uapi.UFFD_USER_MODE_ONLY
        return _check("userfaultfd", lib.vt_uffd_new(uapi.USERFAULTFD_IOC_NEW, flags))

    def uffd_api(self, fd: int, features: int) -> ApiInfo:
        """The kernel answers with every feature it supports, not only the requested
        ones; only the requested ones are enabled on ``fd``. A uffd accepts one
        UFFDIO_API: after a failed one the fd is unusable, open a new one."""
        arg = ffi.new("struct uffdio_api *", {"api": uapi.UFFD_API, "features": features})
        ret = lib.vt_ioctl(fd, uapi.UFFDIO_API, arg)
        if ret < 0:
            raise KernelError("UFFDIO_API", -ret, 0, f"fd {fd}, features 0x{features:x}")
        return ApiInfo(int(arg.features), int(arg.ioctls))

    def uffd_features(self, fd: int) -> int | None:
        return fdinfo_uffd_features(f"/proc/self/fdinfo/{fd}", fd)

    def uffd_close(self, fd: int) -> None:
        _check("close(uffd)", lib.vt_close(fd))

    def uffd_register(self, fd: int, start: int, length: int, mode: int) -> int:
        arg = ffi.new("struct uffdio_register *", {"range": (start, length), "mode": mode})
        _rcheck("UFFDIO_REGISTER", lib.vt_ioctl(fd, uapi.UFFDIO_REGISTER, arg),
                fd, start, length)
        return int(arg.ioctls)

    def uffd_unregister(self, fd: int, start: int, length: int) -> None:
        _rcheck("UFFDIO_UNREGISTER",
                lib.vt_uffd_range(fd, uapi.UFFDIO_UNREGISTER, start, length), fd, start, length)

    def uffd_copy(self, fd: int, dst: int, src: bytes | bytearray | memoryview,
                  mode: int = 0) -> int:
        # EAGAIN with a partial count when the range is partly populated or a
        # non-cooperative event is pending; EEXIST when the page is already mapped
        # (e.g. another fault handler won the race).
        if type(src) is bytes:  # passed to C as a pointer to its data, no copy
            ret = lib.vt_uffd_copy(fd, uapi.UFFDIO_COPY, dst, src, len(src), mode)
        else:
            buf = ffi.from_buffer(src)
            ret = lib.vt_uffd_copy(fd, uapi.UFFDIO_COPY, dst, buf, len(buf), mode)
        return ret if ret >= 0 else _failed("UFFDIO_COPY", ret, fd, dst, len(src))

    def uffd_zeropage(self, fd: int, start: int, length: int, mode: int = 0) -> int:
        ret = lib.vt_uffd_range_result(fd, uapi.UFFDIO_ZEROPAGE, start, length, mode)
        return ret if ret >= 0 else _failed("UFFDIO_ZEROPAGE", ret, fd, start, length)

    def uffd_wake(self, fd: int, start: int, length: int) -> None:
        _rcheck("UFFDIO_WAKE", lib.vt_uffd_range(fd, uapi.UFFDIO_WAKE, start, length),
                fd, start, length)

    def uffd_writeprotect(self, fd: int, start: int, length: int, mode: int) -> None:
        _rcheck("UFFDIO_WRITEPROTECT",
                lib.vt_uffd_range_mode(fd, uapi.UFFDIO_WRITEPROTECT, start, length, mode),
                fd, start, length)

    def uffd_continue(self, fd: int, start: int, length: int, mode: int = 0) -> int:
        ret = lib.vt_uffd_range_result(fd, uapi.UFFDIO_CONTINUE, start, length, mode)
        return ret if ret >= 0 else _failed("UFFDIO_CONTINUE", ret, fd, start, length)

    def uffd_move(self, fd: int, dst: int, src: int, length: int, mode: int = 0) -> int:
        # Only dst must be registered (same uffd): unregistered dst -> EINVAL, populated
        # dst -> EEXIST, src hole -> ENOENT unless ALLOW_SRC_HOLES, page shared with a
        # fork()ed child -> EBUSY until the parent writes it again.
        ret = lib.vt_uffd_move(fd, uapi.UFFDIO_MOVE, dst, src, length, mode)
        if ret < 0:
            done = max(int(lib.vt_last_done()), 0)
            raise KernelError("UFFDIO_MOVE", -ret, done,
                              f"{_where(fd, dst, length)} from 0x{src:x}")
        return ret

    def uffd_poison(self, fd: int, start: int, length: int, mode: int = 0) -> int:
        ret = lib.vt_uffd_range_result(fd, uapi.UFFDIO_POISON, start, length, mode)
        return ret if ret >= 0 else _failed("UFFDIO_POISON", ret, fd, start, length)

    def uffd_rwprotect(self, fd: int, start: int, length: int, mode: int) -> None:
        # Before 7.3 the uffd ioctl switch rejects the unknown command with EINVAL;
        # that error is passed through unchanged.
        _rcheck("UFFDIO_RWPROTECT",
                lib.vt_uffd_range_mode(fd, uapi.UFFDIO_RWPROTECT, start, length, mode),
                fd, start, length)

    def uffd_deactivate(self, fd: int, start: int, length: int) -> None:
        # RFC-only. Never issued: 7.3 reuses nr 0x09 for RWPROTECT.
        raise KernelError("UFFDIO_DEACTIVATE", errno.ENOTTY, 0,
                          "RFC-only ioctl; no real kernel has it")

    def uffd_set_mode(self, fd: int, enable: int, disable: int) -> None:
        arg = ffi.new("struct uffdio_set_mode *", {"enable": enable, "disable": disable})
        ret = lib.vt_ioctl(fd, uapi.UFFDIO_SET_MODE, arg)
        if ret < 0:
            raise KernelError("UFFDIO_SET_MODE", -ret, 0,
                              f"fd {fd}, enable 0x{enable:x}, disable 0x{disable:x}")

    def _read_buf(self, size: int) -> Any:
        buf = getattr(self._tls, "buf", None)
        if buf is None or len(buf) < size:
            buf = ffi.new("char[]", size)
            self._tls.buf = buf
        return buf

    def uffd_read(self, fd: int, max_msgs: int = 64) -> list[UffdEvent]:
        size = max_msgs * uapi.SIZEOF_UFFD_MSG
        buf = self._read_buf(size)
        n = lib.vt_read(fd, buf, size)
        if n < 0:
            if n == -errno.EAGAIN:
                return []
            raise KernelError("read(uffd)", -n)
        out: list[UffdEvent] = []
        for event, a, b, c in _MSG.iter_unpack(ffi.buffer(buf, n)):
            if event == uapi.UFFD_EVENT_PAGEFAULT:
                out.append(PageFault(b, a, c & _U32))
            elif event == uapi.UFFD_EVENT_REMOVE:
                out.append(RemoveEvent(a, b))
            elif event == uapi.UFFD_EVENT_UNMAP:
                out.append(UnmapEvent(a, b))
            elif event == uapi.UFFD_EVENT_REMAP:
                out.append(RemapEvent(a, b, c))
            elif event == uapi.UFFD_EVENT_FORK:
                out.append(ForkEvent(a & _U32))
            else:
                raise KernelError("read(uffd)", errno.EPROTO, 0, f"unknown event 0x{event:x}")
        return out

    # ---- PAGEMAP_SCAN -----------------------------------------------------------------
    def pagemap_scan(self, start: int, end: int, *, category_mask: int = 0,
                     category_inverted: int = 0, category_anyof_mask: int = 0,
                     return_mask: int = 0, flags: int = 0, max_pages: int = 0
                     ) -> ScanResult:
        return self._scanner.scan(start, end, category_mask=category_mask,
                                  category_inverted=category_inverted,
                                  category_anyof_mask=category_anyof_mask,
                                  return_mask=return_mask, flags=flags, max_pages=max_pages)

    # ---- guest side -------------------------------------------------------------------
    def start_access(self, addr: int, kind: AccessKind, length: int = 1,
                     data: bytes = b"") -> Access:
        from .linux_guest import start_access

        return start_access(self, addr, kind, length, data)

    def start_workload(self, region: Region, spec: WorkloadSpec) -> Workload:
        from .linux_guest import start_workload

        return start_workload(self, region, spec)

    # ---- other processes ------------------------------------------------------------
    def open_process(self, pid: int) -> Process:
        from .linux_process import LinuxProcess

        return LinuxProcess(pid, self.page_size)

    # ---- capabilities ---------------------------------------------------------------
    def _probe(self) -> Capabilities:
        """UFFDIO_API with features=0 on a fresh uffd reports every supported feature
        (the kernel fills in its full set); the fd is then spent, so it is closed."""
        fd = self.uffd_open()
        try:
            info = self.uffd_api(fd, 0)
        finally:
            lib.vt_close(fd)
        dialect = Dialect.RWP if info.features & uapi.UFFD_FEATURE_RWP else Dialect.NONE
        strategy, reason = choose_strategy(dialect, info.features)
        return Capabilities(
            backend=self.name,
            release=os.uname().release,
            dialect=dialect,
            features=info.features,
            ioctls=info.ioctls,
            feature_names=tuple(uapi.feature_names(info.features, dialect_names(dialect))),
            strategy=strategy,
            reason=reason,
        )

    def capabilities(self) -> Capabilities:
        self._caps = self._probe()
        return self._caps

    def close(self) -> None:
        if self._pagemap >= 0:
            lib.vt_close(self._pagemap)
            self._pagemap = -1


UFFD_FEATURE_INITIALIZED = 1 << 31  # kernel-internal: set in ctx->features by UFFDIO_API


def fdinfo_uffd_features(path: str, fd: int) -> int | None:
    """Features of the uffd ``fd`` from its fdinfo file ``path`` (see
    :func:`parse_uffd_fdinfo`)."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise KernelError("fdinfo", errno.EBADF, 0, f"fd {fd}") from None
    except OSError as e:
        raise KernelError("fdinfo", e.errno or errno.EIO, 0, path) from None
    return parse_uffd_fdinfo(text, fd, path)


def parse_uffd_fdinfo(text: str, fd: int, where: str) -> int | None:
    """The ``API:`` line of a uffd's fdinfo is ``UFFD_API:ctx->features:ioctls`` in hex.
    ctx->features carries the kernel-internal UFFD_FEATURE_INITIALIZED bit once UFFDIO_API
    has been done (measured on 6.18); before that the features read 0. It also shows
    WP_UNPOPULATED, which the kernel adds by itself whenever WP_ASYNC is asked for."""
    for line in text.splitlines():
        if line.startswith("API:"):
            features = int(line.split()[1].split(":")[1], 16)
            if not features & UFFD_FEATURE_INITIALIZED:
                return None
            return features & ~UFFD_FEATURE_INITIALIZED
    raise KernelError("fdinfo", errno.EBADF, 0, f"fd {fd} is not a userfaultfd ({where})")


def _data_runs(fd: int, start: int, end: int) -> np.ndarray:
    """SEEK_DATA/SEEK_HOLE walk: O(runs), never a page at a time."""
    out: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        try:
            lo = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data at or after pos
                break
            raise KernelError("lseek(SEEK_DATA)", e.errno or errno.EIO, 0,
                              f"fd {fd}, offset 0x{pos:x}") from None
        if lo >= end:
            break
        try:
            hi = os.lseek(fd, lo, os.SEEK_HOLE)
        except OSError as e:
            raise KernelError("lseek(SEEK_HOLE)", e.errno or errno.EIO, 0,
                              f"fd {fd}, offset 0x{lo:x}") from None
        out.append((lo, min(hi, end)))
        pos = hi
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)
