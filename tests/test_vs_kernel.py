"""The pure parts of benchmarks/vs_kernel.py: parsing cgroup and zram files, the table
maths, the daemon config it writes (the restore logic: test_vs_kernel_restore.py). No
timing."""

from __future__ import annotations

import dataclasses
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import vs_kernel_configs as configs  # noqa: E402
import vs_kernel_report as rep  # noqa: E402
from vs_kernel_parse import (  # noqa: E402
    mem_from_v1,
    mem_from_v2,
    parse_keyed,
    parse_mm_stat,
    parse_proc_cgroup,
    parse_swaps,
    parse_task_cpu,
)

V1_STAT = """cache 4096000
rss 367001600
rss_huge 0
shmem 0
mapped_file 8192
swap 12288
pgmajfault 77
total_cache 4096000
total_rss 367001600
total_swap 12288
total_mapped_file 8192
total_pgmajfault 77
hierarchical_memory_limit 9223372036854771712
"""
V2_STAT = "anon 1000\nfile 200\nfile_mapped 50\npgmajfault 3\nsomething odd here\n"


# ---- parsing ---------------------------------------------------------------------------
def test_parse_keyed_skips_lines_that_are_not_key_value() -> None:
    assert parse_keyed(V2_STAT) == {"anon": 1000, "file": 200, "file_mapped": 50,
                                    "pgmajfault": 3}
    assert parse_keyed("a b\nc 1x\n") == {}


def test_v1_and_v2_stat_map_to_the_same_sample() -> None:
    m = mem_from_v1(parse_keyed(V1_STAT), usage=380_000_000)
    assert (m.anon, m.file, m.swap, m.mapped_file, m.pgmajfault) == (
        367001600, 4096000, 12288, 8192, 77)
    assert m.kernel == 380_000_000 - 367001600 - 4096000
    v2 = mem_from_v2(parse_keyed(V2_STAT), current=1500, swap=7)
    assert (v2.usage, v2.anon, v2.file, v2.swap, v2.mapped_file, v2.kernel) == (
        1500, 1000, 200, 7, 50, 300)
    assert mem_from_v2({}, current=10, swap=0).kernel == 10
    assert mem_from_v1({}, usage=0).kernel == 0  # never negative


def test_parse_mm_stat() -> None:
    full = parse_mm_stat("  372436992 163839524 167211008        0 167211008     3001"
                         "      0     7     7\n")
    assert full["orig_data_size"] == 372436992
    assert full["compr_data_size"] == 163839524
    assert full["mem_used_total"] == 167211008
    assert full["same_pages"] == 3001 and full["huge_pages_since"] == 7
    old = parse_mm_stat("1 2 3 4 5")  # older kernels have fewer fields
    assert old == {"orig_data_size": 1, "compr_data_size": 2, "mem_used_total": 3,
                   "mem_limit": 4, "mem_used_max": 5}
    for bad in ("", "1 2", "1 two 3"):
        with pytest.raises(ValueError, match="mm_stat"):
            parse_mm_stat(bad)


def test_parse_proc_cgroup_hybrid_and_pure_v2() -> None:
    hybrid = ("9:name=systemd:/\n4:memory:/process_api/abc\n3:cpuset:/\n"
              "2:cpu,cpuacct:/x\n0::/\n")
    assert parse_proc_cgroup(hybrid) == ("/process_api/abc", "/")
    assert parse_proc_cgroup("0::/user.slice/session-1.scope\n") == (
        None, "/user.slice/session-1.scope")
    assert parse_proc_cgroup("5:memory,blkio:/m\n") == ("/m", None)


def test_parse_task_cpu_counts_fields_after_the_command_name() -> None:
    fields = ["S"] + [str(i) for i in range(4, 53)]  # field 3 .. 52
    fields[14 - 3], fields[15 - 3] = "1234", "567"
    line = "4242 (a (b) c) " + " ".join(fields)
    assert parse_task_cpu(line) == (1234, 567)
    assert parse_swaps("Filename Type Size Used Priority\n/dev/zram1 partition 1 0 100\n"
                       ) == ["/dev/zram1"]
    assert parse_swaps("Filename Type Size Used Priority\n") == []


