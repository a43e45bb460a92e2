"""No fault is ever dropped (issue 11): a UFFDIO_POISON that fails is retried until it
lands, so the faulting access ends with SIGBUS instead of hanging; a POISON that keeps
failing is retried with a growing backoff, logged at a bounded rate, and holds up no
other fault of the region. On the fake kernel, whose errors can be injected."""

from __future__ import annotations

import errno
import logging
import time

import pytest
import trio

from vmm_tierd.kernel.api import AccessKind, AccessStatus
from vmm_tierd.kernel.fake import FakeKernel
from vmm_tierd.kernel.stamps import page_bytes
from vmm_tierd.settings import TrackingSettings

from .conftest import fake_ok
from .harness import PS, H, engine

pytestmark = pytest.mark.skipif(not fake_ok(), reason="no fake kernel")
PAGES = range(0, 16)
BAD = 3


def _fake(h: H) -> FakeKernel:
    assert isinstance(h.kernel, FakeKernel)
    return h.kernel


async def _corrupt_evicted(h: H) -> None:
    await h.write_pages(PAGES)
    await h.wait_evicted(PAGES)
    h.store.corrupt_for_test(h.r.rid, BAD)


@pytest.mark.parametrize("backend", ["fake-rwp", "fake-rfc"])
@pytest.mark.parametrize("memtype", ["anon", "memfd"])
def test_poison_failing_eagain_is_retried_until_sigbus(backend: str, memtype: str) -> None:
    async def main() -> None:
        async with engine(backend, memtype) as h:
            await _corrupt_evicted(h)
            k = _fake(h)
            before = k.calls.get("UFFDIO_POISON", 0)
            k.inject("UFFDIO_POISON", errno.EAGAIN, count=40)
            r = await h.access(BAD, AccessKind.READ)
            assert r.status is AccessStatus.SIGBUS, r
            assert k.calls["UFFDIO_POISON"] - before >= 41  # every failure was retried
            r = await h.access(BAD + 1, AccessKind.READ)
            assert r.status is AccessStatus.OK and r.data == page_bytes(BAD + 1, 1)
    trio.run(main)


@pytest.mark.parametrize("memtype", ["anon", "memfd"])
def test_poison_failing_for_good_is_retried_with_backoff_and_blocks_nothing(
        memtype: str, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with engine("fake-rwp", memtype) as h:
            await _corrupt_evicted(h)
            # No more evictions: their SET_MODE(async) wakes every blocked fault (which
            # then faults again, one more message), and the count below is of one fault.
            h.engine.update_tracking(TrackingSettings(interval_s=0.05, min_age=250))
            n = h.runner.report.c.cycles
            await h.wait_for(lambda: h.runner.report.c.cycles >= n + 2)
            k = _fake(h)
            before = k.calls.get("UFFDIO_POISON", 0)
            k.inject("UFFDIO_POISON", errno.EIO, count=10**6)
            t0 = time.monotonic()
            bad = k.start_access(h.addr(BAD), AccessKind.READ, PS)
            # the other pages' faults are served meanwhile, read and write
            for p in (BAD + 1, BAD + 2, 0):
                r = await h.access(p, AccessKind.READ)
                assert r.status is AccessStatus.OK and r.data == page_bytes(p, 1), (p, r)
            await h.write_pages(range(40, 44), version=3)
            await h.wait_for(lambda: k.calls.get("UFFDIO_POISON", 0) - before >= 12)
            took = time.monotonic() - t0
            tries = k.calls["UFFDIO_POISON"] - before
            assert not bad.done()  # not dropped, not woken into a fault loop: retried
            # the backoff doubles from 1 ms up to 100 ms: 12 tries (11 retries) take at
            # least 1+2+4+...+64 + 4 * 100 ms (a lower bound: load only makes it longer)
            assert took >= 0.127 + 0.4, (tries, took)
            lines = [rec for rec in caplog.records if "UFFDIO_POISON" in rec.getMessage()]
            assert 1 <= len(lines) <= 6, [rec.getMessage() for rec in lines]
            k.injections["UFFDIO_POISON"].clear()  # the kernel recovers: it lands
            r = await trio.to_thread.run_sync(bad.wait, 20.0)
            assert r.status is AccessStatus.SIGBUS, r
            st = h.engine.region_stats()[0]
            assert st.poisoned_pages == 1
    with caplog.at_level(logging.ERROR, logger="vmm_tierd.engine"):
        trio.run(main)
