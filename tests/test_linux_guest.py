"""The linux backend's guest side: C accessor threads, workloads and the verifier, on real
memory (anonymous and memfd), real SIGBUS sources and a real userfaultfd."""

from __future__ import annotations

import contextlib
import errno
import faulthandler
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from vmm_tierd.kernel import stamps, uapi
from vmm_tierd.kernel.api import (
    PAGE_SIZE,
    Access,
    AccessKind,
    AccessStatus,
    PageFault,
    Pattern,
    Region,
    WorkloadSpec,
)
from vmm_tierd.kernel.linux import LinuxKernel
from vmm_tierd.kernel.linux_guest import LinuxWorkload, stamp_page, start_workload

PAGE = PAGE_SIZE


@pytest.fixture(autouse=True)
def _hang_guard() -> Iterator[None]:
    # An unserved uffd fault would hang forever: dump stacks and exit instead.
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def kernel() -> Iterator[LinuxKernel]:
    k = LinuxKernel()
    yield k
    k.close()


@pytest.fixture(params=["anon", "memfd"])
def region_factory(request: pytest.FixtureRequest, kernel: LinuxKernel
                   ) -> Iterator[Callable[[int], Region]]:
    made: list[Region] = []

    def make(npages: int) -> Region:
        length = npages * PAGE
        r = kernel.map_anon(length) if request.param == "anon" else kernel.map_memfd(length)
        made.append(r)
        return r

    yield make
    for r in made:
        kernel.unmap(r)


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def run_until(w: LinuxWorkload, ops: int) -> None:
    wait_until(w.touched, "the touch-all-first pass")

    def enough() -> bool:
        s = w.stats()
        return s.reads + s.writes >= ops

    wait_until(enough, f"{ops} workload ops")
    w.stop()


# ---- stamps ---------------------------------------------------------------------------
@pytest.mark.parametrize("index,version", [(0, 0), (0, 1), (7, 3), (12345, 1 << 40),
                                           ((1 << 32) + 5, 99), (0x51AFD7ED558CCD, 1)])
def test_c_stamp_equals_stamps_py(index: int, version: int) -> None:
    assert stamp_page(index, version) == stamps.page_bytes(index, version)


def test_workload_pages_are_stamps_py_pages(kernel: LinuxKernel,
                                            region_factory: Callable[[int], Region]) -> None:
    r = region_factory(192)
    spec = WorkloadSpec(pattern=Pattern.UNIFORM, threads=3, hot_fraction=0.5,
                        write_fraction=1.0, zero_fraction=0.1, seed=7)
    w = start_workload(kernel, r, spec)
    run_until(w, 3000)
    versions = w.versions()
    zero = w.zero_mask.astype(bool)
    assert zero.sum() == round(0.1 * 192)
    assert (versions[zero] == 0).all() and (versions[~zero] >= 1).all()
    assert versions.max() > 1  # the pattern phase rewrote hot pages
    data = kernel.read_unregistered(r.addr, r.length)
    for p in range(192):
        assert data[p * PAGE:(p + 1) * PAGE] == stamps.page_bytes(p, int(versions[p])), p
    assert w.stats().writes == int(versions.sum())
    rep = w.verify()
    assert (rep.pages, rep.lost_writes, rep.corrupt_pages, rep.poisoned_pages) == (192, 0, 0, 0)


def test_zero_subset_is_deterministic(kernel: LinuxKernel) -> None:
    r = kernel.map_anon(64 * PAGE)
    try:
        spec = WorkloadSpec(threads=1, zero_fraction=0.25, seed=3, ops_per_sec=1)
        masks = []
        for _ in range(2):
            w = start_workload(kernel, r, spec)
            masks.append(w.zero_mask.copy())
            w.stop()
        assert (masks[0] == masks[1]).all() and masks[0].sum() == 16
    finally:
        kernel.unmap(r)


def test_verify_refuses_a_running_workload(kernel: LinuxKernel) -> None:
    r = kernel.map_anon(8 * PAGE)
    try:
        w = start_workload(kernel, r, WorkloadSpec(threads=1, ops_per_sec=10))
        with pytest.raises(RuntimeError, match="stop"):
            w.verify()
        w.stop()
        assert w.verify().pages == 8
    finally:
        kernel.unmap(r)


# ---- patterns -------------------------------------------------------------------------
def counted(kernel: LinuxKernel, r: Region, spec: WorkloadSpec, ops: int) -> LinuxWorkload:
    w = start_workload(kernel, r, spec, count_accesses=True)
    run_until(w, ops)
    return w


