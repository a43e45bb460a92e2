"""The maths of benchmarks/vs_kernel.py (pure): steady-window figures of one run, the
comparison with the no-tiering run of the same pace and round, the table, the issue's
goals, the PNG plot (matplotlib, optional) and the figures for benchmarks/run.py."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MiB = 1 << 20
FAULTED_NS = 5000  # slower is a fault: a resident page reads in 0.4-4 µs here (new thread)


def in_window(samples: Sequence[dict[str, Any]], w0: float, w1: float) -> list[dict[str, Any]]:
    return [s for s in samples if w0 <= s["t"] <= w1 + 0.5]


def rates(samples: Sequence[dict[str, Any]]) -> list[float]:
    """Workload ops/s over each interval between consecutive samples."""
    return [(b["ops"] - a["ops"]) / (b["t"] - a["t"])
            for a, b in itertools.pairwise(samples) if b["t"] > a["t"]]


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def percentile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))]


def hist_quantile(start: dict[str, float], end: dict[str, float], q: float) -> float | None:
    """Upper bound (s) of the bucket holding quantile q of a cumulative prometheus histogram
    between two snapshots; None if nothing was observed."""
    def le(k: str) -> float:
        return float("inf") if k == "+Inf" else float(k)

    keys = sorted(end, key=le)
    d = [(le(k), end[k] - start.get(k, 0.0)) for k in keys]
    total = d[-1][1] if d else 0.0
    if total <= 0:
        return None
    return next(b for b, c in d if c >= q * total)


def summarize(run: dict[str, Any], w0: float, w1: float) -> dict[str, Any]:
    """Figures of one run over its steady window [w0, w1] (seconds since workload start)."""
    s = in_window(run.get("samples", []), w0, w1)
    if len(s) < 2:
        return {"error": run.get("error") or f"only {len(s)} samples in {w0:g}-{w1:g} s"}
    a, b = s[0], s[-1]
    dt = b["t"] - a["t"]
    r = rates(s)
    out: dict[str, Any] = {"window_s": round(dt, 1), "ops_mean": (b["ops"] - a["ops"]) / dt,
                           "ops_worst": min(r)}

    def pct(key: str) -> float:
        return 100.0 * (b.get(key, 0.0) - a.get(key, 0.0)) / dt

    out.update(cpu=pct("cpu"), cpu_sys=pct("cpu_sys"), wl_cpu=pct("wl_cpu"),
               wl_sys=pct("wl_sys"), bench_cpu=pct("bench_cpu"), kcpu=pct("kcpu"))
    # the tiering side of the process: for the daemon its own threads (everything but the
    # workload's and the benchmark's); the kernel's threads (kswapd, kdamond) always
    out["tier_cpu"] = (max(0.0, out["cpu"] - out["wl_cpu"] - out["bench_cpu"])
                       if run.get("mode") == "daemon" else 0.0) + out["kcpu"]
    if "mem" in a:
        m = [x["mem"] for x in s]
        for k in ("usage", "anon", "file", "swap", "mapped_file"):
            out[k] = mean([x[k] for x in m])
        out["kernel"] = mean([max(0, x["usage"] - x["anon"] - x["file"]) for x in m])
        zp = [x.get("zram", {}).get("mem_used_total", 0) for x in s]
        out["zram_pool"] = mean(zp)
        out["zram_orig"] = mean([x.get("zram", {}).get("orig_data_size", 0) for x in s])
        out["host"] = mean([x["usage"] + z for x, z in zip(m, zp, strict=True)])
        out["faults_s"] = (b["mem"]["pgmajfault"] - a["mem"]["pgmajfault"]) / dt
    if "daemon" in a:
        out["faults_s"] = (b["daemon"]["faults"] - a["daemon"]["faults"]) / dt
        out["evicted"] = mean([x["daemon"]["evicted"] for x in s])
        out["resident"] = mean([x["daemon"]["resident"] for x in s])
        out["store_disk"] = b["daemon"]["store_disk"]
    final = run.get("final") or {}
    lats = [ns for t, ns in final.get("probes", []) if w0 <= t <= w1 and ns >= 0]
    out["probe_n"] = len(lats)
    out["probe_stuck"] = sum(1 for _, ns in final.get("probes", []) if ns < 0)
    if lats:
        us = [ns / 1e3 for ns in lats]
        out.update(probe_p50=percentile(us, 50), probe_p99=percentile(us, 99),
                   probe_max=max(us),
                   probe_faulted=100.0 * sum(1 for ns in lats if ns > FAULTED_NS) / len(lats))
    h = final.get("service_hist")
    if h:
        for q in (50, 99):
            v = hist_quantile(h["start"], h["end"], q / 100)
            out[f"svc_p{q}"] = None if v is None else v * 1e6
    if final.get("store_cached") is not None:
        out["store_cached"] = final["store_cached"]
    return out


def compare(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adds slowdown, worst/none, memory saved and extra CPU against the "none" run of the
    same pace and round (in place; returns rows)."""
    base = {(r["pace"], r["round"]): r for r in rows if r["config"] == "none"
            and "error" not in r}
    for r in rows:
        n = base.get((r["pace"], r["round"]))
        if n is None or "error" in r or "ops_mean" not in n:
            continue
        r["slowdown"] = 100.0 * (1 - r["ops_mean"] / n["ops_mean"])
        r["worst_rel"] = r["ops_worst"] / n["ops_mean"]
        r["worst_slowdown"] = 100.0 * (1 - r["worst_rel"])
        if "host" in r and n.get("host"):
            r["saved"] = 100.0 * (1 - r["host"] / n["host"])
        r["extra_cpu"] = r["cpu"] + r["kcpu"] - n["cpu"] - n["kcpu"]
    return rows


