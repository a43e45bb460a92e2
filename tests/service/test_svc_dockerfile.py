"""The Dockerfile agrees with the daemon it runs: the suggested stop timeout covers the
default command's stop deadline plus grace, and the metrics port it EXPOSEs is one the
default command listens on from outside the container's loopback."""

from __future__ import annotations

import json
import re
from pathlib import Path

from vmm_tierd.cli import build_parser
from vmm_tierd.service.config import default_settings, parse_listen, with_overrides
from vmm_tierd.service.runner import STOP_GRACE_S

DOCKERFILE = (Path(__file__).resolve().parents[2] / "Dockerfile").read_text()


def instruction(name: str) -> str:
    (line,) = re.findall(rf"^{name} (.+)$", DOCKERFILE, re.M)
    return line


def test_the_suggested_stop_timeout_covers_the_deadline_plus_grace() -> None:
    cmd = json.loads(instruction("CMD"))
    args = build_parser().parse_args(cmd)
    assert args.command == "run" and args.config is None  # the embedded default
    deadline = default_settings().daemon.shutdown_deadline_s
    timeouts = [int(t) for t in re.findall(r"--stop-timeout (\d+)", DOCKERFILE)]
    assert timeouts and all(t >= deadline + STOP_GRACE_S for t in timeouts), timeouts
    assert f"{deadline:g}s in the embedded default" in DOCKERFILE


def test_the_default_command_listens_where_expose_and_publish_can_reach() -> None:
    cmd = json.loads(instruction("CMD"))
    args = build_parser().parse_args(cmd)
    s = with_overrides(default_settings(), metrics_listen=args.metrics_listen)
    listen = parse_listen(s.daemon.metrics_listen)
    assert listen is not None
    host, port = listen
    assert host in ("0.0.0.0", "::")  # the container's loopback is unreachable from outside
    assert instruction("EXPOSE") == str(port)
    # every run line publishes the port on the host's loopback only
    publishes = re.findall(r"-p (\S+)", DOCKERFILE)
    assert publishes and all(p == f"127.0.0.1:{port}:{port}" for p in publishes), publishes
    # and a run line with its own CMD keeps the listen address
    for run_line in re.findall(r"vmm-tierd run --config .*", DOCKERFILE):
        assert f"--metrics-listen 0.0.0.0:{port}" in run_line, run_line
