"""Bounded HTTP floods on loopback (service tests and benchmarks/bench_metrics_flood.py).

Both floods are one thread of non-blocking sockets, bounded in count and in time: they
stand for many clients without needing many client threads.
"""

from __future__ import annotations

import errno
import selectors
import socket
import threading
import time
from collections import Counter
from typing import cast
from urllib.parse import urlsplit

REQUEST = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n"


def target(url: str) -> tuple[str, int]:
    u = urlsplit(url)
    assert u.hostname is not None and u.port is not None, url
    return u.hostname, u.port


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError(f"no Threads: line for pid {pid}")


class SlowLoris:
    """``n`` connections that send a request one byte per ``drip_s`` and never finish it,
    for at most ``seconds``; ``closed`` counts those the server closed."""

    def __init__(self, url: str, n: int = 300, seconds: float = 6.0,
                 drip_s: float = 0.5) -> None:
        self.addr = target(url)
        self.n, self.seconds, self.drip_s = n, seconds, drip_s
        self.opened = 0
        self.closed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def holding(self) -> bool:
        """Still sending (within its time) with some connections open."""
        return self._thread.is_alive() and self.opened > self.closed

    def __enter__(self) -> SlowLoris:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(self.seconds + 10)

    def _run(self) -> None:
        socks: list[socket.socket] = []
        sent: dict[socket.socket, int] = {}
        end = time.monotonic() + self.seconds
        try:
            for _ in range(self.n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.settimeout(2)
                try:
                    s.connect(self.addr)
                except OSError:
                    s.close()
                    self.closed += 1
                    continue
                s.setblocking(False)
                socks.append(s)
                sent[s] = 0
                self.opened += 1
            while not self._stop.is_set() and time.monotonic() < end:
                for s in list(socks):
                    try:
                        if s.recv(4096, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                            raise ConnectionResetError
                    except BlockingIOError:
                        pass
                    except OSError:
                        socks.remove(s)
                        s.close()
                        self.closed += 1
                        continue
                    i = sent[s]
                    if i < len(REQUEST) - 4:  # never the final CRLF CRLF
                        try:
                            s.send(REQUEST[i:i + 1])
                            sent[s] = i + 1
                        except OSError:
                            socks.remove(s)
                            s.close()
                            self.closed += 1
                self._stop.wait(self.drip_s)
        finally:
            for s in socks:
                s.close()


def parallel_scrapes(url: str, n: int = 1000, timeout_s: float = 30.0) -> Counter[str]:
    """``n`` scrapes started at once; each ends as "200", "503", "reset", "refused" or
    "unfinished" (still open when ``timeout_s`` ran out)."""
    addr = target(url)
    sel = selectors.DefaultSelector()
    out: Counter[str] = Counter()
    state: dict[socket.socket, bytearray] = {}
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        rc = s.connect_ex(addr)
        if rc not in (0, errno.EINPROGRESS):
            out["refused"] += 1
            s.close()
            continue
        state[s] = bytearray()
        sel.register(s, selectors.EVENT_WRITE)
    end = time.monotonic() + timeout_s
    while state and time.monotonic() < end:
        for key, mask in sel.select(0.5):
            s = cast(socket.socket, key.fileobj)
            buf = state[s]
            try:
                if mask & selectors.EVENT_WRITE:
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise ConnectionRefusedError(err, "connect")
                    s.send(REQUEST)
                    sel.modify(s, selectors.EVENT_READ)
                    continue
                chunk = s.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionRefusedError:
                chunk, verdict = b"", "refused"
            except OSError:
                chunk, verdict = b"", "reset"
            else:
                verdict = ""
            if chunk:
                buf += chunk
                continue
            if not verdict:
                head = bytes(buf[:16])
                verdict = ("200" if head.startswith(b"HTTP/1.1 200") and _complete(buf)
                           else "503" if head.startswith(b"HTTP/1.1 503")
                           else "reset")
            out[verdict] += 1
            sel.unregister(s)
            s.close()
            del state[s]
    out["unfinished"] += len(state)
    for s in state:
        s.close()
    sel.close()
    return out


def _complete(buf: bytearray) -> bool:
    head, sep, body = bytes(buf).partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) == int(line.split(b":")[1])
    return False


def main() -> None:
    """``python svc_floods.py URL SECONDS``: both floods until SECONDS have passed, then
    one line of counts (for a flood in its own, possibly niced, process)."""
    import sys

    url, seconds = sys.argv[1], float(sys.argv[2])
    tally: Counter[str] = Counter()
    end = time.monotonic() + seconds
    with SlowLoris(url, n=300, seconds=seconds):
        while time.monotonic() < end:
            tally.update(parallel_scrapes(url, n=1000, timeout_s=max(1.0, end -
                                                                    time.monotonic())))
    print(" ".join(f"{k}={v}" for k, v in sorted(tally.items())), flush=True)


if __name__ == "__main__":
    main()
