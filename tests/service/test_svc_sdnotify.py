"""sd_notify against a real AF_UNIX datagram socket (path and abstract namespace)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmm_tierd.service.sdnotify import Notifier


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[socket.socket,
                                                                              str]]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        name = str(tmp_path / "notify.sock")
        s.bind(name)
    else:
        name = f"@vmm-tierd-test-{os.getpid()}-{id(s)}"
        s.bind(b"\0" + name[1:].encode())
    s.settimeout(5)
    yield s, name
    s.close()


def test_messages_arrive_as_datagrams(listener: tuple[socket.socket, str]) -> None:
    sock, name = listener
    n = Notifier({"NOTIFY_SOCKET": name})
    assert n.enabled
    assert n.ready("working set 1.0 MiB")
    assert sock.recv(4096) == b"READY=1\nSTATUS=working set 1.0 MiB"
    assert n.status("a\nb")
    assert sock.recv(4096) == b"STATUS=a b"
    assert n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert n.reloading()
    lines = sock.recv(4096).decode().split("\n")
    assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=")
    assert int(lines[1].split("=")[1]) > 0
    n.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    n = Notifier({})
    assert not n.enabled and not n.ready() and not n.watchdog()
    assert Notifier({"NOTIFY_SOCKET": "relative/path"}).enabled is False


def test_send_failure_is_reported_not_raised(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert n.enabled and n.ready() is False


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_s == 15.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
                    ).watchdog_s == 15.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_s is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_s is None
    assert Notifier({}).watchdog_s is None
