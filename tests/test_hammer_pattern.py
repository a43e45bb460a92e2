"""The HAMMER workload pattern (the torture's writers): pages taken away from under the
guest (here dropped by the test: DONTNEED on anon, a punched hole on memfd) are found
absent the way a guest feels it and written again at once, on both backends."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from vmm_tierd.kernel import open_kernel, uapi
from vmm_tierd.kernel.api import PAGE_SIZE, Pattern, Region, WorkloadSpec

from .engine.conftest import fake_ok, linux_ok

BACKENDS = [pytest.param("fake-rwp", marks=pytest.mark.skipif(not fake_ok(), reason="no fake")),
            pytest.param("linux", marks=pytest.mark.skipif(not linux_ok(),
                                                           reason="no linux backend"))]
NPAGES = 256
DROP = range(100, 140)


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.fixture(params=BACKENDS)
def kernel(request: pytest.FixtureRequest) -> Iterator[Any]:
    k = open_kernel(request.param)
    yield k
    k.close()


@pytest.mark.parametrize("memtype", ["anon", "memfd"])
def test_hammer_rewrites_the_pages_taken_away(kernel: Any, memtype: str) -> None:
    length = NPAGES * PAGE_SIZE
    r: Region = kernel.map_anon(length) if memtype == "anon" else kernel.map_memfd(length)
    w = kernel.start_workload(r, WorkloadSpec(pattern=Pattern.HAMMER, threads=1,
                                              hot_fraction=0.05, write_fraction=1.0,
                                              zero_fraction=0.0, seed=3))
    try:
        # one thread: it owns every page (absent pages of other threads are only read,
        # and a read without a uffd maps the zero page)
        wait_until(w.touched, "the touch-all-first pass")
        hot = int(0.05 * NPAGES + 1)
        before = w.versions()
        assert (before >= 1).all()
        a, n = DROP.start * PAGE_SIZE, len(DROP) * PAGE_SIZE

        def mapped() -> bool:
            res = kernel.pagemap_scan(r.addr + a, r.addr + a + n,
                                      category_mask=uapi.PAGE_IS_PRESENT,
                                      return_mask=uapi.PAGE_IS_PRESENT)
            return int(sum(int(e) - int(s) for s, e, _ in res.regions.tolist())) == n

        # Drop the pages until each was written again at least once (without a uffd, a
        # read burst that gets there first maps the zero page instead: drop again).
        rewritten = np.zeros(len(DROP), dtype=bool)
        deadline = time.monotonic() + 60
        while not rewritten.all():
            assert time.monotonic() < deadline, f"rewritten: {rewritten}"
            seen = w.versions()[DROP.start:DROP.stop]
            if memtype == "anon":
                kernel.madvise(r.addr + a, n, uapi.MADV_DONTNEED)
            else:
                kernel.punch_hole(r.fd, r.offset + a, n)
            wait_until(mapped, "the dropped pages mapped again")
            rewritten |= w.versions()[DROP.start:DROP.stop] > seen
        w.stop()
        after = w.versions()
        cold = np.ones(NPAGES, dtype=bool)
        cold[:hot + 1] = False
        cold[DROP.start:DROP.stop] = False
        # Pages that were never taken away are not written (only the hot set is): the
        # writes went to the pages that were.
        assert (after[cold] == before[cold]).all()
        s = w.stats()
        assert s.sigbus == 0
    finally:
        w.stop()  # before the memory goes: its threads touch it
        kernel.unmap(r)
