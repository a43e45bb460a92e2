"""vmm-tierd against the kernel's own answer (issue 10): the same workload, interleaved in
one run, under no tiering, vmm-tierd (default and aggressive settings), zram swap in a
memory cgroup limited to what vmm-tierd kept resident, and DAMOS pageout on zram where
DAMON is free to use. Needs root.

    .venv/bin/python benchmarks/vs_kernel.py --quick      # 30 s runs, about 5 minutes
    .venv/bin/python benchmarks/vs_kernel.py              # 130 s runs, about 20 minutes
    .venv/bin/python benchmarks/vs_kernel.py --restore    # undo what a killed run left

Each run is one process (benchmarks/vs_kernel_runner.py) in a memory cgroup of its own,
so that everything it causes is charged there: guest memory, the daemon's heap, the
store's page cache, page tables. zram's pool is not charged to any cgroup and is added
from the device's mm_stat (the device is ours: hot_add, removed afterwards). Figures are
means over the steady window (default 60-130 s of each run; --quick 15-30 s). Prints a
table and the issue's goals, writes results.json, table.txt and a PNG plot of memory saved
against slowdown (matplotlib: the optional "bench" extra). Every change to the machine
(cgroups, zram, swap, DAMON, runner processes, stores) is undone on every path: normal
end, exceptions, Ctrl-C, SIGTERM and SIGHUP, and after a SIGKILL by the next start (state
file). Not in run.py's BENCHMARKS (minutes, even --quick): ``run.py --vs-kernel`` runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import PIPE, Popen
from typing import Any, TextIO

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

from vs_kernel_configs import CONFIGS, DAMOS_MIN_AGE_S, PACES, Config, daemon_config  # noqa: E402
from vs_kernel_host import (  # noqa: E402
    NAME_PREFIX,
    Cgroup,
    Host,
    Restorer,
    Unavailable,
    snapshot_diff,
)
from vs_kernel_parse import parse_task_cpu  # noqa: E402
from vs_kernel_report import (  # noqa: E402
    LEGEND,
    compare,
    details,
    figures,
    goals,
    plot,
    summarize,
    table,
)

TICK = os.sysconf("SC_CLK_TCK")
STARTUP_ALLOWANCE_S = 180.0
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP: handled like Ctrl-C, so every finally runs."""


