"""Part 1 of bench_attach: attach-mode fault service, the engine attached to a VMM
(attach_rig.py) next to ref_handler.c serving the same pages of the same VMM from the
same store (see bench_attach.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trio

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path[:0] = [str(HERE), str(HERE.parent)]

from attach_rig import (  # noqa: E402
    NAME,
    PAGE,
    Attached,
    StandIn,
    empty_stops,
    load_figs,
    load_note,
    ms_median,
    percentiles,
)
from bench_faults import build_c  # noqa: E402
from bench_store import guest_pages  # noqa: E402

from vmm_tierd.attach.vm import owner_tag  # noqa: E402
from vmm_tierd.engine.faults import FaultServer  # noqa: E402
from vmm_tierd.engine.selftest import RecordingObserver  # noqa: E402
from vmm_tierd.engine.store import PageStore  # noqa: E402
from vmm_tierd.kernel.api import Strategy  # noqa: E402
from vmm_tierd.kernel.linux import LinuxKernel  # noqa: E402
from vmm_tierd.kernel.remote import RemoteSpace  # noqa: E402
from vmm_tierd.settings import TrackingSettings  # noqa: E402

Figs = dict[str, Any]


@dataclass
class Round:
    lat_us: np.ndarray  # the VMM thread's round trip per access
    svc_us: np.ndarray  # the handler's own time per fault (read -> resolved)
    wall_s: float
    info: dict[str, Any]


class FaultBench:
    def __init__(self, tmp: Path, k: LinuxKernel, vmm_exe: Path, ref_exe: Path,
                 npages: int) -> None:
        self.tmp, self.k, self.ref_exe = tmp, k, ref_exe
        caps = k.capabilities()
        assert caps.strategy is not None, caps.reason
        self.strategy: Strategy = caps.strategy
        self.granted = caps.features
        self.tracking = TrackingSettings(interval_s=3600.0, min_age=1000, prefetch_pages=0)
        self.store_dir = tmp / "store-faults"
        self.store = PageStore(self.store_dir, sync="none", instance_id="bench-attach")
        self.memfd = -1
        try:
            self.vmm = StandIn(vmm_exe, npages * PAGE, tmp)
        except BaseException:
            self.store.close()
            raise
        try:
            self.memfd = self.vmm.open_memfd()
            p = k.open_process(self.vmm.pid)
            try:
                self.rid = self.store.region_id(NAME, owner=owner_tag(p.owner))
            finally:
                p.close()
            pages = guest_pages(npages, seed=13)
            for b in range(0, npages, 512):
                n = min(512, npages - b)
                self.store.put_batch(self.rid, np.arange(b, b + n, dtype=np.uint64),
                                     pages[b:b + n].data.cast("B"))
            self.first_words = np.ascontiguousarray(pages.view(np.uint64)[:, 0])
        except BaseException:
            self.close()
            raise
        self.npages = npages
        self.api: tuple[int, int] | None = None  # the engine's features and mode

    def close(self) -> None:
        if self.memfd >= 0:
            os.close(self.memfd)
        self.vmm.close()
        self.store.close()

    def empty_stops(self, n: int) -> list[float]:
        proc = self.k.open_process(self.vmm.pid)
        try:
            return empty_stops(proc, RemoteSpace(proc).tid, n)
        finally:
            proc.close()

    def _check(self, order: np.ndarray, words: np.ndarray, side: str) -> None:
        bad = int(np.count_nonzero(words != self.first_words[order]))
        if bad:
            raise RuntimeError(f"{side}: {bad} of {len(order)} pages read wrong content")

    def engine_round(self, order: np.ndarray, threads: int) -> Round:
        self.k.punch_hole(self.memfd, 0, self.vmm.ram_bytes)  # every page evicted
        obs = RecordingObserver()
        a = Attached.open(self.k, self.vmm.pid, self.store, self.strategy, self.granted,
                          self.tracking, obs, NAME)

        async def main() -> tuple[np.ndarray, np.ndarray, int, dict[str, int]]:
            try:
                core = await a.runner.setup()
                # the features enabled on the uffd (fdinfo), not UFFDIO_API's answer
                # (every feature the kernel supports, SIGBUS among them)
                feats = self.k.uffd_features(a.guest.local_uffd)
                assert feats is not None
                self.api = (feats, core.tracker.register_mode())
                n = self.npages
                core.pages.adopt(np.arange(n, dtype=np.uint64), np.zeros(n, dtype=bool))
                fs = FaultServer(core)
                async with trio.open_nursery() as nursery:
                    await nursery.start(fs.serve)
                    lat, words, wall = await self.vmm.touch_async(order, threads, False)
                    nursery.cancel_scope.cancel()
                return lat, words, wall, dict(core.report.c.faults)
            finally:
                with trio.CancelScope(shield=True):
                    await a.close()

        lat, words, wall, kinds = trio.run(main)
        self._check(order, words, "engine")
        return Round(lat / 1e3, np.asarray(obs.latencies) * 1e6, wall / 1e9,
                     {"kinds": kinds, "errors": obs.errors,
                      "uffd stop s": a.pauses.each[0][0]})

    def c_round(self, order: np.ndarray, threads: int) -> Round:
        assert self.api is not None, "an engine round first: it decides the features"
        features, mode = self.api
        self.k.punch_hole(self.memfd, 0, self.vmm.ram_bytes)
        k, base, length = self.k, self.vmm.ram_addr, self.vmm.ram_bytes
        svc_file = self.tmp / "svc.u64"
        proc = k.open_process(self.vmm.pid)
        remote = RemoteSpace(proc)
        try:
            rfd, local = remote.create_uffd()  # as the engine's attach does
            uffd_stop = remote.stats.last_s
            try:
                k.uffd_api(local, features)
                k.uffd_register(local, base, length, mode)
                # NOLOCK: the store's lock file is the daemon's own (it removes LMDB's);
                # nothing writes the store during a round.
                cmd = [str(self.ref_exe), "--uffd", str(local), hex(base),
                       str(self.store_dir), str(self.rid), str(self.npages),
                       str(int(self.strategy is Strategy.WP)), "1", str(svc_file)]
                h = subprocess.Popen(cmd, pass_fds=(local,), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
                try:
                    assert h.stdout is not None
                    first = h.stdout.readline().strip()
                    if first != "SERVING":  # it exited: its reason is on stderr
                        why = h.stderr.read().strip() if h.stderr else ""
                        raise RuntimeError(f"ref_handler did not start ({first!r}): {why}")
                    lat, words, wall = self.vmm.touch(order, threads, False)
                    out, err = h.communicate(timeout=60)
                finally:
                    if h.poll() is None:
                        h.kill()
                        h.wait()
                if h.returncode:
                    raise RuntimeError(f"ref_handler failed ({h.returncode}): {err.strip()}")
            finally:
                try:
                    k.uffd_unregister(local, base, length)
                finally:
                    k.uffd_close(local)
                    remote.close_remote([rfd])
        finally:
            if proc.alive():
                remote.release()
            proc.close()
        self._check(order, words, "C handler")
        info: dict[str, Any] = {a: int(b) for a, b in (kv.split("=") for kv in out.split())}
        info["uffd stop s"] = uffd_stop
        svc = np.fromfile(svc_file, dtype=np.uint64) / 1e3
        svc_file.unlink()
        return Round(lat / 1e3, svc, wall / 1e9, info)


def part_faults(tmp: Path, k: LinuxKernel, vmm_exe: Path, quick: bool) -> Figs:
    load0, t0 = load_note(), time.perf_counter()
    npages = 8192 if quick else 65536
    rounds = 3 if quick else 6
    _, ref_exe = build_c(tmp)
    assert ref_exe is not None
    rng = np.random.default_rng(21)
    b = FaultBench(tmp, k, vmm_exe, ref_exe, npages)
    res: dict[str, list[Round]] = {"engine": [], "c": []}
    try:
        warm = rng.permutation(npages).astype(np.uint64)
        b.engine_round(warm, 1)  # warm-up; also decides the features the C side gets
        b.c_round(warm, 1)
        for _ in range(rounds):
            order = rng.permutation(npages).astype(np.uint64)
            for side, fn in (("c", b.c_round), ("engine", b.engine_round)):
                res[side].append(fn(order, 1))
        empty = ms_median(b.empty_stops(20))
    finally:
        b.close()
    e, c = res["engine"], res["c"]
    ep = percentiles(np.concatenate([r.lat_us for r in e]))
    cp = percentiles(np.concatenate([r.lat_us for r in c]))
    es = percentiles(np.concatenate([r.svc_us for r in e]))
    cs = percentiles(np.concatenate([r.svc_us for r in c]))
    kinds: dict[str, int] = {}
    for r in e:
        for kk, v in r.info["kinds"].items():
            kinds[kk] = kinds.get(kk, 0) + v
    c_get = sum(r.info["get_ns"] for r in c) / sum(r.info["faults"] for r in c) / 1e3
    c_copy = sum(r.info["copy_ns"] for r in c) / sum(r.info["faults"] for r in c) / 1e3

    def fps(rs: list[Round]) -> float:
        return float(np.median([len(r.lat_us) / r.wall_s for r in rs]))

    setup = (f"{npages} pages ({npages * PAGE >> 20} MiB memfd RAM of attach_vmm: 60% stamped, "
             f"30% text, 10% zero records), all evicted, {rounds} rounds/side, 1 faulting "
             f"VMM thread, random order, {b.strategy.value} registration 0x{(b.api or (0, 0))[1]:x}"
             ", no fault-around, unpinned (2 shared CPUs); engine fault kinds "
             f"{kinds}")
    ref = "C handler"
    return {
        "attach: service p50": {"value": es[0], "unit": "us", "ref": cs[0], "ref_name": ref,
                                "note": f"the handler's own time, read -> resolved; {setup}"},
        "attach: service p99": {"value": es[1], "unit": "us", "ref": cs[1], "ref_name": ref,
                                "note": f"C per fault: store get+zstd+crc {c_get:.1f} us, "
                                        f"UFFDIO_COPY into the VMM {c_copy:.1f} us"},
        "attach: fault round trip p50": {"value": ep[0], "unit": "us", "ref": cp[0],
                                         "ref_name": ref,
                                         "note": "seen by the VMM's faulting thread"},
        "attach: fault round trip p99": {"value": ep[1], "unit": "us", "ref": cp[1],
                                         "ref_name": ref},
        "attach: faults/s": {"value": fps(e), "unit": "/s", "ref": fps(c), "ref_name": ref},
        "attach: injected pause, the uffd at attach": {
            "value": ms_median([r.info["uffd stop s"] for r in e + c]), "unit": "ms", "ref": empty,
            "ref_name": "one empty stop (getpid)",
            "note": "userfaultfd() injected into the VMM's main thread (once per attach), "
                    f"median of {len(e + c)} attaches; ref: median of 20 stops running "
                    "getpid"},
        **load_figs("faults", load0, t0),
    }
