"""Every case x every backend x every memory type (ids: ``<backend>-<memtype>-<case>``).

Linux-backend params carry ``pytest.mark.guest`` so the Linux 7.3 QEMU runner selects
them with ``-m guest`` (where RWP is granted and the rwp-* cases run for real).
"""

from __future__ import annotations

import os

import pytest

from vmm_tierd.kernel.api import MemType

from . import harness
from .cases import CASES
from .harness import Case


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


def test_case_names_unique() -> None:
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
