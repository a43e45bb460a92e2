"""The one narrow interface between vmm_tierd and a kernel.

Two implementations exist: ``kernel/linux.py`` (cffi, the real kernel) and
``kernel/fake.py`` (an in-process kernel with the same semantics, speaking either the
7.3 RWP dialect or the RFC as posted). Nothing above this package imports cffi.

Conventions shared by every backend:
- Addresses, lengths and offsets are ints in bytes. Ranges must be page aligned.
- Every failing call raises :class:`KernelError` carrying ``(op, errno, done)``, where
  ``done`` is what the kernel reported as completed before the error (the ``copy``,
  ``zeropage``, ``move``, ``mapped`` or ``updated`` field), or 0.
- uffd fds are always opened non-blocking; ``uffd_read`` returns ``[]`` when empty.
- Guest memory is never touched from Python while holding the GIL. Backends touch it
  only from C with the GIL released (linux) or from simulated vCPUs (fake). The
  ``Access``/``Workload`` facets below are how tests and the built-in guest do it.
"""

from __future__ import annotations

import enum
import errno as _errno
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from . import uapi

if TYPE_CHECKING:
    from .process import Process

PAGE_SIZE = 4096


class KernelError(OSError):
    """A failed kernel operation: ``(op, errno, done)`` kept whole."""

    def __init__(self, op: str, err: int, done: int = 0, detail: str = "") -> None:
        msg = f"{op}: {os.strerror(err)} ({_errno.errorcode.get(err, err)})"
        if done:
            msg += f" after {done} bytes"
        if detail:
            msg += f" [{detail}]"
        super().__init__(err, msg)
        self.op = op
        self.done = done
        self.detail = detail

    def __reduce__(self) -> tuple[type, tuple[str, int, int, str]]:
        return (KernelError, (self.op, self.errno or 0, self.done, self.detail))


class Dialect(enum.Enum):
    """How bits 17/18, ioctl nr 0x09 and category bit 9 are spelled."""

    NONE = "none"  # neither RWP nor the RFC: Linux 6.8-7.2
    RWP = "rwp"  # Linux >= 7.3 and the fake's RWP dialect
    RFC = "rfc"  # the RFC as posted (fake only)


class MemType(enum.Enum):
    ANON = "anon"
    MEMFD = "memfd"


class Strategy(enum.Enum):
    RWP = "rwp"  # read+write tracking, SET_MODE sync/async (7.3 RWP or RFC dialect)
    WP = "wp"  # write-only tracking with WP_ASYNC + PAGEMAP_SCAN, eviction by MOVE


@dataclass(frozen=True, slots=True)
class ApiInfo:
    features: int  # granted
    ioctls: int  # bit n set => ioctl nr n available


@dataclass(frozen=True, slots=True, order=True)
class Owner:
    """The process whose address space a guest region lives in. ``start_time`` (field 22
    of /proc/PID/stat, clock ticks since boot) tells a reused pid from the process that
    had it. ``SELF`` (pid 0) is this process."""

    pid: int
    start_time: int = 0

    @property
    def is_self(self) -> bool:
        return self.pid == 0

    def __str__(self) -> str:
        return "self" if self.is_self else f"pid {self.pid} (start {self.start_time})"


SELF = Owner(0, 0)


@dataclass(frozen=True, slots=True)
class Region:
    """A guest memory region, the contract between components (as Firecracker's region
    descriptor is): whose address space it lives in, where, how long, its page size, and
    for memfd-backed memory the file and the offset of ``addr`` in it.

    ``fd`` is *this* process's fd of the memfd (for a region in another process: the copy
    ``Process.getfd`` made). It is not part of the serialised form, which names the file
    by ``owner_fd``, the owner's fd number, instead.
    """

    addr: int  # in the owner's address space
    length: int
    memtype: MemType
    fd: int = -1  # this process's fd of the memfd (MEMFD), else -1
    offset: int = 0  # offset of addr within the memfd
    owner: Owner = SELF
    page_size: int = PAGE_SIZE
    owner_fd: int = -1  # the owner's fd number of the memfd (another process), else -1

    @property
    def end(self) -> int:
        return self.addr + self.length

    @property
    def npages(self) -> int:
        return self.length // self.page_size

    def to_dict(self) -> dict[str, object]:
        return {"addr": self.addr, "length": self.length, "memtype": self.memtype.value,
                "offset": self.offset, "owner_pid": self.owner.pid,
                "owner_start_time": self.owner.start_time, "page_size": self.page_size,
                "owner_fd": self.owner_fd}

    @classmethod
    def from_dict(cls, d: dict[str, object], fd: int = -1) -> Region:
        def num(key: str) -> int:
            v = d[key]
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"region descriptor: {key} must be an integer, got {v!r}")
            return v

        return cls(addr=num("addr"), length=num("length"), memtype=MemType(d["memtype"]),
                   fd=fd, offset=num("offset"),
                   owner=Owner(num("owner_pid"), num("owner_start_time")),
                   page_size=num("page_size"), owner_fd=num("owner_fd"))


