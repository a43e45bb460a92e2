"""Tiering a running VM from beside it (issue 9's figures), each next to its reference.

    .venv/bin/python -m benchmarks.bench_attach [--quick] [--qemu | --only-qemu] [--json]
    .venv/bin/python benchmarks/run.py attach      # parts 1-3 in the benchmark table

The VMM is attach_vmm.c, a stand-in with QEMU's kind of guest RAM (a shared memfd named
"memory-backend-memfd") whose "CPU 0/KVM" threads (faulter.c) touch it and time every
access. The engine is attached to it as `vmm-tierd attach --pid` attaches (attach_rig.py:
a uffd injected into the VMM's main thread, RAM discovered in /proc, a RemoteGuest
region), in this process so that its own fault service time can be recorded.

1. fault service: every page of the RAM evicted (records in the engine's store, the
   memfd punched); the VMM reads one word of every page in random order. Side A: the
   engine serves the faults from the store. Side B: ref_handler.c (--uffd mode) serves
   the same pages of the same VMM from the same store, on a uffd injected the same way
   with the same features and registration. Rounds alternate. Figures: the handler's own
   time (read -> resolved) and the round trip the VMM's thread saw. (attach_faults.py)
2. cycle cost per GiB through /proc/PID/pagemap (no eviction), next to the same two
   PAGEMAP_SCAN ioctls on the VMM's pagemap from C and through LinuxProcess.
3. injected pauses: cycles that evict (budgeted, and in a full run one unlimited), each
   stop of the VMM's main thread recorded (RemoteSpace's stats); next to one empty
   injected stop (getpid) of the same thread. (2 and 3: attach_cycles.py; wp only)
4. ``--qemu``: a real QEMU guest's own throughput with and without `vmm-tierd attach`,
   and the memory saved (bench_attach_qemu.py; minutes).

Before and after each part the machine's load average is printed (it is shared).
Parts 1-3 take about 10 s with --quick, about 1-2 min without; needs root and gcc.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run as a script or as benchmarks.bench_attach
    sys.path[:0] = [str(HERE), str(HERE.parent)]

from attach_cycles import part_cycles  # noqa: E402
from attach_faults import part_faults  # noqa: E402
from attach_rig import build_vmm  # noqa: E402

from vmm_tierd.kernel.linux import LinuxKernel  # noqa: E402

Figs = dict[str, Any]


def bench_attach(quick: bool) -> Figs:
    """Parts 1-3 (run.py's entry)."""
    with tempfile.TemporaryDirectory(prefix="vmm-tierd-bench-", dir="/var/tmp") as td:
        tmp = Path(td)
        k = LinuxKernel()
        try:
            vmm_exe = build_vmm(tmp)
            figs = part_faults(tmp, k, vmm_exe, quick)
            figs.update(part_cycles(tmp, k, vmm_exe, quick))
        finally:
            k.close()
    return figs


def main(argv: list[str] | None = None) -> int:
    import run

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--qemu", action="store_true",
                    help="also part 4: a real QEMU guest with and without the daemon "
                         "(boots a TCG guest: several minutes)")
    ap.add_argument("--only-qemu", action="store_true", help="part 4 alone")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    # SIGTERM as Ctrl-C, so that every part's cleanup runs (VMMs, handlers, QEMU, the
    # daemon): re-raised as SIGINT, which trio's own handler (inside trio.run) delivers to
    # a task at a safe point; a KeyboardInterrupt raised from a SIGTERM handler could hit
    # the run loop itself and skip the tasks' cleanup.
    # (SIGINT itself is ignored in a process started with & from a script: take it back.)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    tables: dict[str, tuple[Figs, float]] = {}
    if not args.only_qemu:
        t0 = time.perf_counter()
        tables["bench_attach (parts 1-3)"] = (bench_attach(args.quick),
                                              time.perf_counter() - t0)
    if args.qemu or args.only_qemu:
        from bench_attach_qemu import bench_attach_qemu

        t0 = time.perf_counter()
        tables["bench_attach --qemu (part 4)"] = (bench_attach_qemu(args.quick),
                                                  time.perf_counter() - t0)
    for name, (figs, dt) in tables.items():
        norm = {k: run.normalise(v) for k, v in figs.items()}
        if args.json:
            print(json.dumps({"name": name, "seconds": round(dt, 1), "figures": norm},
                             indent=1, default=str))
        else:
            run.print_table(name, norm, dt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
