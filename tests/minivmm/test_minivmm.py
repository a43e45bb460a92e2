"""minivmm on the running kernel: a KVM guest writes and verifies its RAM (a memfd), the
host can see and corrupt that RAM, and the VMM looks like QEMU from outside (memfd name,
thread names, main thread in ppoll) and survives a ptrace stop of its main thread.

Host-side tests: KVM here is nested (kvm_pvm) and emulates the payload, about 0.5 µs per
guest instruction, so most use a short stamp (``fill_dwords``) and a small RAM.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from vmm_tierd.kernel.process import ThreadInfo, is_vcpu_thread, pick_inject_thread

from .driver import FULL_FILL, PAGE, MiniVmm, MiniVmmError, build, expected_pages, kvm_unavailable

_why = kvm_unavailable()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"no usable KVM: {_why}")

SYS_PPOLL = 271
PTRACE_DETACH, PTRACE_SEIZE, PTRACE_INTERRUPT = 17, 0x4206, 0x4207
PTRACE_EVENT_STOP = 128
WALL = 0x40000000
PF_USER_WORKER = 0x4000


@pytest.fixture(autouse=True)
def _hang_guard() -> Iterator[None]:
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def binary() -> Path:
    return build()


@pytest.fixture
def vmm(binary: Path) -> Iterator[MiniVmm]:
    v = MiniVmm.start(16, fill_dwords=14, binary=binary)
    yield v
    v.close()


def memfd_pages(vmm: MiniVmm, first: int, count: int) -> np.ndarray:
    fd = vmm.open_memfd(os.O_RDONLY)
    try:
        data = os.pread(fd, count * PAGE, first * PAGE)
    finally:
        os.close(fd)
    assert len(data) == count * PAGE
    return np.frombuffer(data, dtype="<u4").reshape(count, PAGE // 4)


def user_worker(pid: int, tid: int) -> bool:
    """A kernel worker thread in a user process's thread group (PF_USER_WORKER)."""
    stat_line = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    return bool(int(stat_line.rsplit(")", 1)[1].split()[6]) & PF_USER_WORKER)


def threads(pid: int) -> list[ThreadInfo]:
    out = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
        comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().rstrip("\n")
        out.append(ThreadInfo(int(tid), comm))
    return out


def test_looks_like_qemu_from_outside(vmm: MiniVmm) -> None:
    r = vmm.ready
    assert r.pid == vmm.pid and r.ram == 16 << 20
    assert os.readlink(f"/proc/{vmm.pid}/fd/{r.memfd}") == "/memfd:memory-backend-memfd (deleted)"
    maps = Path(f"/proc/{vmm.pid}/maps").read_text().splitlines()
    ram = [m for m in maps if m.startswith(f"{r.hva:x}-")]
    assert len(ram) == 1, maps
    span, perms = ram[0].split()[:2]
    start, end = (int(x, 16) for x in span.split("-"))
    assert (end - start, perms) == (r.ram, "rw-s")
    assert ram[0].endswith("/memfd:memory-backend-memfd (deleted)")
    vmm.write(1, vmm.data_pages.start, 1)     # the vCPU has run: KVM's workers exist
    ts = threads(vmm.pid)
    ours = [t for t in ts if not user_worker(vmm.pid, t.tid)]
    assert sorted(t.comm for t in ours) == ["CPU 0/KVM", "minivmm"]
    # KVM adds kernel workers to the thread group (6.18: "kvm-nx-lpage-re", the NX huge
    # page recovery task): PF_USER_WORKER, neither a vCPU nor a thread to inject into.
    assert all(t.comm.startswith("kvm-") for t in ts if t not in ours), ts
    assert [is_vcpu_thread(t.comm) for t in ts] == [t.comm == "CPU 0/KVM" for t in ts]
    assert pick_inject_thread(vmm.pid, ts) == vmm.pid
    off, length = vmm.data_range
    assert (off, off + length) == (16 * PAGE, r.ram)


def test_write_then_verify_and_host_sees_the_stamps(vmm: MiniVmm) -> None:
    pages = vmm.data_pages
    w = vmm.write(1)
    assert w.pages == len(pages)
    assert vmm.verify() == (len(pages), 0)
    # The host reads exactly what the Python reference says the guest wrote.
    got = memfd_pages(vmm, pages.start, len(pages))
    assert np.array_equal(got, expected_pages(pages.start, len(pages), 1, 14))
    # The verifier can fail: every page is wrong for another version.
    r = vmm.verify_report(2)
    assert (r.pages, r.bad, r.first_bad) == (len(pages), len(pages), pages.start)
    # Rewrite a sub-range: exactly those pages change version.
    vmm.write(2, pages.start + 100, 50)
    r = vmm.verify_report(1)
    assert (r.bad, r.first_bad) == (50, pages.start + 100)
    assert vmm.verify(2, pages.start + 100, 50) == (50, 0)