# ---- uffd messages ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PageFault:
    address: int
    flags: int  # UFFD_PAGEFAULT_FLAG_*
    tid: int = 0

    @property
    def write(self) -> bool:
        return bool(self.flags & uapi.UFFD_PAGEFAULT_FLAG_WRITE)

    @property
    def wp(self) -> bool:
        return bool(self.flags & uapi.UFFD_PAGEFAULT_FLAG_WP)

    @property
    def minor(self) -> bool:
        return bool(self.flags & uapi.UFFD_PAGEFAULT_FLAG_MINOR)

    @property
    def rwp(self) -> bool:
        return bool(self.flags & uapi.UFFD_PAGEFAULT_FLAG_RWP)

    @property
    def missing(self) -> bool:
        return not (self.flags & (uapi.UFFD_PAGEFAULT_FLAG_WP | uapi.UFFD_PAGEFAULT_FLAG_MINOR
                                  | uapi.UFFD_PAGEFAULT_FLAG_RWP))


@dataclass(frozen=True, slots=True)
class ForkEvent:
    ufd: int


@dataclass(frozen=True, slots=True)
class RemapEvent:
    src: int
    dst: int
    length: int


@dataclass(frozen=True, slots=True)
class RemoveEvent:
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class UnmapEvent:
    start: int
    end: int


UffdEvent = PageFault | ForkEvent | RemapEvent | RemoveEvent | UnmapEvent


