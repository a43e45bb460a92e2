"""scripts/test runs every step even when one fails, reports each, and fails if any did.

The real script runs in a copy of the checkout's layout where setup, ruff, mypy and the
Python steps are stubs that record their call and exit as told."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

STUB = """#!/usr/bin/env bash
echo "$(basename "$0")${*:+ $*}" >> "$LOG"
case "$*" in
  *kernel_vm*) exit "${GUEST_RC:-0}" ;;
  *pytest*) exit "${HOST_RC:-0}" ;;
esac
exit 0
"""


def layout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "test", root / "scripts" / "test")
    (root / "scripts" / "setup").write_text("#!/usr/bin/env bash\nexit 0\n")
    bindir = root / ".venv" / "bin"
    bindir.mkdir(parents=True)
    for name in ("ruff", "mypy", "python"):
        (bindir / name).write_text(STUB)
    (bindir / "activate").write_text(f'export PATH="{bindir}:$PATH"\n')
    for p in [root / "scripts" / "test", root / "scripts" / "setup", *bindir.iterdir()]:
        p.chmod(0o755)
    return root


def run(root: Path, *args: str, **env: str) -> tuple[int, str, list[str]]:
    log = root / "calls.log"
    r = subprocess.run([str(root / "scripts" / "test"), *args], capture_output=True,
                       text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "LOG": str(log), **env})
    calls = log.read_text().splitlines() if log.exists() else []
    return r.returncode, r.stdout, calls


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_a_failing_host_test_does_not_hide_the_guest_run(tmp_path: Path) -> None:
    root = layout(tmp_path)
    rc, out, calls = run(root, HOST_RC="1")
    assert rc == 1
    assert calls == ["ruff check vmm_tierd tests benchmarks", "mypy",
                     "python -m pytest -q", "python -m tests.kernel_vm"]
    summary = out.split("=== summary\n")[1].splitlines()
    assert summary == ["ok      ruff", "ok      mypy", "FAILED  host tests (exit 1)",
                       "ok      Linux 7.3 guest tests"]


def test_a_failing_guest_run_fails_and_fast_skips_it(tmp_path: Path) -> None:
    root = layout(tmp_path)
    rc, out, _ = run(root, GUEST_RC="73")
    assert rc == 1 and "FAILED  Linux 7.3 guest tests (exit 73)" in out
    (root / "calls.log").unlink()
    rc, out, calls = run(root, "--fast", "tests/service")
    assert rc == 0 and calls[-1] == "python -m pytest -q tests/service", calls
    assert "kernel_vm" not in " ".join(calls)
