"""``vmm-tierd`` command line. Each subcommand lives in its own module and is imported
only when used, so ``kernel-info`` never loads the engine and ``run`` never loads tests.

A subcommand module provides ``add_arguments(parser)`` and ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("vmm_tierd.service.main", "run the daemon (embedded default, or --config FILE)"),
    "check-config": ("vmm_tierd.service.check", "validate a config file without running"),
    "kernel-info": ("vmm_tierd.commands.kernel_info",
                    "print granted uffd features and the tiering strategy"),
    "selftest": ("vmm_tierd.engine.selftest",
                 "run a guest region under aggressive settings and verify every page"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmm-tierd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        args = build_parser().parse_args(["run", *(argv or [])])
    rc: int = importlib.import_module(args._module).main(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
