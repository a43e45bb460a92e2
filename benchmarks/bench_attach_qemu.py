"""Part 4 of bench_attach: a real QEMU guest's own throughput with and without
`vmm-tierd attach`, and the memory it saves (prints figures; asserts nothing).

    .venv/bin/python -m benchmarks.bench_attach --only-qemu [--quick]   # this part alone
    .venv/bin/python -m benchmarks.bench_attach --qemu [--quick]        # after parts 1-3

Debian's QEMU 7.2 under TCG boots the rig's Linux guest (tests/realvm) with 768 MiB of
memfd RAM, 65% of it filled with files on a tmpfs whose sha256 the guest recorded. The
guest's throughput is its own: ``verify`` (re-hash every file; MiB/s of data over the
guest's own time) and ``touch 30`` (read 30% of the files; host time). Timeline:

1. without the daemon: verify (x2 in a full run), touch;
2. `vmm-tierd attach --pid QEMU` with the tests' aggressive settings (1 s interval,
   min_age 1) until eviction levels off; the memory then: QEMU's memfd (allocated bytes,
   SEEK_DATA walk), the store's file on disk and in the page cache, the daemon's RSS;
3. with the daemon: verify (every evicted page faults back, and on this 6.18 host reads
   are invisible to tracking, so the daemon evicts again what the verify just read),
   touch; the daemon's fault-service histogram over that span; injected pauses per cycle
   from scrapes every 0.5 s;
4. detach (SIGTERM: every page back, the uffd closed inside QEMU), verify again.

A boot takes 1-2 minutes under TCG, the whole part about 4-8 minutes; figures move with
the machine's load (printed at start and end).
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path[:0] = [str(HERE), str(HERE.parent)]

from attach_rig import (  # noqa: E402
    Scrape,
    bucket_deltas,
    histogram_quantile,
    load_note,
    per_cycle,
)

from tests.attach.daemon import AttachDaemon, write_config  # noqa: E402
from tests.realvm import memfd  # noqa: E402
from tests.realvm.guest import QemuGuest, Ready, TouchResult, VerifyResult  # noqa: E402

MIB = 1 << 20
RAM_MIB = 768
FILL = 0.65
TIMEOUT = 900.0
VM = "qemu"
Figs = dict[str, Any]
Samples = dict[str, list[tuple[dict[str, str], float]]]


def say(t0: float, what: str) -> None:
    """Progress on stderr (the part takes minutes)."""
    print(f"[qemu +{time.perf_counter() - t0:5.1f} s] {what}", file=sys.stderr, flush=True)


def checked(v: VerifyResult) -> VerifyResult:
    if v.bad or not v.ok:
        raise RuntimeError(f"the guest's verifier: {v.bad} bad files {v.bad_files[:5]}")
    return v


def memfd_allocated(pid: int) -> int:
    fd = memfd.open_ram(pid)
    try:
        return memfd.allocated_bytes(fd)
    finally:
        os.close(fd)


def total(m: Samples, name: str, **labels: str) -> float:
    return sum(v for lab, v in m.get(name, [])
               if all(lab.get(k) == w for k, w in labels.items()))


def buckets(m: Samples, kind: str = "store") -> list[tuple[float, float]]:
    acc: dict[float, float] = {}
    for lab, v in m.get("vmm_tierd_fault_service_seconds_bucket", []):
        if lab.get("kind") == kind and lab.get("vm") == VM:
            le = float(lab["le"])
            acc[le] = acc.get(le, 0.0) + v
    return sorted(acc.items())


def scrape_of(m: Samples) -> Scrape:
    return Scrape(time.monotonic(), total(m, "vmm_tierd_cycles_total", vm=VM),
                  total(m, "vmm_tierd_vm_inject_stops_total", vm=VM),
                  total(m, "vmm_tierd_vm_inject_pause_seconds_total", vm=VM),
                  total(m, "vmm_tierd_vm_inject_pause_max_seconds", vm=VM))


class Sampler:
    """Scrapes the daemon every ``period`` s in a thread (its exposition is at most 1 s
    old): the injection counters, and the latest full scrape."""

    def __init__(self, d: AttachDaemon, period: float = 0.5) -> None:
        self.d, self.period = d, period
        self.scrapes: list[Scrape] = []
        self.last: Samples = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                m = self.d.scrape()
            except OSError:
                continue  # stopping, or one slow answer
            self.last = m
            self.scrapes.append(scrape_of(m))

    def stop(self) -> None:
        self._stop.set()
        self._t.join(30)


def wait_level(s: Sampler, at_least: int, timeout: float = 300.0, flat_s: float = 6.0
               ) -> float:
    """Until at least ``at_least`` bytes are evicted and the figure grew by < 2% over
    the last ``flat_s`` seconds; the evicted bytes then."""
    hist: list[tuple[float, float]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if s.d.proc.poll() is not None:
            raise RuntimeError(f"daemon exited ({s.d.proc.returncode}):\n{s.d.output[-3000:]}")
        now = time.monotonic()
        ev = total(s.last, "vmm_tierd_region_evicted_bytes", vm=VM)
        hist.append((now, ev))
        old = [e for t, e in hist if t <= now - flat_s]
        if ev >= at_least and old and ev <= old[-1] * 1.02:
            return ev
        time.sleep(0.5)
    raise RuntimeError(f"eviction did not level off above {at_least >> 20} MiB within "
                       f"{timeout:.0f} s (at {hist[-1][1] / MIB if hist else 0:.0f} MiB)")


@dataclass
class Span:
    """Guest work done with the daemon attached, between two scrapes."""

    verifies: list[VerifyResult]
    touch: TouchResult | None
    before: Samples
    after: Samples
    scrapes: list[Scrape]

    def delta(self, name: str) -> float:
        return total(self.after, name, vm=VM) - total(self.before, name, vm=VM)

    def quantiles_us(self) -> tuple[float, float, float]:
        """p50, p99 of the store faults' service time, and how many there were."""
        h = bucket_deltas(buckets(self.before), buckets(self.after))
        n = h[-1][1] if h else 0.0
        if not n:
            return 0.0, 0.0, 0.0
        return histogram_quantile(h, 0.5) * 1e6, histogram_quantile(h, 0.99) * 1e6, n

    def note(self) -> str:
        n = self.quantiles_us()[2]
        extra = self.delta("vmm_tierd_prefetched_pages_total")
        busy = sum(v for lab, v in self.after.get("vmm_tierd_fault_service_seconds_sum", [])
                   if lab.get("kind") == "store" and lab.get("vm") == VM) - sum(
            v for lab, v in self.before.get("vmm_tierd_fault_service_seconds_sum", [])
            if lab.get("kind") == "store" and lab.get("vm") == VM)
        per_page = busy / (n + extra) * 1e6 if n + extra else 0.0
        return (f"{n:.0f} store faults, each bringing back up to 8 pages (default "
                f"fault-around; {extra:.0f} pages came with them): mean "
                f"{busy / n * 1e6 if n else 0:.1f} us per fault, {per_page:.1f} us per page "
                f"brought back; {self.delta('vmm_tierd_evictions_total'):.0f} pages evicted "
                "meanwhile")