COLUMNS: list[tuple[str, str, str]] = [  # (key, header, format)
    ("pace", "pace", "s"), ("label", "configuration", "s"), ("ops_mean", "ops/s", ",.0f"),
    ("ops_worst", "worst s", ",.0f"), ("worst_rel", "worst/none", ".2f"),
    ("slowdown", "slowdown%", ".1f"), ("anon", "anon", "mib"), ("file", "pagecache", "mib"),
    ("zram_pool", "zram pool", "mib"), ("kernel", "kernel", "mib"), ("host", "host MiB", "mib"),
    ("saved", "saved%", ".1f"), ("cpu", "CPU%", ".1f"), ("extra_cpu", "extra%", ".1f"),
    ("tier_cpu", "tier CPU%", ".1f"), ("wl_sys", "wl sys%", ".1f"),
    ("probe_p50", "probe p50", ".1f"),
    ("probe_p99", "p99 µs", ".0f"), ("probe_max", "max µs", ",.0f"),
    ("faults_s", "faults/s", ",.0f"), ("limit", "limit", "mib"),
]


def cell(v: Any, fmt: str) -> str:
    if v is None:
        return "–"
    if fmt == "mib":
        return f"{v / MiB:,.0f}"
    return format(v, fmt) if fmt != "s" else str(v)


def table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [[h for _, h, _ in COLUMNS]]
    for r in rows:
        if "error" in r:
            lines.append([r["pace"], r["label"], f"not run: {r['error']}"])
            continue
        lines.append([cell(r.get(k), f) for k, _, f in COLUMNS])
    w = [max(len(ln[i]) for ln in lines if i < len(ln) and len(ln) == len(COLUMNS))
         for i in range(len(COLUMNS))]
    out = []
    for ln in lines:
        if len(ln) != len(COLUMNS):
            out.append("  ".join([ln[0].ljust(w[0]), ln[1].ljust(w[1]), *ln[2:]]))
        else:
            out.append("  ".join(c.ljust(w[i]) if i < 2 else c.rjust(w[i])
                                 for i, c in enumerate(ln)))
    return "\n".join(out)


LEGEND = """\
ops/s: workload ops per second, mean over the window; worst s: its worst second. host MiB:
the run's memory cgroup (anon + page cache + kernel: page tables, slab) plus zram's pool,
which no cgroup is charged for; saved%: against no tiering of the same pace and round.
CPU%: the run's process (workload threads included), % of one core; extra%: that minus no
tiering's, plus kswapd; tier CPU%: vmm-tierd's own threads (the process minus the workload
and benchmark threads); wl sys%: the workload threads' system time (zram compresses in
direct reclaim and decompresses on swap-in there). probe: one read of a page that was hot
15-40 s ago, 20 times a second, timed in C by the reading thread (µs). faults/s: faults the
daemon served, or the cgroup's major faults (zram swap-ins). limit: the zram run's
memory cgroup limit, the anon the vmm-tierd run of the same pace and round kept.
Unpaced runs take whatever CPU is free: their CPU figures are not costs, read slowdown."""


