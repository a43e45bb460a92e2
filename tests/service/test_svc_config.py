"""Config parsing and validation: every error names the file, the dotted key and what
is allowed; all errors are collected."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from vmm_tierd.kernel.api import MemType, Pattern, WorkloadSpec
from vmm_tierd.service.config import (
    GUEST_MEMORY_TABLES,
    ConfigError,
    default_settings,
    default_store_path,
    defines_guest_memory,
    load_settings,
    parse_listen,
    parse_settings,
    restart_required,
    with_overrides,
)
from vmm_tierd.service.units import fmt_size, parse_duration, parse_size
from vmm_tierd.settings import DaemonSettings, Settings, StoreSettings, TrackingSettings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "configs" / "vmm-tierd.toml"


def errors_of(text: str, tmp_path: Path) -> list[str]:
    f = tmp_path / "x.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_settings(f)
    return ei.value.errors


def test_embedded_default_is_the_documented_demo(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    s = default_settings()
    assert s.source == "<embedded default>"
    assert len(s.regions) == 1
    r = s.regions[0]
    assert (r.size_bytes, r.memtype, r.workload.pattern, r.workload_enabled) == (
        1 << 30, MemType.ANON, Pattern.SHIFTING, True)
    assert s.daemon.backend == "auto"
    listen = parse_listen(s.daemon.metrics_listen)
    assert listen is not None and listen[0] == "127.0.0.1"
    assert 1 <= s.tracking.interval_s <= 10
    assert s.store.path == tmp_path / "vmm-tierd" / "store"


def test_store_path_prefers_systemd_state_directory() -> None:
    env = {"STATE_DIRECTORY": "/var/lib/vmm-tierd/vm1:/var/lib/other",
           "XDG_STATE_HOME": "/x", "HOME": "/root"}
    assert default_store_path(env) == Path("/var/lib/vmm-tierd/vm1/store")
    assert default_store_path({"XDG_STATE_HOME": "/x"}) == Path("/x/vmm-tierd/store")


def test_example_config_is_valid_and_documents_the_defaults() -> None:
    s = load_settings(EXAMPLE)
    assert s.tracking == TrackingSettings()
    d = DaemonSettings()
    assert s.daemon == d
    assert (s.store.map_size_bytes, s.store.zstd_level, s.store.sync) == (
        StoreSettings().map_size_bytes, StoreSettings().zstd_level, StoreSettings().sync)
    w = s.regions[0].workload
    dw = WorkloadSpec()
    assert (w.pattern, w.threads, w.hot_fraction, w.write_fraction, w.shift_period_s,
            w.zipf_s, w.zero_fraction, w.seed) == (
        dw.pattern, dw.threads, dw.hot_fraction, dw.write_fraction, dw.shift_period_s,
        dw.zipf_s, dw.zero_fraction, dw.seed)
    # every key the parser knows appears (commented or not) in the example
    text = EXAMPLE.read_text()
    for key in ("log_level", "metrics_listen", "backend", "shutdown_deadline", "path",
                "map_size", "zstd_level", "sync", "interval", "min_age", "budget_pages",
                "budget_bytes_per_sec", "resident_target", "refault_window", "refault_hold",
                "name", "size", "memtype", "enabled", "pattern", "threads", "hot_fraction",
                "write_fraction", "shift_period", "zipf_s", "touch_all_first",
                "zero_fraction", "ops_per_sec", "seed"):
        assert f"\n{key} = " in text or f"\n# {key} = " in text, key


BAD = [
    ('[tracking]\ninterval = "fast"\n', "tracking.interval",
     'must be a duration between 10ms and 1h', '"fast"'),
    ("[tracking]\ninterval = 7200\n", "tracking.interval", "between 10ms and 1h", "7200"),
    ("[tracking]\nmin_age = true\n", "tracking.min_age", "an integer between 1 and 250",
     "true"),
    ("[tracking]\nmin_age = 1.5\n", "tracking.min_age", "an integer between 1 and 250", "1.5"),
    ('[tracking]\nresident_target = "12XB"\n', "tracking.resident_target",
     "a size between 0B and 64TiB", '"12XB"'),
    ("[tracking]\nspeed = 3\n", "tracking.speed", "unknown key (allowed: ", "interval"),
    ('[daemon]\nlog_level = "loud"\n', "daemon.log_level",
     'one of "debug", "info", "warning", "error"', '"loud"'),
    ('[daemon]\nmetrics_listen = "9187"\n', "daemon.metrics_listen", '"HOST:PORT"', '"9187"'),
    ('[daemon]\nbackend = "qemu"\n', "daemon.backend", '"linux", "fake"', '"qemu"'),
    ('[store]\nsync = "sometimes"\n', "store.sync", '"commit", "periodic", "none"',
     '"sometimes"'),
    ("[store]\nzstd_level = 30\n", "store.zstd_level", "between 1 and 22", "30"),
    ('[[region]]\nsize = "1000"\n', "region[0].size", "a multiple of 4096 bytes", '"1000"'),
    ('[[region]]\nsize = "1GiB"\nmemtype = "huge"\n', "region[0].memtype",
     'one of "anon", "memfd"', '"huge"'),
    ('[[region]]\nname = "a b"\nsize = "1GiB"\n', "region[0].name", "letters, digits",
     '"a b"'),
    ('[[region]]\nsize = "1GiB"\n[region.workload]\nthreads = 0\n',
     "region[0].workload.threads", "between 1 and 64", "0"),
    ('[[region]]\nsize = "1GiB"\n[region.workload]\nhot_fraction = 2\n',
     "region[0].workload.hot_fraction", "a number between 0 and 1", "2"),
    ('[[region]]\nname = "x"\n', "region[0].size", "is required", "1GiB"),
    ("[tracking]\n[deamon]\n", "deamon", "unknown section or key", "daemon, store"),
    ("tracking = 3\n", "tracking", "must be a table", "3"),
]


@pytest.mark.parametrize(("text", "key", "allowed", "got"), BAD,
                         ids=[b[1] + ":" + b[3] for b in BAD])
def test_each_error_names_file_key_and_what_is_allowed(text: str, key: str, allowed: str,
                                                       got: str, tmp_path: Path) -> None:
    if "[[region]]" not in text:  # a file without guest memory is an error of its own
        text += '[[region]]\nsize = "1GiB"\n'
    errs = errors_of(text, tmp_path)
    assert len(errs) == 1, errs
    prefix = f"{tmp_path / 'x.toml'}: {key}: "
    assert errs[0].startswith(prefix), errs[0]
    assert allowed in errs[0] and got in errs[0], errs[0]


def test_all_errors_are_collected(tmp_path: Path) -> None:
    errs = errors_of('[daemon]\nlog_level = 1\n[tracking]\ninterval = "fast"\nmin_age = 0\n'
                     '[[region]]\nname = "a"\nsize = "1GiB"\n[[region]]\nname = "a"\n'
                     'size = "2GiB"\n', tmp_path)
    keys = [e.split(": ")[1] for e in errs]
    assert keys == ["daemon.log_level", "tracking.interval", "tracking.min_age",
                    "region[1].name"], errs
    assert "must be unique" in errs[-1] and "region[0].name" in errs[-1]


def test_invalid_toml_and_unreadable_file_name_the_file(tmp_path: Path) -> None:
    errs = errors_of("[tracking\ninterval = 3\n", tmp_path)
    assert errs[0].startswith(f"{tmp_path / 'x.toml'}: invalid TOML: ") and "line 1" in errs[0]
    with pytest.raises(ConfigError) as ei:
        load_settings(tmp_path / "missing.toml")
    assert ei.value.errors[0].startswith(f"{tmp_path / 'missing.toml'}: cannot read")


def test_values_are_converted(tmp_path: Path) -> None:
    f = tmp_path / "c" / "ok.toml"
    f.parent.mkdir()
    f.write_text('[store]\npath = "data/store"\nmap_size = "1GiB"\n'
                 '[tracking]\ninterval = "250ms"\nbudget_bytes_per_sec = "64MiB"\n'
                 'resident_target = 268435456\n'
                 '[[region]]\nname = "vm-1"\nsize = "512MiB"\nmemtype = "memfd"\n'
                 '[region.workload]\nenabled = false\npattern = "zipf"\nshift_period = 2\n')
    s = load_settings(f)
    assert s.store.path == f.parent / "data" / "store"  # relative to the config file
    assert s.store.map_size_bytes == 1 << 30
    assert s.tracking.interval_s == 0.25
    assert s.tracking.budget_bytes_per_s == 64 << 20
    assert s.tracking.resident_target_bytes == 256 << 20
    r = s.regions[0]
    assert (r.name, r.size_bytes, r.memtype, r.workload_enabled, r.workload.pattern,
            r.workload.shift_period_s) == ("vm-1", 512 << 20, MemType.MEMFD, False,
                                           Pattern.ZIPF, 2.0)


@pytest.mark.parametrize(("text", "n"), [(1, 1), ("4KiB", 4096), ("1GiB", 1 << 30),
                                         ("1.5 MiB", 3 << 19), ("2GB", 2_000_000_000),
                                         ("10", 10)])
def test_parse_size(text: object, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["", "1 parsec", "-1", True, 1.5, "0.5B", None])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize(("text", "s"), [(3, 3.0), (0.5, 0.5), ("250ms", 0.25), ("3s", 3.0),
                                         ("2m", 120.0), ("1h", 3600.0), ("500us", 5e-4)])
def test_parse_duration(text: object, s: float) -> None:
    assert parse_duration(text) == pytest.approx(s)


@pytest.mark.parametrize("bad", ["soon", "3 days", False, float("nan"), -1, "1d"])
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_overrides_and_restart_required(tmp_path: Path) -> None:
    base = parse_settings(tomllib.loads('[[region]]\nsize = "64MiB"\n'), "a.toml")
    s = with_overrides(base, backend="fake", metrics_listen="127.0.0.1:0",
                       store_path=str(tmp_path / "st"))
    assert (s.daemon.backend, s.daemon.metrics_listen, s.store.path) == (
        "fake", "127.0.0.1:0", tmp_path / "st")
    with pytest.raises(ConfigError) as ei:
        with_overrides(base, metrics_listen="nowhere")
    assert ei.value.errors[0].startswith("--metrics-listen: ")
    new = parse_settings(tomllib.loads(
        '[daemon]\nlog_level = "debug"\nmetrics_listen = "127.0.0.1:9999"\n'
        '[tracking]\ninterval = 1\n[[region]]\nsize = "128MiB"\n'), "a.toml")
    assert restart_required(base, new) == ["daemon.metrics_listen", "region"]
    assert restart_required(base, base) == []
    assert isinstance(new, Settings)


def test_fmt_size_rounds_into_the_next_unit() -> None:
    assert [fmt_size(n) for n in (0, 1023, 1024, 16384, (1 << 30) - 16384, 3 << 29)] == [
        "0 B", "1023 B", "1.0 KiB", "16.0 KiB", "1.0 GiB", "1.5 GiB"]


def test_a_file_without_guest_memory_is_an_error_but_the_embedded_default_is_the_demo(
        tmp_path: Path) -> None:
    errs = errors_of('[tracking]\ninterval = "1s"\n', tmp_path)
    assert errs == [f"{tmp_path / 'x.toml'}: no guest memory to tier: the file needs at least "
                    "one [[region]] or [[vm]] table or daemon.handoff_socket (see "
                    "configs/vmm-tierd.toml)"]
    assert errors_of("", tmp_path)[0].endswith("(see configs/vmm-tierd.toml)")
    # an empty array is the count error only, not both
    assert errors_of("region = []\n", tmp_path) == [
        f"{tmp_path / 'x.toml'}: region: must have between 1 and 64 entries, got 0"]
    assert defines_guest_memory({"region": [{}]}) and not defines_guest_memory({"daemon": {}})
    assert GUEST_MEMORY_TABLES == ("region", "vm")
    assert defines_guest_memory({"vm": [{}]})
    assert len(default_settings().regions) == 1


@pytest.mark.parametrize("path", ["/", "/etc", "/usr/", "/var/lib", "/tmp/..", "/proc/self",
                                  "/sys/kernel/x", "/dev/shm/store", "~"])
def test_system_directories_are_refused_as_store_path(path: str, tmp_path: Path) -> None:
    errs = errors_of(f'[store]\npath = "{path}"\n[[region]]\nsize = "1GiB"\n', tmp_path)
    assert len(errs) == 1 and errs[0].startswith(f"{tmp_path / 'x.toml'}: store.path: must "), \
        errs
    with pytest.raises(ConfigError) as ei:
        with_overrides(default_settings(), store_path=path)
    assert ei.value.errors[0].startswith("--store: must "), ei.value.errors


def test_a_symlink_to_a_system_directory_is_refused_too(tmp_path: Path) -> None:
    (tmp_path / "innocent").symlink_to("/etc")
    errs = errors_of(f'[store]\npath = "{tmp_path / "innocent"}"\n[[region]]\nsize = 4096\n',
                     tmp_path)
    assert len(errs) == 1 and '"/etc"' in errs[0], errs


def test_empty_store_paths_are_refused(tmp_path: Path) -> None:
    errs = errors_of('[store]\npath = ""\n[[region]]\nsize = "1GiB"\n', tmp_path)
    assert len(errs) == 1 and errs[0].startswith(f"{tmp_path / 'x.toml'}: store.path: must be "
                                                 "a directory path"), errs
    with pytest.raises(ConfigError) as ei:
        with_overrides(default_settings(), store_path="")
    assert ei.value.errors == ['--store: must be a directory path, got "" (an empty path would '
                               'put the store in the current directory)']
    ok = with_overrides(default_settings(), store_path=str(tmp_path / "s"))
    assert ok.store.path == tmp_path / "s"