def span(g: QemuGuest, d: AttachDaemon, s: Sampler, verifies: int, touch: bool) -> Span:
    i0 = len(s.scrapes)
    before = d.scrape()
    vs = [checked(g.verify(TIMEOUT)) for _ in range(verifies)]
    t = g.touch(30, TIMEOUT) if touch else None
    time.sleep(1.1)  # the exposition is up to 1 s old
    return Span(vs, t, before, d.scrape(), s.scrapes[max(0, i0 - 1):])


def set_interval(d: AttachDaemon, tmp: Path, interval: str) -> None:
    """Rewrite the config with another tracking interval and SIGHUP the daemon; returns
    once the reload is applied (a cycle sleeping its interval wakes for it)."""
    n = total(d.scrape(), "vmm_tierd_config_reloads_total")
    write_config(tmp, interval=interval)
    d.send(signal.SIGHUP)
    deadline = time.monotonic() + 60
    while total(d.scrape(), "vmm_tierd_config_reloads_total") <= n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"SIGHUP (interval {interval}) not applied:\n{d.output[-2000:]}")
        time.sleep(0.3)


@dataclass
class Run:
    """What one part-4 run measured (figures() turns it into the table)."""

    load0: tuple[float, str]
    t_all: float
    ready: Ready
    base: list[VerifyResult]       # without the daemon
    base_touch: TouchResult
    mem0: int                      # memfd allocated bytes: before attach
    ready_s: float
    evicted: float                 # the daemon's evicted bytes when it levelled off
    level_s: float
    m1: Samples                    # a scrape then
    mem1: int                      # ... and the memfd then
    a: Span                        # cycles paused: serving only
    mem_a: int
    b: Span                        # cycles every second
    mem2: int
    all_pauses: dict[str, float]
    detach_s: float
    after: VerifyResult
    mem3: int
    alive: bool


