"""Boot the guest under QEMU/TCG, stream its serial console, watch it, read its markers.

KVM cannot boot a Linux guest on these machines (nested kvm_pvm: emulation failures), so the
guest always runs under TCG (``-accel tcg -cpu max``): slow, but the real 7.3 kernel. The
``max`` CPU is an AMD one with SVM and NPT, so the guest runs KVM itself (kvm-amd, loaded by
/init): a small VMM inside it (tests/minivmm) has its guest accesses made by nested KVM.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

QEMU = "qemu-system-x86_64"
CMDLINE = "console=ttyS0 panic=-1 quiet"

# Phases as the host sees them, in order. "boot" covers QEMU start to /init; "setup" covers
# modules, the 9p root and the chroot; "tests" covers the pytest run itself.
PHASES = ("boot", "setup", "tests", "done")


@dataclass
class VmConfig:
    vmlinuz: Path
    initrd: Path
    memory: str = "2G"
    cpus: int = 2
    share: str = "/"
    project: str | None = None      # the checkout, shared on its own (it may sit under /tmp)
    idle_timeout: float = 300.0     # no console output for this long -> the guest is stuck
    deadline: float = 1200.0        # whole run, QEMU start to power-off
    boot_timeout: float = 180.0     # QEMU start to /init (stock 7.3 under TCG: about 5-10 s)
    extra: list[str] = field(default_factory=list)


def tcg_args(cpus: int) -> list[str]:
    """QEMU under TCG, headless, no monitor and no NIC: the part every guest of the tests
    shares. The caller adds memory, serial ports, devices and ``kernel_args``."""
    return [QEMU, "-accel", "tcg", "-cpu", "max", "-smp", str(cpus), "-no-reboot",
            "-display", "none", "-vga", "none", "-monitor", "none", "-nic", "none"]


def kernel_args(vmlinuz: Path, initrd: Path, append: str = CMDLINE) -> list[str]:
    return ["-kernel", str(vmlinuz), "-initrd", str(initrd), "-append", append]


def qemu_command(cfg: VmConfig) -> list[str]:
    return [
        *tcg_args(cfg.cpus), "-m", cfg.memory, "-serial", "stdio",
        *kernel_args(cfg.vmlinuz, cfg.initrd),
        "-virtfs", f"local,path={cfg.share},mount_tag=hostroot,security_model=none,"
                   "readonly=on,multidevs=remap",
        *(["-virtfs", f"local,path={cfg.project},mount_tag=project,security_model=none,"
                       "readonly=on,multidevs=remap"] if cfg.project else []),
        "-device", "virtio-rng-pci",
        *cfg.extra,
    ]


@dataclass
class RunResult:
    phase: str                      # the last phase reached (PHASES)
    exit_status: int | None         # pytest's exit status, if the guest reported one
    failure: str | None             # why the run did not complete, None if it did
    uname: str | None = None
    times: dict[str, float] = field(default_factory=dict)   # seconds since QEMU start

    @property
    def failed_phase(self) -> str | None:
        """'boot' or 'tests' when the guest did not report an exit status, else None."""
        if self.exit_status is not None and self.phase == "done":
            return None
        return "tests" if self.phase == "tests" else "boot"


class MarkerParser:
    """Tracks the phase from the guest's marker lines (which carry this run's nonce)."""

    def __init__(self, token: str) -> None:
        # Same shape as initramfs.marker(): "@@KVM-<token> <what>@@".
        self.re = re.compile(r"@@KVM-" + re.escape(token) + r" (.*?)@@")
        self.phase = "boot"
        self.exit_status: int | None = None
        self.uname: str | None = None
        self.setup_failed = False
        self.seen: dict[str, float] = {}
        self.tests_started = False

    def feed(self, line: str, now: float) -> None:
        m = self.re.search(line)
        if not m:
            return
        word, _, rest = m[1].partition(" ")
        self.seen.setdefault(word, now)
        if word == "INIT":
            self.phase = "setup"
        elif word == "UNAME":
            self.uname = rest.strip()
        elif word == "SETUP-FAILED":
            self.setup_failed = True
        elif word == "TESTS-START":
            self.phase = "tests"
            self.tests_started = True
        elif word == "EXIT":
            try:
                status = int(rest.strip())
            except ValueError:
                return
            if self.tests_started:
                self.exit_status = status
                self.phase = "done"
            else:
                # The run script exited before pytest started (cd, prelude): a setup failure.
                self.setup_failed = True


def run_vm(cfg: VmConfig, token: str, out: Callable[[str], None],
           log: Callable[[str], None]) -> RunResult:
    """Run QEMU to completion (or until the watchdog fires), streaming the console to out."""
    cmd = qemu_command(cfg)
    parser = MarkerParser(token)
    start = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
    except OSError as exc:
        return RunResult("boot", None, f"cannot start {QEMU}: {exc}")
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    last_output = start
    failure: str | None = None
    try:
        while True:
            now = time.monotonic()
            if now - start > cfg.deadline:
                failure = (f"watchdog: deadline of {cfg.deadline:.0f} s passed in phase "
                           f"{parser.phase!r}; QEMU killed")
                break
            if parser.phase == "boot" and now - start > cfg.boot_timeout:
                failure = (f"watchdog: the guest did not reach /init within "
                           f"{cfg.boot_timeout:.0f} s; QEMU killed")
                break
            if now - last_output > cfg.idle_timeout:
                failure = (f"watchdog: no console output for {cfg.idle_timeout:.0f} s in phase "
                           f"{parser.phase!r}; QEMU killed")
                break
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            last_output = time.monotonic()
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", errors="replace").rstrip("\r")
                parser.feed(line, last_output - start)
                out(line)
        if buf:
            line = buf.decode("utf-8", errors="replace").rstrip("\r")
            parser.feed(line, time.monotonic() - start)
            out(line)
    finally:
        if proc.poll() is None:
            proc.kill()
        rc = proc.wait()
    if failure is None and parser.exit_status is None:
        if parser.setup_failed:
            failure = "guest setup failed (see 'guest setup failed' above)"
        elif parser.phase == "boot":
            failure = (f"QEMU exited ({rc}) before the guest ran /init: the kernel did not "
                       "boot (panic or bad QEMU option; see the console above)")
        else:
            failure = (f"QEMU exited ({rc}) in phase {parser.phase!r} without an exit status "
                       "from the guest (guest kernel crash or power-off)")
    times = dict(parser.seen)
    times["end"] = time.monotonic() - start
    log(f"QEMU exited with status {rc} after {times['end']:.1f} s")
    return RunResult(parser.phase, parser.exit_status, failure, parser.uname, times)
