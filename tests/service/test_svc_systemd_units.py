"""`systemd-analyze verify` on both units (ExecStart pointed at this venv's vmm-tierd)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from svc_helpers import StartDaemon

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"


def entry_point() -> Path:
    exe = Path(sys.executable).parent / "vmm-tierd"
    if not exe.exists():
        found = shutil.which("vmm-tierd")
        if found is None:
            pytest.fail("no vmm-tierd entry point: run scripts/setup")
        exe = Path(found)
    return exe


def unit_text(name: str) -> str:
    return (UNITS / name).read_text()


@pytest.mark.parametrize(("src", "as_name"), [("vmm-tierd.service", "vmm-tierd.service"),
                                              ("vmm-tierd@.service", "vmm-tierd@vm1.service")])
def test_systemd_analyze_verify(src: str, as_name: str, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze missing (scripts/setup --test installs systemd)")
    text = unit_text(src).replace("/usr/local/bin/vmm-tierd", str(entry_point()))
    assert str(entry_point()) in text
    unit = tmp_path / as_name
    unit.write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
    # verify only warns (exit 0) about unknown keys: treat any remark on our unit as failure
    remarks = [ln for ln in (r.stdout + r.stderr).splitlines() if as_name in ln]
    assert r.returncode == 0 and not remarks, r.stdout + r.stderr


@pytest.mark.parametrize("name", ["vmm-tierd.service", "vmm-tierd@.service"])
def test_units_are_notify_with_watchdog_reload_and_device_access(name: str) -> None:
    lines = {ln.strip() for ln in unit_text(name).splitlines()}
    for needed in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID",
                   "DevicePolicy=closed", "DeviceAllow=/dev/userfaultfd rw",
                   "DeviceAllow=/dev/kvm rw", "ProtectSystem=strict", "StateDirectoryMode=0700",
                   "NoNewPrivileges=yes", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"):
        assert needed in lines, needed
    assert any(ln.startswith("WatchdogSec=") for ln in lines)
    if "@" in name:
        assert "ExecStart=/usr/local/bin/vmm-tierd attach --config /etc/vmm-tierd/%i.toml" in lines
        assert "StateDirectory=vmm-tierd/%i" in lines


def _unit_syscall_filter() -> tuple[set[str], set[str]]:
    """The syscalls the unit's SystemCallFilter= allows (groups expanded), and its raw list."""
    listing = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True,
                             text=True, timeout=60, check=True).stdout
    groups: dict[str, list[str]] = {}
    cur = None
    for line in listing.splitlines():
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        if not line.startswith(" ") and item.startswith("@"):
            cur = item
            groups[cur] = []
        elif cur is not None:
            groups[cur].append(item)

    def expand(names: list[str]) -> set[str]:
        out: set[str] = set()
        for n in names:
            out |= expand(groups[n]) if n.startswith("@") else {n}
        return out

    line = next(ln for ln in unit_text("vmm-tierd.service").splitlines()
                if ln.startswith("SystemCallFilter="))
    names = line.split("=", 1)[1].split()
    return expand(names), set(names)


def test_daemon_syscalls_pass_the_units_seccomp_filter(tmp_path: Path,
                                                       start_daemon: StartDaemon) -> None:
    """Every syscall a real (linux backend, anon + memfd) daemon makes while tracking,
    evicting, serving faults and metrics, and stopping is allowed by SystemCallFilter=,
    and nothing asks for writable+executable memory (MemoryDenyWriteExecute=yes)."""

    from svc_helpers import small_config

    if shutil.which("strace") is None or shutil.which("systemd-analyze") is None:
        pytest.skip("strace or systemd-analyze missing (scripts/setup --test installs both)")
    allowed, _ = _unit_syscall_filter()
    cfg = small_config(tmp_path, interval="200ms", size="32MiB", extra="")
    cfg.write_text(cfg.read_text() + '\n[[region]]\nname = "vm1"\nsize = "16MiB"\n'
                   'memtype = "memfd"\n')
    trace = tmp_path / "trace.txt"
    d = start_daemon(["--config", str(cfg), "--backend", "linux", "--seconds", "4"],
                     prefix=["strace", "-f", "-qq", "-o", str(trace)])
    d.wait_ready(timeout=120)
    d.scrape()
    d.wait_for(r"vm1: ws .* evicted", timeout=60)
    assert d.proc.wait(120) == 0, d.output
    seen, wx = _traced(trace)
    assert {"ioctl", "userfaultfd"} & seen and "memfd_create" in seen, sorted(seen)
    assert not sorted(seen - allowed - {"exit", "exit_group", "execve", "resumed"})
    assert not wx, wx[:5]


def _traced(trace: Path) -> tuple[set[str], list[str]]:
    """The syscalls an strace -f log shows, and any writable+executable mapping asked for."""
    import re

    seen: set[str] = set()
    wx: list[str] = []
    call = re.compile(r"^\d+\s+(?:<\.\.\. )?([a-z_0-9]+)[( ]")
    with trace.open() as f:
        for line in f:
            m = call.match(line)
            if m:
                seen.add(m.group(1))
            if ("mmap(" in line and "PROT_WRITE|PROT_EXEC" in line) or (
                    "mprotect(" in line and "PROT_EXEC" in line):
                wx.append(line)
    return seen, wx


def test_attach_syscalls_pass_the_units_seccomp_filter(tmp_path: Path) -> None:
    """The same for ``vmm-tierd attach`` on a stand-in VMM (the test target): injected
    syscalls (ptrace), pidfd_getfd and process_vm_writev included."""

    from svc_helpers import Daemon

    from tests.attach.daemon import write_config
    from tests.remote.target import Target

    if shutil.which("strace") is None or shutil.which("systemd-analyze") is None:
        pytest.skip("strace or systemd-analyze missing (scripts/setup --test installs both)")
    allowed, _ = _unit_syscall_filter()
    trace = tmp_path / "trace.txt"
    t = Target.start(16 << 20)
    try:
        cfg = write_config(tmp_path, interval="200ms")
        d = Daemon(["--metrics-listen", "127.0.0.1:0", "--pid", str(t.pid), "--config",
                    str(cfg), "--store", str(tmp_path / "store"), "--seconds", "4"],
                   prefix=["strace", "-f", "-qq", "-o", str(trace)], command="attach")
        d.wait_ready(timeout=120)
        d.wait_for(r"evicted [1-9]", timeout=60)
        assert d.proc.wait(120) == 0, d.output
    finally:
        t.close()
    seen, wx = _traced(trace)
    assert not wx, wx[:5]
    assert {"ptrace", "pidfd_getfd"} <= seen, sorted(seen)
    assert not sorted(seen - allowed - {"exit", "exit_group", "execve", "resumed"})
