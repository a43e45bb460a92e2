"""``vmm-tierd attach --pid PID``: tier a running VM's guest RAM from beside it.

The VMM's RAM must be a shared memfd (QEMU: ``-object memory-backend-memfd,id=ram,
size=SIZE,share=on -machine memory-backend=ram``; libvirt: ``<memoryBacking><source
type='memfd'/><access mode='shared'/></memoryBacking>``). The daemon injects a uffd into
one of the VMM's non-vCPU threads (ptrace: root or CAP_SYS_PTRACE), tiers the RAM until
it is stopped (SIGTERM/Ctrl-C: every page back, uffd closed in the VMM, which is left as
it was found) or until the VMM exits. After a crash of the daemon, the same command on
the same store takes the VMM's uffd back and serves the faults that waited.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys

from ..settings import Settings, VmSettings
from . import rules
from .config import ConfigError, load_settings, with_overrides
from .main import add_arguments as add_run_arguments
from .main import start


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pid", type=rules.arg_type(rules.integer(1, 1 << 22)), metavar="PID",
                   help="the VMM's process id (e.g. $(pidof qemu-system-x86_64))")
    p.add_argument("--name", metavar="NAME",
                   help="the VM's name in metrics and in the store (default: vmPID)")
    add_run_arguments(p)
    p.set_defaults(verify=False)


def main(args: argparse.Namespace) -> int:
    overrides = {"backend": args.backend, "metrics_listen": args.metrics_listen,
                 "store_path": args.store}
    try:
        # --pid names the VM: the file may hold only settings
        base = (load_settings(args.config, need_memory=args.pid is None) if args.config
                else Settings(regions=(), source="<attach>"))
        settings = with_overrides(base, **overrides)
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        return 2
    if args.pid is None and not settings.vms and settings.daemon.handoff_socket is None:
        print("attach: give --pid PID, or a --config with [[vm]] tables or "
              "daemon.handoff_socket", file=sys.stderr)
        return 2
    if args.pid is not None:
        name = args.name or f"vm{args.pid}"
        if not _good_name(name):
            print(f"--name: must be a name of 1-64 letters, digits, '_', '.', '-', got "
                  f"{name!r}", file=sys.stderr)
            return 2
        if any(v.name == name for v in settings.vms):
            print(f"--name: {name!r} is also a [[vm]] in {settings.source}", file=sys.stderr)
            return 2
        vms = (*settings.vms, VmSettings(name=name, pid=args.pid))
        settings = dataclasses.replace(settings, vms=vms)
    return start(settings, args, overrides, config_needs_memory=args.pid is None)


def _good_name(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name) is not None
