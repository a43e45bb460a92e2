"""Fixtures of the service tests: every daemon started is killed in teardown."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from svc_helpers import Daemon, StartDaemon


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.kill()


@pytest.fixture
def start_daemon(daemons: list[Daemon]) -> StartDaemon:
    def start(args: list[str], env: dict[str, str] | None = None,
              prefix: list[str] | None = None) -> Daemon:
        d = Daemon(args, env, prefix)
        daemons.append(d)
        return d
    return start