def bench_attach_qemu(quick: bool) -> Figs:
    load0, t_all = load_note(), time.perf_counter()
    rounds = 2 if quick else 3
    with tempfile.TemporaryDirectory(prefix="bench-attach-qemu-", dir="/var/tmp") as td:
        tmp = Path(td)
        with QemuGuest.start(ram_mib=RAM_MIB, fill_fraction=FILL, workdir=tmp) as g:
            ready = g.wait_ready(TIMEOUT)
            say(t_all, f"guest ready (pid {g.pid}); verifies without the daemon")
            base = [checked(g.verify(TIMEOUT)) for _ in range(rounds)]
            base_touch = g.touch(30, TIMEOUT)
            mem0 = memfd_allocated(g.pid)
            cfg = write_config(tmp, interval="1s")
            d = AttachDaemon(["--pid", str(g.pid), "--name", VM, "--config", str(cfg),
                              "--store", str(tmp / "store")])
            sampler: Sampler | None = None
            try:
                t_attach = time.monotonic()
                say(t_all, "attaching")
                d.wait_ready(300)
                ready_s = time.monotonic() - t_attach
                sampler = Sampler(d)
                evicted = wait_level(sampler, 100 * MIB)
                level_s = time.monotonic() - t_attach
                m1 = d.scrape()
                mem1 = memfd_allocated(g.pid)
                # a: cycles paused (interval 1 h): the daemon only serves faults
                say(t_all, f"evicted {evicted / MIB:.0f} MiB; cycles paused, verify")
                set_interval(d, tmp, "1h")
                a = span(g, d, sampler, 1, False)
                mem_a = memfd_allocated(g.pid)
                # b: cycles every second again, evicting alongside the guest's work
                say(t_all, "cycles every 1 s again")
                set_interval(d, tmp, "1s")
                wait_level(sampler, 100 * MIB)
                say(t_all, "verifies and touch while evicting")
                b = span(g, d, sampler, rounds, True)
                mem2 = memfd_allocated(g.pid)
                all_pauses = per_cycle(sampler.scrapes)
                sampler.stop()
                t_stop = time.monotonic()
                say(t_all, "detaching")
                rc = d.stop(timeout=300)
                detach_s = time.monotonic() - t_stop
            finally:
                if sampler is not None:
                    sampler.stop()
                d.kill()
            if rc != 0:
                raise RuntimeError(f"the daemon's detach failed ({rc}):\n{d.output[-3000:]}")
            after = checked(g.verify(TIMEOUT))
            mem3 = memfd_allocated(g.pid)
            alive = g.alive()
    return figures(Run(load0, t_all, ready, base, base_touch, mem0, ready_s, evicted,
                       level_s, m1, mem1, a, mem_a, b, mem2, all_pauses, detach_s, after,
                       mem3, alive))


