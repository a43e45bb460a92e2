"""TOML config -> :class:`vmm_tierd.settings.Settings`, with every error collected.

Each error names the file, the dotted key and what is allowed, e.g.
``x.toml: tracking.interval: must be a duration between 10ms and 1h, got "fast"``.
The embedded default (``vmm_tierd/defaults/default.toml``) goes through the same parser.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from ..kernel.api import PAGE_SIZE, MemType, Pattern, WorkloadSpec
from ..settings import (
    DEFAULT_MEMFD_NAMES,
    DaemonSettings,
    RegionSettings,
    Settings,
    StoreSettings,
    TrackingSettings,
    VmSettings,
)
from . import rules
from .loader import ConfigError, parse_toml, read_config_text
from .rules import MAX_REGIONS, show

T = TypeVar("T")
LOG_LEVELS = ("debug", "info", "warning", "error")
BACKEND_CHOICES = ("auto", "linux", "fake", "fake-rwp", "fake-rfc")
SYNC_CHOICES = ("commit", "periodic", "none")
# Array-of-tables that define guest memory to tier; a file needs at least one of them.
# A new kind of guest memory adds its table here (and its parser to parse_settings).
GUEST_MEMORY_TABLES: tuple[str, ...] = ("region", "vm")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_LISTEN_RE = re.compile(r"^(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[A-Za-z0-9_.-]+)):(?P<port>\d+)$")
# Directories a store must never be (it is created 0700 and filled with LMDB files);
# anything below the kernel's pseudo filesystems is refused too.
SYSTEM_DIRS = frozenset({
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32",
    "/media", "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp",
    "/usr", "/usr/bin", "/usr/lib", "/usr/lib64", "/usr/libexec", "/usr/local",
    "/usr/local/bin", "/usr/local/lib", "/usr/sbin", "/usr/share", "/var", "/var/cache",
    "/var/lib", "/var/log", "/var/run", "/var/spool", "/var/tmp"})
_PSEUDO_FS = ("/proc", "/sys", "/dev")


# settings field -> TOML key, where they differ
_TOML_KEYS = {"shutdown_deadline_s": "shutdown_deadline", "map_size_bytes": "map_size",
              "interval_s": "interval", "budget_bytes_per_s": "budget_bytes_per_sec",
              "resident_target_bytes": "resident_target"}


def default_store_path(env: dict[str, str] | os._Environ[str] | None = None) -> Path:
    """systemd's $STATE_DIRECTORY, else $XDG_STATE_HOME/vmm-tierd, else ~/.local/state/..."""
    env = os.environ if env is None else env
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0]) / "store"
    base = env.get("XDG_STATE_HOME") or str(Path("~/.local/state").expanduser())
    return Path(base) / "vmm-tierd" / "store"


def parse_listen(value: str) -> tuple[str, int] | None:
    """``"127.0.0.1:9187"`` / ``"[::1]:9187"`` -> (host, port); ``"off"``/``""`` -> None."""
    if value in ("", "off"):
        return None
    m = _LISTEN_RE.match(value)
    if not m or int(m.group("port")) > 65535:
        raise ValueError(value)
    return (m.group("v6") or m.group("host"), int(m.group("port")))


class _Table:
    """Reads one TOML table, recording an error per bad key and any unknown key."""

    def __init__(self, data: object, where: str, errors: list[str], file: str) -> None:
        self.where, self.errors, self.file = where, errors, file
        self.seen: set[str] = set()
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self._err(where, f"must be a table, got {show(data)}")
            data = {}
        self.data: dict[str, Any] = data

    def _err(self, key: str, msg: str) -> None:
        self.errors.append(f"{self.file}: {key}: {msg}")

    def get(self, key: str, default: T, rule: rules.Rule[T]) -> T:
        self.seen.add(key)
        if key not in self.data:
            return default
        raw = self.data[key]
        try:
            return rule.conv(raw)
        except (ValueError, TypeError):
            self._err(f"{self.where}.{key}", rule.message(raw))
            return default

    def error(self, key: str, msg: str) -> None:
        self._err(f"{self.where}.{key}", msg)

    def require(self, key: str, allowed: str) -> bool:
        if key not in self.data:
            self._err(f"{self.where}.{key}", f"is required ({allowed})")
            return False
        return True

    def table(self, key: str) -> _Table:
        self.seen.add(key)
        return _Table(self.data.get(key), f"{self.where}.{key}", self.errors, self.file)

    def finish(self) -> None:
        for key in self.data:
            if key not in self.seen:
                allowed = ", ".join(sorted(self.seen)) or "none"
                self._err(f"{self.where}.{key}", f"unknown key (allowed: {allowed})")


