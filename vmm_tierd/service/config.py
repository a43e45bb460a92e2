"""TOML config -> :class:`vmm_tierd.settings.Settings`, with every error collected.

Each error names the file, the dotted key and what is allowed, e.g.
``x.toml: tracking.interval: must be a duration between 10ms and 1h, got "fast"``.
The embedded default (``vmm_tierd/defaults/default.toml``) goes through the same parser.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from ..kernel.api import PAGE_SIZE, MemType, Pattern, WorkloadSpec
from ..settings import DaemonSettings, RegionSettings, Settings, StoreSettings, TrackingSettings
from .units import fmt_duration, fmt_size, parse_duration, parse_size

T = TypeVar("T")
LOG_LEVELS = ("debug", "info", "warning", "error")
BACKEND_CHOICES = ("auto", "linux", "fake", "fake-rwp", "fake-rfc")
SYNC_CHOICES = ("commit", "periodic", "none")
MAX_REGIONS = 64
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_LISTEN_RE = re.compile(r"^(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[A-Za-z0-9_.-]+)):(?P<port>\d+)$")


# settings field -> TOML key, where they differ
_TOML_KEYS = {"shutdown_deadline_s": "shutdown_deadline", "map_size_bytes": "map_size",
              "interval_s": "interval", "budget_bytes_per_s": "budget_bytes_per_sec",
              "resident_target_bytes": "resident_target"}


class ConfigError(Exception):
    """One or more config problems; ``errors`` holds each full line."""

    def __init__(self, errors: Sequence[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = list(errors)


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


def _show(value: object) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


class _Table:
    """Reads one TOML table, recording an error per bad key and any unknown key."""

    def __init__(self, data: object, where: str, errors: list[str], file: str) -> None:
        self.where, self.errors, self.file = where, errors, file
        self.seen: set[str] = set()
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self._err(where, f"must be a table, got {_show(data)}")
            data = {}
        self.data: dict[str, Any] = data

    def _err(self, key: str, msg: str) -> None:
        self.errors.append(f"{self.file}: {key}: {msg}")

    def _get(self, key: str, default: T, allowed: str, conv: Callable[[Any], T]) -> T:
        self.seen.add(key)
        if key not in self.data:
            return default
        raw = self.data[key]
        try:
            return conv(raw)
        except (ValueError, TypeError):
            self._err(f"{self.where}.{key}", f"must be {allowed}, got {_show(raw)}")
            return default

    def require(self, key: str, allowed: str) -> bool:
        if key not in self.data:
            self._err(f"{self.where}.{key}", f"is required ({allowed})")
            return False
        return True

    def duration(self, key: str, default: float, lo: float, hi: float) -> float:
        def conv(v: object) -> float:
            s = parse_duration(v)
            if not lo <= s <= hi:
                raise ValueError
            return s
        return self._get(key, default, f"a duration between {fmt_duration(lo)} and "
                         f"{fmt_duration(hi)} (e.g. \"3s\", \"250ms\" or seconds)", conv)

    def size(self, key: str, default: int, lo: int, hi: int, multiple: int = 1) -> int:
        def conv(v: object) -> int:
            n = parse_size(v)
            if not lo <= n <= hi or n % multiple:
                raise ValueError
            return n
        extra = f", a multiple of {multiple} bytes" if multiple > 1 else ""
        return self._get(key, default, f"a size between {_fsize(lo)} and {_fsize(hi)}{extra} "
                         f"(e.g. \"512MiB\", \"1GiB\" or bytes)", conv)

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        def conv(v: object) -> int:
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError
            return v
        return self._get(key, default, f"an integer between {lo} and {hi}", conv)

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        def conv(v: object) -> float:
            if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
                raise ValueError
            return float(v)
        return self._get(key, default, f"a number between {lo:g} and {hi:g}", conv)

    def boolean(self, key: str, default: bool) -> bool:
        def conv(v: object) -> bool:
            if not isinstance(v, bool):
                raise ValueError
            return v
        return self._get(key, default, "true or false", conv)

    def choice(self, key: str, default: str, choices: Sequence[str]) -> str:
        def conv(v: object) -> str:
            if v not in choices:
                raise ValueError
            return str(v)
        return self._get(key, default, "one of " + ", ".join(_show(c) for c in choices), conv)

    def string(self, key: str, default: str, allowed: str,
               check: Callable[[str], object] = lambda s: None) -> str:
        def conv(v: object) -> str:
            if not isinstance(v, str):
                raise ValueError
            check(v)
            return v
        return self._get(key, default, allowed, conv)

    def table(self, key: str) -> _Table:
        self.seen.add(key)
        return _Table(self.data.get(key), f"{self.where}.{key}", self.errors, self.file)

    def finish(self) -> None:
        for key in self.data:
            if key not in self.seen:
                allowed = ", ".join(sorted(self.seen)) or "none"
                self._err(f"{self.where}.{key}", f"unknown key (allowed: {allowed})")


def _fsize(n: int) -> str:
    for unit, mult in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return fmt_size(n) if n >= 1024 else f"{n}B"


def _check_name(s: str) -> None:
    if not _NAME_RE.match(s):
        raise ValueError


def _check_nonempty(s: str) -> None:
    if not s.strip():
        raise ValueError


def _check_listen(s: str) -> None:
    parse_listen(s)


def _daemon(t: _Table) -> DaemonSettings:
    d = DaemonSettings()
    out = DaemonSettings(
        log_level=t.choice("log_level", d.log_level, LOG_LEVELS),
        metrics_listen=t.string(
            "metrics_listen", d.metrics_listen,
            "\"HOST:PORT\" (e.g. \"127.0.0.1:9187\", \"[::1]:9187\") or \"off\"", _check_listen),
        backend=t.choice("backend", d.backend, BACKEND_CHOICES),
        shutdown_deadline_s=t.duration("shutdown_deadline", d.shutdown_deadline_s, 0.1, 3600),
    )
    t.finish()
    return out


def _store(t: _Table, base: Path | None) -> StoreSettings:
    d = StoreSettings()
    path = t.string("path", "", "a directory path (absolute, ~/..., or relative to the config "
                    "file)", _check_nonempty)
    if path:
        p = Path(path).expanduser()
        resolved = p if p.is_absolute() or base is None else base / p
    else:
        resolved = default_store_path()
    out = StoreSettings(
        path=resolved,
        map_size_bytes=t.size("map_size", d.map_size_bytes, 1 << 20, 64 << 40, PAGE_SIZE),
        zstd_level=t.integer("zstd_level", d.zstd_level, 1, 22),
        sync=t.choice("sync", d.sync, SYNC_CHOICES),
    )
    t.finish()
    return out


def _tracking(t: _Table) -> TrackingSettings:
    d = TrackingSettings()
    out = TrackingSettings(
        interval_s=t.duration("interval", d.interval_s, 0.01, 3600),
        min_age=t.integer("min_age", d.min_age, 1, 250),
        budget_pages=t.integer("budget_pages", d.budget_pages, 0, 1 << 40),
        budget_bytes_per_s=float(t.size("budget_bytes_per_sec", int(d.budget_bytes_per_s),
                                        0, 1 << 40)),
        resident_target_bytes=t.size("resident_target", d.resident_target_bytes, 0, 64 << 40,
                                     PAGE_SIZE),
        refault_window=t.integer("refault_window", d.refault_window, 0, 250),
        refault_hold=t.integer("refault_hold", d.refault_hold, 0, 250),
    )
    t.finish()
    return out


def _workload(t: _Table) -> tuple[WorkloadSpec, bool]:
    d = WorkloadSpec()
    enabled = t.boolean("enabled", True)
    spec = WorkloadSpec(
        pattern=Pattern(t.choice("pattern", d.pattern.value, [p.value for p in Pattern])),
        threads=t.integer("threads", d.threads, 1, 64),
        hot_fraction=t.number("hot_fraction", d.hot_fraction, 0.0, 1.0),
        write_fraction=t.number("write_fraction", d.write_fraction, 0.0, 1.0),
        shift_period_s=t.duration("shift_period", d.shift_period_s, 0.1, 3600),
        zipf_s=t.number("zipf_s", d.zipf_s, 0.01, 10.0),
        touch_all_first=t.boolean("touch_all_first", d.touch_all_first),
        zero_fraction=t.number("zero_fraction", d.zero_fraction, 0.0, 1.0),
        ops_per_sec=t.number("ops_per_sec", d.ops_per_sec, 0.0, 1e9),
        seed=t.integer("seed", d.seed, 0, (1 << 63) - 1),
    )
    t.finish()
    return spec, enabled


def _regions(raw: object, file: str, errors: list[str]) -> tuple[RegionSettings, ...]:
    if raw is None:
        return (RegionSettings(),)
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        errors.append(f"{file}: region: must be an array of tables ([[region]]), got {_show(raw)}")
        return (RegionSettings(),)
    if not 1 <= len(raw) <= MAX_REGIONS:
        errors.append(f"{file}: region: must have between 1 and {MAX_REGIONS} entries, "
                      f"got {len(raw)}")
    regions: list[RegionSettings] = []
    names: dict[str, int] = {}
    for i, item in enumerate(raw):
        t = _Table(item, f"region[{i}]", errors, file)
        name = t.string("name", f"guest{i}", "a name of 1-64 letters, digits, '_', '.', '-'",
                        _check_name)
        if name in names:
            errors.append(f"{file}: region[{i}].name: must be unique, {_show(name)} is also "
                          f"region[{names[name]}].name")
        names.setdefault(name, i)
        t.require("size", "a size such as \"1GiB\"")
        size = t.size("size", 1 << 30, PAGE_SIZE, 16 << 40, PAGE_SIZE)
        memtype = MemType(t.choice("memtype", "anon", [m.value for m in MemType]))
        spec, enabled = _workload(t.table("workload"))
        t.finish()
        regions.append(RegionSettings(name=name, size_bytes=size, memtype=memtype,
                                      workload=spec, workload_enabled=enabled))
    return tuple(regions) or (RegionSettings(),)


def parse_settings(doc: dict[str, Any], source: str, base: Path | None = None) -> Settings:
    """Validate a parsed TOML document; raise ConfigError listing every problem."""
    errors: list[str] = []
    top = _Table(doc, "", errors, source)
    daemon = _daemon(_Table(doc.get("daemon"), "daemon", errors, source))
    store = _store(_Table(doc.get("store"), "store", errors, source), base)
    tracking = _tracking(_Table(doc.get("tracking"), "tracking", errors, source))
    regions = _regions(doc.get("region"), source, errors)
    top.seen.update(("daemon", "store", "tracking", "region"))
    for key in doc:
        if key not in top.seen:
            errors.append(f"{source}: {key}: unknown section or key (allowed: daemon, store, "
                          f"tracking, region)")
    if errors:
        raise ConfigError(errors)
    return Settings(daemon=daemon, store=store, tracking=tracking, regions=regions,
                    source=source)


def load_settings(path: str | os.PathLike[str]) -> Settings:
    """Read and validate a config file. Raises ConfigError (also for unreadable files)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{p}: cannot read: {e}"]) from e
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{p}: invalid TOML: {e}"]) from e
    return parse_settings(doc, str(p), p.resolve().parent)


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
                          f"{_show(backend)}")
        daemon = dataclasses.replace(daemon, backend=backend)
    if metrics_listen is not None:
        try:
            parse_listen(metrics_listen)
        except ValueError:
            errors.append(f"--metrics-listen: must be \"HOST:PORT\" or \"off\", got "
                          f"{_show(metrics_listen)}")
        daemon = dataclasses.replace(daemon, metrics_listen=metrics_listen)
    if store_path is not None:
        store = dataclasses.replace(store, path=Path(store_path).expanduser().absolute())
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
    return changed
