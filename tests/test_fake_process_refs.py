"""The fake process model, continued: fault injection of the cross-process ops, a
workload in a VMM tiered from this process, no leaked fds, and a hypothesis state
machine of a uffd's references across the VMM and this process (getfd copies, closes
on either side, this side's crash, the VMM's exit) with a fault in flight."""

from __future__ import annotations

import errno
import os
import select
import threading
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vmm_tierd.kernel import uapi as U
from vmm_tierd.kernel.api import (
    Access,
    AccessKind,
    AccessStatus,
    KernelError,
    MemType,
    Owner,
    PageFault,
    Region,
    RemoveEvent,
    WorkloadSpec,
)
from vmm_tierd.kernel.fake import FakeKernel
from vmm_tierd.kernel.fake_state import Uffd
from vmm_tierd.kernel.process import (
    SYS_CLOSE,
    SYS_GETPID,
    SYS_MADVISE,
    SYS_PIDFD_OPEN,
    SYS_PROCESS_MADVISE,
    SYS_USERFAULTFD,
    Syscall,
)

from .test_fake_process import MISSING, PS, attach, call, err_of, page

NPAGES = 8


@pytest.fixture
def k() -> Iterator[FakeKernel]:
    kern = FakeKernel()
    yield kern
    kern.close()


# ---- fault injection ---------------------------------------------------------------------
def test_fault_injection_of_each_op(k: FakeKernel) -> None:
    vmm = k.spawn_process(NPAGES * PS)
    p, vfd, _ufd = attach(k, vmm)
    a = vmm.ram_addr
    raising: dict[str, Callable[[], object]] = {
        "pidfd_open": lambda: k.open_process(vmm.pid),
        "pidfd_getfd": lambda: p.getfd(vfd),
        "ptrace(SEIZE)": lambda: p.inject(vmm.pid, [Syscall(SYS_GETPID)]),
        "process_vm_readv": lambda: p.read_memory(a, 1),
        "process_vm_writev": lambda: p.write_memory(a, b"x"),
        "PAGEMAP_SCAN": lambda: p.pagemap_scan(a, a + PS),
        "/proc/PID/maps": p.maps, "/proc/PID/fd": p.fds, "/proc/PID/task": p.threads,
        "/proc/PID/fdinfo": lambda: p.uffd_features(vfd),
    }
    for op, fn in raising.items():
        k.inject(op, errno.EPERM)
        assert err_of(fn) == (op, errno.EPERM, 0), op
        fn()  # count=1: the next call works
    # an injected syscall fails with its raw result, the ptrace stop itself works
    k.inject("userfaultfd(injected)", errno.EMFILE)
    assert call(p, SYS_USERFAULTFD, U.O_NONBLOCK) == -errno.EMFILE
    fd = k.uffd_open()  # this process's own userfaultfd() is another op
    k.uffd_close(fd)
    me = call(p, SYS_PIDFD_OPEN, vmm.pid, 0)
    k.inject("process_madvise", errno.ENOMEM)  # the plain name hits the injected call
    assert call(p, SYS_PROCESS_MADVISE, me, a, 0, U.MADV_DONTNEED, 0) == -errno.ENOMEM
    assert call(p, SYS_PROCESS_MADVISE, me, a, 0, U.MADV_DONTNEED, 0) == 0
    assert k.calls["process_madvise(injected)"] == 2
    # count and after: the second getfd fails, the first and third work
    k.inject("pidfd_getfd", errno.EMFILE, count=1, after=1)
    k.uffd_close(p.getfd(vfd))
    assert err_of(lambda: p.getfd(vfd))[1] == errno.EMFILE
    k.uffd_close(p.getfd(vfd))


def test_injected_dontneed_raises_remove_and_waits_for_it(k: FakeKernel) -> None:
    """An injected madvise(DONTNEED) on registered RAM queues REMOVE on the uffd (read
    here, through the copy) and the injected thread stays stopped until it is read."""
    vmm = k.spawn_process(NPAGES * PS)
    p, _vfd, ufd = attach(k, vmm, U.UFFD_FEATURE_MISSING_SHMEM | U.UFFD_FEATURE_EVENT_REMOVE)
    k.uffd_register(ufd, vmm.ram_addr, NPAGES * PS, MISSING)
    res: list[int] = []
    t = threading.Thread(target=lambda: res.append(
        call(p, SYS_MADVISE, vmm.ram_addr + PS, 2 * PS, U.MADV_DONTNEED)), daemon=True)
    t.start()
    assert select.select([ufd], [], [], 5)[0]
    assert not res, "the injected madvise returned before its REMOVE event was read"
    assert k.uffd_read(ufd) == [RemoveEvent(vmm.ram_addr + PS, vmm.ram_addr + 3 * PS)]
    t.join(5)
    assert res == [0]