def _check_name(s: str) -> None:
    if not _NAME_RE.match(s):
        raise ValueError


def _check_nonempty(s: str) -> None:
    if not s.strip():
        raise ValueError


def _check_listen(s: str) -> None:
    parse_listen(s)


def _daemon(t: _Table, base: Path | None = None) -> DaemonSettings:
    d = DaemonSettings()
    uids: list[int] = t.get("handoff_uids", list(d.handoff_uids), rules.int_list(
        0, (1 << 32) - 2, "uids allowed to hand a uffd over, e.g. [0, 107]"))
    out = DaemonSettings(
        log_level=t.get("log_level", d.log_level, rules.choice(LOG_LEVELS)),
        metrics_listen=t.get("metrics_listen", d.metrics_listen, rules.string(
            "\"HOST:PORT\" (e.g. \"127.0.0.1:9187\", \"[::1]:9187\") or \"off\"",
            _check_listen)),
        backend=t.get("backend", d.backend, rules.choice(BACKEND_CHOICES)),
        shutdown_deadline_s=t.get("shutdown_deadline", d.shutdown_deadline_s,
                                  rules.SHUTDOWN_DEADLINE),
        handoff_socket=_path_or_none(t.get("handoff_socket", "", rules.string(
            "a path for the UNIX socket VMMs hand their uffd over on", lambda s: None)),
            base),
        handoff_uids=tuple(uids),
    )
    t.finish()
    return out


def _path_or_none(s: str, base: Path | None) -> Path | None:
    if not s:
        return None
    p = Path(s).expanduser()
    return p if p.is_absolute() or base is None else base / p