def test_uniform_stays_in_hot_set(kernel: LinuxKernel,
                                  region_factory: Callable[[int], Region]) -> None:
    r = region_factory(1000)
    w = counted(kernel, r, WorkloadSpec(pattern=Pattern.UNIFORM, threads=1, hot_fraction=0.1,
                                        touch_all_first=False), 30000)
    c = w.access_counts()
    assert c[100:].sum() == 0
    assert (c[:100] > 0).all()
    assert w.verify().lost_writes == 0


def test_zipf_follows_rank_frequency(kernel: LinuxKernel) -> None:
    r = kernel.map_anon(1000 * PAGE)
    try:
        spec = WorkloadSpec(pattern=Pattern.ZIPF, threads=1, zipf_s=1.1, touch_all_first=False)
        w = counted(kernel, r, spec, 40000)
        assert w.perm is not None
        by_rank = w.access_counts()[w.perm.astype(np.int64)].astype(np.float64)
        share_top100 = by_rank[:100].sum() / by_rank.sum()
        ranks = np.arange(1, 1001, dtype=np.float64) ** -1.1
        expected = ranks[:100].sum() / ranks.sum()
        assert abs(share_top100 - expected) < 0.03, (share_top100, expected)
        assert by_rank[:10].mean() > by_rank[10:100].mean() > by_rank[100:].mean()
        assert by_rank[0] > by_rank[100:].max()
    finally:
        kernel.unmap(r)


def test_shifting_moves_hot_window(kernel: LinuxKernel) -> None:
    npages, hot = 2000, 100  # 20 windows: wrapping around would take 20 periods
    r = kernel.map_anon(npages * PAGE)
    try:
        spec = WorkloadSpec(pattern=Pattern.SHIFTING, threads=1, hot_fraction=hot / npages,
                            shift_period_s=0.5, touch_all_first=False)
        w = start_workload(kernel, r, spec, count_accesses=True)

        def windows() -> np.ndarray:
            return np.flatnonzero(w.access_counts().reshape(-1, hot).sum(axis=1))

        wait_until(lambda: len(windows()) >= 3, "three hot windows")
        w.stop()
        seen = windows()
        assert (seen == np.arange(len(seen))).all(), seen  # consecutive windows from 0
        per_window = w.access_counts().reshape(-1, hot)
        assert (per_window[1] > 0).all()  # a fully served window in between
    finally:
        kernel.unmap(r)


def test_sequential_scans_in_order(kernel: LinuxKernel,
                                   region_factory: Callable[[int], Region]) -> None:
    r = region_factory(101)
    w = start_workload(kernel, r, WorkloadSpec(pattern=Pattern.SEQUENTIAL, threads=2,
                                               touch_all_first=False), count_accesses=True)
    # both threads must have scanned (one may be starved for a while on a busy host)
    wait_until(lambda: bool(w.access_counts().min() >= 2), "two full scans")
    w.stop()
    c = w.access_counts().astype(np.int64)
    for t in range(2):
        mine = c[t::2]
        assert mine.min() >= 1 and mine.max() - mine.min() <= 1
        assert (np.diff(mine) <= 0).all()  # the pages scanned one more time form a prefix
    rep = w.verify()
    assert rep.lost_writes == rep.corrupt_pages == 0


def test_many_writer_threads_keep_versions_exact(kernel: LinuxKernel,
                                                 region_factory: Callable[[int], Region]
                                                 ) -> None:
    # Two threads writing one page would race its read-increment-store of the version
    # and lose increments: every write must show up as exactly one version step.
    r = region_factory(64)
    w = start_workload(kernel, r, WorkloadSpec(pattern=Pattern.UNIFORM, threads=4,
                                               hot_fraction=0.2, write_fraction=0.9))
    run_until(w, 200000)
    assert w.stats().writes == int(w.versions().sum())
    rep = w.verify()
    assert (rep.lost_writes, rep.corrupt_pages, rep.poisoned_pages) == (0, 0, 0), rep


# ---- verify finds damage ----------------------------------------------------------------
def stopped_workload(kernel: LinuxKernel, r: Region) -> LinuxWorkload:
    w = start_workload(kernel, r, WorkloadSpec(pattern=Pattern.UNIFORM, threads=2,
                                               hot_fraction=1.0, write_fraction=1.0,
                                               zero_fraction=0.1, seed=5))
    run_until(w, 500)
    return w


