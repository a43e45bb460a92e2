"""Typed driver for ``minivmm`` (minivmm.c): a KVM VMM whose guest RAM is a memfd.

``build()`` compiles minivmm.c with gcc into a cache keyed by the source (default
``<checkout>/.cache/minivmm``, or ``$VMM_TIERD_MINIVMM_CACHE``); ``MiniVmm.start()`` runs it
and talks to it over stdin/stdout (the protocol is described at the top of minivmm.c).
Every wait is bounded; a VMM that dies or stops answering raises :class:`MiniVmmError` with
its exit status and last output. ``close()`` always leaves no process behind.

Pages are numbered as in RAM (guest-physical address / 4096); the data area is
``data_pages`` (``range``) and ``data_range`` (byte offset and length in RAM and the memfd).
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import os
import queue
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

SOURCE = Path(__file__).with_name("minivmm.c")
PROJECT = Path(__file__).resolve().parents[2]
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror", "-pthread")
PREFIX = "MINIVMM "
PAGE = 4096
FULL_FILL = PAGE // 4 - 2  # fill dwords that cover the whole page after the header
KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00)
TAIL = 40  # lines of output kept for error messages


class MiniVmmError(RuntimeError):
    """The VMM failed, refused a command, died or stopped answering."""


def kvm_unavailable() -> str | None:
    """Why KVM cannot be used here, or None if /dev/kvm opens and speaks API 12."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"/dev/kvm: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as exc:
        return f"KVM_GET_API_VERSION: {exc.strerror}"
    finally:
        os.close(fd)
    return None if version == 12 else f"KVM API version {version}, expected 12"


def cache_dir() -> Path:
    env = os.environ.get("VMM_TIERD_MINIVMM_CACHE")
    return Path(env) if env else PROJECT / ".cache" / "minivmm"


