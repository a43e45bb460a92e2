"""``vmm-tierd run``: the daemon, on the embedded default or ``--config FILE``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..settings import Settings
from . import rules
from .capacity import check_capacity
from .config import BACKEND_CHOICES, ConfigError, default_settings, load_settings, with_overrides


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help="TOML config (default: the embedded default; SIGHUP re-reads FILE)")
    p.add_argument("--backend", choices=BACKEND_CHOICES,
                   help="override daemon.backend (fake = in-process fake kernel)")
    p.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="override daemon.metrics_listen (port 0 picks a free port; 'off')")
    p.add_argument("--store", metavar="DIR", help="override store.path")
    p.add_argument("--seconds", type=rules.arg_type(rules.SECONDS), metavar="N",
                   help="stop (gracefully) N seconds after the daemon is ready (a duration: "
                        "seconds, or e.g. \"2m\")")
    p.add_argument("--verify", action="store_true",
                   help="when stopping, stop the built-in workloads and verify every page "
                        "they wrote before bringing pages back (exit 1 if any is wrong)")


def setup_logging(level: str) -> None:
    # under systemd, journald adds its own timestamps
    fmt = ("%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM")
           else "%(asctime)s %(levelname)s %(message)s")
    logging.basicConfig(stream=sys.stderr, format=fmt, datefmt="%H:%M:%S", force=True)
    logging.getLogger().setLevel(level.upper())


def main(args: argparse.Namespace) -> int:
    overrides = {"backend": args.backend, "metrics_listen": args.metrics_listen,
                 "store_path": args.store}
    try:
        base = load_settings(args.config) if args.config else default_settings()
        settings = with_overrides(base, **overrides)
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        return 2
    return start(settings, args, overrides)


def start(settings: Settings, args: argparse.Namespace, overrides: dict[str, str | None],
          *, config_needs_memory: bool = True) -> int:
    """Capacity checks, logging, then the daemon (``run`` and ``attach`` share it)."""
    cap = check_capacity(settings)
    for line in cap.errors:
        print(line, file=sys.stderr)
    if cap.errors:
        return 2
    setup_logging(settings.daemon.log_level)
    for w in cap.warnings:
        logging.getLogger("vmm_tierd").warning("%s", w)
    from .runner import Service  # loads trio, the engine and the kernel only now

    return Service(settings, config_path=args.config, overrides=overrides,
                   seconds=args.seconds, verify=getattr(args, "verify", False),
                   config_needs_memory=config_needs_memory).run()
