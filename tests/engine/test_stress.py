"""The lost-page hunt of issue 11 as a regular test, on the real kernel: a 256 MiB anon
region, no eviction budget, a 50 ms interval, HAMMER writers on the pages being evicted
and read bursts, stats scrapers and thread churn against the loop, random reloads, store
writes failing (rollbacks) and moves back from staging failing EAGAIN (pages left in
staging across the cycles' scans, which is how the page was lost). Every cycle ends with
the invariant checks, every staging drop is audited, everything is traced; at the end
every page is verified. VT_STRESS_SECONDS sets the duration (default 20)."""

from __future__ import annotations

import json
import os

import pytest

from vmm_tierd.engine.torture import TortureResult, TortureSpec, run_torture

from .conftest import linux_ok

SECONDS = float(os.environ.get("VT_STRESS_SECONDS", "20"))


def _check(r: TortureResult) -> str:
    """Every run must be correct; returns the run's detail for the coverage message."""
    d = r.to_dict()
    hist = d.pop("histories")
    detail = json.dumps(d, indent=1) + "\n" + hist
    assert r.verify_completed, detail
    assert (r.lost_writes, r.corrupt_pages, r.poisoned_pages) == (0, 0, 0), detail
    assert r.engine_poisoned == 0, detail
    assert r.violations == [], detail
    assert r.graceful_stop, detail
    assert r.invariant_checks >= 10 and r.staging_audits >= 10, detail
    return detail


@pytest.mark.skipif(not linux_ok(), reason="no usable userfaultfd on this kernel")
def test_lost_page_stress_on_the_real_kernel() -> None:
    # Whether a guest write lands on a page while it sits in staging is a race the
    # test provokes but cannot force: on a loaded machine a 20 s run can miss it (CI
    # saw 0 staging faults with 127k evictions). So: up to three runs, each one checked
    # in full, until together they did what the test is for (faults on pages in
    # mid-eviction, store writes rolled back, moves back from staging that failed).
    staging = puts = moves = 0
    detail = ""
    for seed in (11, 12, 13):
        r = run_torture(TortureSpec(backend="linux", memtype="anon", seconds=SECONDS,
                                    size_mib=256, interval_s=0.05, threads=4, scrapers=4,
                                    fail_puts=0.05, fail_moves_back=0.3, seed=seed))
        detail = _check(r)
        assert r.strategy == "wp"  # the host's: the one whose scans leave markers
        staging += r.faults_by_kind.get("staging", 0)
        puts += r.failed_puts
        moves += r.failed_moves_back
        if staging and puts and moves:
            return
    pytest.fail(f"three runs never hit what the stress is for: {staging} staging faults, "
                f"{puts} rolled-back store writes, {moves} failed moves back\n"
                + detail)
