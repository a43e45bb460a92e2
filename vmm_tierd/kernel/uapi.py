"""The userfaultfd and PAGEMAP_SCAN ABI, defined here rather than taken from headers.

The installed linux-libc-dev is 6.1-era (no WP_ASYNC, MOVE or PAGEMAP_SCAN) while the
host runs 6.18 and the RWP backend targets 7.3, so every number the project relies on
lives in this file and is checked by tests/test_uapi.py against the ``_IOC`` formula,
the literal values, and (where it has them) the installed header.

Two dialects share bit and ioctl numbers:
- RWP, as merged in Linux 7.3: ``UFFD_FEATURE_RWP``/``RWP_ASYNC`` are bits 17/18,
  ``_UFFDIO_RWPROTECT`` is nr 0x09 and ``PAGE_IS_ACCESSED`` is category bit 9.
- The RFC as posted: the same bits 17/18 are ``MINOR_ANON``/``MINOR_ASYNC``, nr 0x09 is
  ``UFFDIO_DEACTIVATE`` (an ``_IOR`` of a bare range, so a different ioctl number), and
  category bit 9 is ``PAGE_IS_UFFD_DEACTIVATED`` - the *opposite* meaning of ACCESSED.
"""

from __future__ import annotations

# --- ioctl encoding (asm-generic/ioctl.h, as on x86_64) ---------------------------------
IOC_NONE = 0
IOC_WRITE = 1
IOC_READ = 2
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30


