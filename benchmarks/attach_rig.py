"""The parts bench_attach.py builds on: the stand-in VMM (attach_vmm.c), the engine
attached to it as `vmm-tierd attach` attaches (a uffd injected into its main thread, a
RemoteGuest region), and pure helpers (percentiles from Prometheus histogram buckets,
per-cycle figures from scrapes, the machine's load).
"""

from __future__ import annotations

import itertools
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from vmm_tierd.attach.discover import find_guest_ram
from vmm_tierd.attach.guest import ProcessSpace, RemoteGuest
from vmm_tierd.attach.vm import owner_tag
from vmm_tierd.engine.observer import Observer
from vmm_tierd.engine.runner import RegionRunner
from vmm_tierd.engine.store import PageStore
from vmm_tierd.kernel.api import Kernel, Strategy
from vmm_tierd.kernel.process import SYS_GETPID, Process, Syscall
from vmm_tierd.kernel.remote import PauseStats, RemoteSpace
from vmm_tierd.settings import TrackingSettings

HERE = Path(__file__).resolve().parent
PAGE = 4096
NAME = "bench/ram0"  # the region of the attached VMM (vm "bench", its RAM mapping 0)
WAIT_S = 300.0


# ---- pure helpers ---------------------------------------------------------------------
def load_note() -> tuple[float, str]:
    """The 1-minute load average and all three as text."""
    la = os.getloadavg()
    return la[0], " ".join(f"{x:.2f}" for x in la)


def load_figs(part: str, start: tuple[float, str], t0: float) -> dict[str, Any]:
    end = load_note()
    return {f"{part}: load at start": {"value": start[0], "note": start[1]},
            f"{part}: load at end": {"value": end[0], "note": end[1]},
            f"{part}: seconds": {"value": time.perf_counter() - t0, "unit": "s"}}


def ms_median(xs: list[float]) -> float:
    """Median of seconds, in ms."""
    return float(np.median(xs)) * 1e3


def empty_stops(proc: Process, tid: int, n: int) -> list[float]:
    """Stops of thread ``tid`` that run one getpid each: the fixed cost of a stop."""
    return [proc.inject(tid, [Syscall(SYS_GETPID)]).pause_s for _ in range(n)]


def percentiles(x: np.ndarray, qs: Sequence[float] = (50, 99)) -> list[float]:
    if not len(x):
        return [0.0 for _ in qs]
    return [float(np.percentile(x, q)) for q in qs]


def histogram_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float:
    """The q-quantile (0 < q <= 1) of a cumulative Prometheus histogram given as (le,
    count) pairs (any order; the +Inf bucket as float("inf")), interpolated linearly
    inside the bucket it falls in, as PromQL's histogram_quantile does; NaN when empty.
    A quantile in the +Inf bucket is the largest finite bound."""
    if not 0 < q <= 1:
        raise ValueError(f"q={q}: must be in (0, 1]")
    bs = sorted(buckets)
    if not bs or bs[-1][1] <= 0:
        return float("nan")
    rank = q * bs[-1][1]
    lo_le, lo_n = 0.0, 0.0
    for le, n in bs:
        if n >= rank:
            if le == float("inf"):
                return lo_le
            if n == lo_n:
                return le
            return lo_le + (le - lo_le) * (rank - lo_n) / (n - lo_n)
        lo_le, lo_n = le, n
    return bs[-1][0]


def bucket_deltas(before: Sequence[tuple[float, float]], after: Sequence[tuple[float, float]]
                  ) -> list[tuple[float, float]]:
    """after - before, bucket by bucket (a histogram over the span between two scrapes)."""
    b = dict(before)
    return [(le, n - b.get(le, 0.0)) for le, n in after]


@dataclass(frozen=True)
class Scrape:
    """The daemon's injection and cycle counters at one moment."""

    t: float
    cycles: float
    stops: float
    pause_total_s: float
    pause_max_s: float


def per_cycle(scrapes: Sequence[Scrape]) -> dict[str, float]:
    """Injected pauses per cycle from successive scrapes: only spans in which exactly one
    cycle completed count (then their pause is that cycle's, exactly); for them the total
    per cycle (median, max) and the stops per cycle (median). ``longest stop`` is the
    daemon's own all-time maximum at the last scrape."""
    tot: list[float] = []
    stops: list[float] = []
    for a, b in itertools.pairwise(scrapes):
        if b.cycles - a.cycles == 1:
            tot.append(b.pause_total_s - a.pause_total_s)
            stops.append(b.stops - a.stops)
    if not tot:
        return {"cycles": 0.0}
    return {"cycles": float(len(tot)), "total median s": float(np.median(tot)),
            "total max s": float(max(tot)), "stops median": float(np.median(stops)),
            "longest stop s": scrapes[-1].pause_max_s}