def test_verify_detects_lost_write(kernel: LinuxKernel,
                                   region_factory: Callable[[int], Region]) -> None:
    r = region_factory(64)
    w = stopped_workload(kernel, r)
    v = w.versions()
    written = np.flatnonzero(v)
    p, q = int(written[3]), int(np.flatnonzero(v == 0)[0])
    w.set_version_for_test(p, int(v[p]) + 1)  # a newer write that never reached memory
    w.set_version_for_test(q, 1)  # a zero page whose write was lost
    rep = w.verify()
    assert (rep.lost_writes, rep.corrupt_pages, rep.poisoned_pages) == (2, 0, 0)
    assert rep.bad == sorted([p, q])


def test_verify_detects_corrupt_pages(kernel: LinuxKernel,
                                      region_factory: Callable[[int], Region]) -> None:
    r = region_factory(64)
    w = stopped_workload(kernel, r)
    v = w.versions()
    written = np.flatnonzero(v)
    a, b, c = (int(x) for x in written[[1, 5, 9]])
    z = int(np.flatnonzero(v == 0)[0])
    page_a = kernel.read_unregistered(r.addr + a * PAGE, PAGE)
    acc = kernel.start_access(r.addr + a * PAGE + 3001, AccessKind.WRITE,
                              data=bytes([page_a[3001] ^ 1]))
    assert acc.wait(10).status is AccessStatus.OK
    w.set_version_for_test(b, int(v[b]) - 1)  # memory holds a newer version than recorded
    acc = kernel.start_access(r.addr + c * PAGE, AccessKind.WRITE,  # another page's stamp
                              data=stamps.page_bytes(c + 1, int(v[c])))
    assert acc.wait(10).status is AccessStatus.OK
    acc = kernel.start_access(r.addr + z * PAGE + 100, AccessKind.WRITE, data=b"\x01")
    assert acc.wait(10).status is AccessStatus.OK
    rep = w.verify()
    assert (rep.lost_writes, rep.corrupt_pages, rep.poisoned_pages) == (0, 4, 0), rep
    assert rep.bad == sorted([a, b, c, z])


def test_verify_and_workload_survive_sigbus(kernel: LinuxKernel) -> None:
    r = kernel.map_memfd(64 * PAGE)
    try:
        w = stopped_workload(kernel, r)
        os.ftruncate(r.fd, 48 * PAGE)  # pages 48.. are now beyond EOF: SIGBUS on access
        rep = w.verify()
        assert rep.poisoned_pages == 16 and rep.lost_writes == rep.corrupt_pages == 0
        assert rep.bad == list(range(48, 64))
        w2 = start_workload(kernel, r, WorkloadSpec(pattern=Pattern.SEQUENTIAL, threads=2,
                                                    zero_fraction=0.0))
        wait_until(w2.touched, "the touch-all-first pass")
        wait_until(lambda: w2.stats().sigbus >= 100, "SIGBUS counted in workload threads")
        s = w2.stop()
        assert s.writes > 0 and s.reads > 0
        v2 = w2.versions()
        assert (v2[48:] == 0).all() and (v2[:48] >= 1).all()
    finally:
        kernel.unmap(r)


# ---- single accesses --------------------------------------------------------------------
def test_access_read_write_gup(kernel: LinuxKernel,
                               region_factory: Callable[[int], Region]) -> None:
    r = region_factory(4)
    payload = bytes(range(256)) * 20  # crosses a page boundary
    a = kernel.start_access(r.addr + 100, AccessKind.WRITE, data=payload)
    assert a.wait(10).status is AccessStatus.OK
    assert a.tid > 0 and a.tid != threading.get_native_id()
    rd = kernel.start_access(r.addr + 100, AccessKind.READ, len(payload)).wait(10)
    assert rd.status is AccessStatus.OK and rd.data == payload
    gup = kernel.start_access(r.addr + 100, AccessKind.GUP_READ, len(payload)).wait(10)
    assert gup.status is AccessStatus.OK and gup.data == payload
    big = kernel.start_access(r.addr, AccessKind.GUP_READ, 4 * PAGE).wait(10)
    assert big.data == kernel.read_unregistered(r.addr, 4 * PAGE)


