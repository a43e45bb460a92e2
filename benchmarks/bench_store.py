"""Page store and policy figures, each next to its reference (see run.py)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from vmm_tierd.engine.pages import PageTable
from vmm_tierd.engine.ranges import ranges_to_mask
from vmm_tierd.engine.store import PageStore
from vmm_tierd.engine.store_format import crc32
from vmm_tierd.kernel import linux_store as ls
from vmm_tierd.kernel import stamps
from vmm_tierd.settings import TrackingSettings

PAGE = 4096
BATCH = 512
MASK = (1 << 64) - 1


def stamp_pages(index: np.ndarray, version: int = 1) -> np.ndarray:
    """stamps.page_bytes for many pages at once, (n, 4096) uint8 (same bytes)."""
    idx = index.astype(np.uint64)
    s = ((idx + np.uint64(1)) * np.uint64(stamps.GOLDEN)) ^ np.uint64(
        (version * 0xBF58476D1CE4E5B9) & MASK)
    s[s == 0] = np.uint64(stamps.GOLDEN)
    out = np.empty((len(idx), PAGE // 8), dtype=np.uint64)
    out[:, 0] = idx + np.uint64(1)
    out[:, 1] = version
    x = s.copy()
    for i in range(2, 256):
        x ^= x << np.uint64(13)
        x ^= x >> np.uint64(7)
        x ^= x << np.uint64(17)
        out[:, i] = x
    out[:, 256:] = s[:, None]
    return out.view(np.uint8).reshape(len(idx), PAGE)


def text_pages(n: int, rng: np.random.Generator) -> np.ndarray:
    """Text-like pages: Zipf-distributed words from a 3000-word vocabulary."""
    letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", dtype=np.uint8)
    vocab = [letters[rng.integers(0, 26, rng.integers(2, 10))].tobytes() for _ in range(3000)]
    words = rng.zipf(1.3, 400_000) % len(vocab)
    corpus = np.frombuffer(b" ".join(vocab[w] for w in words), dtype=np.uint8)
    starts = rng.integers(0, len(corpus) - PAGE, n)
    return corpus[starts[:, None] + np.arange(PAGE)]


def guest_pages(n: int, seed: int = 7) -> np.ndarray:
    """(n, 4096) uint8: 60% write-stamped, 30% text-like, 10% zero pages, shuffled."""
    rng = np.random.default_rng(seed)
    kind = rng.permutation(np.repeat([0, 1, 2], [n - n * 4 // 10, n * 3 // 10,
                                                 n * 4 // 10 - n * 3 // 10]))
    out = np.zeros((n, PAGE), dtype=np.uint8)
    st = np.flatnonzero(kind == 0)
    out[st] = stamp_pages(st, 1)
    tx = np.flatnonzero(kind == 1)
    out[tx] = text_pages(len(tx), rng)
    assert out[st[0]].tobytes() == stamps.page_bytes(int(st[0]), 1)
    return out


def _ref_compress(cctx: zstandard.ZstdCompressor, mv: memoryview, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        cctx.compress(mv[i * PAGE:(i + 1) * PAGE])
    return time.perf_counter() - t0


def _fill(path: Path, pages: np.ndarray, sync: str, level: int = 1) -> dict[str, Any]:
    """put_batch every page in 512-page batches, each interleaved with the reference."""
    cctx = zstandard.ZstdCompressor(level=level, write_content_size=False,
                                    write_checksum=False)
    t_put: list[float] = []
    t_ref: list[float] = []
    with PageStore(path, sync=sync, zstd_level=level, instance_id="bench") as s:
        r = s.region_id("bench")
        for b in range(0, len(pages), BATCH):
            chunk = pages[b:b + BATCH]
            mv = chunk.data.cast("B")
            t_ref.append(_ref_compress(cctx, mv, len(chunk)))
            t0 = time.perf_counter()
            s.put_batch(r, np.arange(b, b + len(chunk), dtype=np.uint64), mv)
            t_put.append(time.perf_counter() - t0)
        st = s.stats()
        cache = _cached(path / "data.mdb")
    mb = pages.nbytes / 1e6
    # per-batch ratios: a load spike on this shared machine hits one batch, not the median
    ratio = float(np.median(np.array(t_ref) / np.array(t_put)))
    return {"put_mbps": mb / sum(t_put), "ref_mbps": mb / sum(t_ref), "ratio": ratio,
            "stats": st, "cache": cache}


def _cached(f: Path) -> int:
    """Bytes of ``f`` in the page cache (cachestat(2), whoever's store wrote it)."""
    fd = os.open(f, os.O_RDONLY)
    try:
        return ls.cachestat(fd).cached
    finally:
        os.close(fd)


def _churn(path: Path, pages: np.ndarray, rounds: int) -> tuple[Any, Any]:
    """Rounds of: a random third of the pages faulted back (records deleted), background
    GC (compact() until done, as the engine's worker would), the pages evicted again.
    Stats at the end, and after the store's own maintenance (trim) if it has one."""
    rng = np.random.default_rng(9)
    with PageStore(path, sync="none", instance_id="bench") as s:
        r = s.region_id("bench")
        for _ in range(rounds):
            gone = np.sort(rng.choice(len(pages), len(pages) // 3, replace=False))
            s.delete(r, gone.astype(np.uint64))
            while s.compact(4):
                pass
            for b in range(0, len(gone), BATCH):
                idx = gone[b:b + BATCH]
                s.put_batch(r, idx.astype(np.uint64), np.ascontiguousarray(pages[idx]).data)
        end = s.stats()
        if hasattr(s, "trim"):
            s.trim()
        return end, s.stats()


def bench_eviction(quick: bool) -> dict[str, Any]:
    n = 8192 if quick else 65536
    pages = guest_pages(n)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vmm-tierd-bench-", dir="/var/tmp") as tmp:
        res = {sync: _fill(Path(tmp) / sync, pages, sync) for sync in ("none", "commit")}
        rounds = 3 if quick else 10
        churned, trimmed = _churn(Path(tmp) / "none", pages, rounds)
    for sync, r in res.items():
        out[f"put_batch MB/s sync={sync}"] = {
            "value": r["put_mbps"], "unit": "MB/s", "ref": r["ref_mbps"],
            "ref_name": "zstd-only", "goal": ">= 0.7x ref"}
        out[f"put_batch / zstd sync={sync}"] = {
            "value": r["ratio"], "unit": "x", "goal": ">= 0.7",
            "note": "median over 512-page batches of zstd-only time / put_batch time"}
    st = res["none"]["stats"]
    nonzero = st.records - st.zero_records
    out["compressed bytes/page"] = {"value": st.compressed_bytes / st.records, "unit": "B",
                                    "ref": PAGE, "ref_name": "guest"}
    out["disk bytes/page"] = {"value": st.disk_bytes / st.records, "unit": "B",
                              "ref": st.compressed_bytes / st.records,
                              "ref_name": "compressed", "goal": "<= 1.1x ref"}
    out["disk / compressed"] = {"value": st.disk_bytes / st.compressed_bytes, "unit": "x",
                                "goal": "<= 1.1",
                                "note": f"{n} pages ({n * PAGE >> 20} MiB guest, "
                                        f"{nonzero} non-zero), st_blocks of data.mdb"}
    out["disk / compressed after churn"] = {
        "value": churned.disk_bytes / churned.compressed_bytes, "unit": "x", "goal": "<= 1.1",
        "ref": max(churned.used_bytes, 1) / churned.compressed_bytes,
        "ref_name": "LMDB pages in use",
        "note": f"{rounds} rounds of: delete a random third, compact(), put them back"}
    out["disk / compressed after churn + trim()"] = {
        "value": trimmed.disk_bytes / trimmed.compressed_bytes, "unit": "x", "goal": "<= 1.1",
        "note": "the same, after the store's maintenance call punched LMDB's free pages"}
    out["compression ratio"] = {"value": st.guest_bytes / max(1, st.disk_bytes), "unit": "x"}
    for sync in ("none", "commit"):
        r = res[sync]
        out[f"page cache after fill sync={sync}"] = {
            "value": r["cache"] / (1 << 20), "unit": "MiB",
            "ref": r["stats"].compressed_bytes / (1 << 20), "ref_name": "compressed",
            "note": "data.mdb in the page cache right after the last put_batch "
                    "(cachestat): pages written must not stay"}
    return out


def _percentiles(ns: list[int]) -> tuple[float, float]:
    a = np.array(ns) / 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def _drop_cache(f: Path) -> None:
    """Drop data.mdb from the page cache, PTEs of LMDB's map of it included."""
    fd = os.open(f, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        size = np.array([[0, st.st_size]], dtype=np.uint64)
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and fields[4] == str(st.st_ino):
                    lo, hi = (int(x, 16) for x in fields[0].split("-"))
                    ls.writeback(fd, size, map_base=lo, map_len=hi - lo)
        ls.writeback(fd, size, sync_flags=ls.SYNC_WAIT_BEFORE | ls.SYNC_WRITE
                     | ls.SYNC_WAIT_AFTER, drop=True)
    finally:
        os.close(fd)


def bench_get(quick: bool) -> dict[str, Any]:
    n = 8192 if quick else 65536
    m = 20_000 if quick else 100_000
    ncold = 300 if quick else 2000
    pages = guest_pages(n, seed=11)
    nonzero = np.flatnonzero(pages.any(axis=1))
    rng = np.random.default_rng(3)
    order = rng.choice(nonzero, m)
    cctx = zstandard.ZstdCompressor(level=1, write_content_size=False, write_checksum=False)
    comp = {int(i): cctx.compress(pages[i].tobytes()) for i in np.unique(order)}
    dctx = zstandard.ZstdDecompressor()
    ns, cpu = time.perf_counter_ns, time.thread_time_ns
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vmm-tierd-bench-", dir="/var/tmp") as tmp:
        with PageStore(Path(tmp), sync="none", instance_id="bench") as s:
            r = s.region_id("bench")
            for b in range(0, n, BATCH):
                s.put_batch(r, np.arange(b, b + BATCH, dtype=np.uint64),
                            pages[b:b + BATCH].data.cast("B"))
            get, dec, release = s.get, dctx.decompress, s.release_reader
            for p in nonzero.tolist():  # everything in the page cache once
                get(r, p)
            t_get, t_dec, t_crc = [], [], []
            for p in order.tolist():  # interleaved so load noise hits both alike
                c = comp[p]
                t0 = ns()
                get(r, p)
                t1 = ns()
                o = dec(c, max_output_size=PAGE)
                t2 = ns()
                crc32(o)
                t3 = ns()
                t_get.append(t1 - t0)
                t_dec.append(t2 - t1)
                t_crc.append(t3 - t2)
            c0 = cpu()
            for p in order.tolist():
                get(r, p)
            cpu_get = (cpu() - c0) / len(order) / 1e3
            t_burst = []  # the engine's pattern: a burst of 2 faults, then release_reader
            for i in range(0, len(order) - 1, 2):
                t0 = ns()
                get(r, int(order[i]))
                get(r, int(order[i + 1]))
                release()
                t_burst.append((ns() - t0) // 2)
            t_many = []  # pages evicted together fault together: 16 neighbours at once
            if hasattr(s, "get_many"):
                for p in rng.choice(n - 16, m // 16).tolist():
                    t0 = ns()
                    s.get_many(r, range(p, p + 16))
                    t_many.append((ns() - t0) // 16)
            zero = np.flatnonzero(~pages.any(axis=1))[:2000].tolist()
            t_zero = []
            for p in zero:
                t0 = ns()
                get(r, p)
                t_zero.append(ns() - t0)
            t_cold, t_cold_pl = [], []
            f = Path(tmp) / "data.mdb"
            for p in rng.choice(nonzero, ncold).tolist():
                _drop_cache(f)  # all of it: index pages too
                t0 = ns()
                get(r, p)
                t_cold.append(ns() - t0)
            get(r, int(nonzero[0]))
            for p in rng.choice(nonzero, ncold).tolist():  # payload cold, index warm
                for q in rng.choice(nonzero, 64).tolist():
                    get(r, q)  # touch the index broadly, then drop what isn't mapped
                fd = os.open(f, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
                t0 = ns()
                get(r, p)
                t_cold_pl.append(ns() - t0)
    g50, g99 = _percentiles(t_get)
    d50, d99 = _percentiles(t_dec)
    c50, _ = _percentiles(t_crc)
    z50, _ = _percentiles(t_zero)
    b50, _ = _percentiles(t_burst)
    k50, k99 = _percentiles(t_cold)
    q50, q99 = _percentiles(t_cold_pl)
    out.update({
        "get p50": {"value": g50, "unit": "us", "ref": d50, "ref_name": "decompress-only",
                    "goal": "<= 10"},
        "get p99": {"value": g99, "unit": "us", "ref": d99, "ref_name": "decompress-only"},
        "get CPU us": {"value": cpu_get, "unit": "us",
                       "note": "thread CPU time per get (cached), less load noise than p50"},
        "get p50, release_reader() per 2-get burst": {
            "value": b50, "unit": "us", "ref": g50, "ref_name": "get p50",
            "note": "the fault path's pattern; a new read txn per burst costs here"},
        "crc32 p50": {"value": c50, "unit": "us", "note": "crc32 of 4 KiB (zlib-ng)"},
        "get p50 (zero page)": {"value": z50, "unit": "us"},
        "get p50 cold": {"value": k50, "unit": "us", "ref": g50, "ref_name": "cached",
                         "note": f"{ncold} gets, each after data.mdb left the page cache "
                                 "(index pages too): what a fault pays now that evicted "
                                 "pages don't stay cached"},
        "get p99 cold": {"value": k99, "unit": "us"},
        "get p50 cold payload": {"value": q50, "unit": "us", "ref": g50, "ref_name": "cached",
                                 "note": "payload read from disk, index pages cached"},
        "get p99 cold payload": {"value": q99, "unit": "us"},
        "gets": {"value": m, "note": f"random non-zero pages of a {n * PAGE >> 20} MiB "
                                     "store, after one warm-up pass"},
    })
    if t_many:
        k50m, _ = _percentiles(t_many)
        out["get_many p50 per page (16 neighbours)"] = {
            "value": k50m, "unit": "us", "ref": g50, "ref_name": "get p50"}
    return out


def bench_policy(quick: bool) -> dict[str, Any]:
    gib = 1 if quick else 8
    n = gib << 18
    p = PageTable(n, TrackingSettings(min_age=2, budget_pages=100_000))
    present = np.ones(n, dtype=bool)
    rng = np.random.default_rng(5)
    masks = [rng.random(n) < 0.9 for _ in range(4)]
    cycles = 10 if quick else 20
    t_obs = t_sel = 0.0
    for c in range(cycles):
        t0 = time.perf_counter()
        p.observe(masks[c % 4], present)
        t1 = time.perf_counter()
        got = p.select(3.0)
        t2 = time.perf_counter()
        half = got[: len(got) // 2]
        p.committed(p.detached(half, 0), np.zeros(len(half), dtype=bool))
        for q in half[: len(got) // 100].tolist():
            p.served_back(q)
        p.flush()
        t_obs += t1 - t0
        t_sel += t2 - t1
    regions = np.array([[0x10000000 + i * 2 * PAGE, 0x10000000 + i * 2 * PAGE + PAGE, 1]
                        for i in range(0, min(n // 2, 50_000))], dtype=np.uint64)
    t0 = time.perf_counter()
    ranges_to_mask(regions, 0x10000000, n)
    t_mask = time.perf_counter() - t0
    per = 1e3 / cycles / gib
    return {
        "metadata bytes/page": {"value": p.metadata_bytes_per_page, "unit": "B",
                                "goal": "<= 2",
                                "note": "the page table's arrays; bench_faults measures all "
                                        "per-page engine state"},
        "observe ms/GiB": {"value": t_obs * per, "unit": "ms"},
        "select ms/GiB": {"value": t_sel * per, "unit": "ms"},
        "observe+select ms/GiB": {"value": (t_obs + t_sel) * per, "unit": "ms",
                                  "note": f"{gib} GiB guest, {cycles} cycles, 10% accessed"},
        "ranges_to_mask ms (50k regions)": {"value": t_mask * 1e3, "unit": "ms"},
    }
