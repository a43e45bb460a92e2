"""``vmm-tierd check-config FILE``: validate without running. Exit 0 ok, 2 invalid.

Besides the file's own rules, it checks that the config fits this machine and its store
(:mod:`.capacity`): errors make it invalid, warnings are printed and leave it valid.
"""

from __future__ import annotations

import argparse
import sys

from .capacity import check_capacity
from .config import ConfigError, load_settings
from .units import fmt_duration, fmt_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="TOML config to check")


def _fail(file: str, errors: list[str], warnings: list[str] | None = None) -> int:
    for line in errors:
        print(line, file=sys.stderr)
    for w in warnings or []:
        print(f"warning: {w}", file=sys.stderr)
    n = len(errors)
    print(f"{file}: {n} error{'s' if n != 1 else ''}", file=sys.stderr)
    return 2


def main(args: argparse.Namespace) -> int:
    try:
        s = load_settings(args.file)
    except ConfigError as e:
        return _fail(args.file, e.errors)
    cap = check_capacity(s)
    if cap.errors:
        return _fail(args.file, cap.errors, cap.warnings)
    for w in cap.warnings:
        print(f"warning: {w}", file=sys.stderr)
    total = sum(r.size_bytes for r in s.regions)
    regions = ", ".join(f"{r.name} {fmt_size(r.size_bytes)} {r.memtype.value}"
                        for r in s.regions)
    what = [f"{len(s.regions)} region(s) ({regions}; {fmt_size(total)} in all)"] \
        if s.regions else []
    what += [f"vm {v.name} ({f'pid {v.pid}' if v.pid else v.pid_file})" for v in s.vms]
    if s.daemon.handoff_socket is not None:
        what.append(f"handoff socket {s.daemon.handoff_socket}")
    print(f"{args.file}: ok: {', '.join(what)}, "
          f"interval {fmt_duration(s.tracking.interval_s)}, min_age {s.tracking.min_age}, "
          f"store {s.store.path}, metrics {s.daemon.metrics_listen}, "
          f"backend {s.daemon.backend}")
    return 0
