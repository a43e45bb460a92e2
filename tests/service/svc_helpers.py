"""Helpers of the service tests: a real `vmm-tierd run` subprocess, metric lookups."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[str, list[tuple[dict[str, str], float]]]
T = TypeVar("T")


class StartDaemon(Protocol):
    """The ``start_daemon`` fixture: a `vmm-tierd run ARGS` killed at teardown."""

    def __call__(self, args: list[str], env: dict[str, str] | None = None,
                 prefix: list[str] | None = None) -> Daemon: ...


class Daemon:
    def __init__(self, args: list[str], env: dict[str, str] | None = None,
                 prefix: list[str] | None = None, command: str = "run") -> None:
        full_env = {k: v for k, v in os.environ.items()
                    if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                                 "JOURNAL_STREAM")}
        full_env.update(env or {})
        cmd = [*(prefix or []), sys.executable, "-m", "vmm_tierd.cli", command, *args]
        self.proc = subprocess.Popen(cmd,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=full_env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.url = ""

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 30.0, after: int = 0) -> re.Match[str]:
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in self.lines[after:]:
                m = rx.search(line)
                if m:
                    return m
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} within {timeout}s "
                             f"(exit {self.proc.poll()}):\n{self.output}")

    def wait_ready(self, timeout: float = 60.0) -> str:
        self.url = self.wait_for(r"metrics at (http://\S+)", timeout).group(1)
        self.wait_for(r"ready: \d+ region", timeout)
        return self.url

    def scrape(self) -> Samples:
        with urllib.request.urlopen(self.url, timeout=10) as resp:
            text = resp.read().decode()
        out: Samples = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out.setdefault(s.name, []).append((s.labels, s.value))
        return out

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """One stop signal, then wait for the graceful stop (a second one means: now)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        finally:
            self.kill()
        self._reader.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def value(m: Samples, name: str, **labels: str) -> float:
    vals = [v for lab, v in m.get(name, []) if all(lab.get(k) == x for k, x in labels.items())]
    assert len(vals) == 1, (name, labels, m.get(name))
    return vals[0]


def poll_until(fn: Callable[[], T | None], timeout: float, what: str,
               interval: float = 0.1) -> T:
    """Call fn() until it returns something truthy; fail naming `what` after timeout."""
    end = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < end:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")


def small_config(tmp_path: Path, *, interval: str = "200ms", size: str = "16MiB",
                 memtype: str = "anon", extra: str = "") -> Path:
    f = tmp_path / "vmm-tierd.toml"
    f.write_text(f"""
[daemon]
log_level = "info"
metrics_listen = "127.0.0.1:0"
shutdown_deadline = "20s"
[store]
path = "{tmp_path / 'store'}"
map_size = "256MiB"
sync = "none"
[tracking]
interval = "{interval}"
min_age = 1
{extra}
[[region]]
name = "vm0"
size = "{size}"
memtype = "{memtype}"
[region.workload]
threads = 1
hot_fraction = 0.2
ops_per_sec = 2000
shift_period = "1s"
""")
    return f
