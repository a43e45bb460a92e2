"""Another process on the real kernel: the :class:`~vmm_tierd.kernel.process.Process`
Protocol through a pidfd, a directory fd of /proc/PID and ptrace (``native/process.c``).

Everything per-process in /proc is opened relative to the /proc/PID directory fd taken
at open: that fd stays bound to the process it was opened for, so once it has exited
every lookup through it fails (ENOENT/ESRCH) instead of reaching a process that reused
the pid. process_vm_readv/writev and ptrace take a pid number; they are checked against
the pidfd around the call (a pid is only reused after its process was reaped, which is
never within one call in practice).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
from collections.abc import Sequence
from typing import Any

from .api import KernelError, Owner, ScanResult
from .linux import parse_uffd_fdinfo
from .linux_scan import PagemapScanner
from .process import InjectError, InjectResult, ProcFd, ProcMapping, Syscall, ThreadInfo

from vmm_tierd._native import ffi, lib  # isort: skip

log = logging.getLogger(__name__)
_alloc = ffi.new_allocator(should_clear_after_alloc=False)

_U64 = (1 << 64) - 1
_SYSCALL_INSN = b"\x0f\x05"
_INSN_SEARCH_MAX = 1 << 20  # bytes of an executable mapping searched for `syscall`


def parse_stat(text: str) -> tuple[str, int]:
    """(comm, start_time) from a /proc/PID/stat line. comm (field 2) sits in parentheses
    and may itself contain spaces, parentheses and digits (PR_SET_NAME allows any byte
    but NUL), so the fields are counted from the *last* ')'. start_time is field 22."""
    lp, rp = text.find("("), text.rfind(")")
    if lp < 0 or rp < lp:
        raise ValueError(f"/proc/PID/stat: no (comm) in {text[:80]!r}")
    rest = text[rp + 1:].split()
    if len(rest) < 20:  # rest[0] is field 3 (state), field 22 is rest[19]
        raise ValueError(f"/proc/PID/stat: {len(rest) + 2} fields, need 22: {text[:80]!r}")
    return text[lp + 1:rp], int(rest[19])


def parse_maps(text: str) -> list[ProcMapping]:
    """/proc/PID/maps: ``start-end perms offset dev inode [path]``; the path may
    contain spaces (and ends in " (deleted)" for an unlinked file)."""
    out: list[ProcMapping] = []
    for line in text.splitlines():
        f = line.split(maxsplit=5)
        if len(f) < 5:
            continue
        lo, _, hi = f[0].partition("-")
        out.append(ProcMapping(int(lo, 16), int(hi, 16), f[1], int(f[2], 16), int(f[4]),
                               f[5] if len(f) > 5 else ""))
    return out


def _thread_hint(pid: int, err: int) -> str:
    """pidfd_open of a thread that is not its group's leader fails with ENOENT on 6.18
    (EINVAL on the kernels the man page describes): say so."""
    if err not in (errno.ENOENT, errno.EINVAL):
        return ""
    try:
        with open(f"/proc/{pid}/status") as f:
            tgid = next(int(ln.split()[1]) for ln in f if ln.startswith("Tgid:"))
    except (OSError, StopIteration, ValueError):
        return ""
    return f" is a thread of process {tgid}, not a process" if tgid != pid else ""


class LinuxProcess:
    """Process ``pid`` (a thread-group leader), opened by ``LinuxKernel.open_process``."""

    def __init__(self, pid: int, page_size: int, scan_vec_len: int = 65536) -> None:
        self.pid = pid
        self.page_size = page_size
        self._scan_vec_len = scan_vec_len
        self._dir = -1
        self._pagemap = -1
        self._scanner: PagemapScanner | None = None
        self._insn = 0  # address of a `syscall` instruction in the process (cached)
        self._inject_lock = threading.Lock()
        self._lock = threading.Lock()
        fd = int(lib.vt_pidfd_open(pid, 0))
        if fd < 0:
            raise KernelError("pidfd_open", -fd, 0, f"pid {pid}{_thread_hint(pid, -fd)}")
        self.pidfd = fd
        try:
            try:
                self._dir = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                raise self._error("open /proc/PID", e) from None
            comm, start = parse_stat(self._read("stat", "stat"))
            if self._exited():
                raise KernelError("pidfd_open", errno.ESRCH, 0, f"pid {pid} has exited")
        except BaseException:
            self.close()
            raise
        self.comm = comm
        self.owner = Owner(pid, start)

    # ---- identity ---------------------------------------------------------------------
    def _exited(self) -> bool:
        """The pidfd polls readable once the process has exited (zombie or reaped)."""
        if self.pidfd < 0:
            return True
        p = select.poll()
        p.register(self.pidfd, select.POLLIN)
        return bool(p.poll(0))

    def alive(self) -> bool:
        if self._exited():
            return False
        try:  # by path, not through the dir fd: this is the pid-reuse check
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                _, start = parse_stat(f.read().decode("utf-8", "replace"))
        except (OSError, ValueError):
            return False
        return start == self.owner.start_time

    def _need_open(self, op: str) -> None:
        if self._dir < 0:
            raise KernelError(op, errno.EBADF, 0, f"pid {self.pid}: process handle closed")

    def _error(self, op: str, e: OSError, what: str = "", *, fd_entry: bool = False
               ) -> KernelError:
        err = e.errno or errno.EIO
        if self._exited():
            err = errno.ESRCH
        elif err == errno.ENOENT:
            err = errno.EBADF if fd_entry else errno.ESRCH
        return KernelError(op, err, 0, f"pid {self.pid}" + (f": {what}" if what else ""))

    def _read(self, op: str, name: str, *, fd_entry: bool = False) -> str:
        self._need_open(op)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._dir)
            try:
                chunks = []
                while chunk := os.read(fd, 1 << 16):
                    chunks.append(chunk)
            finally:
                os.close(fd)
        except OSError as e:
            raise self._error(op, e, f"/proc/PID/{name}", fd_entry=fd_entry) from None
        return b"".join(chunks).decode("utf-8", "replace")

    def _check_alive(self, op: str, what: str = "") -> None:
        """A zombie's /proc files read empty rather than failing: exit is checked on the
        pidfd after every read."""
        if self._exited():
            raise KernelError(op, errno.ESRCH, 0,
                              f"pid {self.pid} has exited" + (f" ({what})" if what else ""))

    # ---- /proc ------------------------------------------------------------------------
    def maps(self) -> list[ProcMapping]:
        text = self._read("maps", "maps")
        self._check_alive("maps")
        return parse_maps(text)

    def _listdir(self, op: str, sub: str) -> list[str]:
        """The entries of /proc/PID/<sub>, through the directory fd held open."""
        self._need_open(op)
        try:
            dfd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._dir)
            try:
                return os.listdir(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            raise self._error(op, e, f"/proc/PID/{sub}") from None

    def fds(self) -> list[ProcFd]:
        names = self._listdir("fds", "fd")
        out: list[ProcFd] = []
        for name in sorted(names, key=int):
            try:
                target = os.readlink(f"fd/{name}", dir_fd=self._dir)
                inode = os.stat(f"fd/{name}", dir_fd=self._dir).st_ino
            except FileNotFoundError:  # closed meanwhile
                continue
            except OSError as e:
                raise self._error("fds", e, f"/proc/PID/fd/{name}") from None
            out.append(ProcFd(int(name), target, inode))
        self._check_alive("fds")
        return out

    def threads(self) -> list[ThreadInfo]:
        names = self._listdir("threads", "task")
        out: list[ThreadInfo] = []
        for name in names:
            try:
                with open(f"task/{name}/comm", "rb",
                          opener=lambda p, fl: os.open(p, fl | os.O_CLOEXEC,
                                                       dir_fd=self._dir)) as f:
                    raw = f.read()
            except (FileNotFoundError, ProcessLookupError):  # exited meanwhile
                continue
            except OSError as e:
                raise self._error("threads", e, f"/proc/PID/task/{name}/comm") from None
            # The kernel appends one "\n"; the name itself may end in spaces.
            comm = raw[:-1] if raw.endswith(b"\n") else raw
            out.append(ThreadInfo(int(name), comm.decode("utf-8", "replace")))
        self._check_alive("threads")
        return out

    def uffd_features(self, fd: int) -> int | None:
        text = self._read("fdinfo", f"fdinfo/{int(fd)}", fd_entry=True)
        self._check_alive("fdinfo")
        return parse_uffd_fdinfo(text, fd, f"/proc/{self.pid}/fdinfo/{fd}")

    # ---- fds and memory ---------------------------------------------------------------
    def getfd(self, fd: int) -> int:
        self._need_open("pidfd_getfd")
        r = int(lib.vt_pidfd_getfd(self.pidfd, fd, 0))
        if r < 0:
            raise KernelError("pidfd_getfd", -r, 0, f"pid {self.pid} fd {fd}")
        return r

    def read_memory(self, addr: int, length: int) -> bytes:
        if length <= 0:
            return b""
        self._need_open("process_vm_readv")
        buf = _alloc("char[]", length)
        done = ffi.new("int64_t *")
        r = lib.vt_process_vm_rw(self.pid, 0, buf, addr, length, done)
        self._check_alive("process_vm_readv")
        if r < 0:
            raise KernelError("process_vm_readv", -r, int(done[0]),
                              f"pid {self.pid}, [0x{addr:x}, 0x{addr + length:x})")
        return ffi.buffer(buf, length)[:]

    def write_memory(self, addr: int, data: bytes) -> None:
        if not data:
            return
        self._need_open("process_vm_writev")
        self._check_alive("process_vm_writev")
        buf = ffi.from_buffer(data)
        done = ffi.new("int64_t *")
        r = lib.vt_process_vm_rw(self.pid, 1, buf, addr, len(buf), done)
        if r < 0:
            err = errno.ESRCH if self._exited() else -r
            raise KernelError("process_vm_writev", err, int(done[0]),
                              f"pid {self.pid}, [0x{addr:x}, 0x{addr + len(buf):x})")

    def pagemap_scan(self, start: int, end: int, *, category_mask: int = 0,
                     category_inverted: int = 0, category_anyof_mask: int = 0,
                     return_mask: int = 0, flags: int = 0, max_pages: int = 0
                     ) -> ScanResult:
        with self._lock:
            if self._scanner is None:
                self._need_open("PAGEMAP_SCAN")
                try:
                    self._pagemap = os.open("pagemap", os.O_RDONLY | os.O_CLOEXEC,
                                            dir_fd=self._dir)
                except OSError as e:
                    raise self._error("open /proc/PID/pagemap", e) from None
                self._scanner = PagemapScanner(self._pagemap, self.page_size,
                                               self._scan_vec_len)
            scanner = self._scanner
        try:
            res = scanner.scan(start, end, category_mask=category_mask,
                               category_inverted=category_inverted,
                               category_anyof_mask=category_anyof_mask,
                               return_mask=return_mask, flags=flags, max_pages=max_pages)
        except KernelError as e:
            if self._exited():
                raise KernelError(e.op, errno.ESRCH, e.done, e.detail) from None
            raise
        self._check_alive("PAGEMAP_SCAN")
        return res

    # ---- injection ----------------------------------------------------------------------
    def _syscall_insn(self) -> int:
        """Address of a `syscall` instruction (0f 05) in the process: its [vDSO] has one
        (the fallback paths of clock_gettime & co.). The bytes may be part of a longer
        instruction; that does not matter, rip is set to them and one instruction is
        executed. Without a vDSO (vdso=0) the executable mappings are searched."""
        if self._insn:
            return self._insn
        maps = self.maps()
        cands = [m for m in maps if m.path == "[vdso]"]
        cands += [m for m in maps if m.perms[2:3] == "x" and m.path != "[vdso]"]
        for m in cands:
            try:
                data = self.read_memory(m.start, min(m.length, _INSN_SEARCH_MAX))
            except KernelError as e:
                if e.errno == errno.ESRCH:
                    raise
                continue
            i = data.find(_SYSCALL_INSN)
            if i >= 0:
                self._insn = m.start + i
                return self._insn
        raise KernelError("inject", errno.ENOEXEC, 0,
                          f"pid {self.pid}: no syscall instruction in its vDSO or code")

    def inject(self, tid: int, calls: Sequence[Syscall]) -> InjectResult:
        n = len(calls)
        arr: Any = ffi.new("struct vt_syscall[]", max(n, 1))
        for i, c in enumerate(calls):
            if not 0 <= c.nr < 4096 or len(c.args) > 6:
                raise ValueError(f"inject: call {i}: bad syscall {c!r} (nr 0..4095, "
                                 f"at most 6 arguments)")
            arr[i].nr = c.nr
            for j, a in enumerate(c.args):
                if not -(1 << 63) <= a <= _U64:
                    raise ValueError(f"inject: call {i} argument {j}: {a} is not a 64-bit value")
                arr[i].args[j] = a & _U64
        self._need_open("ptrace(SEIZE)")
        try:
            os.stat(f"task/{int(tid)}", dir_fd=self._dir)
        except OSError:
            self._check_alive("ptrace(SEIZE)")
            raise InjectError("ptrace(SEIZE)", errno.ESRCH,
                              f"tid {tid} is not a thread of pid {self.pid}") from None
        insn = self._syscall_insn()
        res = ffi.new("int64_t[]", max(n, 1))
        rep = ffi.new("struct vt_inject_report *")
        with self._inject_lock:  # one tracer at a time per process
            r = lib.vt_inject(self.pid, tid, insn, arr, n, res, rep)
        results = tuple(int(res[i]) for i in range(rep.calls_done))
        signals = tuple(int(rep.signals[i]) for i in range(rep.nsignals))
        if rep.lost_signals:
            log.warning("pid %d tid %d: %d signals arrived during an injection beyond the "
                        "%d held; they were not re-delivered", self.pid, tid,
                        rep.lost_signals, len(rep.signals))
        if r < 0:
            op = ffi.string(rep.op).decode()
            err = int(rep.err)
            # PTRACE_SEIZE of a zombie is EPERM, not ESRCH.
            if err == errno.ESRCH or self._exited():
                err = errno.ESRCH
            hint = self._seize_hint(tid) if (op, err) == ("ptrace(SEIZE)", errno.EPERM) else ""
            raise InjectError(op, err, f"pid {self.pid} tid {tid}, after {len(results)} of "
                              f"{n} calls, registers "
                              f"{'restored' if rep.restored else 'not restored'}{hint}",
                              results=results, restored=bool(rep.restored), signals=signals)
        return InjectResult(tid, results, rep.pause_ns / 1e9, signals)

    def _seize_hint(self, tid: int) -> str:
        try:
            text = self._read("ptrace(SEIZE)", f"task/{tid}/status")
            tracer = next(int(ln.split()[1]) for ln in text.splitlines()
                          if ln.startswith("TracerPid:"))
        except (KernelError, StopIteration, ValueError):
            return ""
        if tracer:
            return f"; already traced by pid {tracer}"
        return "; tracing it needs CAP_SYS_PTRACE (or the same user and ptrace_scope 0)"

    def close(self) -> None:
        for name in ("_pagemap", "_dir", "pidfd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        self._scanner = None

    def __repr__(self) -> str:
        return f"LinuxProcess({self.owner})"
