"""Pauses of a VMM thread under syscall injection (prints figures; asserts nothing).

    .venv/bin/python -m benchmarks.bench_inject [--rounds N]
    .venv/bin/python benchmarks/run.py inject          # the same, in the benchmark table

Target: tests/remote/target.c (64 MiB memfd RAM, 2 "CPU n/KVM" threads, the main
thread in ppoll), injected into its main thread as RemoteSpace does. The pause is what
the stopped thread sees: PTRACE_SEIZE to PTRACE_DETACH (CLOCK_MONOTONIC, measured in C);
"wall" adds this process's Python around it. Figures: one syscall; eight in one stop;
userfaultfd (+ pidfd_getfd here, outside the pause); discard (process_madvise
MADV_DONTNEED inside the VMM) of 1, 256 and 4096 one-page ranges, populated again before
each round with an injected MADV_POPULATE_WRITE. Needs root and gcc.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

from tests.remote.target import Target  # noqa: E402
from vmm_tierd.kernel.linux import LinuxKernel  # noqa: E402
from vmm_tierd.kernel.process import SYS_GETPID, SYS_MADVISE, Syscall  # noqa: E402
from vmm_tierd.kernel.remote import RemoteSpace  # noqa: E402

PS = 4096
RAM = 64 << 20
MADV_POPULATE_WRITE = 23
REF = "kernel-facts C probe"


def _summary(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)
    return statistics.median(xs), xs[int(0.9 * (len(xs) - 1))], xs[-1]


def _fig(pauses: list[float], walls: list[float], ref: float | None = None,
         ref_range: str = "") -> dict[str, Any]:
    med, p90, mx = _summary([p * 1e6 for p in pauses])
    wmed = statistics.median(walls) * 1e6
    f: dict[str, Any] = {"value": round(med, 1), "unit": "µs",
                         "note": f"pause p50 {med:.0f} p90 {p90:.0f} max {mx:.0f} µs; "
                                 f"wall p50 {wmed:.0f} µs; {len(pauses)} rounds"}
    if ref is not None:
        f.update(ref=ref, ref_name=f"{REF} ({ref_range} µs)")
    return f


def run(rounds: int) -> dict[str, Any]:
    k = LinuxKernel()
    t = Target.start(RAM, vcpus=2)
    p = k.open_process(t.pid)
    space = RemoteSpace(p)
    out: dict[str, Any] = {}
    try:
        tid = space.tid

        def measure(fn: Callable[[], float], prepare: Callable[[], object] = lambda: None
                    ) -> tuple[list[float], list[float]]:
            pauses, walls = [], []
            for _ in range(rounds):
                prepare()
                t0 = time.perf_counter()
                pauses.append(fn())
                walls.append(time.perf_counter() - t0)
            return pauses, walls

        out["1 syscall (getpid)"] = _fig(
            *measure(lambda: p.inject(tid, [Syscall(SYS_GETPID)]).pause_s), 130, "130-310")
        out["8 syscalls in one stop"] = _fig(
            *measure(lambda: p.inject(tid, [Syscall(SYS_GETPID)] * 8).pause_s))

        def uffd() -> float:
            remote, local = space.create_uffd()
            pause = space.stats.last_s
            os.close(local)
            space.close_remote([remote])
            return pause

        out["userfaultfd + getfd"] = _fig(*measure(uffd), 190, "190-200")

        space.discard([(t.ram_addr, PS)])  # maps the scratch area once
        populate = Syscall(SYS_MADVISE, (t.ram_addr, RAM, MADV_POPULATE_WRITE))
        for n in (1, 256, 4096):
            step = RAM // PS // n
            ranges = [(t.ram_addr + i * step * PS, PS) for i in range(n)]

            def discard(ranges: list[tuple[int, int]] = ranges) -> float:
                assert space.discard(ranges) == len(ranges) * PS
                return space.stats.last_s

            f = _fig(*measure(discard, lambda: p.inject(tid, [populate])),
                     *((600, "300-900, one madvise of 256 contiguous pages") if n == 256
                       else (None, "")))
            f["note"] += f"; {space.stats.last_calls} process_madvise calls"
            out[f"discard {n} ranges"] = f
        t.ping()
    finally:
        space.release()
        p.close()
        t.close()
        k.close()
    return out


def bench_inject(quick: bool) -> dict[str, Any]:
    return run(20 if quick else 200)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    for name, f in run(args.rounds).items():
        ref = f" (ref {f['ref']} {f['ref_name']})" if "ref" in f else ""
        print(f"{name:28s} {f['value']:8.1f} {f['unit']}{ref}\n{'':28s} {f['note']}")


if __name__ == "__main__":
    main()