def details(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line of secondary figures per run."""
    out = []
    for r in rows:
        if "error" in r:
            continue
        tag = f"{r['pace']} {r['label']}"
        probe = (f"probe faulted {r['probe_faulted']:.0f}% of {r['probe_n']}"
                 + (f", {r['probe_stuck']} stuck" if r.get("probe_stuck") else "")
                 if "probe_faulted" in r else "no probes")
        if r.get("mode") == "daemon":
            svc = "/".join("–" if r.get(k) is None else f"{r[k]:,.0f}"
                           for k in ("svc_p50", "svc_p99"))
            cached = r.get("store_cached")
            out.append(f"{tag}: guest memory resident {r['resident'] / MiB:,.0f} MiB, "
                       f"evicted {r['evicted'] / MiB:,.0f} MiB, store file "
                       f"{r['store_disk'] / MiB:,.0f} MiB on disk"
                       + ("" if cached is None else f", {cached / MiB:,.0f} MiB of it cached"
                          " (fincore at the end)")
                       + f"; daemon's fault service p50/p99 <= {svc} µs (its histogram's "
                       f"buckets); {probe}")
        elif r.get("zram_orig"):
            ratio = r["zram_orig"] / r["zram_pool"] if r["zram_pool"] else 0.0
            out.append(f"{tag}: zram holds {r['zram_orig'] / MiB:,.0f} MiB in a "
                       f"{r['zram_pool'] / MiB:,.0f} MiB pool ({ratio:.2f}x); swapped "
                       f"{r.get('swap', 0) / MiB:,.0f} MiB; {probe}")
        else:
            out.append(f"{tag}: {probe}")
    return out


def _find(rows: Sequence[dict[str, Any]], config: str, pace: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["config"] == config and r["pace"] == pace and "error" not in r]


def goals(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The issue's goals (printed, never asserted), per vmm-tierd setting and round."""
    out = []
    for cfg, zcfg in (("tierd", "zram"), ("tierd-aggr", "zram-aggr")):
        for t in _find(rows, cfg, "paced"):
            z = next((x for x in _find(rows, zcfg, "paced") if x["round"] == t["round"]), None)
            tag = f"{t['label']} (round {t['round']})"
            if z is not None and "saved" in t and "saved" in z:
                ok = t["saved"] >= z["saved"]
                out.append(f"{'ok    ' if ok else 'MISSED'} {tag}: saves {t['saved']:.1f}% "
                           f"of host memory vs {z['label']} {z['saved']:.1f}% (goal: >=)")
            if "worst_rel" in t:
                ok = t["worst_rel"] >= 0.9
                out.append(f"{'ok    ' if ok else 'MISSED'} {tag}: worst second "
                           f"{t['worst_rel']:.2f} of the no-tiering mean (goal: >= 0.90)")
            if z is not None and "extra_cpu" in z:
                ok = t["tier_cpu"] <= max(0.0, z["extra_cpu"])
                out.append(f"{'ok    ' if ok else 'MISSED'} {tag}: daemon CPU "
                           f"{t['tier_cpu']:.1f}% of a core vs zram's extra "
                           f"{z['extra_cpu']:.1f}% (goal: <=)")
    return out


def plot(rows: Sequence[dict[str, Any]], path: Path) -> str:
    """Memory saved against slowdown, one point per run; returns what was done."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install -e '.[bench]')"
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    order = list(dict.fromkeys(r["config"] for r in rows))  # one colour per configuration
    for ax, pace in zip(axes, ("paced", "unpaced"), strict=True):
        pts = [r for r in rows if r["pace"] == pace and "saved" in r]
        for r in pts:
            c = f"C{order.index(r['config']) % 10}"
            ax.plot([r["slowdown"], r["worst_slowdown"]], [r["saved"]] * 2, color=c, lw=0.8)
            ax.scatter([r["slowdown"]], [r["saved"]], color=c, s=40, zorder=3,
                       label=f"{r['label']} (r{r['round']})")
            ax.scatter([r["worst_slowdown"]], [r["saved"]], color=c, marker="x", s=30)
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_title(f"{pace}: • mean slowdown, × worst second")
        ax.set_xlabel("slowdown vs no tiering (%)")
        ax.set_ylabel("host memory saved (%), page cache and zram pool counted")
        if pts:
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"


def figures(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Summary figures for benchmarks/run.py (first round), with zram as the reference."""
    out: dict[str, Any] = {}

    def one(cfg: str, pace: str, rnd: int | None = None) -> dict[str, Any] | None:
        rs = [r for r in _find(rows, cfg, pace) if rnd is None or r["round"] == rnd]
        return rs[0] if rs else None

    for pace in ("paced", "unpaced"):
        for cfg, zcfg, tag in (("tierd", "zram", "default"),
                               ("tierd-aggr", "zram-aggr", "aggressive")):
            t = one(cfg, pace)
            if t is None or "saved" not in t:
                continue
            z = one(zcfg, pace, t["round"])
            ref = {} if z is None or "saved" not in z else {"ref_name": "zram, same anon"}
            out[f"{pace} {tag}: memory saved"] = {
                "value": round(t["saved"], 1), "unit": "%", **ref,
                **({"ref": round(z["saved"], 1), "goal": ">= 1x ref"}
                   if ref and z and z["saved"] > 0 else {})}
            out[f"{pace} {tag}: worst second / none"] = {
                "value": round(t["worst_rel"], 3), "goal": ">= 0.9" if pace == "paced" else "",
                **({"ref": round(z["worst_rel"], 3), "ref_name": "zram"}
                   if z and z.get("worst_rel", 0) > 0 else {})}
            out[f"{pace} {tag}: daemon CPU"] = {
                "value": round(t["tier_cpu"], 1), "unit": "% core",
                **({"ref": round(z["extra_cpu"], 1), "ref_name": "zram extra CPU",
                    "goal": "<= 1x ref"} if z and z.get("extra_cpu", 0) > 0 else {})}
            if "probe_p99" in t:
                out[f"{pace} {tag}: cold-page probe p99"] = {
                    "value": round(t["probe_p99"], 1), "unit": "µs",
                    **({"ref": round(z["probe_p99"], 1), "ref_name": "zram"}
                       if z and z.get("probe_p99", 0) > 0 else {})}
    return out
