"""KVM's accesses to minivmm's guest RAM arrive on a uffd owned by the VMM (created by it,
handed to this test process over Firecracker's socket protocol) and are served from here.

The uffd's context is the VMM's mm: the test registers the VMM's addresses on it and
resolves faults with UFFDIO_COPY from its own buffers. The ``guest`` variants run the same
checks inside the Linux 7.3 guest (``python -m tests.kernel_vm``), where KVM is nested SVM
under TCG and guest accesses reach the host mm through NPT faults, not the emulator.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import select
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from vmm_tierd.kernel import uapi
from vmm_tierd.kernel.linux import LinuxKernel

from .driver import PAGE, MiniVmm, build, expected_page, kvm_unavailable
from .handoff import Handoff, UffdRegion, listen, receive
from .serve import FaultServer

_why = kvm_unavailable()
# Host tests skip without KVM; in the guest a missing /dev/kvm is a failure (the guest run
# loads kvm-amd for these tests).
needs_kvm = pytest.mark.skipif(_why is not None, reason=f"no usable KVM: {_why}")
in_guest = pytest.mark.skipif(os.environ.get("VMM_TIERD_GUEST") != "1",
                              reason="only inside the kernel_vm guest")

SYS_PIDFD_GETFD = 438
MISSING = uapi.UFFDIO_REGISTER_MODE_MISSING
THREAD_ID = uapi.UFFD_FEATURE_THREAD_ID


@pytest.fixture(autouse=True)
def _hang_guard() -> Iterator[None]:
    faulthandler.dump_traceback_later(600, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def binary() -> Path:
    return build()


@pytest.fixture
def kernel() -> Iterator[LinuxKernel]:
    k = LinuxKernel()
    yield k
    k.close()


@contextmanager
def handed_off(tmp_path: Path, binary: Path, ram_mib: int, fill: int,
               **kw: object) -> Iterator[tuple[MiniVmm, Handoff]]:
    """A VMM that has sent its uffd (and memfd) to us and waits for our ack."""
    sock = tmp_path / "uffd.sock"
    try:
        with listen(sock) as lst:
            vmm = MiniVmm.start(ram_mib, fill_dwords=fill, handoff=sock, wait=False,
                                binary=binary, **kw)  # type: ignore[arg-type]
            try:
                h = receive(lst, vmm)
            except BaseException:
                vmm.close()
                raise
    finally:
        sock.unlink(missing_ok=True)
    try:
        yield vmm, h
    finally:
        vmm.close()
        h.close()


def vcpu_tid(pid: int) -> int:
    for tid in os.listdir(f"/proc/{pid}/task"):
        if Path(f"/proc/{pid}/task/{tid}/comm").read_text().rstrip("\n") == "CPU 0/KVM":
            return int(tid)
    raise AssertionError(f"pid {pid} has no 'CPU 0/KVM' thread")


def pidfd_getfd(pid: int, fd: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        new = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if new < 0:
            raise OSError(ctypes.get_errno(), f"pidfd_getfd({pid}, {fd})")
        return int(new)
    finally:
        os.close(pidfd)


def data_addrs(vmm: MiniVmm) -> list[int]:
    hva, length = vmm.data_hva()
    return list(range(hva, hva + length, PAGE))


def stamps_of(vmm: MiniVmm, version: int, fill: int,
              odd: tuple[int, int] | None = None) -> Callable[[int], bytes]:
    """Fault content: page N's stamp of ``version``; ``odd`` = (page, other version)."""
    base = vmm.ready.hva

    def content(addr: int) -> bytes:
        page = (addr - base) // PAGE
        v = odd[1] if odd is not None and page == odd[0] else version
        return expected_page(page, v, fill)
    return content


