"""ConfigLoader: a reload's file is read off the event loop, under a timeout, one at a
time, and every failure is a ConfigError naming the file."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import trio

from vmm_tierd.service import reload as reloading
from vmm_tierd.service.config import ConfigError
from vmm_tierd.settings import Settings

GOOD = '[tracking]\ninterval = "1s"\n[[region]]\nsize = "16MiB"\n'


def test_a_good_file_loads_with_the_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(GOOD)
    loader = reloading.ConfigLoader(str(f), {"backend": "fake", "metrics_listen": None,
                                             "store_path": str(tmp_path / "s")})
    s = trio.run(loader.load)
    assert isinstance(s, Settings)
    assert (s.tracking.interval_s, s.daemon.backend, s.store.path) == (1.0, "fake",
                                                                       tmp_path / "s")


def test_a_load_that_hangs_times_out_and_the_next_one_says_busy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    entered = threading.Event()

    def stuck(path: str, **kw: object) -> Settings:
        entered.set()
        release.wait(60)
        raise OSError("released")

    monkeypatch.setattr(reloading, "load_settings", stuck)
    loader = reloading.ConfigLoader(str(tmp_path / "c.toml"), {}, timeout_s=0.2)

    async def main() -> tuple[list[str], list[str]]:
        with pytest.raises(ConfigError) as first:
            await loader.load()
        assert entered.is_set()
        with pytest.raises(ConfigError) as second:  # the abandoned thread still reads
            await loader.load()
        return first.value.errors, second.value.errors

    try:
        first, second = trio.run(main)
    finally:
        release.set()
    assert first == [f"{tmp_path / 'c.toml'}: reading and validating took longer than 0.2s"]
    assert second[0].startswith(f"{tmp_path / 'c.toml'}: the previous reload is still reading")


def test_any_exception_becomes_a_config_error(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(path: str, **kw: object) -> Settings:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(reloading, "load_settings", boom)
    loader = reloading.ConfigLoader(str(tmp_path / "c.toml"), {})
    with pytest.raises(ConfigError) as ei:
        trio.run(loader.load)
    assert ei.value.errors == [f"{tmp_path / 'c.toml'}: cannot load: RecursionError: maximum "
                               "recursion depth exceeded"]
    monkeypatch.undo()
    (tmp_path / "c.toml").write_text(GOOD)  # and the loader is usable again
    assert trio.run(loader.load).tracking.interval_s == 1.0
