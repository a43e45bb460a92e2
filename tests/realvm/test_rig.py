"""The rig on a real QEMU: a real Debian kernel boots under TCG with memfd RAM, fills it,
and its verifier passes across churn and touch, and fails, naming exactly the right file,
when the host corrupts one page of that file through QEMU's memfd."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.kernel_vm import fetch
from tests.realvm import memfd, workload
from tests.realvm.guest import BootFailed, GuestDied, QemuGuest, RigError, RigUnavailable

pytestmark = pytest.mark.realvm

RAM_MIB = 768
FILL = 0.65
BOOT_TIMEOUT = 600.0        # TCG on a shared 2-core machine: about 20 s when idle
REPLY_TIMEOUT = 300.0       # a verify: about 8 s when idle


def _start(workdir: Path, ram_mib: int, fill: float,
           kernel: fetch.KernelBundle | None = None) -> QemuGuest:
    try:
        return QemuGuest.start(workdir=workdir, ram_mib=ram_mib, fill_fraction=fill,
                               kernel=kernel)
    except RigUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QemuGuest]:
    with _start(tmp_path_factory.mktemp("realvm"), RAM_MIB, FILL) as g:
        g.wait_ready(BOOT_TIMEOUT)
        yield g


def _plan() -> list[workload.FileSpec]:
    return workload.plan_files(int(FILL * RAM_MIB * (1 << 20)))


def _first(percent: int, files: list[workload.FileSpec]) -> list[workload.FileSpec]:
    return files[:-(-len(files) * percent // 100)]


def test_guest_ram_is_the_memfd_and_holds_the_fill(guest: QemuGuest) -> None:
    plan = _plan()
    ready = guest.wait_ready(0)
    assert ready.files == len(plan) + 1                   # + the canary
    assert ready.bytes == sum(f.size for f in plan)
    ram = memfd.find_ram(guest.pid)
    assert ram.size == RAM_MIB << 20 and ram.offset == 0
    fd = memfd.open_ram(guest.pid)
    try:
        assert os.fstat(fd).st_size == RAM_MIB << 20
        # The data lives in guest RAM, so in the memfd: at least the fill is allocated.
        assert memfd.allocated_bytes(fd) >= ready.bytes
    finally:
        os.close(fd)
    stats = guest.stats(REPLY_TIMEOUT)
    assert stats.files == ready.files
    assert stats.shmem_kib * 1024 >= ready.bytes


def test_verify_passes_across_churn_and_touch(guest: QemuGuest) -> None:
    plan = _plan()
    first = guest.verify(REPLY_TIMEOUT)
    assert (first.ok, first.bad, first.bad_files) == (len(plan) + 1, 0, [])
    # Churn and touch walk the plan's order from its start (this module's guest is fresh).
    churned = _first(20, plan)
    c = guest.churn(20, REPLY_TIMEOUT)
    assert c.files == len(churned)
    assert c.changed == sum(f.kind != "z" for f in churned)   # zeros rewritten stay zeros
    touched = _first(30, plan)
    t = guest.touch(30, REPLY_TIMEOUT)
    assert (t.files, t.bytes) == (len(touched), sum(f.size for f in touched))
    second = guest.verify(REPLY_TIMEOUT)
    assert (second.ok, second.bad, second.bad_files) == (len(plan) + 1, 0, [])


def test_verify_names_exactly_the_file_whose_page_the_host_corrupted(guest: QemuGuest) -> None:
    marker = guest.canary_marker
    garbage = bytes(b ^ 0x5A for b in marker)
    fd = memfd.open_ram(guest.pid, writable=True)
    try:
        # The canary's page is the only place the guest ever put the marker; if the guest
        # kernel left a stale copy somewhere (a migrated page), it is corrupted as well.
        where = memfd.find_all(fd, marker)
        assert where, "the canary's marker is not in QEMU's memfd"
        saved = [(off, memfd.overwrite(fd, off, garbage)) for off in where]
        bad = guest.verify(REPLY_TIMEOUT)
        assert bad.bad_files == [workload.CANARY]
        assert (bad.ok, bad.bad) == (guest.wait_ready(0).files - 1, 1)
        for off, old in saved:
            if os.pread(fd, len(garbage), off) == garbage:
                memfd.overwrite(fd, off, old)
    finally:
        os.close(fd)
    restored = guest.verify(REPLY_TIMEOUT)
    assert (restored.bad, restored.bad_files) == (0, [])


def test_poweroff_ends_qemu_and_cleans_up(guest: QemuGuest) -> None:
    assert guest.stop(REPLY_TIMEOUT) == 0
    assert not guest.alive()
    assert not Path(f"/proc/{guest.pid}").exists()
    assert not guest.rundir.exists()
    with pytest.raises(GuestDied, match="stopped"):
        guest.verify(REPLY_TIMEOUT)


def test_a_killed_qemu_is_reported_as_dead(tmp_path: Path) -> None:
    with _start(tmp_path, 512, 0.02) as g:
        g.wait_ready(BOOT_TIMEOUT)
        os.kill(g.pid, signal.SIGKILL)
        with pytest.raises(GuestDied, match=r"QEMU exited with status -9") as err:
            g.verify(REPLY_TIMEOUT)
        assert "last console lines" in str(err.value)
    assert not g.rundir.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_kernel_that_does_not_boot_is_a_boot_failure_with_the_console(tmp_path: Path) -> None:
    try:
        real = fetch.ensure_kernel(fetch.cache_root(), lambda msg: None)
    except (fetch.KernelFetchError, OSError) as exc:
        pytest.skip(f"no guest kernel: {exc}")
    junk = tmp_path / "vmlinuz"
    junk.write_bytes(b"not a kernel" * 1000)
    with _start(tmp_path, 512, 0.02, kernel=replace(real, vmlinuz=junk)) as g:
        with pytest.raises(BootFailed, match=r"before the guest was ready") as err:
            g.wait_ready(BOOT_TIMEOUT)
        assert "QEMU said:" in str(err.value)
        with pytest.raises(RigError, match="not ready"):
            g.verify(REPLY_TIMEOUT)


STARTER = """
import sys
from pathlib import Path
from tests.realvm.guest import QemuGuest, RigUnavailable
try:
    g = QemuGuest.start(workdir=Path(sys.argv[1]), ram_mib=512, fill_fraction=0.02)
except RigUnavailable as exc:
    print("unavailable", exc, flush=True)
    sys.exit(0)
print(g.pid, flush=True)
sys.stdin.readline()
"""


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.parametrize("how", ["exits", "is-killed"])
def test_qemu_does_not_outlive_the_process_that_started_it(tmp_path: Path, how: str) -> None:
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(tmp_path)],
                               cwd=Path(__file__).parents[2], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert starter.stdin and starter.stdout
    try:
        first = starter.stdout.readline().split()
        if first[:1] == ["unavailable"]:
            pytest.skip(" ".join(first[1:]))
        pid = int(first[0])
        assert _running(pid) and Path(f"/proc/{pid}/exe").resolve().name.startswith("qemu")
        if how == "exits":
            starter.stdin.close()              # the script returns; atexit runs the finalizer
            assert starter.wait(60) == 0
        else:
            starter.kill()                     # no Python cleanup at all: the death signal
            starter.wait(60)
        try:
            assert _wait_gone(pid, 60), f"QEMU {pid} still runs after its starter {how}"
        finally:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        if how == "exits":
            assert list(tmp_path.iterdir()) == []      # and its run directory is gone
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait()