# ---- the checks, run on the host and in the 7.3 guest -------------------------------------
def check_kvm_faults_served_from_another_process(tmp_path: Path, binary: Path,
                                                 kernel: LinuxKernel, ram_mib: int,
                                                 fill: int) -> None:
    with handed_off(tmp_path, binary, ram_mib, fill) as (vmm, h):
        assert h.regions == [UffdRegion(h.regions[0].base_host_virt_addr, ram_mib << 20, 0,
                                        PAGE)]
        kernel.uffd_api(h.uffd, THREAD_ID)            # a fresh uffd: API and register are ours
        hva = h.regions[0].base_host_virt_addr
        kernel.uffd_register(h.uffd, hva, ram_mib << 20, MISSING)
        server = FaultServer(kernel, h.uffd).start()
        try:
            h.ack()
            assert vmm.wait_ready().hva == hva
            w = vmm.write(1)
            assert vmm.verify() == (w.pages, 0)
            assert vmm.touch_hot(vmm.data_pages.start, 64, rounds=3, write=True).bad == 0
        finally:
            server.stop()
        # Every data page faulted exactly once, on the guest's first (write) access, from
        # the vCPU thread; the reserved area (populated by the VMM) never faulted.
        assert server.pages() == data_addrs(vmm)
        assert all(f.write for f in server.faults)
        assert {f.tid for f in server.faults} == {vcpu_tid(vmm.pid)}
        assert server.other_events == [] and server.eexist == 0
        assert vmm.close() == 0


def check_served_content_is_what_kvm_reads(tmp_path: Path, binary: Path,
                                           kernel: LinuxKernel, ram_mib: int,
                                           fill: int) -> None:
    with handed_off(tmp_path, binary, ram_mib, fill) as (vmm, h):
        kernel.uffd_api(h.uffd, 0)
        kernel.uffd_register(h.uffd, h.regions[0].base_host_virt_addr, ram_mib << 20, MISSING)
        h.ack()
        vmm.wait_ready()
        pages = vmm.data_pages
        odd = pages.start + len(pages) // 2
        server = FaultServer(kernel, h.uffd, stamps_of(vmm, 7, fill, (odd, 8))).start()
        try:
            r = vmm.verify_report(7)   # never written by the guest: all served by us
        finally:
            server.stop()
        assert (r.pages, r.bad, r.first_bad) == (len(pages), 1, odd)
        assert server.pages() == data_addrs(vmm)
        assert not any(f.write for f in server.faults)


# ---- host ----------------------------------------------------------------------------------
@needs_kvm
def test_handoff_message_and_fds(tmp_path: Path, binary: Path) -> None:
    with handed_off(tmp_path, binary, 8, 0) as (vmm, h):
        assert len(h.regions) == 1 and h.regions[0].size == 8 << 20
        assert os.readlink(f"/proc/self/fd/{h.uffd}") == "anon_inode:[userfaultfd]"
        assert h.memfd is not None and h.extra_fds == []
        h.ack()
        r = vmm.wait_ready()
        assert r.hva == h.regions[0].base_host_virt_addr
        assert os.fstat(h.memfd).st_ino == os.stat(f"/proc/{vmm.pid}/fd/{r.memfd}").st_ino
        sent = vmm.handoff_lines[0].split()
        assert sent[2:4] == ["sent=1", f"uffd={sent[3][5:]}"] and "api=0" in sent
        their_uffd = int(sent[3][5:])            # the VMM keeps its own copy
        assert os.readlink(f"/proc/{vmm.pid}/fd/{their_uffd}") == "anon_inode:[userfaultfd]"
        assert vmm.handoff_lines[1] == "MINIVMM HANDOFF ack=line"
    with handed_off(tmp_path, binary, 8, 0, send_memfd=False) as (vmm, h):
        assert h.memfd is None and h.extra_fds == []
        h.ack()
        vmm.wait_ready()


@needs_kvm
def test_kvm_faults_reach_a_uffd_owned_by_the_vmm(tmp_path: Path, binary: Path,
                                                  kernel: LinuxKernel) -> None:
    check_kvm_faults_served_from_another_process(tmp_path, binary, kernel, 8, 14)


@needs_kvm
def test_served_content_is_what_kvm_reads(tmp_path: Path, binary: Path,
                                          kernel: LinuxKernel) -> None:
    check_served_content_is_what_kvm_reads(tmp_path, binary, kernel, 8, 14)


@needs_kvm
def test_firecracker_style_uffd_already_registered(tmp_path: Path, binary: Path,
                                                   kernel: LinuxKernel) -> None:
    with handed_off(tmp_path, binary, 8, 14, uffd_api=THREAD_ID, register=MISSING) as (vmm, h):
        assert kernel.uffd_features(h.uffd) == THREAD_ID   # the VMM did UFFDIO_API
        server = FaultServer(kernel, h.uffd).start()
        try:
            assert h.conn is not None
            h.conn.close()                                  # ack by closing our end
            h.conn = None
            vmm.wait_ready()
            assert vmm.handoff_lines[-1] == "MINIVMM HANDOFF ack=eof"
            w = vmm.write(2)
            assert vmm.verify() == (w.pages, 0)
        finally:
            server.stop()
        assert server.pages() == data_addrs(vmm)
        assert {f.tid for f in server.faults} == {vcpu_tid(vmm.pid)}


