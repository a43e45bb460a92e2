"""End to end: writers hammer a region while the engine evicts thousands of pages; then
every page's write stamp is verified. 0 lost writes, 0 corrupt pages, nothing poisoned."""

from __future__ import annotations

import json
import os

import pytest

from .conftest import fake_ok, linux_ok, run_selftest

SECONDS = float(os.environ.get("VT_E2E_SECONDS", "6"))
# The fake's vCPUs are Python: its region is smaller and runs longer to reach thousands.
FAKE_SECONDS = float(os.environ.get("VT_E2E_FAKE_SECONDS", "10"))
GUEST_SECONDS = float(os.environ.get("VT_E2E_GUEST_SECONDS", "8"))
MIN_EVICTIONS = int(os.environ.get("VT_E2E_MIN_EVICTIONS", "2000"))


def check(out: dict[str, object], min_evictions: int) -> None:
    detail = {k: v for k, v in out.items() if k != "_stderr"}
    assert out["verify_completed"], (detail, out["_stderr"])
    assert out["lost_writes"] == 0, (detail, out["_stderr"])
    assert out["corrupt_pages"] == 0, (detail, out["_stderr"])
    assert out["poisoned_pages"] == 0, (detail, out["_stderr"])
    assert out["engine_poisoned"] == 0, detail
    assert out["pages_verified"] == out["size_mib"] * 256, detail  # type: ignore[operator]
    assert out["evictions"] >= min_evictions, detail  # type: ignore[operator]
    # Writers hit evicted pages: some come back from the store (or from staging).
    kinds = out["faults_by_kind"]
    assert isinstance(kinds, dict)
    assert kinds.get("store", 0) + kinds.get("staging", 0) > 0, detail
    assert out["graceful_stop"], detail
    assert out["_rc"] == 0, detail


@pytest.mark.skipif(not fake_ok(), reason="fake kernel not available")
@pytest.mark.parametrize("memtype", ["anon", "memfd"])
@pytest.mark.parametrize("backend", ["fake-rwp", "fake-rfc"])
def test_fake_integrity(backend: str, memtype: str) -> None:
    out = run_selftest("--backend", backend, "--memtype", memtype,
                       "--seconds", str(FAKE_SECONDS), "--size-mib", "8", "--interval", "0.05",
                       timeout=FAKE_SECONDS * 10 + 120)
    assert out["strategy"] == "rwp"
    check(out, MIN_EVICTIONS)


@pytest.mark.skipif(not fake_ok(), reason="fake kernel not available")
@pytest.mark.parametrize("memtype", ["anon", "memfd"])
def test_fake_wp_strategy_integrity(memtype: str) -> None:
    """The wp strategy, forced on the fake (it grants WP_ASYNC and MOVE too)."""
    out = run_selftest("--backend", "fake-rwp", "--strategy", "wp", "--memtype", memtype,
                       "--seconds", str(FAKE_SECONDS), "--size-mib", "8", "--interval", "0.05",
                       timeout=FAKE_SECONDS * 10 + 120)
    assert out["strategy"] == "wp"
    check(out, MIN_EVICTIONS)


@pytest.mark.skipif(not linux_ok(), reason="no usable userfaultfd on this kernel")
@pytest.mark.parametrize("memtype", ["anon", "memfd"])
def test_linux_integrity(memtype: str) -> None:
    out = run_selftest("--backend", "linux", "--memtype", memtype, "--seconds", str(SECONDS),
                       "--size-mib", "64", "--interval", "0.05", timeout=SECONDS * 10 + 180)
    check(out, MIN_EVICTIONS)


@pytest.mark.guest
@pytest.mark.skipif(not linux_ok(), reason="no usable userfaultfd on this kernel")
@pytest.mark.parametrize("memtype", ["anon", "memfd"])
def test_guest_kernel_integrity(memtype: str) -> None:
    """In the 7.3 QEMU guest this runs the rwp strategy (short: Python under TCG is slow)."""
    out = run_selftest("--backend", "linux", "--memtype", memtype,
                       "--seconds", str(GUEST_SECONDS), "--size-mib", "2",
                       "--interval", "0.1", timeout=GUEST_SECONDS * 30 + 600)
    print(json.dumps({k: v for k, v in out.items() if not k.startswith("_")}))  # for -s
    check(out, int(os.environ.get("VT_E2E_GUEST_MIN_EVICTIONS", "200")))
