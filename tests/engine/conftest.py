"""Helpers for the engine tests: backends, a hang guard, and a bounded selftest runner."""

from __future__ import annotations

import faulthandler
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

FAKES = ("fake-rwp", "fake-rfc")


def linux_ok() -> bool:
    if not os.path.exists("/dev/userfaultfd") and os.geteuid() != 0:
        return False
    try:
        from vmm_tierd.kernel.linux import LinuxKernel
    except Exception:
        return False
    k = LinuxKernel()
    try:
        return k.capabilities().strategy is not None
    finally:
        k.close()


def fake_ok() -> bool:
    try:
        import vmm_tierd.kernel.fake  # noqa: F401
    except Exception:
        return False
    return True


@pytest.fixture(autouse=True)
def _hang_guard() -> Iterator[None]:
    # A uffd fault nobody serves hangs forever: dump every stack and exit instead.
    faulthandler.dump_traceback_later(float(os.environ.get("VT_TEST_HANG_S", "300")),
                                      exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def run_selftest(*args: str, timeout: float) -> dict[str, Any]:
    """``vmm-tierd selftest ... --json`` in a subprocess, killed after ``timeout``."""
    cmd = [sys.executable, "-m", "vmm_tierd.cli", "selftest", "--json", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    try:
        out: dict[str, Any] = json.loads(p.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"selftest rc={p.returncode}\nstdout:\n{p.stdout[-3000:]}\n"
                             f"stderr:\n{p.stderr[-6000:]}") from None
    out["_rc"] = p.returncode
    out["_stderr"] = p.stderr[-4000:]
    return out
