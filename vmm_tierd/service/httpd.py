"""The metrics endpoint: one thread, bounded connections, bounded time, cached output.

prometheus-client's own server starts a thread per connection: 300 slow-loris connections
held 306 threads in the daemon, and 1,500 parallel scrapes ran the collectors 1,500 times,
every thread taking the GIL from the fault path. This server is one thread with a
``selectors`` loop:

- at most ``max_connections`` are open at once (each costs an fd and a buffer, no thread).
  When a new one arrives and all are taken, the one that has waited longest for its
  request is closed to make room, if it has waited more than ``idle_grace_s`` (a slow or
  idle client); otherwise the new one gets ``503`` at once and is closed;
- at most ``max_accept_rate`` connections are taken per second (a token bucket with one
  second of burst), answered or refused alike. Beyond that the server does not accept:
  the kernel's listen backlog holds the next ones and drops what overflows, which costs
  this process nothing. A flood can take the metrics endpoint, but not the GIL that the
  fault path needs (each connection costs ~100 µs of Python);
- each connection has ``timeout_s`` in all to send its request (at most 8 KiB of request
  line and headers) and to take its answer;
- the exposition is generated at most once per ``cache_s`` per format, so a flood of
  scrapes runs the collectors a few times, not once per scrape;
- the answer is ``Connection: close``: no idle keep-alive connections to hold.

Refusals and timeouts are counted (``on_drop(reason)``) but never logged per connection.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from ..ratelimit import RateLimitedLog

log = logging.getLogger(__name__)
MAX_REQUEST_BYTES = 8192
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\n"
         b"Connection: close\r\n\r\n")


@dataclass(slots=True)
class _Conn:
    sock: socket.socket
    deadline: float
    accepted: float
    inbuf: bytearray = field(default_factory=bytearray)
    out: memoryview | None = None  # set once the request is answered


def _response(status: str, ctype: str, body: bytes, head_only: bool = False) -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode("ascii")
    return head if head_only else head + body


class MetricsServer:
    """Serves ``registry`` on (host, port); port 0 picks a free one."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int, *,
                 max_connections: int = 128, timeout_s: float = 10.0, cache_s: float = 1.0,
                 idle_grace_s: float = 1.0, max_accept_rate: float = 200.0,
                 on_drop: Callable[[str], None] | None = None) -> None:
        self.registry = registry
        self.max_connections = max_connections
        self.idle_grace_s = idle_grace_s
        self.max_accept_rate = max_accept_rate
        self._tokens = max_accept_rate
        self._refilled = time.monotonic()
        self._listening = True
        self.timeout_s = timeout_s
        self.cache_s = cache_s
        self.on_drop = on_drop or (lambda reason: None)
        self.generated = 0  # how many times the collectors ran
        self._cache: dict[str, tuple[float, bytes]] = {}
        self._errors = RateLimitedLog(log, burst=3, interval_s=60)
        family, _, _, _, addr = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0,
                                                   socket.AI_PASSIVE)[0]
        self._sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind(addr)
            self._sock.listen(128)
        except OSError:
            self._sock.close()
            raise
        self._sock.setblocking(False)
        self.host = host
        self.port: int = self._sock.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._closed = False
        self._conns: dict[socket.socket, _Conn] = {}
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._sock, selectors.EVENT_READ)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._loop, name="vmm-tierd-metrics",
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join(timeout=5)
        for c in list(self._conns.values()):
            c.sock.close()
        self._conns.clear()
        self._sel.close()
        self._sock.close()
        self._wake_r.close()
        self._wake_w.close()

    # ---- the loop (its own thread)
    def _loop(self) -> None:
        while not self._closed:
            now = time.monotonic()
            wait = min((c.deadline for c in self._conns.values()), default=now + 1.0) - now
            if not self._refill(now):
                wait = min(wait, 1.0 / self.max_accept_rate)
            try:
                events = self._sel.select(max(0.0, min(wait, 1.0)))
            except OSError as e:  # pragma: no cover - select on valid fds does not fail
                self._errors.error("select", "metrics server: select failed: %s", e)
                time.sleep(0.1)
                continue
            for key, mask in events:
                if key.fileobj is self._wake_r:
                    return
                if key.fileobj is self._sock:
                    self._accept()
                    continue
                c = self._conns.get(cast(socket.socket, key.fileobj))
                if c is None:
                    continue
                try:
                    if mask & selectors.EVENT_READ and c.out is None:
                        self._read(c)
                    if c.out is not None and c.sock in self._conns:
                        self._write(c)
                except Exception as e:  # one connection must not end the server
                    self._errors.warning("conn", "metrics server: connection failed: %s", e)
                    self._drop(c, "")
            now = time.monotonic()
            for c in [c for c in self._conns.values() if c.deadline <= now]:
                self._drop(c, "timeout")

    def _refill(self, now: float) -> bool:
        """Top up the accept tokens; watch the listening socket only while there are
        some. Returns whether accepting is on."""
        self._tokens = min(self.max_accept_rate,
                           self._tokens + (now - self._refilled) * self.max_accept_rate)
        self._refilled = now
        want = self._tokens >= 1
        if want != self._listening:
            if want:
                self._sel.register(self._sock, selectors.EVENT_READ)
            else:
                self._sel.unregister(self._sock)
            self._listening = want
        return want

    def _accept(self) -> None:
        for _ in range(64):  # a batch; the rest waits in the backlog for the next round
            if self._tokens < 1:
                return
            try:
                s, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: back off, count, don't spin
                self._errors.warning("accept", "metrics server: accept failed: %s", e)
                self.on_drop("accept_failed")
                return
            self._tokens -= 1
            s.setblocking(False)
            if len(self._conns) >= self.max_connections and not self._make_room():
                try:
                    s.send(_BUSY)
                except OSError:
                    pass
                s.close()
                self.on_drop("busy")
                continue
            now = time.monotonic()
            c = _Conn(s, deadline=now + self.timeout_s, accepted=now)
            self._conns[s] = c
            self._sel.register(s, selectors.EVENT_READ)
            try:
                self._read(c)  # the request is often there already: answer it at once
                if c.out is not None and s in self._conns:
                    self._write(c)
            except Exception as e:
                self._errors.warning("conn", "metrics server: connection failed: %s", e)
                self._drop(c, "")

    def _make_room(self) -> bool:
        old = time.monotonic() - self.idle_grace_s
        waiting = [c for c in self._conns.values() if c.out is None and c.accepted < old]
        if not waiting:
            return False
        self._drop(min(waiting, key=lambda c: c.accepted), "evicted")
        return True

    def _drop(self, c: _Conn, reason: str) -> None:
        if self._conns.pop(c.sock, None) is None:
            return
        try:
            self._sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()
        if reason:
            self.on_drop(reason)

    def _read(self, c: _Conn) -> None:
        while True:
            try:
                chunk = c.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(c, "")
                return
            if not chunk:
                self._drop(c, "")
                return
            c.inbuf += chunk
            end = c.inbuf.find(b"\r\n\r\n")
            if end < 0 and len(c.inbuf) > MAX_REQUEST_BYTES:
                self._answer(c, _response("431 Request Header Fields Too Large",
                                          "text/plain", b"request too large\n"))
                self.on_drop("bad_request")
                return
            if end >= 0:
                self._answer(c, self._handle(bytes(c.inbuf[:end])))
                return

    def _handle(self, head: bytes) -> bytes:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            self.on_drop("bad_request")
            return _response("400 Bad Request", "text/plain", b"bad request\n")
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return _response("405 Method Not Allowed", "text/plain", b"GET only\n")
        path = target.split("?", 1)[0]
        if path not in ("/", "/metrics"):
            return _response("404 Not Found", "text/plain", b"metrics are at /metrics\n")
        accept = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        body, ctype = self._exposition(accept)
        return _response("200 OK", ctype, body, head_only=method == "HEAD")

    def _exposition(self, accept: str) -> tuple[bytes, str]:
        encoder, ctype = choose_encoder(accept)
        now = time.monotonic()
        hit = self._cache.get(ctype)
        if hit is not None and now - hit[0] < self.cache_s:
            return hit[1], ctype
        body = encoder(self.registry)
        self.generated += 1
        if len(self._cache) >= 8:  # a handful of formats at most; never grow without bound
            self._cache.clear()
        self._cache[ctype] = (time.monotonic(), body)
        return body, ctype

    def _answer(self, c: _Conn, data: bytes) -> None:
        c.out = memoryview(data)
        self._sel.modify(c.sock, selectors.EVENT_WRITE)

    def _write(self, c: _Conn) -> None:
        assert c.out is not None
        while c.out:
            try:
                n = c.sock.send(c.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(c, "")
                return
            c.out = c.out[n:]
        try:
            c.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._drop(c, "")