def test_access_beyond_memfd_eof(kernel: LinuxKernel) -> None:
    r = kernel.map_memfd(4 * PAGE)
    try:
        os.ftruncate(r.fd, 2 * PAGE)
        for kind in (AccessKind.READ, AccessKind.WRITE):
            res = kernel.start_access(r.addr + 3 * PAGE, kind, 8).wait(10)
            assert res.status is AccessStatus.SIGBUS and res.data == b""
        res = kernel.start_access(r.addr + 3 * PAGE, AccessKind.GUP_READ, 8).wait(10)
        assert res.status is AccessStatus.ERROR and res.err == errno.EFAULT
        ok = kernel.start_access(r.addr + PAGE, AccessKind.READ, 8).wait(10)
        assert ok.status is AccessStatus.OK and ok.data == bytes(8)
    finally:
        kernel.unmap(r)


@contextlib.contextmanager
def missing_uffd(kernel: LinuxKernel, npages: int, features: int = 0,
                 user_mode_only: bool = False
                 ) -> Iterator[tuple[Region, int, list[Access | LinuxWorkload]]]:
    """An anon region registered MISSING. On the way out the uffd is closed first (which
    lets blocked threads fault normally), workloads in the yielded list are stopped, and
    the region is unmapped only once every access in it has ended: unmapping under a
    running thread would crash the whole test process instead of failing one test."""
    r = kernel.map_anon(npages * PAGE)
    fd = kernel.uffd_open(user_mode_only=user_mode_only)
    started: list[Access | LinuxWorkload] = []
    try:
        kernel.uffd_api(fd, features)
        kernel.uffd_register(fd, r.addr, r.length, uapi.UFFDIO_REGISTER_MODE_MISSING)
        yield r, fd, started
    finally:
        kernel.uffd_close(fd)
        ended = True
        for x in started:
            if isinstance(x, LinuxWorkload):
                x.stop()
            else:
                ended = ended and x.wait(10).status is not AccessStatus.PENDING
        if ended:
            kernel.unmap(r)


def next_fault(kernel: LinuxKernel, fd: int) -> PageFault:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for ev in kernel.uffd_read(fd):
            if isinstance(ev, PageFault):
                return ev
        time.sleep(0.002)
    raise AssertionError("no page fault arrived on the uffd")


@pytest.mark.parametrize("kind", list(AccessKind))
def test_access_blocks_on_missing_fault_until_served(kernel: LinuxKernel,
                                                     kind: AccessKind) -> None:
    with missing_uffd(kernel, 2, uapi.UFFD_FEATURE_THREAD_ID) as (r, fd, started):
        a = kernel.start_access(r.addr + PAGE + 8, kind, 16, b"w" * 16)
        started.append(a)
        ev = next_fault(kernel, fd)
        assert ev.address & ~(PAGE - 1) == r.addr + PAGE and ev.missing
        assert ev.write == (kind is AccessKind.WRITE)
        assert ev.tid == a.tid != 0
        assert a.wait(0.3).status is AccessStatus.PENDING and not a.done()
        content = stamps.page_bytes(1, 1)
        kernel.uffd_copy(fd, r.addr + PAGE, content)
        res = a.wait(10)
        assert res.status is AccessStatus.OK and a.done()
        if kind is AccessKind.WRITE:
            after = content[:8] + b"w" * 16 + content[24:]
            assert kernel.read_unregistered(r.addr + PAGE, PAGE) == after
        else:
            assert res.data == content[8:24]


def test_dropped_blocked_access_is_safe(kernel: LinuxKernel) -> None:
    with missing_uffd(kernel, 1, uapi.UFFD_FEATURE_THREAD_ID) as (r, fd, started):
        a = kernel.start_access(r.addr, AccessKind.READ, PAGE)
        tid = next_fault(kernel, fd).tid
        del a  # the blocked C thread keeps the handle alive
        kernel.uffd_zeropage(fd, r.addr, PAGE)
        b = kernel.start_access(r.addr, AccessKind.READ, 8)
        started.append(b)
        assert b.wait(10).data == bytes(8)
        # the detached thread finishes on its own and frees the handle; unmapping the
        # memory before it is done would crash it, as it would any guest thread
        wait_until(lambda: not os.path.exists(f"/proc/self/task/{tid}"), "accessor exit")


