"""``vmm-tierd attach`` in a subprocess, for tests (the service tests' Daemon, plus sums
over metric labels, bounded waits for a figure, and SIGKILL)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tests.service.svc_helpers import Daemon

AGGRESSIVE = """\
[daemon]
shutdown_deadline = "60s"
[tracking]
interval = "{interval}"
min_age = 1
refault_hold = 1
"""


def write_config(tmp: Path, interval: str = "300ms", extra: str = "") -> Path:
    p = tmp / "attach.toml"
    p.write_text(AGGRESSIVE.format(interval=interval) + extra)
    return p


class AttachDaemon(Daemon):
    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        super().__init__(["--metrics-listen", "127.0.0.1:0", *args], env, command="attach")

    def total(self, name: str, **labels: str) -> float:
        return sum(v for lab, v in self.scrape().get(name, [])
                   if all(lab.get(k) == w for k, w in labels.items()))

    def wait_metric(self, name: str, at_least: float, timeout: float = 120.0,
                    **labels: str) -> float:
        deadline = time.monotonic() + timeout
        v = 0.0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}):\n{self.output}")
            v = self.total(name, **labels)
            if v >= at_least:
                return v
            time.sleep(0.5)
        raise AssertionError(f"{name} stayed at {v} < {at_least}:\n{self.output[-6000:]}")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