def build(cache: Path | None = None, source: Path = SOURCE) -> Path:
    """The compiled ``source`` (default minivmm.c), built once per source version (atomic
    rename into the cache); the binary is named after the source."""
    src = source.read_bytes()
    key = hashlib.sha256(src + " ".join(CFLAGS).encode()).hexdigest()[:16]
    out = (cache or cache_dir()) / key / source.stem
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{source.stem}.{os.getpid()}.{threading.get_ident()}")
    try:
        proc = subprocess.run(["gcc", *CFLAGS, "-o", str(tmp), str(source)],
                              capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MiniVmmError(f"cannot run gcc on {source}: {exc}") from exc
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise MiniVmmError(f"gcc failed on {source} ({proc.returncode}):\n{proc.stderr}")
    os.replace(tmp, out)
    return out


def stamp_fill(page: int, version: int) -> int:
    """The u32 the guest repeats after a page's header (minivmm.c's ``fill``)."""
    return ((page * 0x9E3779B1) ^ (((version + 1) & 0xFFFFFFFF) * 0x85EBCA77)) & 0xFFFFFFFF


def expected_page(page: int, version: int, fill_dwords: int) -> bytes:
    """The 4 KiB a guest write of ``version`` leaves in ``page`` that held zeros before:
    u32 page, u32 version, ``fill_dwords`` fill words; the rest is not written."""
    words = np.zeros(PAGE // 4, dtype="<u4")
    words[0] = page
    words[1] = version
    words[2:2 + fill_dwords] = stamp_fill(page, version)
    return words.tobytes()


def expected_pages(first: int, count: int, version: int, fill_dwords: int) -> np.ndarray:
    """``expected_page`` for pages [first, first+count), as a (count, 1024) u32 array."""
    pages = np.arange(first, first + count, dtype=np.uint64)
    fill = ((pages * np.uint64(0x9E3779B1))
            ^ np.uint64((((version + 1) & 0xFFFFFFFF) * 0x85EBCA77) & 0xFFFFFFFF))
    words = np.zeros((count, PAGE // 4), dtype="<u4")
    words[:, 0] = pages
    words[:, 1] = version
    words[:, 2:2 + fill_dwords] = (fill & np.uint64(0xFFFFFFFF)).astype("<u4")[:, None]
    return words


@dataclass(frozen=True, slots=True)
class Ready:
    pid: int
    ram: int           # bytes of guest RAM (memfd size)
    hva: int           # where the VMM mapped it
    memfd: int         # the memfd's fd number in the VMM
    data_first: int    # first data page
    data_pages: int    # number of data pages
    fill_dwords: int


@dataclass(frozen=True, slots=True)
class Written:
    round: int
    pages: int
    ns: int


@dataclass(frozen=True, slots=True)
class Verified:
    round: int
    pages: int
    bad: int
    first_bad: int     # page number, -1 if none
    ns: int


@dataclass(frozen=True, slots=True)
class Touched:
    round: int
    pages: int
    touches: int
    bad: int           # touches that found a page not holding its own page number
    ns: int


def parse_fields(line: str) -> dict[str, str]:
    """``key=value`` words of an output line."""
    return dict(w.split("=", 1) for w in line.split() if "=" in w)


class MiniVmm:
    """One running minivmm process."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL)
        self._reader = threading.Thread(target=self._read, name="minivmm-out", daemon=True)
        self._reader.start()
        self._ready: Ready | None = None
        self._last_version: int | None = None
        self.handoff_lines: list[str] = []

    # ---- life cycle ---------------------------------------------------------------------
    @classmethod
    def start(cls, ram_mib: int = 64, *, fill_dwords: int | None = None,
              handoff: str | os.PathLike[str] | None = None, uffd_api: int | None = None,
              register: int | None = None, send_memfd: bool = True, wait: bool = True,
              timeout: float = 60.0, binary: Path | None = None) -> MiniVmm:
        """Start a VMM. With ``handoff`` it connects to that socket and waits for the
        receiver's ack before its vCPU runs: pass ``wait=False``, receive (handoff.py),
        ack, then ``wait_ready()``."""
        argv = [str(binary or build()), "--ram-mib", str(ram_mib)]
        if fill_dwords is not None:
            argv += ["--fill-dwords", str(fill_dwords)]
        if handoff is not None:
            argv += ["--handoff", os.fspath(handoff)]
            if uffd_api is not None:
                argv += ["--uffd-api", f"{uffd_api:x}"]
            if register is not None:
                argv += ["--register", f"{register:x}"]
            if not send_memfd:
                argv.append("--no-memfd")
        elif uffd_api is not None or register is not None or not send_memfd:
            raise ValueError("uffd_api, register and send_memfd apply to handoff mode only")
        vmm = cls(argv)
        if wait:
            try:
                vmm.wait_ready(timeout)
            except BaseException:
                vmm.close()
                raise
        return vmm

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.rstrip("\n")
            self._tail.append(line)
            self._lines.put(line)
        self._lines.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> list[str]:
        """The last lines the VMM printed."""
        return list(self._tail)

    def _fail(self, what: str) -> MiniVmmError:
        rc = self.proc.poll()
        state = "running" if rc is None else f"exited with status {rc}"
        tail = "\n  ".join(self.output()) or "(nothing)"
        return MiniVmmError(f"minivmm pid {self.pid} ({state}): {what}; last output:\n  {tail}")

    def _next(self, kinds: tuple[str, ...], timeout: float) -> tuple[str, dict[str, str]]:
        """The next line of one of ``kinds``; ERROR and FATAL lines raise."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._fail(f"no {'/'.join(kinds)} line within {timeout:.0f} s")
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(timeout=10)
                self._lines.put(None)  # later waits fail the same way
                raise self._fail(f"output ended while waiting for {'/'.join(kinds)}")
            if not line.startswith(PREFIX):
                continue
            kind, _, rest = line[len(PREFIX):].partition(" ")
            if kind in ("ERROR", "FATAL"):
                raise self._fail(f"{kind}: {rest}")
            if kind == "HANDOFF":
                self.handoff_lines.append(line)
            if kind in kinds:
                return kind, parse_fields(rest)

    def wait_ready(self, timeout: float = 60.0) -> Ready:
        if self._ready is None:
            _, f = self._next(("READY",), timeout)
            self._ready = Ready(pid=int(f["pid"]), ram=int(f["ram"]), hva=int(f["hva"], 16),
                                memfd=int(f["memfd"]), data_first=int(f["data_first"]),
                                data_pages=int(f["data_pages"]),
                                fill_dwords=int(f["fill_dwords"]))
        return self._ready

    @property
    def ready(self) -> Ready:
        """The READY line's facts (waits for it: in handoff mode, ack first)."""
        return self.wait_ready()

    def close(self, timeout: float = 30.0) -> int:
        """Quit cleanly (the vCPU finishes what is queued), or kill after ``timeout``.
        Returns the exit status (negative: killed by that signal)."""
        if self.alive():
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        self._reader.join(timeout=10)
        return self.proc.returncode

    def __enter__(self) -> MiniVmm:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ---- the guest --------------------------------------------------------------------
    @property
    def ram_bytes(self) -> int:
        return self.ready.ram

    @property
    def data_pages(self) -> range:
        r = self.ready
        return range(r.data_first, r.data_first + r.data_pages)

    @property
    def data_range(self) -> tuple[int, int]:
        """(offset, length) in bytes of the data area within RAM (= within the memfd)."""
        r = self.ready
        return r.data_first * PAGE, r.data_pages * PAGE

    def data_hva(self) -> tuple[int, int]:
        """(address, length) of the data area in the VMM's address space."""
        off, length = self.data_range
        return self.ready.hva + off, length

    def open_memfd(self, flags: int = os.O_RDWR) -> int:
        """A new fd on the VMM's guest RAM, through /proc/PID/fd (the caller closes it)."""
        return os.open(f"/proc/{self.pid}/fd/{self.ready.memfd}", flags | os.O_CLOEXEC)

    def _range(self, first: int | None, count: int | None) -> tuple[int, int]:
        pages = self.data_pages
        if first is None and count is None:
            return pages.start, len(pages)
        if first is None or count is None:
            raise ValueError("give both first and count, or neither")
        return first, count

    def send(self, line: str) -> None:
        """Send one command line without waiting (then ``result(kind)``)."""
        if not self.alive():
            raise self._fail(f"cannot send {line!r}")
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise self._fail(f"cannot send {line!r}: {exc}") from exc

    def result(self, kind: str, timeout: float = 300.0) -> dict[str, str]:
        """The fields of the next ``kind`` result line (WRITE, VERIFY, HOT)."""
        return self._next((kind,), timeout)[1]

    def command(self, line: str, kind: str, timeout: float) -> dict[str, str]:
        """Send one command line and wait for its result line (``kind``)."""
        self.wait_ready(timeout)
        self.send(line)
        return self.result(kind, timeout)

    def write(self, version: int, first: int | None = None, count: int | None = None,
              timeout: float = 300.0) -> Written:
        """The guest stamps pages [first, first+count) (default: the data area) with
        ``version``."""
        a, n = self._range(first, count)
        f = self.command(f"write {version} {a} {n}", "WRITE", timeout)
        if first is None:
            self._last_version = version
        return Written(int(f["round"]), int(f["pages"]), int(f["ns"]))

    def verify_report(self, version: int | None = None, first: int | None = None,
                      count: int | None = None, timeout: float = 300.0) -> Verified:
        """The guest checks pages hold the stamp of ``version`` (default: the version of
        the last write over the whole data area)."""
        if version is None:
            if self._last_version is None:
                raise ValueError("verify: no version given and no whole-area write yet")
            version = self._last_version
        a, n = self._range(first, count)
        f = self.command(f"verify {version} {a} {n}", "VERIFY", timeout)
        return Verified(int(f["round"]), int(f["pages"]), int(f["bad"]), int(f["first_bad"]),
                        int(f["ns"]))

    def verify(self, version: int | None = None, first: int | None = None,
               count: int | None = None, timeout: float = 300.0) -> tuple[int, int]:
        """(pages checked, bad pages); see ``verify_report`` for the rest."""
        r = self.verify_report(version, first, count, timeout)
        return r.pages, r.bad

    def touch_hot(self, first: int, count: int, rounds: int = 1, *, write: bool = False,
                  timeout: float = 300.0) -> Touched:
        """The guest touches pages [first, first+count) ``rounds`` times: reads its page
        number, and with ``write`` rewrites its version word with itself."""
        mode = "write" if write else "read"
        f = self.command(f"hot {first} {count} {rounds} {mode}", "HOT", timeout)
        return Touched(int(f["round"]), int(f["pages"]), int(f["touches"]), int(f["bad"]),
                       int(f["ns"]))