def test_workload_over_registered_region_is_served(kernel: LinuxKernel) -> None:
    """Workload threads block on MISSING faults; a server thread (no GIL in the faulting
    path) fills each page with zeros; verify then sees every write."""
    npages = 128
    stop = threading.Event()
    served = [0]

    def serve(fd: int) -> None:
        while not stop.is_set():
            evs = kernel.uffd_read(fd)
            for ev in evs:
                if isinstance(ev, PageFault):
                    page = ev.address & ~(PAGE - 1)
                    try:
                        kernel.uffd_zeropage(fd, page, PAGE)
                        served[0] += 1
                    except OSError as e:
                        if e.errno != errno.EEXIST:  # another thread's fault raced us
                            raise
            if not evs:
                time.sleep(0.0005)

    with missing_uffd(kernel, npages) as (r, fd, started):
        t = threading.Thread(target=serve, args=(fd,), daemon=True)
        t.start()
        try:
            w = start_workload(kernel, r, WorkloadSpec(pattern=Pattern.UNIFORM, threads=2,
                                                       zero_fraction=0.25))
            started.append(w)
            run_until(w, 2000)
            rep = w.verify()
        finally:
            stop.set()
            t.join(10)
        assert rep.pages == npages and rep.lost_writes == rep.corrupt_pages == 0
        assert served[0] >= npages - round(0.25 * npages)


def test_uffd_poisoned_page(kernel: LinuxKernel) -> None:
    with missing_uffd(kernel, 32, uapi.UFFD_FEATURE_POISON) as (r, fd, started):
        kernel.uffd_unregister(fd, r.addr, r.length)
        w = stopped_workload(kernel, r)
        p = int(np.flatnonzero(w.versions())[4])
        kernel.uffd_register(fd, r.addr, r.length, uapi.UFFDIO_REGISTER_MODE_MISSING)
        kernel.madvise(r.addr + p * PAGE, PAGE, uapi.MADV_DONTNEED)
        kernel.uffd_poison(fd, r.addr + p * PAGE, PAGE)
        accs = [kernel.start_access(r.addr + p * PAGE, kind, 8)
                for kind in (AccessKind.READ, AccessKind.WRITE, AccessKind.GUP_READ)]
        started.extend(accs)
        res = [a.wait(10) for a in accs]
        assert [x.status for x in res] == [AccessStatus.SIGBUS, AccessStatus.SIGBUS,
                                           AccessStatus.ERROR]
        assert res[2].err == errno.EFAULT  # the kernel's own read of the page fails
        rep = w.verify()  # every other page is present: no fault to serve
        assert (rep.poisoned_pages, rep.lost_writes, rep.corrupt_pages) == (1, 0, 0)
        assert rep.bad == [p]


def test_gup_read_on_user_mode_only_uffd_fails_fast(kernel: LinuxKernel) -> None:
    # A USER_MODE_ONLY uffd does not handle kernel-mode faults: write(pipe, addr) gets
    # EFAULT at once, while a user-mode load blocks as usual.
    with missing_uffd(kernel, 1, user_mode_only=True) as (r, fd, started):
        g = kernel.start_access(r.addr, AccessKind.GUP_READ, 8)
        started.append(g)
        gup = g.wait(10)
        assert gup.status is AccessStatus.ERROR and gup.err == errno.EFAULT
        rd = kernel.start_access(r.addr, AccessKind.READ, 8)
        started.append(rd)
        assert next_fault(kernel, fd).address == r.addr
        kernel.uffd_zeropage(fd, r.addr, PAGE)
        assert rd.wait(10).data == bytes(8)


# ---- SIGBUS handler chaining ----------------------------------------------------------
_CHILD = """
import ctypes, faulthandler, os, sys
from vmm_tierd.kernel.api import AccessKind, AccessStatus
from vmm_tierd.kernel.linux import LinuxKernel
k = LinuxKernel()
r = k.map_memfd(2 * 4096)
os.ftruncate(r.fd, 4096)
def probe():
    res = k.start_access(r.addr + 4096, AccessKind.READ, 8).wait(10)
    assert res.status is AccessStatus.SIGBUS, res
probe()
if sys.argv[1] != "crash-plain":
    faulthandler.enable()  # saves ours as its previous handler; the next access puts ours
    probe()                # back, chained to faulthandler's
print("caught", flush=True)
if sys.argv[1].startswith("crash"):
    ctypes.string_at(r.addr + 4096, 8)  # unarmed thread: the previous handler must run
print("survived", flush=True)
"""


@pytest.mark.parametrize("mode", ["ok", "crash", "crash-plain"])
def test_unarmed_sigbus_reaches_previous_handler(mode: str) -> None:
    p = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True,
                       timeout=60)
    assert "caught" in p.stdout, p.stderr
    if mode == "ok":
        assert p.returncode == 0 and "survived" in p.stdout, p.stderr
    else:
        assert p.returncode == -signal.SIGBUS and "survived" not in p.stdout
        # faulthandler's traceback, once: the chain worked and did not loop
        assert p.stderr.count("Bus error") == (1 if mode == "crash" else 0), p.stderr
