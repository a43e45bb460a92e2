"""LinuxProcess on a real process: tests/remote/target.c, a stand-in VMM with memfd RAM,
"CPU n/KVM" threads, and threads parked in restartable syscalls (see its header).

Needs root (ptrace, pidfd_getfd). Every wait is bounded; a hang dumps tracebacks."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.remote.helpers import (
    CLOCK_MONOTONIC,
    NR_CLOCK_NANOSLEEP,
    NR_FUTEX,
    NR_PPOLL,
    NR_READ,
    NR_RECVFROM,
    PS,
    RemotePage,
)
from tests.remote.target import Target, pattern
from vmm_tierd.kernel.api import AccessKind, AccessStatus, KernelError, Owner
from vmm_tierd.kernel.linux import LinuxKernel
from vmm_tierd.kernel.linux_process import LinuxProcess, parse_stat
from vmm_tierd.kernel.process import (
    SYS_GETPID,
    InjectError,
    InjectResult,
    Process,
    Syscall,
    is_vcpu_thread,
)

GETPID = Syscall(SYS_GETPID)


# ---- /proc parsing ----------------------------------------------------------------------
def _stat_line(pid: int, comm: str, start: int) -> str:
    # fields 3..21 then 22 = start_time, then the rest (as the kernel prints them)
    mid = "S 1 2 3 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 7 0".split()
    return f"{pid} ({comm}) {' '.join(mid)} {start} 12345 678 " + "0 " * 30 + "\n"


@pytest.mark.parametrize("comm", ["target", "a) (b", ") 1 2 3 (", "x y z", "(((", "))",
                                  "", "CPU 0/KVM", "S 1 2) 9"])
def test_parse_stat_comm_with_spaces_and_parens(comm: str) -> None:
    assert parse_stat(_stat_line(4242, comm, 987654)) == (comm, 987654)


@given(comm=st.text(st.characters(blacklist_characters="\x00"), max_size=15),
       start=st.integers(0, 2**63))
def test_parse_stat_any_comm(comm: str, start: int) -> None:
    assert parse_stat(_stat_line(7, comm, start)) == (comm, start)


def test_parse_stat_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="comm"):
        parse_stat("1234 no parens here")
    with pytest.raises(ValueError, match="fields"):
        parse_stat("1234 (x) S 1 2")


def test_owner_start_time_and_tricky_comm(lk: LinuxKernel, target: Target) -> None:
    with open(f"/proc/{target.pid}/stat") as f:  # plain comm: naive split is right here
        start = int(f.read().split()[21])
    p = lk.open_process(target.pid)
    assert isinstance(p, Process)
    assert p.owner == Owner(target.pid, start)
    p.close()
    tricky = "a) (b c) 1 2 ("
    target.set_comm(target.pid, tricky)
    p = lk.open_process(target.pid)
    try:
        assert isinstance(p, LinuxProcess)
        assert (p.comm, p.owner) == (tricky, Owner(target.pid, start))
        assert {t.tid: t.comm for t in p.threads()}[target.pid] == tricky
        assert p.alive()
    finally:
        p.close()


# ---- maps, fds, threads, getfd ------------------------------------------------------------
@pytest.mark.parametrize("name", ["memory-backend-memfd", "ram (node 0) x"])
def test_maps_fds_threads(lk: LinuxKernel, name: str) -> None:
    with Target.start(1 << 20, vcpus=3, name=name) as t:
        p = lk.open_process(t.pid)
        try:
            ram = [m for m in p.maps() if m.start == t.ram_addr]
            assert len(ram) == 1
            m = ram[0]
            assert (m.length, m.perms, m.shared, m.offset) == (1 << 20, "rw-s", True, 0)
            assert m.path == f"/memfd:{name} (deleted)"
            assert any(x.path == "[vdso]" for x in p.maps())
            fds = {f.fd: f for f in p.fds()}
            assert fds[t.ram_fd].memfd_name == name
            assert fds[t.ram_fd].inode == m.inode
            assert [f.fd for f in fds.values() if f.memfd_name is not None] == [t.ram_fd]
            assert not any(f.is_uffd for f in fds.values())
            threads = {th.tid: th.comm for th in p.threads()}
            assert set(threads) == {t.pid, *t.vcpu_tids, *t.workers.values()}
            assert [threads[tid] for tid in t.vcpu_tids] == ["CPU 0/KVM", "CPU 1/KVM",
                                                              "CPU 2/KVM"]
            assert {tid for tid, c in threads.items() if is_vcpu_thread(c)} == set(t.vcpu_tids)
        finally:
            p.close()


def test_getfd_of_the_memfd(target: Target, proc: LinuxProcess) -> None:
    fd = proc.getfd(target.ram_fd)
    try:
        assert fd != target.ram_fd or os.getpid() != target.pid
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        ino = next(m.inode for m in proc.maps() if m.start == target.ram_addr)
        assert os.fstat(fd).st_ino == ino
        assert os.pread(fd, PS, 5 * PS) == pattern(5)
    finally:
        os.close(fd)
    with pytest.raises(KernelError) as ei:
        proc.getfd(999)
    assert (ei.value.op, ei.value.errno) == ("pidfd_getfd", errno.EBADF)


def test_uffd_features_of_a_non_uffd(target: Target, proc: LinuxProcess) -> None:
    for fd in (target.ram_fd, 999):
        with pytest.raises(KernelError) as ei:
            proc.uffd_features(fd)
        assert (ei.value.op, ei.value.errno) == ("fdinfo", errno.EBADF)


def test_read_and_write_memory(target: Target, proc: LinuxProcess) -> None:
    assert proc.read_memory(target.ram_addr + 7 * PS, PS) == pattern(7)
    proc.write_memory(target.anon_addr + PS + 8, b"written from outside")
    r = target.start_access(target.anon_addr + PS, AccessKind.READ, 32).wait(10)
    assert r.data == pattern(1, 8) + b"written from outside" + pattern(1, 4, 28)
    with pytest.raises(KernelError) as ei:
        proc.read_memory(0x1000, 16)  # below mmap_min_addr: never mapped
    assert (ei.value.op, ei.value.errno, ei.value.done) == ("process_vm_readv", errno.EFAULT, 0)


# ---- injection ------------------------------------------------------------------------------
def test_inject_getpid_into_main_thread(target: Target, proc: LinuxProcess) -> None:
    target.wait_in_syscall(target.pid, NR_PPOLL)
    r = proc.inject(target.pid, [GETPID, GETPID, Syscall(110)])  # getppid
    assert isinstance(r, InjectResult)
    assert r.tid == target.pid
    assert r.results == (target.pid, target.pid, os.getpid())
    assert r.signals == ()
    assert r.pause_s > 0
    target.ping()


def test_inject_raw_errno_and_no_calls(target: Target, proc: LinuxProcess) -> None:
    r = proc.inject(target.pid, [Syscall(3, (123456,)), Syscall(1999)])  # close; no such nr
    assert r.results == (-errno.EBADF, -errno.ENOSYS)
    assert proc.inject(target.pid, []).results == ()
    target.ping()


def test_inject_refuses_foreign_tid_and_bad_calls(target: Target, proc: LinuxProcess) -> None:
    with pytest.raises(InjectError) as ei:
        proc.inject(os.getpid(), [GETPID])
    assert (ei.value.op, ei.value.errno) == ("ptrace(SEIZE)", errno.ESRCH)
    assert "not a thread of" in str(ei.value)
    with pytest.raises(ValueError, match="6 arguments"):
        proc.inject(target.pid, [Syscall(39, (1, 2, 3, 4, 5, 6, 7))])
    with pytest.raises(ValueError, match="64-bit"):
        proc.inject(target.pid, [Syscall(39, (1 << 64,))])


def test_main_thread_keeps_answering_after_many_injections(target: Target,
                                                           proc: LinuxProcess) -> None:
    for i in range(300):
        assert proc.inject(target.pid, [GETPID]).results == (target.pid,)
        if i % 25 == 0:
            target.ping()
    target.ping()
    assert target.sigusr1_count() == 0


@pytest.mark.parametrize("where", ["ppoll", "futex", "nanosleep", "recvfrom", "read"])
def test_interrupted_syscall_restarts_after_detach(target: Target, proc: LinuxProcess,
                                                   where: str) -> None:
    """The thread is blocked in the syscall when it is stopped; after detach the syscall
    goes on as if nothing happened (restart with the restored orig_rax/rax)."""
    calls = [GETPID] * 3
    if where == "ppoll":
        target.wait_in_syscall(target.pid, NR_PPOLL)
        assert proc.inject(target.pid, calls).results == (target.pid,) * 3
        target.ping()
    elif where == "futex":
        target.wait_in_syscall(target.workers["futex"], NR_FUTEX)
        proc.inject(target.workers["futex"], calls)
        assert target.futex_wake() == (0, 0, 0)  # woken by the wake, not before
    elif where == "nanosleep":
        ms = 500
        pend = target.start_sleep(ms)
        target.wait_in_syscall(target.workers["sleep"], NR_CLOCK_NANOSLEEP)
        proc.inject(target.workers["sleep"], calls)
        ret, err, elapsed_ns = (int(x) for x in pend.wait()[1:])
        assert (ret, err) == (0, 0)
        assert elapsed_ns >= ms * 1_000_000  # restarted for the rest, not returned early
    elif where == "recvfrom":
        target.wait_in_syscall(target.workers["recv"], NR_RECVFROM)
        proc.inject(target.workers["recv"], calls)
        n, e, data = target.start_recv(b"after injection").wait()[1:]
        assert (int(n), int(e), bytes.fromhex(data)) == (15, 0, b"after injection")
    else:
        target.wait_in_syscall(target.workers["sleep"], NR_READ)
        proc.inject(target.workers["sleep"], calls)
        assert target.start_sleep(1).wait()[1:3] == ["0", "0"]
    target.ping()


def test_signal_during_injection_redelivered_once(target: Target, proc: LinuxProcess) -> None:
    page = RemotePage(proc, target.pid)
    ts = page.put("<qq", 0, 400_000_000)
    out: list[InjectResult | BaseException] = []

    def run() -> None:
        try:
            out.append(proc.inject(target.pid, [Syscall(NR_CLOCK_NANOSLEEP,
                                                        (CLOCK_MONOTONIC, 0, ts, 0))]))
        except BaseException as e:
            out.append(e)

    th = threading.Thread(target=run)
    th.start()
    # 230 in the main thread can only be the injected sleep (it otherwise sits in ppoll).
    target.wait_in_syscall(target.pid, NR_CLOCK_NANOSLEEP)
    os.kill(target.pid, signal.SIGUSR1)  # only the main thread does not block it
    th.join(10)
    assert len(out) == 1 and isinstance(out[0], InjectResult), out
    assert out[0].results == (0,)
    assert out[0].signals == (signal.SIGUSR1,)
    target.ping()
    assert target.sigusr1_count() == 1
    page.close()
    target.ping()


def test_injections_under_a_signal_storm(target: Target, proc: LinuxProcess) -> None:
    """Signals arriving at any point of a stop (before the interrupt's stop, between
    steps, during a call) are held back and re-delivered; none may be turned into a
    crash or a wrong result. Standard signals coalesce, so only bounds are checked."""
    stop = threading.Event()
    sent = 0

    def storm() -> None:
        nonlocal sent
        while not stop.is_set():
            os.kill(target.pid, signal.SIGUSR1)
            sent += 1
            stop.wait(0.0002)

    th = threading.Thread(target=storm)
    th.start()
    held = 0
    try:
        for _ in range(300):
            r = proc.inject(target.pid, [GETPID, GETPID])
            assert r.results == (target.pid, target.pid)
            assert set(r.signals) <= {signal.SIGUSR1}
            held += len(r.signals)
    finally:
        stop.set()
        th.join()
    target.ping()
    assert 1 <= target.sigusr1_count() <= sent
    assert held <= sent


def test_target_killed_during_injection(lk: LinuxKernel) -> None:
    t = Target.start(1 << 20)
    p = lk.open_process(t.pid)
    try:
        page = RemotePage(p, t.pid)
        ts = page.put("<qq", 30, 0)
        err: list[BaseException] = []

        def run() -> None:
            try:
                p.inject(t.pid, [Syscall(NR_CLOCK_NANOSLEEP, (CLOCK_MONOTONIC, 0, ts, 0))])
            except BaseException as e:
                err.append(e)

        th = threading.Thread(target=run)
        th.start()
        t.wait_in_syscall(t.pid, NR_CLOCK_NANOSLEEP)
        t.kill()
        th.join(10)
        assert not th.is_alive()
        assert len(err) == 1 and isinstance(err[0], InjectError), err
        assert err[0].errno == errno.ESRCH and not err[0].restored
    finally:
        t.close()  # reaped: the injection reaped the traced thread's exit, not hung on it
        p.close()


# ---- a dead process ---------------------------------------------------------------------------
@pytest.mark.parametrize("state", ["zombie", "reaped"])
def test_dead_process_raises_esrch(lk: LinuxKernel, state: str) -> None:
    t = Target.start(1 << 20)
    p = lk.open_process(t.pid)
    ram_fd, ram = t.ram_fd, t.ram_addr
    try:
        if state == "zombie":
            t.kill()
            os.waitid(os.P_PID, t.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        else:
            t.close()
        assert not p.alive()
        ops = {
            "maps": p.maps, "fds": p.fds, "threads": p.threads,
            "getfd": lambda: p.getfd(ram_fd), "uffd_features": lambda: p.uffd_features(ram_fd),
            "read_memory": lambda: p.read_memory(ram, 8),
            "write_memory": lambda: p.write_memory(ram, b"x"),
            "inject": lambda: p.inject(t.pid, [GETPID]),
            "pagemap_scan": lambda: p.pagemap_scan(ram, ram + PS),
        }
        for name, fn in ops.items():
            with pytest.raises(KernelError) as ei:
                fn()
            assert ei.value.errno == errno.ESRCH, (name, str(ei.value))
    finally:
        t.close()
        p.close()
    with pytest.raises(KernelError) as ei:
        lk.open_process(t.pid)
    assert (ei.value.op, ei.value.errno) == ("pidfd_open", errno.ESRCH)


def test_open_a_thread_id_is_refused(lk: LinuxKernel, target: Target) -> None:
    with pytest.raises(KernelError) as ei:
        lk.open_process(target.vcpu_tids[0])
    # ENOENT on 6.18, EINVAL on older kernels
    assert ei.value.op == "pidfd_open" and ei.value.errno in (errno.ENOENT, errno.EINVAL)
    assert f"is a thread of process {target.pid}" in str(ei.value)


def test_access_results_come_from_a_vcpu(target: Target) -> None:
    a = target.start_access(target.ram_addr + 3 * PS, AccessKind.GUP_READ, 16)
    r = a.wait(10)
    assert (r.status, r.data) == (AccessStatus.OK, pattern(3, 16))
    assert a.tid in target.vcpu_tids


def test_inject_into_an_already_traced_thread(lk: LinuxKernel, target: Target) -> None:
    """A second tracer is refused (EPERM), and the first one's injection is unharmed."""
    code = ("import sys; from vmm_tierd.kernel.linux import LinuxKernel;"
            "from vmm_tierd.kernel.process import Syscall;"
            "p = LinuxKernel().open_process(int(sys.argv[1]));"
            "print(p.inject(int(sys.argv[2]), [Syscall(35, (int(sys.argv[3]), 0))]).results)")
    page = None
    p = lk.open_process(target.pid)
    try:
        page = RemotePage(p, target.pid)
        ts = page.put("<qq", 1, 0)  # another process injects nanosleep(35) of 1 s
        other = subprocess.Popen([sys.executable, "-c", code, str(target.pid),
                                  str(target.workers["futex"]), str(ts)],
                                 stdout=subprocess.PIPE, text=True)
        target.wait_in_syscall(target.workers["futex"], 35)
        with pytest.raises(InjectError) as ei:
            p.inject(target.workers["futex"], [GETPID])
        assert (ei.value.op, ei.value.errno) == ("ptrace(SEIZE)", errno.EPERM)
        assert f"already traced by pid {other.pid}" in str(ei.value)
        out, _ = other.communicate(timeout=10)
        assert out.strip() == "(0,)"
        assert target.futex_wake() == (0, 0, 0)
    finally:
        if page:
            page.close()
        p.close()
