"""Driver of ``target.c``: a stand-in VMM process for tests of another process's memory.

The program is built with gcc on first use into ``~/.cache/vmm-tierd/target/`` (keyed by
a hash of its source) and started with one end of a socketpair as its control socket.
Its guest RAM is a memfd named like QEMU's ("memory-backend-memfd"), mapped MAP_SHARED,
every 8-byte word of page p holding :func:`pattern` (p); threads "CPU n/KVM" access it
on command (:meth:`Target.start_access`), the main thread sits in ppoll on the socket.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from vmm_tierd.kernel.api import Access, AccessKind, AccessResult, AccessStatus

SRC = Path(__file__).with_name("target.c")
PAGE = 4096
WAIT = 10.0
_KIND = {AccessKind.READ: "r", AccessKind.WRITE: "w", AccessKind.GUP_READ: "g"}
_STATUS = {"ok": AccessStatus.OK, "sigbus": AccessStatus.SIGBUS, "error": AccessStatus.ERROR}


class TargetError(RuntimeError):
    pass


def build() -> Path:
    """The target binary, compiled once per source version."""
    key = hashlib.sha256(SRC.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    exe = cache / "vmm-tierd" / "target" / f"target-{key}"
    if exe.exists():
        return exe
    exe.parent.mkdir(parents=True, exist_ok=True)
    tmp = exe.with_name(f"{exe.name}.tmp{os.getpid()}")
    r = subprocess.run(["gcc", "-O1", "-g", "-Wall", "-pthread", "-o", str(tmp), str(SRC)],
                       capture_output=True, text=True)
    if r.returncode:
        raise TargetError(f"building {SRC} failed:\n{r.stderr}")
    os.replace(tmp, exe)
    return exe


def pattern(page: int, length: int = PAGE, offset: int = 0) -> bytes:
    """What the target wrote at ``offset`` of RAM (or anon) page ``page``."""
    word = struct.pack("<Q", ((page + 1) * 0x9E3779B97F4A7C15) & ((1 << 64) - 1))
    return (word * (PAGE // 8))[offset:offset + length]


def _unhex(tok: str) -> bytes:
    return b"" if tok == "-" else bytes.fromhex(tok)


class Pending:
    """A request the target answers later (tokens after the id), or None if it died."""

    def __init__(self) -> None:
        self._ev = threading.Event()
        self.tokens: list[str] | None = None

    def _set(self, tokens: list[str] | None) -> None:
        self.tokens = tokens
        self._ev.set()

    def done(self) -> bool:
        return self._ev.is_set()

    def wait(self, timeout: float = WAIT) -> list[str]:
        if not self._ev.wait(timeout):
            raise TargetError(f"no answer from the target within {timeout}s")
        if self.tokens is None:
            raise TargetError("the target exited before answering")
        if self.tokens[:1] == ["ERR"]:
            raise TargetError(f"target: error {self.tokens[1:]}")
        return self.tokens


class TargetAccess:
    """One access by a "CPU n/KVM" thread of the target (the Access protocol)."""

    def __init__(self, pending: Pending, tid: int) -> None:
        self._p = pending
        self._tid = tid

    def done(self) -> bool:
        return self._p.done()

    def wait(self, timeout: float) -> AccessResult:
        if not self._p._ev.wait(max(0.0, timeout)):
            return AccessResult(AccessStatus.PENDING)
        t = self._p.tokens
        if t is None:
            raise TargetError("the target exited during the access")
        # ACC status err hexdata
        return AccessResult(_STATUS[t[1]], _unhex(t[3]), int(t[2]))

    @property
    def tid(self) -> int:
        return self._tid


class Target:
    pid: int
    ram_addr: int
    ram_fd: int  # the target's own fd number of the memfd
    ram_bytes: int
    anon_addr: int  # 1 MiB private anonymous, same pattern
    anon_bytes: int
    vcpu_tids: list[int]
    workers: dict[str, int]  # "futex", "sleep", "recv" -> tid

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket, ram_bytes: int,
                 name: str) -> None:
        self._proc = proc
        self._sock = sock
        self._file = sock.makefile("rb")
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pending: dict[str, Pending] = {}
        self._busy: dict[int, int] = {}
        self._dead = False
        self._tmp: str | None = None
        self.pid = proc.pid
        self.ram_bytes = ram_bytes
        self.name = name
        ready = self._file.readline().decode().split()
        if ready[:1] != ["READY"]:
            proc.kill()
            proc.wait()
            raise TargetError(f"target did not start: {ready!r}")
        kv = dict(t.split("=", 1) for t in ready[1:])
        self.ram_addr = int(kv["ram_addr"], 16)
        self.ram_fd = int(kv["ram_fd"])
        self.anon_addr = int(kv["anon_addr"], 16)
        self.anon_bytes = int(kv["anon_bytes"])
        self.vcpu_tids = [int(t) for t in kv["vcpus"].split(",")]
        self.workers = {k: int(kv[k]) for k in ("futex", "sleep", "recv")}
        self._busy = dict.fromkeys(range(len(self.vcpu_tids)), 0)
        self._reader = threading.Thread(target=self._read, name=f"target-{self.pid}",
                                        daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, ram_bytes: int, *, vcpus: int = 1, name: str = "memory-backend-memfd",
              user: int | None = None) -> Target:
        """``user``: run as that uid (and gid), e.g. 65534, an unprivileged VMM."""
        exe = build()
        tmp = None
        if user is not None:  # the cache under /root is not reachable for other users
            tmp = tempfile.mkdtemp(prefix="vmm-tierd-target-")
            os.chmod(tmp, 0o755)
            exe = Path(shutil.copy(exe, Path(tmp) / "target"))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = subprocess.Popen([str(exe), str(theirs.fileno()), str(ram_bytes),
                                     str(vcpus), name], pass_fds=(theirs.fileno(),),
                                    user=user, group=user,
                                    extra_groups=[] if user is not None else None)
        finally:
            theirs.close()
        t = cls(proc, ours, ram_bytes, name)
        t._tmp = tmp
        return t

    # ---- protocol -----------------------------------------------------------------------
    def _read(self) -> None:
        try:
            for raw in self._file:
                tok = raw.decode().split()
                if len(tok) < 2:
                    continue
                with self._lock:
                    p = self._pending.pop(tok[1], None)
                if p is not None:
                    p._set([tok[0], *tok[2:]])
        except (OSError, ValueError):
            pass
        with self._lock:
            self._dead = True
            left = list(self._pending.values())
            self._pending.clear()
        for p in left:
            p._set(None)

    def request(self, cmd: str, *args: object) -> Pending:
        p = Pending()
        rid = str(next(self._ids))
        with self._lock:
            if self._dead:
                raise TargetError("the target has exited")
            self._pending[rid] = p
        self._sock.sendall(" ".join([cmd, rid, *map(str, args)]).encode() + b"\n")
        return p

    def call(self, cmd: str, *args: object, timeout: float = WAIT) -> list[str]:
        return self.request(cmd, *args).wait(timeout)[1:]

    # ---- guest side ---------------------------------------------------------------------
    def start_access(self, addr: int, kind: AccessKind, length: int = 1, data: bytes = b"",
                     *, vcpu: int | None = None) -> Access:
        """An access by a vCPU thread (the least busy one unless ``vcpu`` is given)."""
        if kind is AccessKind.WRITE and len(data) != length:
            raise ValueError(f"write of {length} bytes with {len(data)} bytes of data")
        with self._lock:
            cpu = min(self._busy, key=lambda c: self._busy[c]) if vcpu is None else vcpu
            self._busy[cpu] += 1
        p = self.request("ACC", cpu, _KIND[kind], hex(addr), length, data.hex() or "-")
        orig = p._set

        def _done(tokens: list[str] | None) -> None:
            with self._lock:
                self._busy[cpu] -= 1
            orig(tokens)

        p._set = _done  # type: ignore[method-assign]
        return TargetAccess(p, self.vcpu_tids[cpu])

    # ---- health and the threads in restartable syscalls ---------------------------------
    def ping(self, timeout: float = WAIT) -> None:
        """The main thread answers: its ppoll restarted and its registers are intact."""
        self.call("PING", timeout=timeout)

    def sigusr1_count(self) -> int:
        return int(self.call("SIGCOUNT")[0])

    def set_comm(self, tid: int, name: str | bytes) -> None:
        raw = name.encode() if isinstance(name, str) else name
        self.call("COMM", tid, raw.hex() or "-")

    def futex_wake(self) -> tuple[int, int, int]:
        """Wake the futex worker: (ret, errno, early returns of its FUTEX_WAIT)."""
        r, e, early = self.call("FWAKE")
        return int(r), int(e), int(early)

    def start_sleep(self, ms: int) -> Pending:
        """The sleep worker runs clock_nanosleep(ms); tokens: ret, errno, elapsed ns."""
        return self.request("SLEEP", ms)

    def start_recv(self, data: bytes) -> Pending:
        """Send ``data`` to the recv worker; tokens: bytes of data recvfrom returned (or
        -1), errno, hex of that data."""
        return self.request("SEND", data.hex() or "-")

    def syscall_of(self, tid: int) -> str:
        """First field of /proc/PID/task/TID/syscall: the number of the syscall the
        thread is blocked in, "running", or "-1" (blocked outside any syscall)."""
        with open(f"/proc/{self.pid}/task/{tid}/syscall") as f:
            return f.read().split()[0]

    def wait_in_syscall(self, tid: int, nr: int, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while self.syscall_of(tid) != str(nr):
            if time.monotonic() > deadline:
                raise TargetError(f"tid {tid} not in syscall {nr} after {timeout}s "
                                  f"({self.syscall_of(tid)})")
            time.sleep(0.002)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        os.kill(self.pid, sig)

    def close(self) -> None:
        """Kill and reap."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._sock.close()
        self._reader.join(WAIT)
        self._file.close()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
