"""The debug-mode invariant checks and the page trace (issue 11): silent through normal
evictions and faults, and each check fires on the state it is about, made on purpose
behind the engine's back with the kernel itself."""

from __future__ import annotations

import pytest
import trio

from vmm_tierd.engine.invariants import Invariants
from vmm_tierd.kernel import uapi
from vmm_tierd.kernel.api import AccessKind, AccessStatus, Strategy
from vmm_tierd.kernel.stamps import page_bytes
from vmm_tierd.settings import TrackingSettings

from .conftest import fake_ok, linux_ok
from .harness import PS, H, engine

_fake = pytest.mark.skipif(not fake_ok(), reason="no fake")
_linux = pytest.mark.skipif(not linux_ok(), reason="no userfaultfd")
CASES = [pytest.param("fake-rwp", None, marks=_fake, id="fake-rwp"),
         pytest.param("fake-rwp", Strategy.WP, marks=_fake, id="fake-rwp-wp"),
         pytest.param("linux", None, marks=_linux, id="linux")]
PAGES = range(0, 32)


def _inv(h: H) -> Invariants:
    assert h.runner.invariants is not None
    return h.runner.invariants


async def _settle(h: H) -> None:
    """No more evictions; wait for two more cycles (the served-back pages flushed)."""
    h.engine.update_tracking(TrackingSettings(interval_s=0.05, min_age=250, refault_hold=0))
    n = h.runner.report.c.cycles
    await h.wait_for(lambda: h.runner.report.c.cycles >= n + 2)


@pytest.mark.parametrize("memtype", ["anon", "memfd"])
@pytest.mark.parametrize(("backend", "strategy"), CASES)
def test_checks_hold_through_evictions_and_faults(backend: str, strategy: Strategy | None,
                                                  memtype: str) -> None:
    async def main() -> None:
        async with engine(backend, memtype, strategy=strategy, debug=True) as h:
            await h.write_pages(PAGES)
            await h.wait_evicted(PAGES)
            for p in range(0, 16):  # back from the store, and evicted again
                r = await h.access(p, AccessKind.READ)
                assert r.status is AccessStatus.OK and r.data == page_bytes(p, 1)
            await h.write_pages(range(8, 24), version=2)
            await h.wait_evicted(range(0, 24))
            inv = _inv(h)
            assert inv.check() == []
            assert inv.checks > 3 and inv.violations == []
            if memtype == "anon":
                assert inv.audits > 0  # the staging audit ran before every drop
    trio.run(main)


@pytest.mark.parametrize(("backend", "strategy"), CASES)
def test_a_page_put_in_staging_behind_the_engine_is_caught(
        backend: str, strategy: Strategy | None) -> None:
    async def main() -> None:
        async with engine(backend, "anon", strategy=strategy, debug=True) as h:
            await h.write_pages(PAGES)
            await h.wait_evicted(PAGES)
            r = await h.access(2, AccessKind.READ)  # back: resident, evicted once
            assert r.status is AccessStatus.OK
            await _settle(h)
            u, inv = h.r.uffd, _inv(h)
            assert u.staging is not None and inv.check() == []
            slot = u.staging.npages - 1  # no batch of 32 pages put anything there
            dst = u.staging.addr + slot * PS
            await trio.to_thread.run_sync(h.kernel.uffd_move, u.sfd, dst, h.addr(2), PS,
                                          uapi.UFFDIO_MOVE_MODE_DONTWAKE)
            found = {v.kind: v for v in inv.check()}
            lost = found.pop("resident page evicted once is absent (its only copy is gone)")
            assert lost.pages == [2]
            held = found.pop("staging is clean but a slot holds a page")
            assert held.slots == [slot] and held.pages == [-1]  # no batch put it there
            assert not found, found
            audit = {v.kind: v for v in inv.audit_staging(u.staging.addr)}
            assert audit["staging slot at the drop holds a page no batch put there"].slots \
                == [slot]
            # the history of the page tells where it went
            assert h.runner.trace is not None
            hist = "\n".join(h.runner.trace.history(2))
            assert "served_back" in hist and "committed" in hist, hist
            assert u.move_in(h.addr(2), dst)  # (past the marker a wp scan may have left)
            assert inv.check() == []
    trio.run(main)


@pytest.mark.parametrize(("backend", "strategy"), CASES)
def test_a_page_emptied_behind_the_engine_is_caught(backend: str,
                                                    strategy: Strategy | None) -> None:
    """An evicted-once page dropped from memory (here: by MADV_DONTNEED with the REMOVE
    event swallowed) is the lost page of issue 11: the end-of-cycle check names it."""
    async def main() -> None:
        async with engine(backend, "memfd", strategy=strategy, debug=True) as h:
            await h.write_pages(PAGES)
            await h.wait_evicted(PAGES)
            r = await h.access(5, AccessKind.READ)
            assert r.status is AccessStatus.OK
            await _settle(h)
            inv = _inv(h)
            assert inv.check() == []
            reg = h.r.uffd.region
            await trio.to_thread.run_sync(h.kernel.punch_hole, reg.fd, reg.offset + 5 * PS,
                                          PS)
            found = {v.kind: v for v in inv.check()}
            assert found["resident page evicted once is absent (its only copy is gone)"] \
                .pages == [5]
    trio.run(main)


@pytest.mark.parametrize(("backend", "strategy"), CASES)
def test_trace_tells_a_page_history(backend: str, strategy: Strategy | None) -> None:
    async def main() -> None:
        async with engine(backend, "anon", strategy=strategy, debug=True) as h:
            await h.write_pages(range(0, 8))
            await h.wait_evicted(range(0, 8))
            r = await h.access(3, AccessKind.READ)
            assert r.status is AccessStatus.OK
            assert h.runner.trace is not None
            hist = h.runner.trace.history(3)
            assert hist[0].startswith("region t page 3:")
            ops = [line.split()[2] for line in hist[1:]]
            want = ["MOVE", "detached", "READ", "committed", "MADV_DONTNEED", "COPY",
                    "served_back"]
            i = 0
            for w in want:  # in this order (the first write's COPY comes before)
                assert w in ops[i:], (w, hist)
                i = ops.index(w, i) + 1
            out = next(line for line in hist if "MOVE out" in line)
            assert "slot" in out and "-> ok" in out, out
    trio.run(main)
