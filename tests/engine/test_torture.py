"""``vmm-tierd selftest --torture`` (issue 11): a short run of the real command in the
default selection (every backend here x strategy x memory type, ~25 s in all;
VT_TORTURE_SECONDS per combination makes it longer), its exit status on a loss, and its
arguments."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

import pytest

from vmm_tierd.cli import build_parser
from vmm_tierd.engine import torture_cli
from vmm_tierd.engine.torture import TortureResult, TortureSpec

from .conftest import fake_ok, linux_ok

SECONDS = os.environ.get("VT_TORTURE_SECONDS", "3")


def _torture(*args: str, timeout: float) -> tuple[int, list[dict[str, Any]], str]:
    cmd = [sys.executable, "-m", "vmm_tierd.cli", "selftest", "--torture", "--json", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    try:
        return p.returncode, json.loads(p.stdout), p.stderr
    except json.JSONDecodeError:
        raise AssertionError(f"rc={p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
                             ) from None


@pytest.mark.skipif(not (fake_ok() or linux_ok()), reason="no backend")
def test_torture_short_run_loses_nothing() -> None:
    backends = [b for b, ok in (("fake-rwp", fake_ok()), ("linux", linux_ok())) if ok]
    rc, out, err = _torture("--backend", ",".join(backends), "--strategy", "rwp,wp",
                            "--memtype", "anon,memfd", "--seconds", SECONDS,
                            "--size-mib", "16", "--fail-puts", "0.05",
                            "--fail-moves-back", "0.2", timeout=300 + 60 * float(SECONDS))
    combos = {(r["backend"], r["strategy"], r["memtype"]) for r in out}
    want = {(b, s, m) for b in backends for s in (("wp",) if b == "linux" else ("rwp", "wp"))
            for m in ("anon", "memfd")}
    assert combos == want, combos
    for r in out:
        detail = json.dumps({k: v for k, v in r.items() if k != "histories"}) + r["histories"]
        assert r["ok"], detail + err[-4000:]
        assert (r["lost_writes"], r["corrupt_pages"], r["poisoned_pages"]) == (0, 0, 0), detail
        assert r["evictions"] > 1000 and r["invariant_checks"] > 5, detail
        if r["memtype"] == "anon":
            assert r["staging_audits"] > 5, detail
    assert rc == 0, err[-4000:]
    assert sum(r["faults_by_kind"].get("staging", 0) for r in out) > 0  # mid-eviction hits


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["selftest", "--torture", *argv])


@pytest.mark.parametrize("broken", ["lost_writes", "corrupt_pages", "poisoned_pages",
                                    "violations", "graceful_stop"])
def test_torture_fails_on_any_loss(broken: str, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    def fake_run(spec: TortureSpec, store: object) -> TortureResult:
        r = TortureResult(backend=spec.backend, memtype=spec.memtype, strategy="wp",
                          lost_writes=0, corrupt_pages=0, poisoned_pages=0,
                          verify_completed=True, graceful_stop=True, evictions=10)
        if spec.memtype == "memfd":  # one combination of two goes wrong
            if broken == "violations":
                r.violations = ["staging is clean but a slot holds a page: 1 page(s) [-1]"]
            elif broken == "graceful_stop":
                r.graceful_stop = False
            else:
                setattr(r, broken, 1)
        return r

    monkeypatch.setattr(torture_cli, "run_torture", fake_run)
    assert torture_cli.main_torture(_args("--backend", "fake", "--memtype", "all")) == 1
    out = capsys.readouterr().out
    assert out.count(" ok\n") == 1 and "FAILED" in out.splitlines()[-1], out


def test_torture_arguments() -> None:
    a = _args("--backend", "all", "--memtype", "all", "--strategy", "wp")
    assert a.backend == ("fake-rwp", "fake-rfc", "linux")
    assert a.memtype == ("anon", "memfd") and a.strategy == ("wp",)
    specs = torture_cli.plan(_args("--backend", "fake-rwp,fake-rfc", "--seconds", "2m"))
    assert [(s.backend, s.memtype, s.seconds, s.size_mib) for s in specs] == \
        [("fake-rwp", "anon", 120.0, 8), ("fake-rfc", "anon", 120.0, 8)]


@pytest.mark.parametrize(("argv", "message"), [
    (["--torture", "--backend", "fake,bogus"],
     "argument --backend: must be fake, fake-rwp, fake-rfc, linux, a comma-separated list"),
    (["--torture", "--memtype", "shmem"], "argument --memtype: must be anon, memfd"),
    (["--backend", "fake,fake-rfc"], "argument --backend: one value (a list or all needs "
                                     "--torture)"),
])
def test_torture_refuses_bad_arguments(argv: list[str], message: str) -> None:
    p = subprocess.run([sys.executable, "-m", "vmm_tierd.cli", "selftest", *argv],
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 2 and message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
