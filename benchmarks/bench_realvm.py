"""Figures of the real-VM rig (tests/realvm): boot to ready, verify rounds, QEMU's memory.

    python benchmarks/bench_realvm.py [--ram 768] [--fill 0.65] [--smp 1] [--rounds 2] [--json]

Not in run.py's BENCHMARKS on purpose: it boots a TCG guest for a minute or more, and the
benchmark smoke test runs every registered benchmark. TCG shares the host's cores, so the
figures move with the machine's load; the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from run import normalise, print_table  # noqa: E402

from tests.realvm import memfd  # noqa: E402
from tests.realvm.guest import QemuGuest, VerifyResult  # noqa: E402

MIB = 1 << 20


def memory(g: QemuGuest) -> dict[str, Any]:
    ram = memfd.find_ram(g.pid)
    fd = memfd.open_ram(g.pid)
    try:
        allocated = memfd.allocated_bytes(fd)
    finally:
        os.close(fd)
    return {"rss": memfd.process_rss(g.pid) / MIB, "map": memfd.mapping_rss(g.pid, ram.start) / MIB,
            "memfd": allocated / MIB}


def checked(v: VerifyResult) -> VerifyResult:
    if v.bad:
        raise RuntimeError(f"the guest's verifier found {v.bad} bad files: {v.bad_files}")
    return v


def bench_realvm(ram_mib: int = 768, fill: float = 0.65, smp: int = 1,
                 rounds: int = 2) -> dict[str, Any]:
    load = os.getloadavg()
    figs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-realvm-") as tmp:
        t0 = time.monotonic()
        with QemuGuest.start(ram_mib=ram_mib, fill_fraction=fill, smp=smp,
                             workdir=Path(tmp)) as g:
            ready = g.wait_ready(900)
            mem0 = memory(g)
            stats = g.stats(300)
            verifies = []
            for _ in range(rounds):
                verifies.append(checked(g.verify(900)).seconds)
            churn = g.churn(20, 900)
            touch = g.touch(30, 900)
            checked(g.verify(900))
            mem1 = memory(g)
            stop = g.stop(120)
        total = time.monotonic() - t0
    figs["boot to ready (fill included)"] = {"value": ready.boot_seconds, "unit": "s",
                                             "note": f"{ready.files} files, "
                                                     f"{ready.bytes / MIB:.0f} MiB"}
    figs["guest fill: write + sha256"] = {"value": ready.fill_seconds, "unit": "s"}
    figs["verify round"] = {"value": min(verifies), "unit": "s",
                            "note": "all rounds: " + ", ".join(f"{s:.1f}" for s in verifies)}
    figs["verify rate"] = {"value": ready.bytes / MIB / min(verifies),
                           "unit": "MiB/s"}
    figs["churn 20 %"] = {"value": churn.seconds, "unit": "s",
                          "note": f"{churn.files} files rewritten"}
    figs["touch 30 %"] = {"value": touch.seconds, "unit": "s",
                          "note": f"{touch.bytes / MIB:.0f} MiB read"}
    figs["QEMU RSS after fill"] = {"value": mem0["rss"], "unit": "MiB"}
    figs["RAM mapping Rss after fill"] = {"value": mem0["map"], "unit": "MiB"}
    figs["memfd allocated after fill"] = {"value": mem0["memfd"], "unit": "MiB"}
    figs["QEMU RSS at end"] = {"value": mem1["rss"], "unit": "MiB"}
    figs["RAM mapping Rss at end"] = {"value": mem1["map"], "unit": "MiB"}
    figs["memfd allocated at end"] = {"value": mem1["memfd"], "unit": "MiB"}
    figs["guest MemFree after fill"] = {"value": stats.mem_free_kib / 1024, "unit": "MiB",
                                        "note": f"MemTotal {stats.mem_total_kib / 1024:.0f}"}
    figs["QEMU exit status"] = stop
    figs["whole run"] = {"value": total, "unit": "s"}
    figs["load average at start"] = {"value": load[0],
                                      "note": " ".join(f"{x:.2f}" for x in load)}
    return figs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ram", type=int, default=768, help="guest RAM, MiB")
    ap.add_argument("--fill", type=float, default=0.65)
    ap.add_argument("--smp", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="verify rounds before churn")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    figs = {k: normalise(v) for k, v in
            bench_realvm(args.ram, args.fill, args.smp, args.rounds).items()}
    if args.json:
        print(json.dumps(figs, indent=1))
    else:
        print_table(f"realvm {args.ram} MiB, fill {args.fill}, smp {args.smp}", figs,
                    time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
