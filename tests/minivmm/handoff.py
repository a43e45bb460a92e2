"""The receiving end of minivmm's handoff (Firecracker's UFFD handler protocol).

The VMM connects to a UNIX socket we listen on and sends one message: a JSON array of
``{"base_host_virt_addr", "size", "offset", "page_size"}`` objects (plus Firecracker's
deprecated ``page_size_kib``, which holds bytes) with its uffd, and optionally its memfd
(e2b's extension), as SCM_RIGHTS. It then waits for our ack (a line, or our closing the
connection) before its vCPU runs.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field

from .driver import MiniVmm, MiniVmmError

MAX_MSG = 65536


@dataclass(frozen=True, slots=True)
class UffdRegion:
    base_host_virt_addr: int
    size: int
    offset: int
    page_size: int


@dataclass
class Handoff:
    regions: list[UffdRegion]
    uffd: int                  # our copy of the VMM's uffd (its context: the VMM's mm)
    memfd: int | None          # our copy of the VMM's memfd, if sent
    conn: socket.socket | None
    extra_fds: list[int] = field(default_factory=list)

    def ack(self) -> None:
        """Let the VMM start its vCPU (after API/register on a fresh uffd)."""
        if self.conn is not None:
            self.conn.sendall(b"ok\n")
            self.conn.close()
            self.conn = None

    def close(self) -> None:
        """Close everything received (the VMM keeps its own uffd and memfd)."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        for fd in (self.uffd, self.memfd, *self.extra_fds):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.uffd, self.memfd, self.extra_fds = -1, None, []


def listen(path: str | os.PathLike[str]) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.bind(os.fspath(path))
    s.listen(1)
    return s


def parse_regions(text: str) -> list[UffdRegion]:
    """Firecracker's region list; a malformed one raises ValueError naming what is wrong."""
    data = json.loads(text)
    if not isinstance(data, list) or not data:
        raise ValueError(f"handoff message: expected a non-empty JSON array, got {text!r}")
    out = []
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise ValueError(f"handoff message: region {i} is not an object: {obj!r}")
        vals = {}
        for key in ("base_host_virt_addr", "size", "offset", "page_size"):
            v = obj.get(key)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"handoff message: region {i} {key}: expected an int >= 0, "
                                 f"got {v!r}")
            vals[key] = v
        out.append(UffdRegion(**vals))
    return out


def receive(listener: socket.socket, vmm: MiniVmm | None = None,
            timeout: float = 60.0) -> Handoff:
    """Accept the VMM's connection and read its message. A VMM that dies first raises
    MiniVmmError with its output."""
    deadline = time.monotonic() + timeout
    listener.settimeout(0.2)
    while True:
        try:
            conn, _ = listener.accept()
            break
        except TimeoutError:
            if vmm is not None and not vmm.alive():
                raise vmm._fail("exited before connecting to the handoff socket") from None
            if time.monotonic() > deadline:
                raise MiniVmmError(f"no handoff connection within {timeout:.0f} s") from None
    conn.settimeout(max(deadline - time.monotonic(), 1.0))
    fds: list[int] = []
    text = b""
    try:
        while True:
            msg, got, flags, _ = socket.recv_fds(conn, MAX_MSG, 4)
            fds += got
            if flags & socket.MSG_CTRUNC:
                raise MiniVmmError("handoff message: control data truncated (too many fds)")
            if not msg:
                raise MiniVmmError(f"handoff connection closed after {text!r}")
            text += msg
            try:
                regions = parse_regions(text.decode())
                break
            except json.JSONDecodeError:
                continue  # a partial read of the message
        if not fds:
            raise MiniVmmError(f"handoff message {text!r} carried no fd")
    except BaseException:
        for fd in fds:
            os.close(fd)
        conn.close()
        raise
    return Handoff(regions, fds[0], fds[1] if len(fds) > 1 else None, conn, fds[2:])
