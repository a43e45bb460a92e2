"""Benchmark entry point: ``python benchmarks/run.py [--quick] [--json] [name ...]``.

Figures are printed side by side with their references; nothing here asserts on time.
A benchmark is a function ``(quick: bool) -> dict[str, figure]`` listed in BENCHMARKS as
``"module:function"`` (modules in this directory). A figure is a number or a dict with
``value`` and optionally ``unit``, ``ref`` (reference value), ``ref_name``, ``goal``
(text such as ">= 0.7x ref" or "<= 10"), ``note``.

OPT_IN benchmarks take minutes even with --quick (so the smoke test, which runs every
entry of BENCHMARKS, leaves them out): each runs only with its flag, e.g. ``--vs-kernel``
(vmm-tierd against zram and DAMOS, issue 10; about 5 minutes with --quick).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

BENCHMARKS: list[str] = [
    "bench_store:bench_eviction",
    "bench_store:bench_get",
    "bench_store:bench_policy",
    "bench_faults:bench_faults",
    "bench_cycle:bench_cycle",
    "bench_inject:bench_inject",
    "bench_minivmm:bench_minivmm",
    "bench_attach:bench_attach",
    "bench_metrics_flood:bench_metrics_flood",
]

# flag -> entry: run only when asked for
OPT_IN: dict[str, str] = {
    "--vs-kernel": "vs_kernel:bench_vs_kernel",
}

Figure = dict[str, Any]


def load(entry: str) -> Callable[[bool], dict[str, Any]]:
    mod, fn = entry.split(":")
    f: Callable[[bool], dict[str, Any]] = getattr(importlib.import_module(mod), fn)
    return f


def normalise(v: Any) -> Figure:
    return dict(v) if isinstance(v, dict) else {"value": v}


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)


def goal_met(f: Figure) -> str:
    goal, v = f.get("goal"), f.get("value")
    if not isinstance(goal, str) or not isinstance(v, int | float):
        return ""
    op, _, rest = goal.partition(" ")
    try:
        bound = float(rest.split()[0].rstrip("x"))
    except (ValueError, IndexError):
        return ""
    if "x ref" in rest and isinstance(f.get("ref"), int | float):
        bound *= f["ref"]
    ok = v >= bound if op == ">=" else v <= bound if op == "<=" else None
    return "" if ok is None else ("ok" if ok else "MISSED")


def print_table(name: str, figs: dict[str, Figure], seconds: float) -> None:
    print(f"\n== {name}  ({seconds:.1f} s)")
    rows = [("figure", "value", "unit", "reference", "goal", "")]
    for k, f in figs.items():
        ref = f.get("ref")
        refs = "" if ref is None else f"{fmt(ref)} {f.get('ref_name', '')}".strip()
        rows.append((k, fmt(f.get("value")), f.get("unit", ""), refs, f.get("goal", ""),
                     goal_met(f)))
    widths = [max(len(str(r[i])) for r in rows) for i in range(6)]
    for r in rows:
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    for k, f in figs.items():
        if f.get("note"):
            print(f"  note: {k}: {f['note']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, whole run < 60 s")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    for flag, entry in OPT_IN.items():
        ap.add_argument(flag, action="append_const", const=entry, dest="opt_in",
                        help=f"also run {entry} (minutes; needs root)")
    ap.add_argument("names", nargs="*", help="only benchmarks whose entry contains these")
    args = ap.parse_args(argv)
    out: dict[str, Any] = {"quick": args.quick, "benchmarks": {}}
    t_all = time.perf_counter()
    for entry in BENCHMARKS + (args.opt_in or []):
        if args.names and not any(n in entry for n in args.names):
            continue
        t0 = time.perf_counter()
        try:
            figs = {k: normalise(v) for k, v in load(entry)(args.quick).items()}
        except Exception as e:  # one broken benchmark must not hide the others
            figs = {"error": {"value": f"{type(e).__name__}: {e}"}}
        dt = time.perf_counter() - t0
        out["benchmarks"][entry] = {"seconds": round(dt, 2), "figures": figs}
        if not args.json:
            print_table(entry, figs, dt)
    out["seconds"] = round(time.perf_counter() - t_all, 2)
    if args.json:
        print(json.dumps(out, indent=1, default=str))
    else:
        print(f"\ntotal {out['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