def figures(v: Run) -> Figs:
    ready, base, a, b = v.ready, v.base, v.a, v.b
    assert b.touch is not None
    data_mib = ready.bytes / MIB
    rate0 = data_mib / min(x.guest_seconds for x in base)
    ref0 = "without the daemon"
    m1, mem0, mem1 = v.m1, v.mem0, v.mem1
    disk = total(m1, "vmm_tierd_store_disk_bytes")
    cache = total(m1, "vmm_tierd_store_cache_bytes")
    rss = total(m1, "process_resident_memory_bytes")
    saved = mem0 - mem1
    pb, pa = per_cycle(b.scrapes), v.all_pauses
    qa, qb = a.quantiles_us(), b.quantiles_us()
    hold = total(b.after, "vmm_tierd_region_loop_hold_max_seconds", vm=VM)

    def secs(vs: list[VerifyResult]) -> str:
        return ", ".join(f"{x.guest_seconds:.1f}" for x in vs)

    figs: Figs = {
        "qemu: verify MiB/s, attached, serving only": {
            "value": data_mib / a.verifies[0].guest_seconds, "unit": "MiB/s", "ref": rate0,
            "ref_name": ref0,
            "note": f"{ready.files} files, {data_mib:.0f} MiB of data in a {RAM_MIB} MiB "
                    f"guest, nearly all evicted first; cycles paused (SIGHUP, interval 1h): "
                    f"the daemon only serves faults; {a.verifies[0].guest_seconds:.1f} s, "
                    f"without the daemon {secs(base)} s (ref: the best); boot+fill "
                    f"{ready.boot_seconds:.0f} s"},
        "qemu: verify MiB/s, attached, evicting alongside": {
            "value": data_mib / b.verifies[0].guest_seconds, "unit": "MiB/s", "ref": rate0,
            "ref_name": ref0,
            "note": f"cycles every 1 s, min_age 1 (the tests' aggressive settings), from "
                    f"nearly all evicted again: {secs(b.verifies)} s; each verify finds "
                    "what the previous one read evicted again (reads are invisible to wp "
                    "tracking)"},
        "qemu: touch 30% s": {"value": b.touch.seconds, "unit": "s",
                              "ref": v.base_touch.seconds, "ref_name": ref0,
                              "note": f"{b.touch.bytes / MIB:.0f} MiB read (host time), "
                                      "evicting alongside"},
        "qemu: verify after detach MiB/s": {
            "value": data_mib / v.after.guest_seconds, "unit": "MiB/s", "ref": rate0,
            "ref_name": ref0,
            "note": f"detach took {v.detach_s:.1f} s (every page back); QEMU alive: "
                    f"{v.alive}; every verify of the run passed"},
        "qemu: memfd allocated, evicted": {
            "value": mem1 / MIB, "unit": "MiB", "ref": mem0 / MIB, "ref_name": ref0,
            "note": f"SEEK_DATA walk of QEMU's memfd; the daemon's evicted figure "
                    f"{v.evicted / MIB:.0f} MiB, levelled off {v.level_s:.0f} s after "
                    f"start (ready in {v.ready_s:.1f} s); after the verify serving only "
                    f"{v.mem_a / MIB:.0f} MiB, after the verifies evicting alongside "
                    f"{v.mem2 / MIB:.0f} MiB, after detach {v.mem3 / MIB:.0f} MiB"},
        "qemu: memory saved, net": {
            "value": (saved - cache - rss) / MIB, "unit": "MiB", "ref": mem0 / MIB,
            "ref_name": "memfd allocated before",
            "note": f"memfd {saved / MIB:.0f} MiB freed, less the store's page cache "
                    f"{cache / MIB:.0f} MiB and the daemon's RSS {rss / MIB:.0f} MiB"},
        "qemu: store disk MiB": {"value": disk / MIB, "unit": "MiB",
                                 "ref": saved / MIB, "ref_name": "memfd bytes freed"},
        "qemu: fault service p50, serving only": {
            "value": qa[0], "unit": "us",
            "note": f"the daemon's histogram (read -> resolved; linear inside buckets "
                    f"5us..10ms) over the verify: {a.note()}"},
        "qemu: fault service p99, serving only": {"value": qa[1], "unit": "us"},
        "qemu: fault service p50, evicting alongside": {
            "value": qb[0], "unit": "us",
            "note": f"over the verifies and touch: {b.note()}; the longest hold of the "
                    f"loop that serves faults: {hold * 1e3:.1f} ms"},
        "qemu: fault service p99, evicting alongside": {"value": qb[1], "unit": "us"},
        "qemu: injected pause total per cycle": {
            "value": pb.get("total median s", 0.0) * 1e3, "unit": "ms",
            "note": f"from scrapes 0.5 s apart, spans with exactly one cycle: "
                    f"{pb.get('cycles', 0):.0f} while evicting alongside (max "
                    f"{pb.get('total max s', 0) * 1e3:.2f} ms, stops per cycle "
                    f"{pb.get('stops median', 0):.0f}); from attach on: "
                    f"{pa.get('cycles', 0):.0f} cycles, median "
                    f"{pa.get('total median s', 0) * 1e3:.2f} ms, max "
                    f"{pa.get('total max s', 0) * 1e3:.2f} ms"},
        "qemu: longest injected stop": {
            "value": pa.get("longest stop s", 0.0) * 1e3, "unit": "ms",
            "note": "the daemon's vmm_tierd_vm_inject_pause_max_seconds (the whole run)"},
    }
    la, lnote = load_note()
    figs["qemu: load at start"] = {"value": v.load0[0], "note": v.load0[1]}
    figs["qemu: load at end"] = {"value": la, "note": lnote}
    figs["qemu: seconds"] = {"value": time.perf_counter() - v.t_all, "unit": "s"}
    return figs
