"""Configs the machine cannot map or the store cannot hold fail at check time, with why."""

from __future__ import annotations

import resource
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from vmm_tierd.service.capacity import (
    ENGINE_BYTES_PER_PAGE,
    WORKLOAD_BYTES_PER_PAGE,
    Machine,
    check_capacity,
)
from vmm_tierd.service.config import parse_settings
from vmm_tierd.service.units import fmt_size
from vmm_tierd.settings import Settings

GiB, TiB = 1 << 30, 1 << 40
SMALL = Machine(address_space_bytes=1 << 47, mem_total_bytes=24 * GiB, swap_total_bytes=0)


def settings(regions: str, store: str = 'map_size = "8GiB"') -> Settings:
    return parse_settings(tomllib.loads(f"[store]\n{store}\n{regions}"), "c.toml")


def region(size: str, workload: bool = True, n: int = 1) -> str:
    return "".join(f'[[region]]\nname = "r{i}"\nsize = "{size}"\n[region.workload]\n'
                   f"enabled = {'true' if workload else 'false'}\n" for i in range(n))


def test_a_small_config_fits() -> None:
    cap = check_capacity(settings(region("1GiB")), SMALL)
    assert cap.errors == [] and cap.warnings == []


def test_a_16tib_region_needs_more_ram_than_the_machine_has() -> None:
    cap = check_capacity(settings(region("16TiB")), SMALL)
    state = (16 * TiB // 4096) * (ENGINE_BYTES_PER_PAGE + WORKLOAD_BYTES_PER_PAGE)
    assert len(cap.errors) == 1, cap
    assert cap.errors[0].startswith(f"c.toml: region: 16.0 TiB of guest memory needs about "
                                    f"{fmt_size(state)} of per-page state"), cap.errors
    assert "more than this machine's 24.0 GiB of RAM" in cap.errors[0]
    # and the built-in workload would write all of it first
    assert any("touch_all_first" in w for w in cap.warnings)


def test_64_regions_of_16tib_exceed_the_address_space() -> None:
    cap = check_capacity(settings(region("16TiB", workload=False, n=64)), SMALL)
    assert any("of address space; this machine has 128.0 TiB per process" in e
               for e in cap.errors), cap.errors


def test_store_map_size_warnings() -> None:
    # 64 GiB of guest memory in an 8 GiB map: works only with 8:1 compression
    cap = check_capacity(settings(region("64GiB", workload=False)), SMALL)
    assert cap.errors == []
    (w,) = cap.warnings
    assert w.startswith("c.toml: store.map_size: 8.0 GiB holds all 64.0 GiB of guest memory "
                        "only if pages compress better than"), w
    # 2 TiB of pages: even their index does not fit in 8 GiB
    cap = check_capacity(settings(region("2TiB", workload=False)), SMALL)
    assert any("cannot hold the records of the configured regions at all" in w
               for w in cap.warnings), cap.warnings
    # a map as large as the guest memory and its index: no warning
    cap = check_capacity(settings(region("64GiB", workload=False), 'map_size = "80GiB"'), SMALL)
    assert cap.warnings == []


def test_the_live_machine_is_probed() -> None:
    m = Machine.probe()
    assert m.address_space_bytes >= 1 << 47
    assert 0 < m.mem_total_bytes < 1 << 50


def _limit_address_space() -> None:
    # if the refusal regresses, the daemon fails to map instead of OOM-ing a shared host
    resource.setrlimit(resource.RLIMIT_AS, (8 * GiB, 8 * GiB))


@pytest.mark.parametrize("cmd", ["check-config", "run"])
def test_check_config_and_run_refuse_a_16tib_region(cmd: str, tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(f'[daemon]\nmetrics_listen = "off"\n[store]\npath = "{tmp_path / "store"}"\n'
                 + region("16TiB"))
    args = ["check-config", str(f)] if cmd == "check-config" else [
        "run", "--config", str(f), "--backend", "fake"]
    r = subprocess.run([sys.executable, "-m", "vmm_tierd.cli", *args], capture_output=True,
                       text=True, timeout=120, preexec_fn=_limit_address_space)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "per-page state in the daemon" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "store").exists()  # refused before anything was opened


def test_check_config_prints_warnings_and_stays_valid(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[store]\nmap_size = "1GiB"\n' + region("4GiB", workload=False))
    r = subprocess.run([sys.executable, "-m", "vmm_tierd.cli", "check-config", str(f)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith(f"warning: {f}: store.map_size: 1.0 GiB holds all 4.0 GiB"), \
        r.stderr
    assert ": ok: 1 region(s)" in r.stdout
