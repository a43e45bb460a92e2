"""A real QEMU (Debian's qemu-system-x86_64, TCG) running a real Debian kernel, with guest RAM
on a memfd exactly as a vmm-tierd user configures it, and a workload inside that can check
every byte of its data on request.

    with QemuGuest.start(workdir=tmp_path) as g:
        g.wait_ready(timeout=300)
        ... attach to g.pid, evict ...
        assert g.verify(timeout=300).bad == 0

QEMU never outlives its QemuGuest: ``stop``/``kill``/the context manager end it, a
finalizer kills it when the object is dropped or the interpreter exits, and (when started
from the main thread) ``setpriv --pdeathsig KILL`` kills it if this process dies.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.kernel_vm import boot, fetch, image

from . import workload
from .channel import (
    BootFailed,
    Channel,
    ChannelClosed,
    ChannelTimeout,
    GuestDied,
    GuestError,
    Reply,
    ReplyTimeout,
    RigError,
    RigUnavailable,
)

LogFn = Callable[[str], None]
MIN_RAM_MIB = 512
MAX_FILL = 0.8


@dataclass(frozen=True)
class Ready:
    files: int
    bytes: int
    fill_seconds: float      # guest: writing and hashing the data
    boot_seconds: float      # host: QEMU start to the ready line (fill included)


@dataclass(frozen=True)
class VerifyResult:
    ok: int
    bad: int
    bad_files: list[str]
    seconds: float           # host: request to answer
    guest_seconds: float


@dataclass(frozen=True)
class ChurnResult:
    files: int               # rewritten
    changed: int             # of which the sha256 changed (zero files stay zero)
    seconds: float


@dataclass(frozen=True)
class TouchResult:
    files: int
    bytes: int
    seconds: float


@dataclass(frozen=True)
class GuestStats:
    mem_total_kib: int
    mem_free_kib: int
    mem_available_kib: int
    shmem_kib: int
    data_kib: int
    files: int


def qemu_command(kernel: fetch.KernelBundle, initrd: Path, console: Path, control_fd: int,
                 ram_mib: int, smp: int) -> list[str]:
    return [
        *boot.tcg_args(smp), "-nodefaults", "-name", "vmm-tierd-realvm",
        "-m", f"{ram_mib}M",
        "-object", f"memory-backend-memfd,id=ram,size={ram_mib}M,share=on",
        "-machine", "memory-backend=ram",
        # QEMU's option syntax: a comma inside a value is written twice.
        "-chardev", f"file,id=console,path={str(console).replace(',', ',,')}",
        "-serial", "chardev:console",
        "-chardev", f"socket,id=control,fd={control_fd}", "-serial", "chardev:control",
        *boot.kernel_args(kernel.vmlinuz, initrd),
    ]


def _reap(proc: subprocess.Popen[bytes], sock: socket.socket, rundir: Path) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    sock.close()
    shutil.rmtree(rundir, ignore_errors=True)


def _tail(path: Path, lines: int) -> list[str]:
    try:
        data = path.read_bytes()[-65536:]
    except OSError:
        return []
    return data.decode("utf-8", errors="replace").splitlines()[-lines:]


class QemuGuest:
    """One running QEMU; build it with ``start``. Use it from one thread at a time. A
    request that timed out may still be running in the guest: the next one waits behind it
    (its late answer is recognised by its id and dropped)."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket, rundir: Path,
                 token: str, ram_mib: int, started: float) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.sock = sock
        self.rundir = rundir
        self.token = token
        self.ram_mib = ram_mib
        self.started = started
        self.ready: Ready | None = None
        self.channel = Channel(sock.fileno(), sock.fileno(), token)
        self._finalizer = weakref.finalize(self, _reap, proc, sock, rundir)

    @classmethod
    def start(cls, *, ram_mib: int = 768, fill_fraction: float = 0.65, smp: int = 1,
              workdir: Path, kernel: fetch.KernelBundle | None = None,
              log: LogFn | None = None) -> QemuGuest:
        """Boot QEMU (returns at once; ``wait_ready`` waits for the filled guest).
        RigUnavailable: no QEMU, busybox or kernel on this host."""
        if ram_mib < MIN_RAM_MIB:
            raise ValueError(f"ram_mib={ram_mib}: at least {MIN_RAM_MIB}")
        if not 0 < fill_fraction <= MAX_FILL:
            raise ValueError(f"fill_fraction={fill_fraction}: in (0, {MAX_FILL}]")
        if smp < 1:
            raise ValueError(f"smp={smp}: at least 1")
        say = log or (lambda msg: None)
        if shutil.which(boot.QEMU) is None:
            raise RigUnavailable(f"{boot.QEMU} not found: run scripts/setup --test "
                                 "(installs qemu-system-x86)")
        try:
            image.find_busybox()
            if kernel is None:
                kernel = fetch.ensure_kernel(fetch.cache_root(), say)
        except (image.InitramfsError, fetch.KernelFetchError, OSError) as exc:
            raise RigUnavailable(f"no guest kernel or busybox: {exc}") from exc
        token = secrets.token_hex(6)
        rundir = Path(tempfile.mkdtemp(prefix="realvm-", dir=workdir))
        ours, theirs = socket.socketpair()
        try:
            files = workload.plan_files(int(fill_fraction * ram_mib * (1 << 20)))
            initrd = workload.build_image(token, files, rundir / "initrd.cpio")
            cmd = qemu_command(kernel, initrd, rundir / "console.log", theirs.fileno(),
                               ram_mib, smp)
            setpriv = shutil.which("setpriv")
            if setpriv and threading.current_thread() is threading.main_thread():
                # The parent-death signal follows the thread that forks: only the main
                # thread lives as long as the process.
                cmd = [setpriv, "--pdeathsig", "KILL", *cmd]
            say(f"booting {kernel.version} under TCG, {ram_mib} MiB memfd RAM, smp {smp}, "
                f"{len(files)} files to fill")
            with open(rundir / "qemu.log", "wb") as qlog:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=qlog,
                                        stderr=subprocess.STDOUT, pass_fds=[theirs.fileno()])
        except BaseException:
            ours.close()
            shutil.rmtree(rundir, ignore_errors=True)
            raise
        finally:
            theirs.close()
        g = cls(proc, ours, rundir, token, ram_mib, time.monotonic())
        g._wait_exec(Path(shutil.which(boot.QEMU) or boot.QEMU).resolve())
        return g

    def _wait_exec(self, qemu: Path, timeout: float = 10.0) -> None:
        """Until the child is QEMU itself (not setpriv before its exec), so that ``pid``
        names QEMU's process from the start."""
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            try:
                if Path(f"/proc/{self.pid}/exe").resolve() == qemu:
                    return
            except OSError:
                pass
            time.sleep(0.01)
        if self.alive():
            self.kill()
            raise BootFailed(f"process {self.pid} did not become {qemu} within {timeout:.0f} s")


    # -- state and diagnostics

    @property
    def canary_marker(self) -> bytes:
        """The bytes that begin the page of the guest file ``canary`` (and nothing else)."""
        return workload.canary_marker(self.token)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def console_tail(self, lines: int = 30) -> list[str]:
        return _tail(self.rundir / "console.log", lines)

    def _diagnostics(self) -> str:
        parts = ["last console lines:", *("  | " + s for s in self.console_tail())]
        qemu = _tail(self.rundir / "qemu.log", 10)
        if qemu:
            parts += ["QEMU said:", *("  | " + s for s in qemu)]
        if self.channel.other:
            parts += ["other lines on the control channel:",
                      *("  | " + s for s in list(self.channel.other)[-5:])]
        return "\n".join(parts)

    def _settle(self) -> None:
        """The channel broke: QEMU is probably exiting; give it a moment, then _check."""
        try:
            self.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            pass
        self._check()

    def _check(self) -> None:
        rc = self.proc.poll()
        if rc is None:
            return
        if self.ready is None:
            raise BootFailed(f"QEMU exited with status {rc} before the guest was ready "
                             f"({time.monotonic() - self.started:.0f} s after start)\n"
                             + self._diagnostics())
        if not self._finalizer.alive:
            raise GuestDied(f"the guest was stopped (QEMU exit status {rc})")
        raise GuestDied(f"QEMU exited with status {rc} while the guest should run\n"
                        + self._diagnostics())

    # -- the guest's commands

    def wait_ready(self, timeout: float) -> Ready:
        """Until the guest has filled its data and recorded the sums."""
        if self.ready is not None:
            return self.ready
        try:
            reply = self.channel.wait(0, timeout, self._check)
        except ChannelTimeout:
            raise ReplyTimeout(f"guest not ready within {timeout:.0f} s (QEMU started "
                               f"{time.monotonic() - self.started:.0f} s ago)\n"
                               + self._diagnostics()) from None
        except (ChannelClosed, OSError):
            self._settle()
            raise BootFailed("control channel closed before the guest was ready\n"
                             + self._diagnostics()) from None
        if reply.verb != "ready":
            raise BootFailed(f"guest setup failed: {reply.fields.get('reason', reply)}\n"
                             + self._diagnostics())
        self.ready = Ready(reply.as_int("files"), reply.as_int("bytes"),
                           reply.as_float("seconds"), time.monotonic() - self.started)
        return self.ready

    def _request(self, verb: str, arg: int | None, timeout: float) -> tuple[Reply, float]:
        if self.ready is None:
            raise RigError(f"{verb}: the guest is not ready (call wait_ready first)")
        self._check()
        t0 = time.monotonic()
        try:
            req = self.channel.send(verb, arg)
            reply = self.channel.wait(req, timeout, self._check)
        except ChannelTimeout:
            raise ReplyTimeout(f"{verb}: no answer from the guest within {timeout:.0f} s\n"
                               + self._diagnostics()) from None
        except (ChannelClosed, OSError) as exc:
            self._settle()
            raise GuestDied(f"{verb}: control channel lost ({exc})\n"
                            + self._diagnostics()) from None
        if reply.verb == "error":
            raise GuestError(f"{verb}: guest error {reply.fields.get('reason', '?')}")
        if reply.verb != verb:
            raise RigError(f"{verb}: unexpected answer {reply}")
        return reply, time.monotonic() - t0

    def verify(self, timeout: float) -> VerifyResult:
        """Re-hash every file in the guest against its recorded sha256."""
        r, dt = self._request("verify", None, timeout)
        result = VerifyResult(r.as_int("ok"), r.as_int("bad"), r.as_names("files"), dt,
                              r.as_float("seconds"))
        if len(result.bad_files) != result.bad:
            raise RigError(f"verify: {result.bad} bad but {len(result.bad_files)} named: {r}")
        return result

    def churn(self, percent: int, timeout: float) -> ChurnResult:
        """Rewrite ``percent`` % of the data files (the next ones in a fixed rotation) with
        new content, and record their new sums."""
        r, dt = self._request("churn", percent, timeout)
        return ChurnResult(r.as_int("files"), r.as_int("changed"), dt)

    def touch(self, percent: int, timeout: float) -> TouchResult:
        """Read every byte of ``percent`` % of the data files (next in their own rotation)."""
        r, dt = self._request("touch", percent, timeout)
        return TouchResult(r.as_int("files"), r.as_int("bytes"), dt)

    def stats(self, timeout: float) -> GuestStats:
        r, _ = self._request("stats", None, timeout)
        return GuestStats(*(r.as_int(k) for k in (
            "mem_total_kib", "mem_free_kib", "mem_available_kib", "shmem_kib", "data_kib",
            "files")))

    # -- ending

    def stop(self, timeout: float = 60.0) -> int:
        """Power the guest off (SIGTERM, then SIGKILL, if it does not go in time); QEMU's exit
        status (0 after a clean power-off). The run directory is removed."""
        deadline = time.monotonic() + timeout
        if self.alive() and self.ready is not None:
            try:
                req = self.channel.send("poweroff")
                self.channel.wait(req, max(1.0, timeout / 2), lambda: None)
                self.proc.wait(max(1.0, deadline - time.monotonic()))
            except (ChannelTimeout, ChannelClosed, OSError, subprocess.TimeoutExpired):
                pass
        if self.alive():             # not ready yet, or not answering: QEMU exits on TERM
            self.proc.terminate()
            try:
                self.proc.wait(10.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._finalizer()
        return self.proc.wait()

    def kill(self) -> int:
        """End QEMU now (SIGKILL) and clean up; its exit status."""
        self._finalizer()
        return self.proc.wait()

    def __enter__(self) -> QemuGuest:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.stop()
        else:
            self.kill()


__all__ = ["BootFailed", "ChurnResult", "GuestDied", "GuestError", "GuestStats", "QemuGuest",
           "Ready", "ReplyTimeout", "RigError", "RigUnavailable", "TouchResult",
           "VerifyResult"]