# ---- the table maths -------------------------------------------------------------------
def sample(t: float, ops: int, cpu: float, usage: int, anon: int, file: int = 0,
           zram: int = 0, majf: int = 0, **kw: Any) -> dict[str, Any]:
    s: dict[str, Any] = {"type": "sample", "t": t, "ops": ops, "cpu": cpu, "cpu_sys": 0.0,
                         "wl_cpu": cpu / 2, "wl_sys": 0.0, "bench_cpu": 0.0, "kcpu": 0.0,
                         "mem": {"usage": usage, "anon": anon, "file": file, "swap": 0,
                                 "mapped_file": 0, "pgmajfault": majf}}
    if zram:
        s["zram"] = {"orig_data_size": 3 * zram, "compr_data_size": zram,
                     "mem_used_total": zram}
    s.update(kw)
    return s


def test_summarize_window_rates_memory_cpu_and_probes() -> None:
    samples = [sample(0, 0, 0.0, 10, 10),  # before the window: ignored
               sample(10, 1000, 1.0, 100, 80, 10, zram=20, majf=5),
               sample(11, 2000, 1.5, 110, 80, 20, zram=20, majf=15),
               sample(12, 2500, 2.0, 120, 90, 20, zram=50, majf=25),
               sample(13, 4000, 2.5, 130, 90, 30, zram=50, majf=35)]
    probes = [[5.0, 9_999_000], [10.5, 1000], [11.0, 3000], [12.0, 500_000],
              [12.5, 2000], [13.4, -1]]
    s = rep.summarize({"samples": samples, "final": {"probes": probes}}, 10, 13)
    assert s["ops_mean"] == pytest.approx(1000.0)  # 3000 ops in 3 s
    assert s["ops_worst"] == pytest.approx(500.0)
    assert s["cpu"] == pytest.approx(50.0)  # 1.5 s of CPU in 3 s
    assert s["tier_cpu"] == 0.0  # plain mode: the kernel's side is in kcpu only
    assert s["anon"] == pytest.approx(85.0) and s["file"] == pytest.approx(20.0)
    assert s["kernel"] == pytest.approx(10.0)
    assert s["zram_pool"] == pytest.approx(35.0)
    assert s["host"] == pytest.approx((120 + 130 + 170 + 180) / 4)
    assert s["faults_s"] == pytest.approx(10.0)
    # probes in the window: 1, 3, 500 and 2 µs; the stuck one is counted, not timed
    assert s["probe_n"] == 4 and s["probe_stuck"] == 1
    assert s["probe_p50"] == pytest.approx(2.0) and s["probe_max"] == pytest.approx(500.0)
    assert s["probe_faulted"] == pytest.approx(25.0)  # only the 500 µs one was a fault


def test_summarize_daemon_side_cpu_and_service_histogram() -> None:
    def d(t: float, cpu: float, wl: float, faults: int) -> dict[str, Any]:
        return sample(t, int(t * 100), cpu, 50, 40, wl_cpu=wl, daemon={
            "faults": faults, "evicted": 7, "resident": 3, "store_disk": 99})

    run = {"mode": "daemon", "samples": [d(0, 0, 0, 0), d(2, 1.0, 0.2, 400)],
           "final": {"probes": [], "service_hist": {
               "start": {"1e-05": 0.0, "5e-05": 0.0, "+Inf": 0.0},
               "end": {"1e-05": 10.0, "5e-05": 98.0, "+Inf": 100.0}}}}
    s = rep.summarize(run, 0, 2)
    assert s["tier_cpu"] == pytest.approx(40.0)  # (1.0 - 0.2) s of 2 s
    assert s["faults_s"] == pytest.approx(200.0)
    assert s["svc_p50"] == pytest.approx(50.0) and s["svc_p99"] == float("inf")
    assert rep.hist_quantile({}, {"+Inf": 0.0}, 0.5) is None


def test_summarize_without_enough_samples_is_an_error_row() -> None:
    assert "error" in rep.summarize({"samples": [sample(20, 1, 0, 1, 1)]}, 10, 30)
    assert rep.summarize({"samples": [], "error": "boom"}, 0, 1)["error"] == "boom"