# ---- a workload in the VMM, tiered from here ----------------------------------------------
def test_workload_in_vmm_evicted_and_served_from_here(k: FakeKernel) -> None:
    n = 64
    vmm = k.spawn_process(n * PS, vcpus=2)
    p, _vfd, ufd = attach(k, vmm)
    mfd = p.getfd(vmm.ram_fd)
    region = Region(vmm.ram_addr, n * PS, MemType.MEMFD, fd=mfd, owner=p.owner,
                    owner_fd=vmm.ram_fd)
    with pytest.raises(ValueError, match="not a running process"):
        k.start_workload(Region(vmm.ram_addr, PS, MemType.MEMFD,
                                owner=Owner(vmm.pid, vmm.start_time + 1)), WorkloadSpec())
    wl = k.start_workload(region, WorkloadSpec(threads=2, zero_fraction=0.0, seed=3))
    with pytest.raises(ValueError, match="belongs to"):
        vmm.start_workload(Region(vmm.ram_addr, PS, MemType.MEMFD), WorkloadSpec())
    while not wl.touched():
        threading.Event().wait(0.01)
    wl.stop()
    assert k.file_data_runs(mfd, 0, n * PS).tolist() == [[0, n * PS]]
    k.uffd_register(ufd, vmm.ram_addr, n * PS, MISSING)
    saved = k.pread(mfd, 0, n * PS)
    k.punch_hole(mfd, 0, n * PS)
    reports = []
    t = threading.Thread(target=lambda: reports.append(wl.verify()), daemon=True)
    t.start()
    tids = set()
    while t.is_alive():
        if select.select([ufd], [], [], 0.05)[0]:
            for f in k.uffd_read(ufd):
                assert isinstance(f, PageFault) and f.missing
                tids.add(f.tid)
                off = f.address - vmm.ram_addr
                k.uffd_copy(ufd, f.address, saved[off:off + PS])
    (rep,) = reports
    assert (rep.pages, rep.lost_writes, rep.corrupt_pages, rep.poisoned_pages) == (n, 0, 0, 0)
    assert tids and tids <= set(vmm.vcpu_tids)


# ---- no fd leaks ---------------------------------------------------------------------------
def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_everything_is_closed() -> None:
    before = _open_fds()
    k = FakeKernel()
    vmm = k.spawn_process(NPAGES * PS)
    p, vfd, _ufd = attach(k, vmm)
    p.getfd(vmm.ram_fd)
    p.getfd(vfd)
    k.spawn_process(PS)
    k.open_process(vmm.pid)
    assert _open_fds() > before
    k.crash()
    k.open_process(vmm.pid).getfd(vfd)
    k.close()
    assert _open_fds() == before