def _vms(raw: object, file: str, errors: list[str], base: Path | None
         ) -> tuple[VmSettings, ...]:
    """``[[vm]]``: VMs to tier from beside them (name; pid or pid_file; memfd; thread)."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(v, dict) for v in raw):
        errors.append(f"{file}: vm: must be an array of tables ([[vm]]), got {show(raw)}")
        return ()
    if not 1 <= len(raw) <= MAX_REGIONS:
        errors.append(f"{file}: vm: must have between 1 and {MAX_REGIONS} entries, got "
                      f"{len(raw)}")
        return ()
    out: list[VmSettings] = []
    names: dict[str, int] = {}
    name_rule = rules.string("a name of 1-64 letters, digits, '_', '.', '-'", _check_name)
    for i, item in enumerate(raw):
        t = _Table(item, f"vm[{i}]", errors, file)
        t.require("name", "a name of 1-64 letters, digits, '_', '.', '-'")
        name = t.get("name", f"vm{i}", name_rule)
        if name in names:
            errors.append(f"{file}: vm[{i}].name: must be unique, {show(name)} is also "
                          f"vm[{names[name]}].name")
        names.setdefault(name, i)
        pid = t.get("pid", 0, rules.integer(1, (1 << 22)))
        pid_file = _path_or_none(t.get("pid_file", "", rules.string(
            "a path to the VMM's pid file", lambda s: None)), base)
        if bool(pid) == bool(pid_file):
            t.error("pid", "give exactly one of pid and pid_file (e.g. pid_file = "
                           "\"/run/libvirt/qemu/NAME.pid\")")
        memfd: list[str] = t.get("memfd", list(DEFAULT_MEMFD_NAMES), rules.string_list(
            "memfd name globs of guest RAM, e.g. [\"memory-backend-memfd*\"]"))
        thread = t.get("inject_thread", "", rules.string("a thread name glob", lambda s: None))
        t.finish()
        out.append(VmSettings(name=name, pid=pid or None, pid_file=pid_file, memfd=tuple(memfd),
                              inject_thread=thread or None))
    return tuple(out)


def store_path_problem(path: Path) -> str | None:
    """Why ``path`` must not be a store directory, or None. A store is created 0700 and
    filled with LMDB files, so it must be a directory of its own: not ``/``, not a system
    directory, not the home directory, nothing under /proc, /sys or /dev."""
    candidates = {os.path.normpath(path)}
    try:
        candidates.add(os.path.realpath(path))
    except (OSError, ValueError):
        pass
    home = os.path.expanduser("~")
    for c in sorted(candidates):
        if c in SYSTEM_DIRS or c == home:
            return (f"must be a directory of its own, not the system directory {show(c)} "
                    f"(the store is made 0700 and filled with LMDB files); use e.g. "
                    f"\"/var/lib/vmm-tierd/store\"")
        for fs in _PSEUDO_FS:
            if c.startswith(fs + "/"):
                return f"must not be under {fs} (a kernel pseudo filesystem), got {show(c)}"
    return None


def _store(t: _Table, base: Path | None) -> StoreSettings:
    d = StoreSettings()
    path = t.get("path", "", rules.string("a directory path (absolute, ~/..., or relative to "
                                          "the config file)", _check_nonempty))
    if path:
        p = Path(path).expanduser()
        resolved = p if p.is_absolute() or base is None else base / p
        problem = store_path_problem(resolved)
        if problem:
            t.error("path", problem)
    else:
        resolved = default_store_path()
    out = StoreSettings(
        path=resolved,
        map_size_bytes=t.get("map_size", d.map_size_bytes, rules.MAP_SIZE),
        zstd_level=t.get("zstd_level", d.zstd_level, rules.integer(1, 22)),
        sync=t.get("sync", d.sync, rules.choice(SYNC_CHOICES)),
        page_cache=t.get("page_cache", d.page_cache, rules.choice(["drop", "keep"])),
    )
    t.finish()
    return out


def _tracking(t: _Table) -> TrackingSettings:
    d = TrackingSettings()
    out = TrackingSettings(
        interval_s=t.get("interval", d.interval_s, rules.INTERVAL),
        min_age=t.get("min_age", d.min_age, rules.integer(1, 250)),
        budget_pages=t.get("budget_pages", d.budget_pages, rules.integer(0, 1 << 40)),
        budget_bytes_per_s=float(t.get("budget_bytes_per_sec", int(d.budget_bytes_per_s),
                                       rules.size(0, 1 << 40))),
        resident_target_bytes=t.get("resident_target", d.resident_target_bytes,
                                    rules.size(0, 64 << 40, PAGE_SIZE)),
        refault_window=t.get("refault_window", d.refault_window, rules.integer(0, 250)),
        refault_hold=t.get("refault_hold", d.refault_hold, rules.integer(0, 250)),
        prefetch_pages=t.get("prefetch_pages", d.prefetch_pages, rules.integer(0, 256)),
    )
    t.finish()
    return out


def _workload(t: _Table) -> tuple[WorkloadSpec, bool]:
    d = WorkloadSpec()
    fraction = rules.number(0.0, 1.0)
    enabled = t.get("enabled", True, rules.boolean())
    spec = WorkloadSpec(
        pattern=Pattern(t.get("pattern", d.pattern.value,
                              rules.choice([p.value for p in Pattern]))),
        threads=t.get("threads", d.threads, rules.WORKLOAD_THREADS),
        hot_fraction=t.get("hot_fraction", d.hot_fraction, fraction),
        write_fraction=t.get("write_fraction", d.write_fraction, fraction),
        shift_period_s=t.get("shift_period", d.shift_period_s, rules.duration(0.1, 3600)),
        zipf_s=t.get("zipf_s", d.zipf_s, rules.number(0.01, 10.0)),
        touch_all_first=t.get("touch_all_first", d.touch_all_first, rules.boolean()),
        zero_fraction=t.get("zero_fraction", d.zero_fraction, fraction),
        ops_per_sec=t.get("ops_per_sec", d.ops_per_sec, rules.number(0.0, 1e9)),
        seed=t.get("seed", d.seed, rules.integer(0, (1 << 63) - 1)),
    )
    t.finish()
    return spec, enabled


def _regions(raw: object, file: str, errors: list[str]) -> tuple[RegionSettings, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        errors.append(f"{file}: region: must be an array of tables ([[region]]), got {show(raw)}")
        return ()
    if not 1 <= len(raw) <= MAX_REGIONS:
        # and nothing more about them: 100,000 regions would be 100,000 checks and lines
        errors.append(f"{file}: region: must have between 1 and {MAX_REGIONS} entries, "
                      f"got {len(raw)}")
        return ()
    regions: list[RegionSettings] = []
    names: dict[str, int] = {}
    name_rule = rules.string("a name of 1-64 letters, digits, '_', '.', '-'", _check_name)
    for i, item in enumerate(raw):
        t = _Table(item, f"region[{i}]", errors, file)
        name = t.get("name", f"guest{i}", name_rule)
        if name in names:
            errors.append(f"{file}: region[{i}].name: must be unique, {show(name)} is also "
                          f"region[{names[name]}].name")
        names.setdefault(name, i)
        t.require("size", "a size such as \"1GiB\"")
        size = t.get("size", 1 << 30, rules.REGION_SIZE)
        memtype = MemType(t.get("memtype", "anon", rules.choice([m.value for m in MemType])))
        spec, enabled = _workload(t.table("workload"))
        t.finish()
        regions.append(RegionSettings(name=name, size_bytes=size, memtype=memtype,
                                      workload=spec, workload_enabled=enabled))
    return tuple(regions)


def defines_guest_memory(doc: Mapping[str, Any]) -> bool:
    """Does the file define any guest memory to tier (one of GUEST_MEMORY_TABLES)?"""
    return any(t in doc for t in GUEST_MEMORY_TABLES)


def parse_settings(doc: dict[str, Any], source: str, base: Path | None = None, *,
                   need_memory: bool = True) -> Settings:
    """Validate a parsed TOML document; raise ConfigError listing every problem."""
    errors: list[str] = []
    top = _Table(doc, "", errors, source)
    daemon = _daemon(_Table(doc.get("daemon"), "daemon", errors, source), base)
    store = _store(_Table(doc.get("store"), "store", errors, source), base)
    tracking = _tracking(_Table(doc.get("tracking"), "tracking", errors, source))
    regions = _regions(doc.get("region"), source, errors)
    vms = _vms(doc.get("vm"), source, errors, base)
    sections = ("daemon", "store", "tracking", *GUEST_MEMORY_TABLES)
    top.seen.update(sections)
    for key in doc:
        if key not in top.seen:
            errors.append(f"{source}: {key}: unknown section or key (allowed: "
                          f"{', '.join(sections)})")
    if need_memory and not defines_guest_memory(doc) and daemon.handoff_socket is None:
        tables = " or ".join(f"[[{t}]]" for t in GUEST_MEMORY_TABLES)
        errors.append(f"{source}: no guest memory to tier: the file needs at least one "
                      f"{tables} table or daemon.handoff_socket (see configs/vmm-tierd.toml)")
    if errors:
        raise ConfigError(errors)
    return Settings(daemon=daemon, store=store, tracking=tracking, regions=regions,
                    vms=vms, source=source)


def load_settings(path: str | os.PathLike[str], *, need_memory: bool = True) -> Settings:
    """Read and validate a config file: ConfigError for every problem, whatever it was
    (unreadable, not a regular file, too large or too deep, invalid TOML or values)."""
    name = os.fspath(path)
    text = read_config_text(name)
    doc = parse_toml(text, name)
    try:
        return parse_settings(doc, name, Path(os.path.abspath(name)).parent,
                              need_memory=need_memory)
    except ConfigError:
        raise
    except Exception as e:  # a validator defect must not become the daemon's: say what it was
        raise ConfigError([f"{name}: cannot validate: {type(e).__name__}: {e}"]) from e


def default_settings() -> Settings:
    """The embedded default (vmm_tierd/defaults/default.toml)."""
    text = resources.files("vmm_tierd").joinpath("defaults/default.toml").read_text("utf-8")
    return parse_settings(tomllib.loads(text), "<embedded default>")


def with_overrides(s: Settings, *, backend: str | None = None,
                   metrics_listen: str | None = None,
                   store_path: str | None = None) -> Settings:
    """Command-line overrides (kept across SIGHUP reloads)."""
    errors: list[str] = []
    daemon, store = s.daemon, s.store
    if backend is not None:
        if backend not in BACKEND_CHOICES:
            errors.append(f"--backend: must be one of {', '.join(BACKEND_CHOICES)}, got "
                          f"{show(backend)}")
        daemon = dataclasses.replace(daemon, backend=backend)
    if metrics_listen is not None:
        try:
            parse_listen(metrics_listen)
        except ValueError:
            errors.append(f"--metrics-listen: must be \"HOST:PORT\" or \"off\", got "
                          f"{show(metrics_listen)}")
        daemon = dataclasses.replace(daemon, metrics_listen=metrics_listen)
    if store_path is not None:
        if not store_path.strip():
            errors.append("--store: must be a directory path, got \"\" (an empty path would "
                          "put the store in the current directory)")
        else:
            path = Path(store_path).expanduser().absolute()
            problem = store_path_problem(path)
            if problem:
                errors.append(f"--store: {problem}")
            store = dataclasses.replace(store, path=path)
    if errors:
        raise ConfigError(errors)
    return dataclasses.replace(s, daemon=daemon, store=store)


def restart_required(old: Settings, new: Settings) -> list[str]:
    """Dotted keys that changed but only take effect on restart (all but tracking.*,
    daemon.log_level)."""
    changed: list[str] = []
    for section in ("daemon", "store"):
        a, b = getattr(old, section), getattr(new, section)
        for f in dataclasses.fields(a):
            if f.name != "log_level" and getattr(a, f.name) != getattr(b, f.name):
                changed.append(f"{section}.{_TOML_KEYS.get(f.name, f.name)}")
    if old.regions != new.regions:
        changed.append("region")
    if old.vms != new.vms:
        changed.append("vm")
    return changed