@needs_kvm
def test_handler_crash_stalls_the_guest_and_a_new_handler_recovers(
        tmp_path: Path, binary: Path, kernel: LinuxKernel) -> None:
    with handed_off(tmp_path, binary, 8, 14) as (vmm, h):
        kernel.uffd_api(h.uffd, 0)
        kernel.uffd_register(h.uffd, h.regions[0].base_host_virt_addr, 8 << 20, MISSING)
        h.ack()
        vmm.wait_ready()
        their_uffd = int(vmm.handoff_lines[0].split()[3].removeprefix("uffd="))
        vmm.send("write 4")
        # The guest's first write faults; the handler "crashes" without reading it.
        assert select.select([h.uffd], [], [], 120)[0] == [h.uffd]
        os.close(h.uffd)
        h.uffd = -1
        assert vmm.alive()
        # The VMM's own copy kept the registration: a new handler takes the uffd back and
        # finds the fault still waiting, then serves the rest.
        uffd = pidfd_getfd(vmm.pid, their_uffd)
        server = FaultServer(kernel, uffd).start()
        try:
            f = vmm.result("WRITE", 300)
            assert vmm.verify(4) == (int(f["pages"]), 0)
        finally:
            server.stop()
            os.close(uffd)
        assert server.pages() == data_addrs(vmm)


# ---- inside the 7.3 guest ------------------------------------------------------------------
@pytest.mark.guest
@in_guest
def test_guest_kvm_is_there() -> None:
    assert _why is None
    assert Path("/sys/module/kvm_amd").is_dir() or Path("/sys/module/kvm_intel").is_dir()


@pytest.mark.guest
@in_guest
def test_guest_kvm_faults_reach_a_uffd_owned_by_the_vmm(tmp_path: Path, binary: Path,
                                                        kernel: LinuxKernel) -> None:
    check_kvm_faults_served_from_another_process(tmp_path, binary, kernel, 8, 1022)


@pytest.mark.guest
@in_guest
def test_guest_served_content_is_what_kvm_reads(tmp_path: Path, binary: Path,
                                                kernel: LinuxKernel) -> None:
    check_served_content_is_what_kvm_reads(tmp_path, binary, kernel, 8, 1022)


@pytest.mark.guest
@in_guest
def test_guest_rwp_sync_faults_for_kvm_reads_and_writes(tmp_path: Path, binary: Path,
                                                        kernel: LinuxKernel) -> None:
    # 7.3's read-write protection against KVM: RWPROTECT must reach KVM's own page tables
    # (NPT), so the guest's next access, a read or a write, faults on the uffd.
    with handed_off(tmp_path, binary, 16, 14) as (vmm, h):
        kernel.uffd_api(h.uffd, uapi.UFFD_FEATURE_RWP | THREAD_ID)
        h.ack()
        vmm.write(1)                                # populated without any registration
        base = vmm.ready.hva
        first = vmm.data_pages.start + 100
        start = base + first * PAGE
        kernel.uffd_register(h.uffd, start, 512 * PAGE, uapi.UFFDIO_REGISTER_MODE_RWP)
        server = FaultServer(kernel, h.uffd).start()
        try:
            for write in (False, True):
                kernel.uffd_rwprotect(h.uffd, start, 64 * PAGE, uapi.UFFDIO_RWPROTECT_MODE_RWP)
                n0 = len(server.faults)
                t = vmm.touch_hot(first, 128, rounds=2, write=write)
                assert (t.touches, t.bad) == (256, 0)
                got = server.faults[n0:]
                assert [f.address & ~(PAGE - 1) for f in got] == \
                    [start + i * PAGE for i in range(64)], write
                assert all(f.rwp for f in got)
        finally:
            server.stop()
        assert {f.tid for f in server.faults} == {vcpu_tid(vmm.pid)}
        assert vmm.verify() == (len(vmm.data_pages), 0)