# ---- PAGEMAP_SCAN ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ScanResult:
    """Complete result of a PAGEMAP_SCAN over [start, end).

    ``regions`` is an (n, 3) uint64 array of (start, end, categories), adjacent pages with
    equal categories merged, exactly as the kernel returns ``struct page_region``.
    """

    regions: np.ndarray
    walk_end: int
    calls: int = 1  # ioctl calls needed to finish

    def pages(self, page_size: int = PAGE_SIZE) -> int:
        if not len(self.regions):
            return 0
        return int(((self.regions[:, 1] - self.regions[:, 0]) // page_size).sum())


# ---- guest-side access (tests, simulated vCPUs, the built-in workload) ------------------
class AccessKind(enum.Enum):
    READ = "read"  # a load from the page
    WRITE = "write"  # a store into the page
    GUP_READ = "gup_read"  # write(pipe, addr, len): the kernel reads the page via GUP


class AccessStatus(enum.Enum):
    PENDING = "pending"  # still blocked (e.g. on a sync uffd fault)
    OK = "ok"
    SIGBUS = "sigbus"  # poisoned page / SIGBUS semantics
    ERROR = "error"  # the syscall (GUP) failed; errno in .err


@dataclass(slots=True)
class AccessResult:
    status: AccessStatus
    data: bytes = b""  # what a READ/GUP_READ saw
    err: int = 0


@runtime_checkable
class Access(Protocol):
    """One access by a guest-like thread, started by ``Kernel.start_access``."""

    def done(self) -> bool: ...

    def wait(self, timeout: float) -> AccessResult:
        """Wait up to ``timeout`` seconds; PENDING if it is still blocked."""
        ...

    @property
    def tid(self) -> int:
        """Kernel thread id of the accessor (0 until it has started)."""
        ...


class Pattern(enum.Enum):
    UNIFORM = "uniform"  # uniform over a hot set
    ZIPF = "zipf"
    SHIFTING = "shifting"  # hot set that moves over time
    SEQUENTIAL = "sequential"  # sequential scan
    HAMMER = "hammer"  # writes on the pages just evicted (found absent), a hot set, read bursts


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    pattern: Pattern = Pattern.SHIFTING
    threads: int = 2
    hot_fraction: float = 0.1  # fraction of pages in the hot set
    write_fraction: float = 0.5  # fraction of accesses that are writes
    shift_period_s: float = 5.0  # SHIFTING: seconds per hot-set move
    zipf_s: float = 1.1
    touch_all_first: bool = True  # write every page once (so there is something to evict)
    zero_fraction: float = 0.05  # fraction of pages left all-zero (ZEROPAGE path)
    ops_per_sec: float = 0.0  # 0 = as fast as possible; else per-thread rate
    seed: int = 1


@dataclass(slots=True)
class WorkloadStats:
    reads: int = 0
    writes: int = 0
    sigbus: int = 0


@dataclass(slots=True)
class VerifyReport:
    pages: int = 0
    lost_writes: int = 0  # page holds an older version than the last write
    corrupt_pages: int = 0  # stamp or fill pattern does not match (page index, version)
    poisoned_pages: int = 0  # reading it raised SIGBUS
    bad: list[int] = field(default_factory=list)  # first few bad page indexes


class Workload(Protocol):
    """Guest threads touching a region with write stamps.

    Every write to page ``p`` stamps ``(p, version)`` into the page and fills it with a
    pattern derived from both, and records ``version`` as the page's last write, so that
    ``verify`` can check every page after ``stop``.
    """

    def stats(self) -> WorkloadStats: ...

    def touched(self) -> bool:
        """Every thread has finished its touch-all-first pass (True if it has none)."""
        ...

    def stop(self) -> WorkloadStats: ...

    def verify(self) -> VerifyReport:
        """Read every page (faulting evicted ones back in) and check its stamp.

        Blocks; call it from a worker thread while the fault server runs."""
        ...


# ---- the kernel -------------------------------------------------------------------------
@runtime_checkable
class Kernel(Protocol):
    """What the engine uses. Address-space operations (map, madvise, pagemap_scan,
    read_unregistered) act on this process; uffd operations act on the uffd's context,
    which is the address space of the process that created the uffd, whoever calls."""

    name: str  # "linux", "fake-rwp", "fake-rfc"
    dialect: Dialect  # detected (linux) or chosen (fake)
    page_size: int

    # -- memory
    def map_anon(self, length: int) -> Region: ...
    def map_memfd(self, length: int, name: str = "guest") -> Region: ...
    def unmap(self, region: Region) -> None: ...
    def madvise(self, addr: int, length: int, advice: int) -> None: ...
    def punch_hole(self, fd: int, offset: int, length: int) -> None: ...
    def pread(self, fd: int, offset: int, length: int) -> bytes:
        """Read through the file, not the mapping: never faults on a registered range."""
        ...

    def file_data_runs(self, fd: int, offset: int, length: int) -> np.ndarray:
        """(n, 2) int64 array of [start, end) byte ranges of ``fd`` within
        [offset, offset + length) that hold data (SEEK_DATA/SEEK_HOLE): on a memfd, the
        pages in the page cache; everything else is a hole."""
        ...

    def read_unregistered(self, addr: int, length: int) -> bytes:
        """Copy bytes out of memory that is present and not protected (e.g. staging)."""
        ...

    # -- userfaultfd
    def uffd_open(self, *, user_mode_only: bool = False) -> int: ...
    def uffd_api(self, fd: int, features: int) -> ApiInfo: ...
    def uffd_features(self, fd: int) -> int | None:
        """Features enabled on this process's uffd ``fd`` (/proc/self/fdinfo), or None if
        UFFDIO_API has not been done on it yet (then ``uffd_api`` may be called)."""
        ...

    def uffd_close(self, fd: int) -> None: ...
    def uffd_register(self, fd: int, start: int, length: int, mode: int) -> int:
        """Returns the ioctls bitmask available on the range."""
        ...

    def uffd_unregister(self, fd: int, start: int, length: int) -> None: ...
    def uffd_copy(self, fd: int, dst: int, src: bytes | bytearray | memoryview,
                  mode: int = 0) -> int: ...
    def uffd_zeropage(self, fd: int, start: int, length: int, mode: int = 0) -> int: ...
    def uffd_wake(self, fd: int, start: int, length: int) -> None: ...
    def uffd_writeprotect(self, fd: int, start: int, length: int, mode: int) -> None: ...
    def uffd_continue(self, fd: int, start: int, length: int, mode: int = 0) -> int: ...
    def uffd_move(self, fd: int, dst: int, src: int, length: int, mode: int = 0) -> int:
        """EINVAL when the uffd's context is another process's mm (cross-mm moves are
        refused), whatever the ranges."""
        ...

    def uffd_poison(self, fd: int, start: int, length: int, mode: int = 0) -> int: ...
    def uffd_rwprotect(self, fd: int, start: int, length: int, mode: int) -> None:
        """7.3 RWPROTECT. Kernels without it answer an unknown uffd ioctl with EINVAL
        (measured on 6.18), not ENOTTY; backends pass that through."""
        ...

    def uffd_deactivate(self, fd: int, start: int, length: int) -> None:
        """RFC DEACTIVATE. Never sent to a real kernel (7.3 reuses nr 0x09 for RWPROTECT):
        both the linux backend (without issuing it) and fake-rwp raise ENOTTY."""
        ...

    def uffd_set_mode(self, fd: int, enable: int, disable: int) -> None: ...
    def uffd_read(self, fd: int, max_msgs: int = 64) -> list[UffdEvent]:
        """Non-blocking batch read; [] when nothing is pending."""
        ...

    # -- PAGEMAP_SCAN over this process
    def pagemap_scan(self, start: int, end: int, *, category_mask: int = 0,
                     category_inverted: int = 0, category_anyof_mask: int = 0,
                     return_mask: int = 0, flags: int = 0, max_pages: int = 0
                     ) -> ScanResult: ...

    # -- other processes (see process.py)
    def open_process(self, pid: int) -> Process:
        """A handle on process ``pid`` (pidfd, /proc, ptrace). ESRCH if it doesn't exist,
        EPERM without the privilege to trace it."""
        ...

    def capabilities(self) -> Capabilities:
        """Features this kernel grants (probed on a fresh uffd) and the strategy they allow."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class GuestSide(Protocol):
    """Accesses made as a guest would make them: by threads of this process that touch
    memory from C with the GIL released (linux) or by simulated vCPUs (fake). Only tests,
    benchmarks and the built-in demo workload use these; the engine never does."""

    def start_access(self, addr: int, kind: AccessKind, length: int = 1,
                     data: bytes = b"") -> Access: ...
    def start_workload(self, region: Region, spec: WorkloadSpec) -> Workload: ...


@runtime_checkable
class Backend(Kernel, GuestSide, Protocol):
    """A whole backend (what ``open_kernel`` returns): the engine's kernel interface plus
    the guest side."""


def dialect_names(dialect: Dialect) -> dict[int, str]:
    return uapi.FEATURE_NAMES_RFC if dialect is Dialect.RFC else uapi.FEATURE_NAMES_RWP


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a kernel grants, and which tiering strategy that allows (and why)."""

    backend: str
    release: str
    dialect: Dialect
    features: int
    ioctls: int
    feature_names: Sequence[str]
    strategy: Strategy | None
    reason: str

    def as_dict(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "release": self.release,
            "dialect": self.dialect.value,
            "features": f"0x{self.features:x}",
            "feature_names": list(self.feature_names),
            "ioctls": f"0x{self.ioctls:x}",
            "strategy": self.strategy.value if self.strategy else None,
            "reason": self.reason,
        }


WP_NEEDS = uapi.UFFD_FEATURE_WP_ASYNC | uapi.UFFD_FEATURE_MOVE | uapi.UFFD_FEATURE_POISON
RWP_NEEDS = uapi.UFFD_FEATURE_RWP | uapi.UFFD_FEATURE_RWP_ASYNC


def choose_strategy(dialect: Dialect, features: int) -> tuple[Strategy | None, str]:
    """Pure: the strategy a kernel's granted features allow, and the reason."""
    if dialect in (Dialect.RWP, Dialect.RFC) and features & RWP_NEEDS == RWP_NEEDS:
        names = "RWP+RWP_ASYNC" if dialect is Dialect.RWP else "MINOR_ANON+MINOR_ASYNC (RFC)"
        return Strategy.RWP, f"{names} granted: reads and writes tracked, sync/async toggle"
    if features & WP_NEEDS == WP_NEEDS:
        return Strategy.WP, ("no RWP; WP_ASYNC+MOVE+POISON granted: writes tracked via "
                             "PAGEMAP_SCAN, eviction by UFFDIO_MOVE (reads invisible)")
    missing = uapi.feature_names(WP_NEEDS & ~features, uapi.FEATURE_NAMES_COMMON)
    return None, f"unsupported kernel: missing {', '.join(missing)} (need Linux >= 6.8)"