def test_compare_against_no_tiering_of_the_same_pace_and_round() -> None:
    def row(cfg: str, pace: str, rnd: int, ops: float, worst: float, host: float,
            cpu: float) -> dict[str, Any]:
        return {"config": cfg, "label": cfg, "pace": pace, "round": rnd, "ops_mean": ops,
                "ops_worst": worst, "host": host, "cpu": cpu, "kcpu": 1.0,
                "tier_cpu": 0.0}

    rows = rep.compare([row("none", "paced", 1, 1000, 990, 1000, 20),
                        row("tierd", "paced", 1, 900, 300, 800, 50),
                        row("none", "unpaced", 1, 5000, 4000, 2000, 90),
                        row("zram", "unpaced", 1, 4000, 3000, 1500, 100),
                        row("zram", "paced", 2, 1, 1, 1, 1),  # no base in round 2
                        {"config": "damos", "label": "d", "pace": "paced", "round": 1,
                         "error": "DAMON is taken"}])
    t, z = rows[1], rows[3]
    assert t["slowdown"] == pytest.approx(10.0) and t["worst_rel"] == pytest.approx(0.3)
    assert t["worst_slowdown"] == pytest.approx(70.0)
    assert t["saved"] == pytest.approx(20.0) and t["extra_cpu"] == pytest.approx(30.0)
    assert z["slowdown"] == pytest.approx(20.0) and z["saved"] == pytest.approx(25.0)
    assert "slowdown" not in rows[4] and "slowdown" not in rows[5]
    text = rep.table(rows)
    assert "not run: DAMON is taken" in text
    assert text.splitlines()[0].split()[:2] == ["pace", "configuration"]
    z["extra_cpu"], t["tier_cpu"] = 5.0, 10.7
    zp = dict(z, pace="paced", config="zram", saved=30.0)
    g = rep.goals([*rows, zp])
    assert any(x.startswith("MISSED") and "saves 20.0%" in x for x in g)
    assert any(x.startswith("MISSED") and "worst second 0.30" in x for x in g)
    assert any(x.startswith("MISSED") and "daemon CPU 10.7%" in x for x in g)
    f = rep.figures([*rows, zp])
    assert f["paced default: memory saved"]["value"] == 20.0
    assert f["paced default: memory saved"]["ref"] == 30.0


def test_details_name_what_each_kind_of_run_holds() -> None:
    lines = rep.details([
        {"pace": "paced", "label": "t", "mode": "daemon", "resident": 300 * rep.MiB,
         "evicted": 700 * rep.MiB, "store_disk": 400 * rep.MiB,
         "store_cached": 350 * rep.MiB, "svc_p50": 35.0, "svc_p99": None,
         "probe_faulted": 80.0, "probe_n": 10, "probe_stuck": 1},
        {"pace": "paced", "label": "z", "mode": "plain", "zram_orig": 500 * rep.MiB,
         "zram_pool": 250 * rep.MiB, "swap": 500 * rep.MiB},
        {"pace": "paced", "label": "d", "error": "no DAMON"}])
    assert len(lines) == 2
    assert "resident 300 MiB" in lines[0] and "350 MiB of it cached" in lines[0]
    assert "p50/p99 <= 35/– µs" in lines[0] and "1 stuck" in lines[0]
    assert "500 MiB in a 250 MiB pool (2.00x)" in lines[1] and "no probes" in lines[1]


def test_plot_writes_a_png_when_matplotlib_is_there(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rows = [{"config": "tierd", "label": "t", "pace": "paced", "round": 1, "saved": 19.0,
             "slowdown": 1.0, "worst_slowdown": 26.0}]
    assert rep.plot(rows, tmp_path / "p.png").startswith("plot:")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


# ---- the daemon config -------------------------------------------------------------------
def test_daemon_config_is_the_embedded_default_with_our_changes(tmp_path: Path) -> None:
    from vmm_tierd.service.config import default_settings, load_settings

    aggr = next(c for c in configs.CONFIGS if c.key == "tierd-aggr")
    s = load_settings(configs.daemon_config(aggr, "unpaced", tmp_path, 256))
    d = default_settings()
    assert s.store.path == tmp_path / "store"
    assert s.daemon.metrics_listen == "127.0.0.1:0"
    assert (s.tracking.interval_s, s.tracking.min_age) == (1.0, 1)
    r = s.regions[0]
    assert r.size_bytes == 256 << 20
    assert r.workload == dataclasses.replace(d.regions[0].workload, ops_per_sec=0.0)
    paced = load_settings(configs.daemon_config(configs.CONFIGS[1], "paced", tmp_path,
                                                  1024))
    assert paced.tracking == d.tracking and paced.regions[0].workload == d.regions[0].workload


def test_dump_toml_round_trips() -> None:
    doc = {"a": {"x": 1, "y": "s\"q", "z": True, "w": 0.5},
           "region": [{"name": "g", "workload": {"n": 2}}, {"name": "h"}]}
    assert tomllib.loads(configs.dump_toml(doc)) == doc
