"""The command line as a new user meets it: usage, help, option validation, messages."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmm_tierd.cli import build_parser


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "vmm_tierd.cli", *args], capture_output=True,
                          text=True, timeout=60, env=full)


def test_bare_command_prints_usage_and_starts_nothing(tmp_path: Path) -> None:
    r = cli(env={"XDG_STATE_HOME": str(tmp_path)})
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("usage: vmm-tierd ")
    assert "a COMMAND is required" in r.stderr
    assert r.stdout == "" and list(tmp_path.iterdir()) == []  # no demo store was created


def test_top_level_help_is_whole_sentences_without_markup() -> None:
    r = cli("--help")
    assert r.returncode == 0
    desc = build_parser().description or ""
    assert desc.endswith(".") and "``" not in r.stdout and "`" not in desc
    assert "Tiers the memory of virtual machines" in r.stdout
    for name in ("run", "check-config", "kernel-info", "selftest"):
        assert name in r.stdout


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def test_every_option_of_every_command_has_help() -> None:
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}"
               for name, sp in _subparsers(build_parser()).items() for a in sp._actions
               if not a.help]
    assert missing == []


BAD_SELFTEST = [
    (["--size-mib", "0"], "argument --size-mib: must be an integer between 1 and 16777216"),
    (["--size-mib", "x"], "argument --size-mib: must be an integer between 1 and 16777216"),
    (["--threads", "0"], "argument --threads: must be an integer between 1 and 64, got 0"),
    (["--threads", "65"], "argument --threads: must be an integer between 1 and 64, got 65"),
    (["--seconds", "-1"], "argument --seconds: must be a positive duration"),
    (["--seconds", "0"], "argument --seconds: must be a positive duration"),
    # the bounds and words of tracking.interval in a config file
    (["--interval", "0"], 'argument --interval: must be a duration between 10ms and 1h '
                          '(e.g. "3s", "250ms" or seconds), got 0'),
    (["--interval", "nan"], "argument --interval: must be a duration between 10ms and 1h"),
]


@pytest.mark.parametrize(("args", "message"), BAD_SELFTEST,
                         ids=[" ".join(a) for a, _ in BAD_SELFTEST])
def test_selftest_refuses_bad_arguments_like_the_config_does(args: list[str],
                                                             message: str) -> None:
    r = cli("selftest", "--backend", "fake", *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_selftest_accepts_durations_and_numbers() -> None:
    sp = _subparsers(build_parser())["selftest"]
    a = sp.parse_args(["--interval", "250ms", "--seconds", "1.5", "--size-mib", "8"])
    assert (a.interval, a.seconds, a.size_mib) == (0.25, 1.5, 8)


@pytest.mark.parametrize("seconds", ["0", "-1", "soon"])
def test_run_refuses_a_bad_seconds(seconds: str) -> None:
    r = cli("run", "--backend", "fake", "--seconds", seconds)
    assert r.returncode == 2
    assert "argument --seconds: must be a positive duration" in r.stderr, r.stderr


def test_run_refuses_an_empty_store_path() -> None:
    r = cli("run", "--backend", "fake", "--store", "")
    assert r.returncode == 2
    assert r.stderr.startswith('--store: must be a directory path, got ""'), r.stderr


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and util-linux setpriv to run as another user")
def test_kernel_info_as_non_root_says_what_is_needed() -> None:
    r = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                        sys.executable, "-m", "vmm_tierd.cli", "kernel-info"],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "HOME": "/nonexistent"})
    assert r.returncode == 1, (r.stdout, r.stderr)
    msg = r.stderr
    assert "cannot open the linux backend: userfaultfd: Operation not permitted (EPERM)" in msg
    assert ("userfaultfd needs one of: root; read and write access to /dev/userfaultfd; or "
            "the sysctl vm.unprivileged_userfaultfd=1") in msg
    assert "uid 65534" in msg and "Traceback" not in msg
