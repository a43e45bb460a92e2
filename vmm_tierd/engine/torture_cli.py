"""``vmm-tierd selftest --torture``: run torture.py on every backend x memory type (x
strategy) asked for, one after the other, and print a summary; exit 1 on any loss.

    vmm-tierd selftest --torture --backend all --memtype all --seconds 60
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from .torture import TortureResult, TortureSpec, run_torture

BACKENDS = ("fake", "fake-rwp", "fake-rfc", "linux")
ALL_BACKENDS = ("fake-rwp", "fake-rfc", "linux")
MEMTYPES = ("anon", "memfd")
STRATEGIES = ("rwp", "wp")


def listed(what: str, names: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: one name, a comma-separated list of them, or ``all``."""
    every = ALL_BACKENDS if names is BACKENDS else names

    def parse(value: str) -> tuple[str, ...]:
        got = tuple(v.strip() for v in value.split(",") if v.strip())
        if got == ("all",):
            return every
        bad = [v for v in got if v not in names]
        if bad or not got:
            raise argparse.ArgumentTypeError(
                f"must be {', '.join(names)}, a comma-separated list of them, or all; "
                f"got {value!r}")
        return tuple(dict.fromkeys(got))  # in order, once each

    parse.__name__ = what  # argparse names the type in its messages
    return parse


def _strategies(backend: str, asked: tuple[str, ...] | None) -> list[str | None]:
    """The strategies to run on ``backend``: None = the one it grants."""
    if not asked:
        return [None]
    if backend == "linux":
        from ..kernel import open_kernel

        k = open_kernel("linux")
        try:
            granted = k.capabilities().strategy
        finally:
            k.close()
        return [s for s in asked if granted is not None and s == granted.value]
    return list(asked)  # the fakes grant WP_ASYNC and MOVE as well as RWP


def plan(args: argparse.Namespace) -> list[TortureSpec]:
    out = []
    for backend in args.backend:
        for strategy in _strategies(backend, args.strategy):
            for memtype in args.memtype:
                size = args.size_mib or (256 if backend == "linux" else 8)
                out.append(TortureSpec(backend=backend, memtype=memtype, seconds=args.seconds,
                                       size_mib=size, interval_s=args.interval or 0.05,
                                       threads=args.threads, strategy=strategy,
                                       fail_puts=args.fail_puts,
                                       fail_moves_back=args.fail_moves_back,
                                       trace=not args.no_trace))
    return out


HEAD = (f"{'backend':9} {'strategy':8} {'memtype':7} {'seconds':>7} {'evictions':>10} "
        f"{'faults':>9} {'staging':>8} {'lost':>5} {'corrupt':>7} {'poisoned':>8} "
        f"{'broken':>6}  result")


def row(r: TortureResult) -> str:
    staging = r.faults_by_kind.get("staging", 0)
    broken = len(r.violations)
    return (f"{r.backend:9} {r.strategy:8} {r.memtype:7} {r.seconds:7.1f} {r.evictions:10d} "
            f"{r.faults:9d} {staging:8d} {r.lost_writes:5d} {r.corrupt_pages:7d} "
            f"{r.poisoned_pages:8d} {broken:6d}  {'ok' if r.ok else 'FAILED'}")


def detail(r: TortureResult) -> list[str]:
    out = [f"{r.backend} {r.strategy} {r.memtype}: {r.size_mib} MiB "
           f"({r.kernel_release}), {r.cycles} cycles, refaults {r.refaults}, workload "
           f"{r.workload_writes} writes / {r.workload_reads} reads, {r.scrapes} scrapes, "
           f"{r.reloads} reloads, {r.failed_puts} failed store writes, "
           f"{r.failed_moves_back} failed moves back, "
           f"{r.invariant_checks} invariant checks, {r.staging_audits} staging audits, "
           f"faults {r.faults_by_kind}, errors {r.errors or 'none'}"]
    if not r.ok:
        if not r.verify_completed:
            out.append("  the verification did not complete")
        if not r.graceful_stop:
            out.append("  the stop was not graceful")
        out += [f"  broken invariant: {v}" for v in r.violations]
        if r.bad_pages:
            out.append(f"  bad pages: {r.bad_pages}")
        if r.histories:
            out.append("  histories:\n    " + r.histories.replace("\n", "\n    "))
    return out


def main_torture(args: argparse.Namespace) -> int:
    specs = plan(args)
    if not specs:
        print("vmm-tierd selftest: error: no backend here can run the strategies asked for",
              file=sys.stderr)
        return 2
    results: list[TortureResult] = []
    for spec in specs:
        if not args.json:
            print(f"torture {spec.backend} {spec.strategy or '(default)'} {spec.memtype} "
                  f"{spec.size_mib} MiB for {spec.seconds:g} s ...", file=sys.stderr,
                  flush=True)
        results.append(run_torture(spec, args.store))
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        print(HEAD)
        for r in results:
            print(row(r))
        for r in results:
            print("\n".join(detail(r)))
        print("OK" if all(r.ok for r in results) else "FAILED")
    return 0 if all(r.ok for r in results) else 1
