"""Stateful property test: random interleavings of evict, guest read/write, guest
discard, corrupt record, restore and record deletion, on a real engine over the fake
kernel (the engine's trio loop runs in a thread; the rules drive it and the fake vCPUs).

Invariants: a page reads its last write, or zeros on first touch and after a discard;
it is poisoned (SIGBUS) only when its record was bad; nothing is lost; every page the
engine holds as evicted has a record.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from vmm_tierd.engine.evict import Evictor
from vmm_tierd.engine.pagebits import EVICTED, KIND, POISONED
from vmm_tierd.engine.restore import restore_all
from vmm_tierd.kernel import uapi
from vmm_tierd.kernel.api import AccessKind, AccessStatus
from vmm_tierd.kernel.stamps import page_bytes
from vmm_tierd.settings import TrackingSettings

from .conftest import fake_ok
from .harness import PS, H, engine

N = 16
T = TypeVar("T")
ZERO, POISON = "zero", "poison"


class EngineThread:
    """An engine (harness.engine) on a trio loop in its own thread."""

    def __init__(self, backend: str, memtype: str) -> None:
        self.h: H | None = None
        self.token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self.error: BaseException | None = None
        self._t = threading.Thread(target=self._main, args=(backend, memtype), daemon=True)
        self._t.start()
        if not self._ready.wait(30) or self.h is None:
            raise RuntimeError(f"engine did not start: {self.error!r}")

    def _main(self, backend: str, memtype: str) -> None:
        async def main() -> None:
            async with engine(backend, memtype, npages=N, interval=3600.0) as h:
                h.engine.update_tracking(TrackingSettings(interval_s=3600.0, min_age=1))
                self.h, self.token = h, trio.lowlevel.current_trio_token()
                self._stop = trio.Event()
                self._ready.set()
                await self._stop.wait()
        try:
            trio.run(main)
        except BaseException as e:  # reported by close()
            self.error = e
            self._ready.set()

    def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        return trio.from_thread.run(fn, trio_token=self.token)

    def close(self) -> None:
        if self.token is not None and self._stop is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
        self._t.join(60)
        assert not self._t.is_alive(), "engine thread did not stop"
        if self.error is not None:
            raise self.error


class PagesMachine(RuleBasedStateMachine):
    backend = "fake-rwp"
    memtype = "anon"

    @initialize()
    def start(self) -> None:
        self.e = EngineThread(self.backend, self.memtype)
        h = self.e.h
        assert h is not None
        self.h: H = h
        self.evictor = Evictor(h.r)
        self.want: list[Any] = [ZERO] * N  # ZERO, POISON, or the version last written
        self.version = 0

    def teardown(self) -> None:
        if hasattr(self, "e"):
            try:
                for p in range(N):  # nothing lost, at the end too
                    self._check_read(p)
            finally:
                self.e.close()

    # ---- helpers ------------------------------------------------------------------------
    def _access(self, p: int, kind: AccessKind, data: bytes = b"") -> Any:
        a = self.h.kernel.start_access(self.h.addr(p), kind, len(data) or PS, data)
        r = a.wait(20.0)
        assert r.status is not AccessStatus.PENDING, f"page {p} {kind}: fault never served"
        return r

    def _check_read(self, p: int) -> None:
        r = self._access(p, AccessKind.READ)
        want = self.want[p]
        if want == POISON:
            assert r.status is AccessStatus.SIGBUS, (p, r)
        else:
            assert r.status is AccessStatus.OK, (p, want, r)
            expect = bytes(PS) if want == ZERO else page_bytes(p, want)
            assert r.data == expect, f"page {p}: want {want}, read {r.data[:16]!r}"

    def _kinds(self) -> np.ndarray:
        return self.h.r.pages.state & KIND

    # ---- rules --------------------------------------------------------------------------
    @rule(p=st.integers(0, N - 1))
    def write(self, p: int) -> None:
        self.version += 1
        r = self._access(p, AccessKind.WRITE, page_bytes(p, self.version))
        if self.want[p] == POISON:
            assert r.status is AccessStatus.SIGBUS, r
        else:
            assert r.status is AccessStatus.OK, r
            self.want[p] = self.version

    @rule(first=st.integers(0, N - 1), n=st.integers(1, N))
    def write_run(self, first: int, n: int) -> None:
        for p in range(first, min(N, first + n)):
            self.write(p)

    @rule(p=st.integers(0, N - 1))
    def read(self, p: int) -> None:
        self._check_read(p)

    @rule(pages=st.one_of(st.sets(st.integers(0, N - 1), min_size=1),
                          st.just(set(range(N)))))
    def evict(self, pages: set[int]) -> None:
        r = self.h.r
        victims = np.array(sorted(pages), dtype=np.uint64)

        async def go() -> None:
            r.tracker.begin_interval()  # rwp: protect, so untouched pages count cold
            await self.evictor.evict(victims, {})
        self.e.call(go)

    # The draws below pick among pages by the engine's state, and that state depends on
    # timing (which of two concurrent faults is served first decides what fault-around
    # brings back): so they draw indexes from a fixed range and map them onto the
    # candidates. A strategy built from the state would make hypothesis's generation
    # itself differ between runs of the same choices (FlakyStrategyDefinition).
    @rule(picks=st.lists(st.integers(0, N - 1), min_size=1))
    def evict_resident(self, picks: list[int]) -> None:
        """Victims as the policy picks them: pages in memory (written, not evicted)."""
        cand = [p for p in range(N) if isinstance(self.want[p], int)
                and self.h.r.pages.kind(p) != EVICTED]
        if cand:
            self.evict({cand[i % len(cand)] for i in picks})

    @rule(first=st.integers(0, N - 1), n=st.integers(1, 4))
    def discard(self, first: int, n: int) -> None:
        if self.memtype != "anon":
            return  # a discard on memfd sends no event (see README, "noticed")
        last = min(N, first + n)
        # MADV_DONTNEED blocks until the fault server reads the REMOVE event: from here
        self.h.kernel.madvise(self.h.addr(first), (last - first) * PS, uapi.MADV_DONTNEED)
        for p in range(first, last):
            self.want[p] = ZERO

    def _corruptible(self) -> list[int]:
        # corrupt_for_test flips bits: twice would mend the record, so once per record
        return [p for p in np.flatnonzero(self._kinds() == EVICTED).tolist()
                if self.want[p] != POISON]

    @rule(i=st.integers(0, N - 1))
    def corrupt(self, i: int) -> None:
        cand = self._corruptible()
        if not cand:
            return
        p = cand[i % len(cand)]
        self.h.store.corrupt_for_test(self.h.r.rid, p)
        self.want[p] = POISON

    @rule()
    def restore(self) -> None:
        async def go() -> None:
            await restore_all(self.h.r)
        self.e.call(go)
        assert not np.any(self._kinds() == EVICTED)

    @rule()
    def flush_deletes(self) -> None:
        self.e.call(self.evictor.flush_deletes)

    # ---- invariants ---------------------------------------------------------------------
    @invariant()
    def poisoned_only_when_the_record_was_bad(self) -> None:
        if not hasattr(self, "h"):
            return
        poisoned = set(np.flatnonzero(self._kinds() == POISONED).tolist())
        assert poisoned <= {p for p in range(N) if self.want[p] == POISON}, poisoned

    @invariant()
    def every_evicted_page_has_a_record(self) -> None:
        if not hasattr(self, "h"):
            return
        for p in np.flatnonzero(self._kinds() == EVICTED).tolist():
            try:
                self.h.store.get(self.h.r.rid, p)
            except KeyError:
                raise AssertionError(f"page {p} is evicted but has no record") from None
            except Exception:  # corrupt on purpose: a RecordError is a record too
                pass


SETTINGS = settings(max_examples=30, stateful_step_count=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def machine(backend: str, memtype: str) -> type[PagesMachine]:
    return type(f"Pages_{backend}_{memtype}", (PagesMachine,),
                {"backend": backend, "memtype": memtype})


@pytest.mark.skipif(not fake_ok(), reason="fake kernel not available")
@pytest.mark.parametrize("memtype", ["anon", "memfd"])
@pytest.mark.parametrize("backend", ["fake-rwp", "fake-rfc"])
def test_page_states(backend: str, memtype: str) -> None:
    m = machine(backend, memtype)
    m.TestCase.settings = SETTINGS
    m.TestCase().runTest()