# ---- references across processes: a state machine -----------------------------------------
class UffdRefs(RuleBasedStateMachine):
    """A uffd made inside a VMM, its RAM registered MISSING and page 0 evicted (a hole
    whose content lives here). Model: does the VMM hold its fd, which copies this side
    holds, is a VMM access of the hole in flight (and was its fault read). The context
    lives iff some fd refers to it; while it lives the access waits for this side."""

    def __init__(self) -> None:
        super().__init__()
        self.k = FakeKernel()
        self.vmm = self.k.spawn_process(NPAGES * PS)
        self.p, self.vfd, ufd = attach(self.k, self.vmm)
        self.u: Uffd = self.k.uffds[ufd]
        self.mine = {ufd}
        self.vmm_ref = True
        self.k.uffd_register(ufd, self.vmm.ram_addr, NPAGES * PS, MISSING)
        self.access: Access | None = None
        self.fault_read = False
        self.exited = False

    def _check_release(self) -> None:
        if self.access is not None and not self.mine and not self.vmm_ref:
            r = self.access.wait(5)  # released: the blocked fault completes
            want = (AccessStatus.ERROR if self.exited else AccessStatus.OK)
            assert r.status is want, r
            if not self.exited:
                assert r.data == bytes(PS)  # the hole reads as zeros
            self.access = None

    @precondition(lambda self: not self.exited)
    @rule()
    def getfd(self) -> None:
        if self.vmm_ref:
            self.mine.add(self.p.getfd(self.vfd))
        else:
            assert err_of(lambda: self.p.getfd(self.vfd))[1] == errno.EBADF

    @precondition(lambda self: self.mine)
    @rule(data=st.data())
    def close_mine(self, data: st.DataObject) -> None:
        fd = data.draw(st.sampled_from(sorted(self.mine)))
        self.mine.remove(fd)
        self.k.uffd_close(fd)
        self._check_release()

    @precondition(lambda self: self.vmm_ref and not self.exited)
    @rule()
    def vmm_closes(self) -> None:
        assert call(self.p, SYS_CLOSE, self.vfd) == 0
        self.vmm_ref = False
        self._check_release()

    @rule()
    def crash(self) -> None:
        self.k.crash()
        self.mine.clear()
        self._check_release()
        if not self.exited:
            self.p = self.k.open_process(self.vmm.pid)

    @precondition(lambda self: not self.exited)
    @rule()
    def vmm_exits(self) -> None:
        self.vmm.exit()
        self.exited = True
        self.vmm_ref = False
        if self.access is not None:
            r = self.access.wait(5)
            assert (r.status, r.err) == (AccessStatus.ERROR, errno.ESRCH)
            self.access = None
        self._check_release()

    @precondition(lambda self: self.access is None and not self.exited)
    @rule()
    def touch_hole(self) -> None:
        self.access = self.vmm.start_access(self.vmm.ram_addr, AccessKind.READ, PS)
        self.fault_read = False
        if self.u.released:
            r = self.access.wait(5)
            assert r.status is AccessStatus.OK and r.data == bytes(PS)
            self.access = None

    @precondition(lambda self: self.access is not None and self.mine)
    @rule()
    def serve(self) -> None:
        fd = min(self.mine)
        assert self.access is not None
        if not self.fault_read:  # delivered to whichever copy reads first
            assert select.select([fd], [], [], 5)[0]
            msgs = self.k.uffd_read(fd)
            assert [m.address for m in msgs if isinstance(m, PageFault)] == [
                self.vmm.ram_addr]
            self.fault_read = True
        self.k.uffd_copy(fd, self.vmm.ram_addr, page(0))
        r = self.access.wait(5)
        assert r.status is AccessStatus.OK and r.data == page(0)
        self.access = None
        mfd = self.p.getfd(self.vmm.ram_fd)
        self.k.punch_hole(mfd, 0, PS)  # evicted again
        os.close(mfd)

    @invariant()
    def refs(self) -> None:
        want = len(self.mine) + self.vmm_ref
        assert self.u.released is (want == 0)
        assert self.u.refs == want
        assert {fd for fd, u in self.k.uffds.items() if u is self.u} == self.mine
        if self.access is not None:
            assert not self.access.done(), "a fault completed with no one serving it"

    def teardown(self) -> None:
        self.k.close()
        if self.access is not None:
            assert self.access.wait(5).status is not AccessStatus.PENDING


TestUffdRefs = UffdRefs.TestCase
TestUffdRefs.settings = settings(max_examples=40, stateful_step_count=15, deadline=None,
                                 suppress_health_check=[HealthCheck.too_slow])


def test_crash_closes_memfd_copies_behind_os_close(k: FakeKernel) -> None:
    """An fd closed with os.close and its number reused is not taken for the memfd."""
    vmm = k.spawn_process(PS)
    p = k.open_process(vmm.pid)
    mfd = p.getfd(vmm.ram_fd)
    os.close(mfd)
    other = os.open("/dev/null", os.O_RDONLY)
    try:
        assert other == mfd
        assert err_of(lambda: k.pread(mfd, 0, 1))[1] == errno.EBADF
    finally:
        os.close(other)
    with pytest.raises(KernelError):
        k.punch_hole(mfd, 0, PS)
