"""Plain, validated-elsewhere settings shared by the engine and the service.

``service/config.py`` parses and validates TOML into these; the engine only reads them.
Tracking and policy settings may be replaced at run time (SIGHUP); the rest may not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .kernel.api import MemType, Pattern, WorkloadSpec


@dataclass(frozen=True, slots=True)
class TrackingSettings:
    interval_s: float = 3.0  # one protect -> sleep -> scan cycle
    min_age: int = 2  # consecutive cold intervals before a page may be evicted
    budget_pages: int = 0  # max pages evicted per cycle; 0 = unlimited
    budget_bytes_per_s: float = 0.0  # max guest bytes evicted per second; 0 = unlimited
    resident_target_bytes: int = 0  # evict coldest-first down to this; 0 = no target
    refault_window: int = 3  # a fault within this many intervals of eviction is a refault
    refault_hold: int = 4  # extra intervals a refaulted page must stay cold (wp strategy)
    prefetch_pages: int = 8  # a fault from the store brings back up to this many pages
    # around it that were evicted with it (same cycle, adjacent), in one UFFDIO_COPY


@dataclass(frozen=True, slots=True)
class StoreSettings:
    path: Path = field(default_factory=lambda: Path("~/.local/state/vmm-tierd/store")
                       .expanduser())
    map_size_bytes: int = 8 << 30
    zstd_level: int = 1
    sync: str = "none"  # "commit" (fsync each txn), "periodic" (metasync off), "none"
    # "drop": pages written to the store leave the page cache (the host memory an
    # eviction saves is real; a fault back pays a disk read). "keep": the kernel keeps
    # them cached until it needs the memory (faults back are page-cache hits).
    page_cache: str = "drop"


@dataclass(frozen=True, slots=True)
class RegionSettings:
    name: str = "guest0"
    size_bytes: int = 1 << 30
    memtype: MemType = MemType.ANON
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    workload_enabled: bool = True


# memfd names VMMs give guest RAM: QEMU's memory-backend-memfd, Cloud Hypervisor,
# Firecracker (memfd-backed builds)
DEFAULT_MEMFD_NAMES = ("memory-backend-memfd*", "ch_ram*", "guest_mem*")


@dataclass(frozen=True, slots=True)
class VmSettings:
    """A VM to tier from beside it (``[[vm]]``, or ``vmm-tierd attach --pid``)."""

    name: str
    pid: int | None = None  # exactly one of pid, pid_file
    pid_file: Path | None = None  # e.g. libvirt's /run/libvirt/qemu/NAME.pid
    memfd: tuple[str, ...] = DEFAULT_MEMFD_NAMES
    inject_thread: str | None = None  # comm glob of the VMM thread to inject into


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    log_level: str = "info"
    metrics_listen: str = "127.0.0.1:9187"
    backend: str = "auto"  # "auto" (linux), "linux", "fake", "fake-rwp", "fake-rfc"
    shutdown_deadline_s: float = 10.0
    handoff_socket: Path | None = None  # VMMs that create their uffd send it here
    handoff_uids: tuple[int, ...] = (0,)  # peers allowed on it (SO_PEERCRED)


@dataclass(frozen=True, slots=True)
class Settings:
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    regions: tuple[RegionSettings, ...] = (RegionSettings(),)
    vms: tuple[VmSettings, ...] = ()
    source: str = "<embedded default>"


__all__ = ["DaemonSettings", "MemType", "Pattern", "RegionSettings", "Settings",
           "StoreSettings", "TrackingSettings", "VmSettings"]
