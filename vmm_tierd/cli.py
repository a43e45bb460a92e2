"""The ``vmm-tierd`` command line.

Each subcommand lives in its own module and is imported only when used, so
``kernel-info`` never loads the engine and ``run`` never loads tests. A subcommand module
provides ``add_arguments(parser)`` and ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

DESCRIPTION = ("Tiers the memory of virtual machines: tracks which guest pages are used with "
               "userfaultfd, moves cold ones zstd-compressed into an LMDB store, and serves "
               "them back on fault.")
EPILOG = ("Start with 'vmm-tierd run' (the embedded demo: a 1 GiB guest region with a "
          "built-in workload) or 'vmm-tierd run --config FILE'; see 'vmm-tierd COMMAND "
          "--help'.")

COMMANDS: dict[str, tuple[str, str]] = {
    "attach": ("vmm_tierd.service.attach_cmd",
               "tier a running VM from beside it (--pid PID, or [[vm]] in --config)"),
    "run": ("vmm_tierd.service.main", "run the daemon (embedded default, or --config FILE)"),
    "check-config": ("vmm_tierd.service.check", "validate a config file without running"),
    "kernel-info": ("vmm_tierd.commands.kernel_info",
                    "print granted uffd features and the tiering strategy"),
    "selftest": ("vmm_tierd.engine.selftest",
                 "run a guest region under aggressive settings and verify every page"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmm-tierd", description=DESCRIPTION, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        # first thing, before the imports: a SIGHUP from now on is held for the daemon
        # instead of ending the process (SIGHUP's default action)
        from .service.startup import hold_sighup

        hold_sighup()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `vmm-tierd` does not start the demo daemon
        parser.print_usage(sys.stderr)
        print("vmm-tierd: error: a COMMAND is required (run, check-config, kernel-info, "
              "selftest); 'vmm-tierd --help' explains them", file=sys.stderr)
        return 2
    rc: int = importlib.import_module(args._module).main(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