def _IOC(direction: int, typ: int, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (typ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(typ: int, nr: int) -> int:
    return _IOC(IOC_NONE, typ, nr, 0)


def _IOR(typ: int, nr: int, size: int) -> int:
    return _IOC(IOC_READ, typ, nr, size)


def _IOW(typ: int, nr: int, size: int) -> int:
    return _IOC(IOC_WRITE, typ, nr, size)


def _IOWR(typ: int, nr: int, size: int) -> int:
    return _IOC(IOC_READ | IOC_WRITE, typ, nr, size)


# --- struct sizes (all fields are __u64/__s64; no padding) ------------------------------
SIZEOF_UFFDIO_RANGE = 16  # start, len
SIZEOF_UFFDIO_API = 24  # api, features, ioctls
SIZEOF_UFFDIO_REGISTER = 32  # range, mode, ioctls
SIZEOF_UFFDIO_COPY = 40  # dst, src, len, mode, s64 copy
SIZEOF_UFFDIO_ZEROPAGE = 32  # range, mode, s64 zeropage
SIZEOF_UFFDIO_MOVE = 40  # dst, src, len, mode, s64 move
SIZEOF_UFFDIO_WRITEPROTECT = 24  # range, mode
SIZEOF_UFFDIO_CONTINUE = 32  # range, mode, s64 mapped
SIZEOF_UFFDIO_POISON = 32  # range, mode, s64 updated
SIZEOF_UFFDIO_RWPROTECT = 24  # range, mode (7.3)
SIZEOF_UFFDIO_SET_MODE = 16  # enable, disable
SIZEOF_UFFD_MSG = 32
SIZEOF_PM_SCAN_ARG = 96  # 12 x u64
SIZEOF_PAGE_REGION = 24  # start, end, categories

UFFD_API = 0xAA
UFFDIO = 0xAA

_UFFDIO_REGISTER = 0x00
_UFFDIO_UNREGISTER = 0x01
_UFFDIO_WAKE = 0x02
_UFFDIO_COPY = 0x03
_UFFDIO_ZEROPAGE = 0x04
_UFFDIO_MOVE = 0x05
_UFFDIO_WRITEPROTECT = 0x06
_UFFDIO_CONTINUE = 0x07
_UFFDIO_POISON = 0x08
_UFFDIO_RWPROTECT = 0x09  # 7.3; the RFC used nr 0x09 for DEACTIVATE
_UFFDIO_SET_MODE = 0x0A
_UFFDIO_API = 0x3F

UFFDIO_API = _IOWR(UFFDIO, _UFFDIO_API, SIZEOF_UFFDIO_API)
UFFDIO_REGISTER = _IOWR(UFFDIO, _UFFDIO_REGISTER, SIZEOF_UFFDIO_REGISTER)
UFFDIO_UNREGISTER = _IOR(UFFDIO, _UFFDIO_UNREGISTER, SIZEOF_UFFDIO_RANGE)
UFFDIO_WAKE = _IOR(UFFDIO, _UFFDIO_WAKE, SIZEOF_UFFDIO_RANGE)
UFFDIO_COPY = _IOWR(UFFDIO, _UFFDIO_COPY, SIZEOF_UFFDIO_COPY)
UFFDIO_ZEROPAGE = _IOWR(UFFDIO, _UFFDIO_ZEROPAGE, SIZEOF_UFFDIO_ZEROPAGE)
UFFDIO_MOVE = _IOWR(UFFDIO, _UFFDIO_MOVE, SIZEOF_UFFDIO_MOVE)
UFFDIO_WRITEPROTECT = _IOWR(UFFDIO, _UFFDIO_WRITEPROTECT, SIZEOF_UFFDIO_WRITEPROTECT)
UFFDIO_CONTINUE = _IOWR(UFFDIO, _UFFDIO_CONTINUE, SIZEOF_UFFDIO_CONTINUE)
UFFDIO_POISON = _IOWR(UFFDIO, _UFFDIO_POISON, SIZEOF_UFFDIO_POISON)
UFFDIO_RWPROTECT = _IOWR(UFFDIO, _UFFDIO_RWPROTECT, SIZEOF_UFFDIO_RWPROTECT)
UFFDIO_SET_MODE = _IOW(UFFDIO, _UFFDIO_SET_MODE, SIZEOF_UFFDIO_SET_MODE)
# RFC dialect only (never sent to a real kernel: 7.3 reuses nr 0x09 for RWPROTECT).
UFFDIO_DEACTIVATE = _IOR(UFFDIO, _UFFDIO_RWPROTECT, SIZEOF_UFFDIO_RANGE)
# /dev/userfaultfd
USERFAULTFD_IOC = 0xAA
USERFAULTFD_IOC_NEW = _IO(USERFAULTFD_IOC, 0x00)
# fs.h
PAGEMAP_SCAN = _IOWR(ord("f"), 16, SIZEOF_PM_SCAN_ARG)

# bit positions in uffdio_api.ioctls / uffdio_register.ioctls
IOCTL_BIT = {
    "REGISTER": _UFFDIO_REGISTER,
    "UNREGISTER": _UFFDIO_UNREGISTER,
    "WAKE": _UFFDIO_WAKE,
    "COPY": _UFFDIO_COPY,
    "ZEROPAGE": _UFFDIO_ZEROPAGE,
    "MOVE": _UFFDIO_MOVE,
    "WRITEPROTECT": _UFFDIO_WRITEPROTECT,
    "CONTINUE": _UFFDIO_CONTINUE,
    "POISON": _UFFDIO_POISON,
    "RWPROTECT": _UFFDIO_RWPROTECT,
    "SET_MODE": _UFFDIO_SET_MODE,
    "API": _UFFDIO_API,
}

# --- features (uffdio_api.features) -----------------------------------------------------
UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_MISSING_HUGETLBFS = 1 << 4
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
UFFD_FEATURE_SIGBUS = 1 << 7
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFD_FEATURE_MINOR_HUGETLBFS = 1 << 9
UFFD_FEATURE_MINOR_SHMEM = 1 << 10
UFFD_FEATURE_EXACT_ADDRESS = 1 << 11
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_POISON = 1 << 14
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFD_FEATURE_MOVE = 1 << 16
UFFD_FEATURE_RWP = 1 << 17  # 7.3
UFFD_FEATURE_RWP_ASYNC = 1 << 18  # 7.3; toggled at run time by UFFDIO_SET_MODE
UFFD_FEATURE_MINOR_ANON = 1 << 17  # RFC dialect, same bit as RWP
UFFD_FEATURE_MINOR_ASYNC = 1 << 18  # RFC dialect, same bit as RWP_ASYNC

FEATURE_NAMES_COMMON = {
    UFFD_FEATURE_PAGEFAULT_FLAG_WP: "PAGEFAULT_FLAG_WP",
    UFFD_FEATURE_EVENT_FORK: "EVENT_FORK",
    UFFD_FEATURE_EVENT_REMAP: "EVENT_REMAP",
    UFFD_FEATURE_EVENT_REMOVE: "EVENT_REMOVE",
    UFFD_FEATURE_MISSING_HUGETLBFS: "MISSING_HUGETLBFS",
    UFFD_FEATURE_MISSING_SHMEM: "MISSING_SHMEM",
    UFFD_FEATURE_EVENT_UNMAP: "EVENT_UNMAP",
    UFFD_FEATURE_SIGBUS: "SIGBUS",
    UFFD_FEATURE_THREAD_ID: "THREAD_ID",
    UFFD_FEATURE_MINOR_HUGETLBFS: "MINOR_HUGETLBFS",
    UFFD_FEATURE_MINOR_SHMEM: "MINOR_SHMEM",
    UFFD_FEATURE_EXACT_ADDRESS: "EXACT_ADDRESS",
    UFFD_FEATURE_WP_HUGETLBFS_SHMEM: "WP_HUGETLBFS_SHMEM",
    UFFD_FEATURE_WP_UNPOPULATED: "WP_UNPOPULATED",
    UFFD_FEATURE_POISON: "POISON",
    UFFD_FEATURE_WP_ASYNC: "WP_ASYNC",
    UFFD_FEATURE_MOVE: "MOVE",
}
FEATURE_NAMES_RWP = {**FEATURE_NAMES_COMMON, 1 << 17: "RWP", 1 << 18: "RWP_ASYNC"}
FEATURE_NAMES_RFC = {**FEATURE_NAMES_COMMON, 1 << 17: "MINOR_ANON", 1 << 18: "MINOR_ASYNC"}

# --- registration modes ------------------------------------------------------------------
UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_REGISTER_MODE_MINOR = 1 << 2
UFFDIO_REGISTER_MODE_RWP = 1 << 3  # 7.3

# --- per-ioctl modes ---------------------------------------------------------------------
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_COPY_MODE_WP = 1 << 1
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1
UFFDIO_CONTINUE_MODE_DONTWAKE = 1 << 0
UFFDIO_CONTINUE_MODE_WP = 1 << 1
UFFDIO_POISON_MODE_DONTWAKE = 1 << 0
UFFDIO_MOVE_MODE_DONTWAKE = 1 << 0
UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES = 1 << 1
UFFDIO_RWPROTECT_MODE_RWP = 1 << 0
UFFDIO_RWPROTECT_MODE_DONTWAKE = 1 << 1

# --- uffd_msg ----------------------------------------------------------------------------
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16

UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1
UFFD_PAGEFAULT_FLAG_MINOR = 1 << 2
UFFD_PAGEFAULT_FLAG_RWP = 1 << 3  # 7.3

# userfaultfd(2) / USERFAULTFD_IOC_NEW flags
UFFD_USER_MODE_ONLY = 1
O_CLOEXEC = 0o2000000
O_NONBLOCK = 0o4000
SYS_userfaultfd = 323  # x86_64

# --- PAGEMAP_SCAN ------------------------------------------------------------------------
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1

PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PAGE_IS_SOFT_DIRTY = 1 << 7
PAGE_IS_GUARD = 1 << 8
PAGE_IS_ACCESSED = 1 << 9  # 7.3 (RWP dialect)
PAGE_IS_UFFD_DEACTIVATED = 1 << 9  # RFC dialect: same bit, opposite meaning

# --- madvise / fallocate / mmap ----------------------------------------------------------
MADV_WILLNEED = 3
MADV_DONTNEED = 4
MADV_REMOVE = 9
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
MADV_COLD = 20
MADV_PAGEOUT = 21
MADV_COLLAPSE = 25
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
PROT_READ = 1
PROT_WRITE = 2
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
MFD_CLOEXEC = 1


def feature_names(features: int, names: dict[int, str]) -> list[str]:
    """Names of the set bits, unknown bits as ``bit<N>``."""
    out = []
    for bit in range(64):
        if features >> bit & 1:
            out.append(names.get(1 << bit, f"bit{bit}"))
    return out