def _raise(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Setup steps and their undo records happen together: a signal that arrives
    meanwhile is delivered (and raises) once they are both done."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@dataclass
class Options:
    seconds: float = 130.0
    window_from: float = 60.0
    rounds: int = 1
    paces: tuple[str, ...] = ("paced", "unpaced")
    only: tuple[str, ...] = ()
    size_mib: int = 1024
    probe_hz: float = 20.0
    out: Path | None = None
    tmp: Path = Path("/var/tmp")
    state_file: Path = Path("/run/vmm-tierd-vs-kernel.json")


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            ut, st = parse_task_cpu(Path(f"/proc/{pid}/stat").read_text())
            total += (ut + st) / TICK
    return total


def collect(proc: Popen[str], kpids: list[int], deadline: float) -> dict[str, Any]:
    """The runner's JSON lines until its final one; kernel threads' CPU added per sample."""
    q: queue.Queue[str | None] = queue.Queue()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            q.put(line)
        q.put(None)

    with signals_blocked():  # the thread inherits the mask: signals go to the main thread
        threading.Thread(target=reader, daemon=True).start()
    run: dict[str, Any] = {"samples": []}
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the runner did not finish in time")
        try:
            line = q.get(timeout=min(left, 1.0))
        except queue.Empty:
            continue
        if line is None:
            raise RuntimeError(f"the runner exited ({proc.poll()}) before its final report")
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("type") == "sample":
            rec["kcpu"] = round(cpu_seconds(kpids), 3)
            run["samples"].append(rec)
        elif rec.get("type") == "meta":
            run["meta"] = rec
            run["mode"] = rec["mode"]
        elif rec.get("type") == "final":
            run["final"] = rec
            return run
        elif rec.get("type") == "error":
            raise RuntimeError(f"runner: {rec['error']}")


class Bench:
    def __init__(self, opts: Options, log: TextIO) -> None:
        self.opts = opts
        self.log = log
        self.host = Host()
        self.restorer = Restorer(self.host, opts.state_file)
        self.limits: dict[tuple[str, str, int], int] = {}
        self.runs: list[dict[str, Any]] = []
        self.restore_errors: list[str] = []
        self.faulter: Path | None = None

    def say(self, msg: str) -> None:
        print(msg, file=self.log, flush=True)

    def argv(self, cfg: Config, pace: str, cg: Cgroup, zblk: Path | None,
             run_dir: Path) -> list[str]:
        o = self.opts
        argv = [sys.executable, str(HERE / "vs_kernel_runner.py"),
                "--seconds", str(o.seconds), "--window-from", str(o.window_from),
                "--probe-hz", str(o.probe_hz), "--faulter", str(self.faulter),
                "--cgroup", str(cg.path), "--cgroup-version", str(cg.version)]
        if zblk is not None:
            argv += ["--zram", str(zblk)]
        if cfg.kind == "daemon":
            return [*argv, "--mode", "daemon", "--config",
                    str(daemon_config(cfg, pace, run_dir, o.size_mib))]
        return [*argv, "--mode", "plain", "--size-mib", str(o.size_mib),
                "--ops-per-sec", str(PACES[pace])]

    def run_one(self, cfg: Config, pace: str, rnd: int, idx: int) -> dict[str, Any]:
        o, host, r = self.opts, self.host, self.restorer
        row: dict[str, Any] = {"config": cfg.key, "label": cfg.label, "pace": pace,
                               "round": rnd, "kind": cfg.kind, "load": os.getloadavg()[0]}
        mark = r.mark()
        log_path: Path | None = None
        proc: Popen[str] | None = None
        cg: Cgroup | None = None
        limit: int | None = None
        try:
            with signals_blocked():
                if cfg.kind == "damos":
                    host.damos_check()  # before anything is set up for nothing
                if cfg.limit_from:
                    limit = self.limits.get((cfg.limit_from, pace, rnd))
                    if limit is None:
                        raise Unavailable(f"no steady anon figure of {cfg.limit_from} "
                                          f"({pace}, round {rnd}) to set the limit from")
                cg = host.make_cgroup(r, f"{os.getpid()}-{idx}")
                if limit is not None:
                    cg.set_limit(limit)
                    row["limit"] = limit
                run_dir = Path(tempfile.mkdtemp(prefix=NAME_PREFIX, dir=o.tmp))
                r.push("rmtree", path=str(run_dir))
                zblk = (host.zram_swap_on(r, 2 * (o.size_mib << 20))
                        if cfg.kind in ("zram", "damos") else None)
                argv = self.argv(cfg, pace, cg, zblk, run_dir)
                log_path = run_dir / "runner.log"
                procs = cg.path / "cgroup.procs"
                with open(log_path, "w") as err:
                    proc = Popen(argv, stdout=PIPE, stderr=err, text=True, cwd=ROOT,
                                 env=os.environ | {"PYTHONDONTWRITEBYTECODE": "1"},
                                 preexec_fn=lambda: procs.write_text(str(os.getpid())))
                r.push("kill", pid=proc.pid, start_time=host.start_time(proc.pid))
                kpids = host.kthreads("kswapd")
                if cfg.kind == "damos":
                    kpids.append(host.damos_start(r, proc.pid, cg, DAMOS_MIN_AGE_S))
            run = collect(proc, kpids, time.monotonic() + o.seconds + STARTUP_ALLOWANCE_S)
            run.update(config=cfg.key, pace=pace, round=rnd)
            self.runs.append(run)
            row["mode"] = run.get("mode")
            row.update(summarize(run, o.window_from, o.seconds))
            if cfg.kind == "daemon" and "anon" in row:
                self.limits[(cfg.key, pace, rnd)] = int(row["anon"]) // 4096 * 4096
        except Unavailable as e:
            row["error"] = str(e)
        except (OSError, RuntimeError, TimeoutError, ValueError) as e:
            tail = log_path.read_text()[-1500:] if log_path and log_path.exists() else ""
            row["error"] = f"{type(e).__name__}: {e}"
            if cg is not None and cg.oom_kills():
                row["error"] = (f"OOM-killed in its memory cgroup, at the limit of "
                                f"{(limit or 0) >> 20} MiB")
            self.say(f"   failed: {row['error']}\n{tail}")
        finally:
            with signals_blocked():
                self.restore_errors += r.restore(mark)
            if proc is not None:  # reaped by the restore already: just the status
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        return row

    def run(self) -> list[dict[str, Any]]:
        o = self.opts
        todo = [c for c in CONFIGS if not o.only or c.key in o.only]
        rows = []
        idx = 0
        for rnd in range(1, o.rounds + 1):
            for pace in o.paces:
                for cfg in todo:
                    idx += 1
                    self.say(f"-- round {rnd} {pace:7s} {cfg.label}  (load "
                             f"{os.getloadavg()[0]:.2f})")
                    t0 = time.monotonic()
                    row = self.run_one(cfg, pace, rnd, idx)
                    row["run_s"] = round(time.monotonic() - t0, 1)
                    rows.append(row)
                    if "error" in row:
                        self.say(f"   not run: {row['error']}")
        return rows


def build_faulter(bench: Bench) -> None:
    from bench_faults import build_c

    d = Path(tempfile.mkdtemp(prefix=NAME_PREFIX + "faulter-", dir=bench.opts.tmp))
    bench.restorer.push("rmtree", path=str(d))
    bench.faulter, _ = build_c(d, ref=False)


def execute(opts: Options, log: TextIO) -> dict[str, Any]:
    """The whole benchmark; the machine is restored whatever happens."""
    if os.geteuid() != 0:
        raise RuntimeError("vs_kernel: needs root (memory cgroups, zram, swapon, userfaultfd)")
    # SIGTERM and SIGHUP end the run as Ctrl-C does, unless ignored on purpose (nohup)
    old = {s: signal.signal(s, _raise) for s in (signal.SIGTERM, signal.SIGHUP)
           if signal.getsignal(s) is not signal.SIG_IGN}
    bench = Bench(opts, log)
    if bench.restorer.actions:
        bench.say(f"undoing {len(bench.restorer.actions)} change(s) a killed run left "
                  f"({opts.state_file})")
        bench.restore_errors += bench.restorer.restore()
    before = bench.host.snapshot()
    load0 = os.getloadavg()
    t0 = time.monotonic()
    bench.say(f"vs_kernel: load {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, kernel "
              f"{os.uname().release}, runs of {opts.seconds:g} s, window "
              f"{opts.window_from:g}-{opts.seconds:g} s")
    rows: list[dict[str, Any]] = []
    try:
        with signals_blocked():
            build_faulter(bench)
        rows = compare(bench.run())
    finally:
        with signals_blocked():
            bench.restore_errors += bench.restorer.restore()
        for s, h in old.items():
            signal.signal(s, h)
        diff = snapshot_diff(before, bench.host.snapshot())
        bench.say("machine restored" if not diff and not bench.restore_errors else
                  "MACHINE NOT RESTORED:\n  " + "\n  ".join(diff + bench.restore_errors))
    load1 = os.getloadavg()
    return {"rows": rows, "runs": bench.runs, "load_start": load0, "load_end": load1,
            "seconds": round(time.monotonic() - t0, 1), "restored": not diff,
            "options": {k: str(v) for k, v in vars(opts).items()}}


def report(res: dict[str, Any], out: Path | None, log: TextIO) -> None:
    rows = sorted(res["rows"], key=lambda r: (list(PACES).index(r["pace"]),
                                               [c.key for c in CONFIGS].index(r["config"]),
                                               r["round"]))
    text = table(rows)
    l0, l1 = res["load_start"], res["load_end"]
    lines = [text, "", LEGEND, "", *details(rows), "", *goals(rows), "",
             f"load at start {l0[0]:.2f} {l0[1]:.2f} {l0[2]:.2f}, at end {l1[0]:.2f} "
             f"{l1[1]:.2f} {l1[2]:.2f}; {res['seconds']:.0f} s in all"]
    print("\n".join(lines), file=log, flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.txt").write_text("\n".join(lines) + "\n")
        (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
        print(plot(rows, out / "vs_kernel.png"), file=log)
        print(f"results: {out}", file=log, flush=True)


def bench_vs_kernel(quick: bool) -> dict[str, Any]:
    """benchmarks/run.py entry (opt-in: run.py --vs-kernel); progress goes to stderr."""
    opts = Options(seconds=30.0, window_from=15.0) if quick else Options()
    res = execute(opts, sys.stderr)
    report(res, default_out(), sys.stderr)
    figs = figures(res["rows"])
    figs["load at start"] = round(res["load_start"][0], 2)
    return figs


def default_out() -> Path:
    return Path("/var/tmp/vmm-tierd-vs-kernel") / time.strftime("%Y%m%d-%H%M%S")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="30 s runs, window 15-30 s")
    ap.add_argument("--seconds", type=float, help="length of each run (default 130)")
    ap.add_argument("--window-from", type=float, help="steady window start (default 60)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds (default 1)")
    ap.add_argument("--paces", default="paced,unpaced", help="paced, unpaced or both")
    ap.add_argument("--only", default="", help="configurations, comma separated: " +
                    ", ".join(c.key for c in CONFIGS))
    ap.add_argument("--size-mib", type=int, default=1024, help="guest region (default 1024)")
    ap.add_argument("--out", type=Path, help="results directory (default "
                    "/var/tmp/vmm-tierd-vs-kernel/DATE-TIME)")
    ap.add_argument("--state-file", type=Path, default=Options.state_file)
    ap.add_argument("--restore", action="store_true",
                    help="only undo what a killed run left (the state file), then exit")
    a = ap.parse_args(argv)
    if a.restore:
        errs = Restorer(Host(), a.state_file).restore()
        print("\n".join(errs) if errs else "restored (or nothing was left to undo)")
        return 1 if errs else 0
    opts = Options(seconds=30.0, window_from=15.0) if a.quick else Options()
    opts.seconds = a.seconds or opts.seconds
    opts.window_from = a.window_from if a.window_from is not None else opts.window_from
    opts.rounds, opts.size_mib, opts.state_file = a.rounds, a.size_mib, a.state_file
    opts.paces = tuple(p for p in a.paces.split(",") if p)
    opts.only = tuple(x for x in a.only.split(",") if x)
    bad = [p for p in opts.paces if p not in PACES] + [
        c for c in opts.only if c not in {k.key for k in CONFIGS}]
    if bad or opts.window_from >= opts.seconds:
        ap.error(f"unknown pace/configuration {bad}" if bad else "--window-from >= --seconds")
    try:
        res = execute(opts, sys.stdout)
    except KeyboardInterrupt as e:
        print(f"interrupted ({e or 'SIGINT'})", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 2
    report(res, a.out or default_out(), sys.stdout)
    return 0 if res["restored"] else 1


if __name__ == "__main__":
    sys.exit(main())
