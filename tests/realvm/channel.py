"""The host side of the control channel to rig.sh, and the rig's errors.

A request is one line ``<id> <verb> [<arg>]``; the answer is the one line
``@@RIG-<token> <id> <verb> key=value ...@@`` that carries the same id. Anything else read
from the channel (noise, or the late answer of a request that timed out) is kept for
diagnostics and never taken for an answer.
"""

from __future__ import annotations

import os
import re
import select
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


class RigError(RuntimeError):
    """Something went wrong with the real-VM guest; the message says what."""


class RigUnavailable(RigError):
    """The host cannot run the rig (no QEMU, no busybox, no kernel): tests skip."""


class BootFailed(RigError):
    """The guest never became ready: QEMU or the kernel failed, or the fill did."""


class GuestDied(RigError):
    """QEMU exited while the guest was expected to run."""


class ReplyTimeout(RigError):
    """The guest did not answer in time."""


class GuestError(RigError):
    """The guest answered a request with an error."""


class ChannelClosed(Exception):
    """End of file on the channel (QEMU exited, or rig.sh did)."""


class ChannelTimeout(Exception):
    """No answer before the deadline."""


@dataclass(frozen=True)
class Reply:
    id: int
    verb: str
    fields: dict[str, str]

    def as_int(self, key: str) -> int:
        return int(self.get(key))

    def as_float(self, key: str) -> float:
        return float(self.get(key))

    def as_names(self, key: str) -> list[str]:
        return [n for n in self.get(key).split(",") if n]

    def get(self, key: str) -> str:
        if key not in self.fields:
            raise RigError(f"guest reply {self.verb!r} (id {self.id}) lacks {key}=: "
                           f"{self.fields}")
        return self.fields[key]


def reply_pattern(token: str) -> re.Pattern[str]:
    return re.compile(r"@@RIG-" + re.escape(token) + r" (\d+) ([a-z]+)((?: [a-z_]+=[^ @]*)*)@@")


def parse_reply(pattern: re.Pattern[str], line: str) -> Reply | None:
    m = pattern.search(line)
    if m is None:
        return None
    fields = dict(kv.split("=", 1) for kv in m[3].split())
    return Reply(int(m[1]), m[2], fields)


class Channel:
    """Requests and answers over a byte stream (a socket, or two pipes in the host tests)."""

    def __init__(self, rfd: int, wfd: int, token: str) -> None:
        self.rfd, self.wfd = rfd, wfd
        self.pattern = reply_pattern(token)
        self.buf = b""
        self.last_id = 0
        self.other: deque[str] = deque(maxlen=50)    # lines that were not the awaited answer
        self.eof = False

    def send(self, verb: str, arg: int | None = None) -> int:
        self.last_id += 1
        line = f"{self.last_id} {verb}" + ("" if arg is None else f" {arg}") + "\n"
        data = line.encode()
        while data:
            data = data[os.write(self.wfd, data):]
        return self.last_id

    def wait(self, want: int, timeout: float, check: Callable[[], None]) -> Reply:
        """The answer with id ``want``. ``check`` runs about twice a second (and at end of
        file) so the caller can raise when QEMU died; ChannelTimeout, ChannelClosed."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                raw, self.buf = self.buf.split(b"\n", 1)
                line = raw.decode("utf-8", errors="replace").rstrip("\r")
                reply = parse_reply(self.pattern, line)
                if reply is not None and reply.id == want:
                    return reply
                self.other.append(line)
            if self.eof:
                check()
                raise ChannelClosed("end of file on the control channel")
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChannelTimeout(f"no answer within {timeout:.0f} s")
            ready, _, _ = select.select([self.rfd], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(self.rfd, 65536)
                if chunk:
                    self.buf += chunk
                else:
                    self.eof = True
                    self.buf += b"\n"
            else:
                check()
