"""Does a valid config fit this machine and its store? Checked by ``check-config`` and by
``run`` before anything is mapped, so an impossible config fails at once with a reason
instead of being OOM-killed before it is ready (a 16 TiB region used to be).

Errors (the config cannot work here):
- the guest regions plus the store's map (LMDB reserves ``store.map_size`` of address
  space) exceed the user address space of this architecture;
- the per-page state the daemon keeps in memory exceeds the machine's RAM. Measured on
  the linux backend: a 32 GiB region with no workload raised the daemon's peak RSS by
  47.5 MB, about :data:`ENGINE_BYTES_PER_PAGE` bytes per 4 KiB page (state bytes plus a
  cycle's scan and selection arrays); the built-in workload adds
  :data:`WORKLOAD_BYTES_PER_PAGE` (a version counter and a zero flag per page).

Warnings (it works, with a limit the operator should know about):
- ``store.map_size`` cannot hold the regions' records at all: every record, even of an
  all-zero page, costs about :data:`RECORD_INDEX_BYTES` bytes of index;
- ``store.map_size`` is smaller than the guest memory it may have to hold, so it fills
  unless pages compress well; a full store pauses eviction;
- the built-in workload writes every page first (``touch_all_first``) and those regions
  exceed RAM + swap: the daemon must evict as fast as the workload writes.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

from ..kernel.api import PAGE_SIZE
from ..settings import Settings
from .units import fmt_size

ENGINE_BYTES_PER_PAGE = 6
WORKLOAD_BYTES_PER_PAGE = 9
RECORD_INDEX_BYTES = 40  # 12-byte key + 19-byte entry + LMDB node header, before B-tree slack
# user virtual address space (4-level page tables; mmap stays below 47/48 bits unless a
# mapping asks for more, which nothing here does)
_ADDRESS_BITS = {"x86_64": 47, "aarch64": 48, "ppc64le": 47, "s390x": 53, "riscv64": 47}


@dataclass(frozen=True, slots=True)
class Machine:
    address_space_bytes: int
    mem_total_bytes: int
    swap_total_bytes: int

    @classmethod
    def probe(cls) -> Machine:
        info: dict[str, int] = {}
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    parts = rest.split()
                    if parts and parts[0].isdigit():
                        info[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
        except OSError:
            pass
        bits = _ADDRESS_BITS.get(platform.machine(), 47)
        # unknown RAM: do not refuse on a figure we could not read
        return cls(1 << bits, info.get("MemTotal", 1 << 62), info.get("SwapTotal", 0))


@dataclass(frozen=True, slots=True)
class Capacity:
    errors: list[str]
    warnings: list[str]


def check_capacity(s: Settings, machine: Machine | None = None) -> Capacity:
    """Errors and warnings, each a full line starting with the config's name."""
    m = machine or Machine.probe()
    src = s.source
    errors: list[str] = []
    warnings: list[str] = []
    guest = sum(r.size_bytes for r in s.regions)
    pages = guest // PAGE_SIZE
    if not pages:
        return Capacity(errors, warnings)
    mapped = guest + s.store.map_size_bytes
    if mapped > m.address_space_bytes:
        errors.append(
            f"{src}: region: {len(s.regions)} region(s) of {fmt_size(guest)} plus "
            f"store.map_size {fmt_size(s.store.map_size_bytes)} need {fmt_size(mapped)} of "
            f"address space; this machine has {fmt_size(m.address_space_bytes)} per process")
    wl_pages = sum(r.size_bytes for r in s.regions if r.workload_enabled) // PAGE_SIZE
    state = pages * ENGINE_BYTES_PER_PAGE + wl_pages * WORKLOAD_BYTES_PER_PAGE
    if state > m.mem_total_bytes:
        errors.append(
            f"{src}: region: {fmt_size(guest)} of guest memory needs about {fmt_size(state)} "
            f"of per-page state in the daemon ({ENGINE_BYTES_PER_PAGE} bytes per 4 KiB page, "
            f"{WORKLOAD_BYTES_PER_PAGE} more with the built-in workload), more than this "
            f"machine's {fmt_size(m.mem_total_bytes)} of RAM")
    index = pages * RECORD_INDEX_BYTES
    ms = s.store.map_size_bytes
    if ms < index:
        warnings.append(
            f"{src}: store.map_size: {fmt_size(ms)} cannot hold the records of the configured "
            f"regions at all: {pages} pages need about {fmt_size(index)} of index alone "
            f"(~{RECORD_INDEX_BYTES} bytes per record, even of an all-zero page); eviction "
            f"stops when the store is full. Raise store.map_size (only address space is "
            f"reserved; disk is used as pages are stored)")
    elif ms < guest + index:
        ratio = guest / (ms - index)
        warnings.append(
            f"{src}: store.map_size: {fmt_size(ms)} holds all {fmt_size(guest)} of guest "
            f"memory only if pages compress better than {ratio:.1f}:1; eviction stops when "
            f"the store is full. Raise store.map_size to {fmt_size(guest + index)} to hold "
            f"every page (only address space is reserved)")
    touched = sum(r.size_bytes for r in s.regions
                  if r.workload_enabled and r.workload.touch_all_first)
    if touched > m.mem_total_bytes + m.swap_total_bytes:
        warnings.append(
            f"{src}: region: the built-in workload writes every page of {fmt_size(touched)} "
            f"first (touch_all_first), more than this machine's "
            f"{fmt_size(m.mem_total_bytes + m.swap_total_bytes)} of RAM and swap: the daemon "
            f"is OOM-killed unless eviction keeps up")
    return Capacity(errors, warnings)