def test_negative_control_host_flips_bytes_in_one_page(binary: Path) -> None:
    # Full-page stamps, so a byte flipped anywhere in the page is caught.
    with MiniVmm.start(2, fill_dwords=FULL_FILL, binary=binary) as vmm:
        pages = vmm.data_pages
        vmm.write(3)
        assert vmm.verify() == (len(pages), 0)
        victim = pages.start + len(pages) // 3
        fd = vmm.open_memfd()
        try:
            for offset in (0, 4, 8, 2049, PAGE - 1):   # page word, version, fill, last byte
                pos = victim * PAGE + offset
                orig = os.pread(fd, 1, pos)
                assert os.pwrite(fd, bytes([orig[0] ^ 0x5A]), pos) == 1
                r = vmm.verify_report()
                assert (r.pages, r.bad, r.first_bad) == (len(pages), 1, victim), offset
                assert os.pwrite(fd, orig, pos) == 1
                assert vmm.verify() == (len(pages), 0)
        finally:
            os.close(fd)


def test_hot_touches(vmm: MiniVmm) -> None:
    first = vmm.data_pages.start
    vmm.write(5, first, 200)
    t = vmm.touch_hot(first, 200, rounds=4, write=True)
    assert (t.pages, t.touches, t.bad) == (200, 800, 0)
    assert vmm.verify(5, first, 200) == (200, 0)       # a write touch keeps the content
    # The touch check can fail: pages never written do not hold their page number.
    t = vmm.touch_hot(first + 200, 10, rounds=3)
    assert (t.touches, t.bad) == (30, 30)


def test_bad_commands_are_refused_and_nothing_runs(vmm: MiniVmm) -> None:
    first = vmm.data_pages.start
    with pytest.raises(MiniVmmError, match="outside the data area"):
        vmm.write(1, 0, 4)                      # the reserved area
    with pytest.raises(MiniVmmError, match="outside the data area"):
        vmm.verify(1, vmm.data_pages.stop - 1, 2)
    with pytest.raises(MiniVmmError, match="unknown command"):
        vmm.command("scribble 1", "WRITE", 30)
    assert vmm.alive()
    assert vmm.verify_report(1, first, 1).bad == 1       # still all zeros
    assert not memfd_pages(vmm, 0, 1).any()             # page 0 (reserved) untouched


def test_dead_vmm_gives_a_clear_error(vmm: MiniVmm) -> None:
    os.kill(vmm.pid, signal.SIGKILL)
    vmm.proc.wait(timeout=30)
    with pytest.raises(MiniVmmError, match=r"exited with status -9.*\n.*MINIVMM READY"):
        vmm.write(1)


def test_quit_and_stdin_eof_end_it_cleanly(binary: Path) -> None:
    vmm = MiniVmm.start(4, fill_dwords=0, binary=binary)
    vmm.write(1)
    assert vmm.close() == 0
    assert vmm.output()[-1] == "MINIVMM QUIT rounds=1"
    # EOF on stdin (the driver went away) ends it too.
    vmm = MiniVmm.start(4, fill_dwords=0, binary=binary)
    assert vmm.proc.stdin is not None
    vmm.proc.stdin.close()
    assert vmm.proc.wait(timeout=60) == 0
    vmm.close()
    assert vmm.output()[-1] == "MINIVMM QUIT rounds=0"


def wait_in_syscall(pid: int, nr: int, timeout: float = 30.0) -> None:
    """Until the main thread is blocked in syscall ``nr`` (it gets there within
    microseconds of handing a command on; the bound is for a loaded machine)."""
    deadline = time.monotonic() + timeout
    while True:
        now = Path(f"/proc/{pid}/syscall").read_text().split()[0]
        if now == str(nr):
            return
        assert time.monotonic() < deadline, f"main thread in syscall {now}, not {nr}"
        time.sleep(0.01)


def test_main_thread_waits_in_ppoll_and_survives_a_ptrace_stop(vmm: MiniVmm) -> None:
    vmm.write(1)
    # The main thread is where syscalls get injected: it waits in ppoll.
    wait_in_syscall(vmm.pid, SYS_PPOLL)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    assert libc.ptrace(PTRACE_SEIZE, vmm.pid, None, None) == 0, os.strerror(ctypes.get_errno())
    try:
        assert libc.ptrace(PTRACE_INTERRUPT, vmm.pid, None, None) == 0
        pid, status = os.waitpid(vmm.pid, WALL)
        assert pid == vmm.pid and os.WIFSTOPPED(status) and status >> 16 == PTRACE_EVENT_STOP
        # The vCPU runs on while the main thread is stopped; a command sent now waits in
        # the pipe to the main thread until it resumes.
        vmm.send("verify 1")
    finally:
        assert libc.ptrace(PTRACE_DETACH, vmm.pid, None, None) == 0
    f = vmm.result("VERIFY", 60)
    assert (f["bad"], f["pages"]) == ("0", str(len(vmm.data_pages)))
    wait_in_syscall(vmm.pid, SYS_PPOLL)


def test_memfd_is_the_guest_ram(vmm: MiniVmm) -> None:
    # Writes through the memfd are what the guest reads: stamp pages from the host.
    first = vmm.data_pages.start + 7
    fd = vmm.open_memfd()
    try:
        assert stat.S_ISREG(os.fstat(fd).st_mode) and os.fstat(fd).st_size == vmm.ram_bytes
        os.pwrite(fd, expected_pages(first, 3, 9, 14).tobytes(), first * PAGE)
    finally:
        os.close(fd)
    assert vmm.verify(9, first, 3) == (3, 0)
    assert vmm.verify_report(9, first - 1, 5).bad == 2
