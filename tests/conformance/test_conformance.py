"""Every case x every backend x every memory type (ids: ``<backend>-<memtype>-<case>``),
and every cross-process case x every backend (memfd only: a VMM's RAM).

Linux-backend params carry ``pytest.mark.guest`` so the Linux 7.3 QEMU runner selects
them with ``-m guest`` (where RWP is granted and the rwp-* cases run for real).
"""

from __future__ import annotations

import os

import pytest

from vmm_tierd.kernel.api import MemType

from . import harness
from .cases import CASES
from .cases_remote import RAM_PAGES, REMOTE_CASES
from .harness import Case
from .harness_remote import remote_context


def _backends() -> tuple[str, ...]:
    sel = os.environ.get("VMM_TIERD_CONFORMANCE_BACKENDS")
    return tuple(sel.split(",")) if sel else harness.BACKENDS


PARAMS = [
    pytest.param(b, m, c, id=f"{b}-{m.value}-{c.name}",
                 marks=[pytest.mark.guest] if b == "linux" else [])
    for b in _backends() for m in harness.MEMTYPES for c in CASES
]


@pytest.mark.parametrize(("backend", "mem", "case"), PARAMS)
def test_conformance(backend: str, mem: MemType, case: Case) -> None:
    with harness.context(backend, mem, case) as ctx:
        case.fn(ctx)


REMOTE_PARAMS = [
    pytest.param(b, c, id=f"{b}-memfd-{c.name}",
                 marks=[pytest.mark.guest] if b == "linux" else [])
    for b in _backends() for c in REMOTE_CASES
]


@pytest.mark.parametrize(("backend", "case"), REMOTE_PARAMS)
def test_conformance_remote(backend: str, case: Case) -> None:
    """Cross-process cases: the uffd lives in another process (see harness_remote)."""
    with remote_context(backend, case, RAM_PAGES) as ctx:
        case.fn(ctx)


def test_case_names_unique() -> None:
    names = [c.name for c in (*CASES, *REMOTE_CASES)]
    assert len(names) == len(set(names))