# ---- the C parts ----------------------------------------------------------------------
def build_vmm(out: Path) -> Path:
    """gcc attach_vmm (with faulter.c) into ``out``."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc): run scripts/setup --test")
    exe = out / "attach_vmm"
    cmd = [cc, "-O2", "-Wall", "-I", str(HERE), "-o", str(exe), str(HERE / "attach_vmm.c"),
           str(HERE / "faulter.c"), "-lpthread"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode:
        raise RuntimeError(f"building attach_vmm failed: {r.stderr}")
    return exe


class StandIn:
    """One running attach_vmm (see its header for the protocol). ``close`` always
    leaves no process behind; the VMM also dies with this process (PDEATHSIG)."""

    def __init__(self, exe: Path, ram_bytes: int, tmp: Path) -> None:
        self.tmp = tmp
        self.proc = subprocess.Popen([str(exe), str(ram_bytes)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.pid = self.proc.pid
        try:
            f = self._answer("READY", 30.0)
        except BaseException:
            self.close()
            raise
        self.ram_addr = int(f["ram_addr"], 16)
        self.ram_bytes = int(f["ram_bytes"])
        self.memfd = int(f["memfd"])  # the VMM's fd number of its RAM
        self.npages = self.ram_bytes // PAGE
        self._n = 0

    def open_memfd(self) -> int:
        """A new fd on the VMM's RAM (the caller closes it)."""
        return os.open(f"/proc/{self.pid}/fd/{self.memfd}", os.O_RDWR | os.O_CLOEXEC)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.strip())
        self._lines.put(None)

    def _answer(self, kind: str, timeout: float) -> dict[str, str]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"attach_vmm pid {self.pid}: no {kind} within {timeout} s"
                               ) from None
        if line is None or not line.startswith(kind):
            raise RuntimeError(f"attach_vmm pid {self.pid} (exit {self.proc.poll()}): "
                               f"expected {kind}, got {line!r}")
        return dict(w.split("=", 1) for w in line.split()[1:] if "=" in w)

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def populate(self) -> float:
        """Map every RAM page in the VMM's page tables; seconds it took."""
        self._send("populate")
        return int(self._answer("OK", WAIT_S)["ns"]) / 1e9

    def touch(self, order: np.ndarray, threads: int, write: bool
              ) -> tuple[np.ndarray, np.ndarray, int]:
        """The VMM's "CPU 0/KVM" threads touch ``order`` (page indexes): (latency ns of
        each access as the touching thread saw it, the words read, wall ns)."""
        self._n += 1
        of, out = self.tmp / f"order{self._n}.u64", self.tmp / f"out{self._n}.u64"
        np.ascontiguousarray(order, dtype=np.uint64).tofile(of)
        try:
            self._send(f"touch {of} {out} {threads} {int(write)}")
            wall = int(self._answer("DONE", WAIT_S)["wall_ns"])
            raw = np.fromfile(out, dtype=np.uint64)
        finally:
            of.unlink(missing_ok=True)
            out.unlink(missing_ok=True)
        n = len(order)
        return raw[:n].copy(), raw[n:2 * n].copy(), wall

    async def touch_async(self, order: np.ndarray, threads: int, write: bool
                          ) -> tuple[np.ndarray, np.ndarray, int]:
        """``touch`` from a trio task, in a worker thread (the loop serves the faults it
        raises). On cancellation (Ctrl-C, an error elsewhere) the thread is abandoned: its
        accesses finish once the caller's teardown unregisters the RAM, or ``close``
        kills the VMM."""
        import trio

        return await trio.to_thread.run_sync(self.touch, order, threads, write,
                                             abandon_on_cancel=True)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._send("quit")
                self.proc.wait(10)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        self._reader.join(5)

    def __enter__(self) -> StandIn:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# ---- the engine, attached -------------------------------------------------------------
class RecordingPauses(PauseStats):
    """RemoteSpace's pause statistics, plus every stop: (pause s, calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.each: list[tuple[float, int]] = []

    def add(self, pause_s: float, calls: int) -> None:
        PauseStats.add(self, pause_s, calls)
        self.each.append((pause_s, calls))


@dataclass
class Attached:
    """The engine's side of one attach, as `vmm-tierd attach --pid` builds it (attach/vm.py):
    the VMM opened, its RAM discovered, a RemoteGuest whose setup injects the uffd, and
    a RegionRunner over it. ``setup()`` of the runner registers; ``close`` detaches."""

    proc: Process
    remote: RemoteSpace
    guest: RemoteGuest
    runner: RegionRunner
    pauses: RecordingPauses

    @classmethod
    def open(cls, k: Kernel, pid: int, store: PageStore, strategy: Strategy, granted: int,
             tracking: TrackingSettings, observer: Observer, name: str = "bench/ram0"
             ) -> Attached:
        proc = k.open_process(pid)
        try:
            remote = RemoteSpace(proc)
            pauses = remote.stats = RecordingPauses()
            space = ProcessSpace(proc, remote)
            region = find_guest_ram(proc)[0].region(k.page_size, proc.owner)
            guest = RemoteGuest(k, space, region, vm="bench", name=name, source="inject",
                                store_owner=owner_tag(proc.owner))
            runner = RegionRunner(k, guest, strategy=strategy, granted=granted,
                                  tracking=tracking, store=store, observer=observer)
        except BaseException:
            proc.close()
            raise
        return cls(proc, remote, guest, runner, pauses)

    async def close(self) -> None:
        """Detach as the daemon does at a graceful stop: unregister, close the uffd on
        both sides, unmap the scratch area in the VMM."""
        import trio

        try:
            await self.guest.teardown(True)
            if self.proc.alive():
                await trio.to_thread.run_sync(self.remote.release)
        finally:
            self.proc.close()
