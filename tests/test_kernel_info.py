"""``vmm-tierd kernel-info`` run as a user would, compared with an in-process probe."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmm_tierd.kernel import uapi

EXE = Path(sys.executable).parent / "vmm-tierd"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "vmm_tierd.cli"]
    return subprocess.run([*cmd, "kernel-info", *args], capture_output=True, text=True,
                          timeout=60)


def test_json_matches_probe() -> None:
    from vmm_tierd.kernel.linux import LinuxKernel

    p = run("--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    k = LinuxKernel()
    caps = k.capabilities()
    k.close()
    ioctl_names = out.pop("ioctl_names")
    assert out == caps.as_dict()
    bits = {v: n for n, v in uapi.IOCTL_BIT.items()}
    assert ioctl_names == [bits[b] for b in range(64) if caps.ioctls >> b & 1]
    assert {"REGISTER", "UNREGISTER", "API"} <= set(ioctl_names)
    assert out["backend"] == "linux" and out["release"] == os.uname().release


def test_this_host() -> None:
    if not os.uname().release.startswith("6.18."):
        pytest.skip("expectations are for the 6.18 hosts of kernel-facts.md")
    out = json.loads(run("--json").stdout)
    assert out["features"] == "0x1ffff"
    assert out["dialect"] == "none"
    assert out["strategy"] == "wp"
    assert "WP_ASYNC" in out["feature_names"] and "RWP" not in out["feature_names"]


def test_text_output() -> None:
    p = run()
    assert p.returncode == 0, p.stderr
    lines = dict(ln.split(":", 1) for ln in p.stdout.splitlines() if not ln.startswith(" "))
    j = json.loads(run("--json").stdout)
    assert lines["features"].strip() == j["features"]
    assert lines["strategy"].strip() == (j["strategy"] or "none (unsupported)")
    assert lines["reason"].strip() == j["reason"]
    assert lines["dialect"].strip() == j["dialect"]
    names = [ln.strip() for ln in p.stdout.splitlines() if ln.startswith("  ")]
    assert names == j["feature_names"]


@pytest.mark.parametrize(("backend", "dialect", "bit17"),
                         [("fake", "rwp", "RWP"), ("fake-rwp", "rwp", "RWP"),
                          ("fake-rfc", "rfc", "MINOR_ANON")])
def test_fake_backends(backend: str, dialect: str, bit17: str) -> None:
    if importlib.util.find_spec("vmm_tierd.kernel.fake") is None:
        pytest.skip("fake backend not present yet")
    p = run("--json", "--backend", backend)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["backend"] == ("fake-rwp" if backend == "fake" else backend)
    assert out["dialect"] == dialect
    assert bit17 in out["feature_names"]


def test_bad_backend_is_a_usage_error() -> None:
    p = run("--backend", "nonsense")
    assert p.returncode == 2
    assert "invalid choice" in p.stderr
