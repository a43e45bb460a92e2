"""A page the rollback of a failed store could not move back stays in flight, in staging.
The wp strategy's scans then leave a uffd-wp marker in its hole, and UFFDIO_MOVE refuses
that destination with EEXIST as if the page were there (measured on 6.18). The page must
still come back intact: when the guest touches it, and by itself at the next eviction
(issue 11, the lost page)."""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import numpy as np
import pytest
import trio

from vmm_tierd.engine.store import PageStore, StoreError
from vmm_tierd.kernel import uapi
from vmm_tierd.kernel.api import AccessKind, AccessStatus, Backend, Kernel, KernelError, Strategy
from vmm_tierd.kernel.stamps import page_bytes
from vmm_tierd.settings import TrackingSettings

from .conftest import fake_ok, linux_ok
from .harness import PS, H, engine

# The wp strategy: the host's (6.18) and the fake's, forced.
WP_BACKENDS = [pytest.param("fake-rwp", marks=pytest.mark.skipif(not fake_ok(), reason="no fake")),
               pytest.param("linux", marks=pytest.mark.skipif(not linux_ok(),
                                                              reason="no userfaultfd"))]
STUCK = range(0, 32)


class MovesBackFail:
    """The backend, with every MOVE back into the guest (the ones that wake) failing
    EAGAIN while ``armed``, as they do while a guest discard's REMOVE event is unread."""

    def __init__(self, k: Backend) -> None:
        self._k = k
        self.armed = False
        self.failed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._k, name)

    def uffd_move(self, fd: int, dst: int, src: int, length: int, mode: int = 0) -> int:
        if self.armed and not mode & uapi.UFFDIO_MOVE_MODE_DONTWAKE:
            self.failed += 1
            raise KernelError("UFFDIO_MOVE", errno.EAGAIN, 0, "injected")
        return self._k.uffd_move(fd, dst, src, length, mode)


class FirstPutFails(PageStore):
    """The first batch write fails (nothing written): that eviction is rolled back."""

    hook: Callable[[np.ndarray], None] | None = None
    fails = 1

    def put_batch(self, region: int, pages: np.ndarray,
                  data: bytes | bytearray | memoryview) -> Any:
        if self.fails > 0:
            self.fails -= 1
            if self.hook is not None:
                self.hook(pages)
            raise StoreError("injected write failure")
        return super().put_batch(region, pages, data)


async def _strand(h: H, fk: MovesBackFail, then: Callable[[], None] | None = None) -> list[int]:
    """Write STUCK; the first eviction (of all or some of them) fails to store and its
    rollback fails to move the pages back: they stay in flight while at least 3 more
    cycles (scans) run. Returns those pages."""
    store = cast(FirstPutFails, h.store)
    cycles: list[int] = []
    batch: list[int] = []

    def failing(pages: np.ndarray) -> None:  # worker thread, inside the failing put
        fk.armed = True
        batch.extend(int(p) for p in pages)
        cycles.append(h.runner.report.c.cycles)
        if then is not None:
            trio.from_thread.run_sync(then)

    store.hook = failing
    await h.write_pages(STUCK)
    await h.wait_for(lambda: bool(cycles) and h.runner.report.c.cycles >= cycles[0] + 3)
    stuck = sorted(h.r.pages.inflight)
    assert stuck and stuck == sorted(batch), (stuck, batch)
    fk.armed = False
    return stuck


async def _read_back(h: H, pages: range) -> None:
    for p in pages:
        r = await h.access(p, AccessKind.READ)
        assert r.status is AccessStatus.OK, (p, r)
        assert r.data == page_bytes(p, 1), f"page {p} lost its content"


# after the failure no more victims: only the guest's faults return the stranded pages
NO_MORE_VICTIMS = TrackingSettings(interval_s=0.05, min_age=250, refault_hold=0)


@asynccontextmanager
async def stranding(backend: str) -> AsyncIterator[tuple[H, MovesBackFail]]:
    """The wp engine whose first store write fails and whose moves back fail on demand."""
    box: list[MovesBackFail] = []

    def wrap(k: Backend) -> Kernel:
        box.append(MovesBackFail(k))
        return cast(Kernel, box[0])

    async with engine(backend, "anon", strategy=Strategy.WP, store_cls=FirstPutFails,
                      wrap=wrap) as h:
        yield h, box[0]


@pytest.mark.parametrize("backend", WP_BACKENDS)
def test_page_stranded_across_scans_comes_back_when_touched(backend: str) -> None:
    async def main() -> None:
        async with stranding(backend) as (h, fk):
            stuck = await _strand(h, fk, lambda: h.engine.update_tracking(NO_MORE_VICTIMS))
            await _read_back(h, STUCK)
            assert not h.r.pages.inflight
            assert h.engine.region_stats()[0].faults.get("staging", 0) == len(stuck)
            assert h.engine.region_stats()[0].poisoned_total == 0
    trio.run(main)


@pytest.mark.parametrize("backend", WP_BACKENDS)
def test_page_stranded_across_scans_is_returned_by_the_next_eviction(backend: str) -> None:
    async def main() -> None:
        async with stranding(backend) as (h, fk):
            await _strand(h, fk)
            # Other pages to evict: the next eviction must first take the stranded pages
            # back (staging can't be reused while they are in it), then go on.
            more = range(64, 96)
            await h.write_pages(more)
            await h.wait_evicted(more)
            assert not h.r.pages.inflight
            assert h.engine.region_stats()[0].faults.get("staging", 0) == 0
            await h.wait_evicted(STUCK)  # and they are evicted again, normally
            await _read_back(h, STUCK)
            await _read_back(h, more)
            assert h.engine.region_stats()[0].poisoned_total == 0
    trio.run(main)


@pytest.mark.parametrize("backend", WP_BACKENDS)
def test_page_whose_staging_copy_vanished_is_poisoned_not_zero(backend: str) -> None:
    """Nothing in the engine empties a slot in flight; if it is empty all the same, the
    guest gets a memory error, never zeros in place of its data (before: zeros)."""
    async def main() -> None:
        async with stranding(backend) as (h, fk):
            stuck = await _strand(h, fk, lambda: h.engine.update_tracking(NO_MORE_VICTIMS))
            gone = stuck[0]
            batch, i = h.r.pages.inflight[gone]
            await trio.to_thread.run_sync(h.kernel.madvise, batch.staging + i * PS, PS,
                                          uapi.MADV_DONTNEED)
            r = await h.access(gone, AccessKind.READ)
            assert r.status is AccessStatus.SIGBUS, r
            await _read_back(h, range(gone + 1, STUCK.stop))  # the others: intact
            st = h.engine.region_stats()[0]
            assert st.poisoned_pages == 1 and st.poisoned_total == 1
    trio.run(main)
