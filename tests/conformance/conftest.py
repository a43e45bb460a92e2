"""Hang guard for the conformance suite.

Every wait in the harness is bounded, but a Python thread stuck in a kernel call (or a
backend bug) must still not hang the run: if one test exceeds the guard, all threads'
tracebacks are dumped and the process exits.
"""

from __future__ import annotations

import faulthandler
import os
import sys
from collections.abc import Iterator

import pytest

# cases*.py and harness.py hold the asserts: have pytest explain them like test modules.
pytest.register_assert_rewrite("tests.conformance.cases", "tests.conformance.cases_rwp",
                             "tests.conformance.cases_remote", "tests.conformance.harness",
                             "tests.conformance.harness_remote")

GUARD_S = float(os.environ.get("VMM_TIERD_CONFORMANCE_GUARD", "120"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "guest: runs inside the Linux 7.3 QEMU guest selection")


@pytest.fixture(autouse=True)
def _hang_guard() -> Iterator[None]:
    faulthandler.dump_traceback_later(GUARD_S, exit=True, file=sys.__stderr__ or sys.stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
