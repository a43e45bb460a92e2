"""Guest-side threads of the linux backend: accessors, workloads and the verifier.

Every touch of guest memory happens in C pthreads (native/guest*.c) created in C; Python
only starts them, polls their status and copies results out of C-owned buffers. A thread
may therefore block on a userfaultfd fault that the trio loop of this process serves.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vmm_tierd._native import ffi, lib

from .api import (
    PAGE_SIZE,
    AccessKind,
    AccessResult,
    AccessStatus,
    KernelError,
    Pattern,
    Region,
    VerifyReport,
    WorkloadSpec,
    WorkloadStats,
)
from .stamps import workload_layout

_KIND = {AccessKind.READ: lib.VG_READ, AccessKind.WRITE: lib.VG_WRITE,
         AccessKind.GUP_READ: lib.VG_GUP_READ}
_STATUS = {lib.VG_PENDING: AccessStatus.PENDING, lib.VG_OK: AccessStatus.OK,
           lib.VG_SIGBUS: AccessStatus.SIGBUS, lib.VG_ERROR: AccessStatus.ERROR}
_PATTERN = {Pattern.UNIFORM: lib.VG_UNIFORM, Pattern.ZIPF: lib.VG_ZIPF,
            Pattern.SHIFTING: lib.VG_SHIFTING, Pattern.SEQUENTIAL: lib.VG_SEQUENTIAL,
            Pattern.HAMMER: lib.VG_HAMMER}
_WAIT_SLICE = 0.2  # wait in slices so Ctrl-C is seen between C calls
VERIFY_THREADS = 2


class LinuxAccess:
    """One access by a detached C thread. A blocked thread keeps its own reference to the
    C handle, so dropping this object never frees memory the thread still uses."""

    __slots__ = ("_h", "_kind", "_length", "_result")

    def __init__(self, handle: Any, kind: AccessKind, length: int) -> None:
        self._h = ffi.gc(handle, lib.vg_access_release)
        self._kind = kind
        self._length = length
        self._result: AccessResult | None = None

    def done(self) -> bool:
        return bool(lib.vg_access_status(self._h) != lib.VG_PENDING)

    def wait(self, timeout: float) -> AccessResult:
        if self._result is not None:
            return self._result
        left = max(0.0, timeout)
        while True:
            step = min(left, _WAIT_SLICE)
            st = lib.vg_access_wait(self._h, step)
            left -= step
            if st != lib.VG_PENDING or left <= 0:
                break
        status = _STATUS[st]
        if status is AccessStatus.PENDING:
            return AccessResult(AccessStatus.PENDING)
        data = b""
        if self._kind is not AccessKind.WRITE and self._length:
            buf = ffi.new("uint8_t[]", self._length)
            n = lib.vg_access_result(self._h, buf, self._length)
            data = bytes(ffi.buffer(buf, n))
        self._result = AccessResult(status, data, int(lib.vg_access_err(self._h)))
        return self._result

    @property
    def tid(self) -> int:
        return int(lib.vg_access_tid(self._h))

    def __repr__(self) -> str:
        return f"LinuxAccess({self._kind.value}, tid={self.tid}, done={self.done()})"


def start_access(kernel: object, addr: int, kind: AccessKind, length: int = 1,
                 data: bytes = b"") -> LinuxAccess:
    """Start one access to ``addr`` in a new C thread.

    READ copies ``length`` bytes out with volatile loads, WRITE stores ``data`` (or
    ``length`` bytes of 0x5A when ``data`` is empty), GUP_READ makes the kernel read the
    memory via ``write(pipe, addr, length)``."""
    del kernel
    if kind is AccessKind.WRITE:
        payload = bytes(data) if data else b"\x5a" * length
    else:
        payload = b""
    n = len(payload) if kind is AccessKind.WRITE else length
    if n < 0 or addr <= 0:
        raise ValueError(f"start_access: bad address 0x{addr:x} or length {n}")
    src = ffi.from_buffer("uint8_t[]", payload) if payload else ffi.NULL
    h = lib.vg_access_start(_KIND[kind], addr, n, src)
    if h == ffi.NULL:
        raise KernelError("start_access", ffi.errno, 0, f"{kind.value} at 0x{addr:x}")
    return LinuxAccess(h, kind, n)


class LinuxWorkload:
    """``spec.threads`` C threads stamping pages of one region (see kernel/stamps.py)."""

    def __init__(self, region: Region, spec: WorkloadSpec, *,
                 count_accesses: bool = False) -> None:
        if region.length % PAGE_SIZE or region.length <= 0:
            raise ValueError(f"workload: region length {region.length} is not whole pages")
        if spec.threads < 1:
            raise ValueError(f"workload: threads must be >= 1, not {spec.threads}")
        self.region = region
        self.spec = spec
        self.npages = region.length // PAGE_SIZE
        self.zero_mask, perm, cdf = workload_layout(self.npages, spec)
        self.perm = perm
        c = ffi.new("vg_spec *")
        c.pattern = _PATTERN[spec.pattern]
        c.threads = spec.threads
        c.hot_fraction = spec.hot_fraction
        c.write_fraction = spec.write_fraction
        c.shift_period_s = spec.shift_period_s
        c.ops_per_sec = spec.ops_per_sec
        c.touch_all_first = int(spec.touch_all_first)
        c.count_accesses = int(count_accesses)
        c.seed = spec.seed & ((1 << 64) - 1)
        zp = ffi.from_buffer("uint8_t[]", self.zero_mask)
        pp = ffi.from_buffer("uint64_t[]", perm) if perm is not None else ffi.NULL
        cp = ffi.from_buffer("double[]", cdf) if cdf is not None else ffi.NULL
        h = lib.vg_workload_start(region.addr, self.npages, c, zp, pp, cp,
                                  len(cdf) if cdf is not None else 0)
        if h == ffi.NULL:
            raise KernelError("start_workload", ffi.errno, 0,
                              f"{spec.pattern.value} x{spec.threads} at 0x{region.addr:x}")
        self._h = h
        self._stopped = False
        self._final: WorkloadStats | None = None

    def _raw_stats(self) -> Any:
        s = ffi.new("vg_stats *")
        lib.vg_workload_stats(self._h, s)
        return s

    def stats(self) -> WorkloadStats:
        s = self._raw_stats()
        return WorkloadStats(reads=int(s.reads), writes=int(s.writes), sigbus=int(s.sigbus))

    def touched(self) -> bool:
        """Every thread has finished its touch-all-first pass."""
        return bool(self._raw_stats().touched_threads == self.spec.threads)

    def running(self) -> int:
        return int(self._raw_stats().running_threads)

    def stop(self) -> WorkloadStats:
        """Stop and join the threads (each finishes the page op it is in: a thread blocked
        on a fault needs the fault served first)."""
        if not self._stopped:
            lib.vg_workload_request_stop(self._h)
            while lib.vg_workload_join(self._h, _WAIT_SLICE):
                pass
            self._stopped = True
            self._final = self.stats()
        assert self._final is not None
        return self._final

    def verify(self) -> VerifyReport:
        """Read every page in C (GIL released) and check it against the last written
        version. Blocks until evicted pages are faulted back in; call it after stop()."""
        if not self._stopped:
            raise RuntimeError("verify: stop() the workload first (its threads still write)")
        r = ffi.new("vg_verify_report *")
        lib.vg_workload_verify(self._h, VERIFY_THREADS, r)
        return VerifyReport(pages=int(r.pages), lost_writes=int(r.lost_writes),
                            corrupt_pages=int(r.corrupt_pages),
                            poisoned_pages=int(r.poisoned_pages),
                            bad=[int(r.bad[i]) for i in range(r.nbad)])

    def versions(self) -> np.ndarray:
        """Last completed write version of every page (0 = never written)."""
        out = np.zeros(self.npages, dtype=np.uint64)
        lib.vg_workload_versions(self._h, ffi.from_buffer("uint64_t[]", out))
        return out

    def access_counts(self) -> np.ndarray:
        """Accesses per page after the touch pass (needs ``count_accesses=True``)."""
        out = np.zeros(self.npages, dtype=np.uint32)
        if lib.vg_workload_counts(self._h, ffi.from_buffer("uint32_t[]", out)) != 0:
            raise RuntimeError("workload was started without count_accesses=True")
        return out

    def set_version_for_test(self, page: int, version: int) -> None:
        """Overwrite the recorded version of ``page`` (tests of verify only)."""
        if lib.vg_workload_set_version(self._h, page, version) != 0:
            raise IndexError(f"page {page} outside the workload's {self.npages} pages")

    def __del__(self) -> None:
        # The C state is freed only once no thread can touch it any more.
        h = getattr(self, "_h", None)
        if h is None:
            return
        lib.vg_workload_request_stop(h)
        if self._stopped or lib.vg_workload_join(h, 1.0) == 0:
            lib.vg_workload_free(h)
        self._h = None


def start_workload(kernel: object, region: Region, spec: WorkloadSpec, *,
                   count_accesses: bool = False) -> LinuxWorkload:
    del kernel
    return LinuxWorkload(region, spec, count_accesses=count_accesses)


def stamp_page(index: int, version: int) -> bytes:
    """The C stamp writer's output for one page (checked against stamps.page_bytes)."""
    buf = ffi.new("uint8_t[]", PAGE_SIZE)
    lib.vg_stamp_page(buf, index, version)
    return bytes(ffi.buffer(buf, PAGE_SIZE))
