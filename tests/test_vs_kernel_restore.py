"""The restore logic of benchmarks/vs_kernel.py on a fake sysfs tree: the real code
(vs_kernel_host.Host, Restorer) with its paths under tmp_path and its commands recorded;
the kill action on real processes. No timing."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from vs_kernel_host import Cgroup, Host, Restorer, Unavailable, snapshot_diff  # noqa: E402

V1_STAT = "cache 4096000\nrss 367001600\ntotal_cache 4096000\ntotal_rss 367001600\n"
V2_STAT = "anon 1000\nfile 200\nfile_mapped 50\npgmajfault 3\n"


# ---- the restore logic on a fake tree ------------------------------------------------------
class Recorder:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> None:
        self.calls.append(list(argv))


def fake_v1(root: Path) -> Path:
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text("4:memory:/jobs/me\n0::/\n")
    (root / "proc/swaps").write_text("Filename Type Size Used Priority\n")
    mem = root / "sys/fs/cgroup/memory"
    (mem / "jobs/me").mkdir(parents=True)
    (mem / "memory.stat").write_text(V1_STAT)
    (root / "sys/block").mkdir(parents=True)
    return mem / "jobs/me"


def test_cgroup_is_created_below_our_own_v1_cgroup_and_removed(tmp_path: Path) -> None:
    own = fake_v1(tmp_path)
    host = Host(tmp_path, Recorder(), wait_s=1)
    r = Restorer(host, tmp_path / "state.json")
    cg = host.make_cgroup(r, "1")
    assert cg.path == own / "vmm-vsk-1" and cg.path.is_dir() and cg.version == 1
    assert host.own_cgroups() == ["vmm-vsk-1"]
    # a crash now: the next start finds the state file and undoes it
    again = Restorer(host, tmp_path / "state.json")
    assert [a["op"] for a in again.actions] == ["rmcgroup"]
    assert again.restore() == []
    assert not cg.path.exists() and not (tmp_path / "state.json").exists()
    assert again.restore() == []  # nothing left: idempotent


def test_cgroup_limit_and_sample_v1_and_v2(tmp_path: Path) -> None:
    v1 = Cgroup(tmp_path, 1)
    (tmp_path / "memory.stat").write_text(V1_STAT)
    (tmp_path / "memory.usage_in_bytes").write_text("400000000\n")
    v1.set_limit(123 << 20)
    assert (tmp_path / "memory.limit_in_bytes").read_text() == str(123 << 20)
    assert v1.sample().anon == 367001600
    d2 = tmp_path / "v2"
    d2.mkdir()
    (d2 / "memory.stat").write_text(V2_STAT)
    (d2 / "memory.current").write_text("1500\n")
    v2 = Cgroup(d2, 2)
    v2.set_limit(4096)
    assert (d2 / "memory.max").read_text() == "4096"
    assert v2.sample().swap == 0 and v2.sample().usage == 1500
    assert v1.oom_kills() == 0 and v2.oom_kills() == 0  # no file: none
    (tmp_path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\n"
                                                 "oom_kill 2\n")
    (d2 / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\n")
    assert v1.oom_kills() == 2 and v2.oom_kills() == 1


def test_cgroup_parent_on_pure_v2(tmp_path: Path) -> None:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text("0::/svc/me\n")
    base = tmp_path / "sys/fs/cgroup"
    (base / "svc/me").mkdir(parents=True)
    (base / "cgroup.controllers").write_text("cpu io memory pids\n")
    (base / "cgroup.subtree_control").write_text("memory pids\n")
    (base / "svc/me/cgroup.subtree_control").write_text("\n")
    host = Host(tmp_path)
    assert host.cgroup_parent() == (base, 2)  # ours delegates no memory: below the root
    (base / "svc/me/cgroup.subtree_control").write_text("memory\n")
    assert host.cgroup_parent() == (base / "svc/me", 2)
    (base / "cgroup.controllers").write_text("cpu\n")
    with pytest.raises(Unavailable, match="no memory cgroup"):
        host.cgroup_parent()


def fake_zram(root: Path, n: int, algos: str = "lzo-rle lzo [lz4]") -> Path:
    ctl = root / "sys/class/zram-control"
    ctl.mkdir(parents=True)
    (ctl / "hot_add").write_text(f"{n}\n")
    (ctl / "hot_remove").write_text("")
    blk = root / f"sys/block/zram{n}"
    blk.mkdir(parents=True)
    (blk / "comp_algorithm").write_text(algos + "\n")
    return blk


def test_zram_swap_on_and_its_restore(tmp_path: Path) -> None:
    fake_v1(tmp_path)
    blk = fake_zram(tmp_path, 3)
    cmd = Recorder()
    host = Host(tmp_path, cmd, wait_s=1)
    r = Restorer(host, tmp_path / "state.json")
    before = host.snapshot()
    assert host.zram_swap_on(r, 2 << 30) == blk
    assert (blk / "comp_algorithm").read_text() == "lz4"
    assert (blk / "disksize").read_text() == str(2 << 30)
    assert cmd.calls == [["mkswap", "/dev/zram3"], ["swapon", "-p", "32767", "/dev/zram3"]]
    (tmp_path / "proc/swaps").write_text("Filename Type Size Used Priority\n"
                                         "/dev/zram3 partition 2097148 0 32767\n")
    assert snapshot_diff(before, host.snapshot())  # swap on: the machine is changed
    assert [a["op"] for a in json.loads((tmp_path / "state.json").read_text())] == [
        "zram_remove", "zram_reset", "swapoff"]
    assert r.restore() == []
    assert cmd.calls[-1] == ["swapoff", "/dev/zram3"]
    assert (blk / "reset").read_text() == "1"
    assert (tmp_path / "sys/class/zram-control/hot_remove").read_text() == "3"


def test_zram_without_the_algorithm_is_unavailable_and_still_undone(tmp_path: Path) -> None:
    fake_v1(tmp_path)
    blk = fake_zram(tmp_path, 1, algos="[lzo-rle] lzo")
    cmd = Recorder()
    host = Host(tmp_path, cmd, wait_s=1)
    r = Restorer(host)
    with pytest.raises(Unavailable, match="no lz4"):
        host.zram_swap_on(r, 1 << 30)
    assert cmd.calls == []  # no mkswap, no swapon
    assert r.restore() == []
    assert (blk / "reset").read_text() == "1"
    assert cmd.calls == []  # swapoff only for a device that is in /proc/swaps


def fake_damon(root: Path, nr: int, avail: str = "paddr") -> Path:
    adm = root / "sys/kernel/mm/damon/admin/kdamonds"
    k = adm / "0"
    c = k / "contexts/0"
    s = c / "schemes/0"
    for d in (c / "monitoring_attrs/intervals", c / "monitoring_attrs/nr_regions",
              c / "targets/0", s / "access_pattern/nr_accesses", s / "access_pattern/age",
              s / "ops_filters/0"):
        d.mkdir(parents=True)
    (adm / "nr_kdamonds").write_text(f"{nr}\n")
    (k / "state").write_text("on\n" if nr else "off\n")
    (k / "pid").write_text("4321\n")
    (c / "avail_operations").write_text(avail + "\n")
    (s / "ops_filters/0/allow").write_text("N\n")
    return adm


def test_damos_refuses_a_damon_that_someone_else_uses(tmp_path: Path) -> None:
    fake_v1(tmp_path)
    adm = fake_damon(tmp_path, nr=1)
    host = Host(tmp_path, Recorder())
    r = Restorer(host)
    with pytest.raises(Unavailable, match="DAMON is taken: 1 kdamond"):
        host.damos_start(r, 99, Cgroup(tmp_path, 1), 6.0)
    assert (adm / "nr_kdamonds").read_text() == "1\n" and r.actions == []
    (adm / "nr_kdamonds").unlink()
    with pytest.raises(Unavailable, match="no DAMON sysfs"):
        host.damos_start(r, 99, Cgroup(tmp_path, 1), 6.0)


def test_damos_paddr_scheme_and_its_restore(tmp_path: Path) -> None:
    own = fake_v1(tmp_path)
    adm = fake_damon(tmp_path, nr=0)
    host = Host(tmp_path, Recorder())
    r = Restorer(host)
    cg = Cgroup(own / "vmm-vsk-7", 1)
    assert host.damos_start(r, 99, cg, 6.0, aggr_us=100_000) == 4321
    c = adm / "0/contexts/0"
    s = c / "schemes/0"
    assert (c / "operations").read_text() == "paddr"
    assert (s / "action").read_text() == "pageout"
    assert (s / "access_pattern/age/min").read_text() == "60"  # 6 s of 100 ms intervals
    f = s / "ops_filters/0"
    assert (f / "type").read_text() == "memcg"
    assert (f / "memcg_path").read_text() == "/jobs/me/vmm-vsk-7"
    assert (f / "matching").read_text() == "N" and (f / "allow").read_text() == "N"
    assert not (c / "targets/0/pid_target").exists()
    assert (adm / "0/state").read_text() == "on"
    assert r.restore() == []
    assert (adm / "0/state").read_text() == "off" and (adm / "nr_kdamonds").read_text() == "0"


def test_damos_vaddr_targets_the_runner(tmp_path: Path) -> None:
    fake_v1(tmp_path)
    adm = fake_damon(tmp_path, nr=0, avail="vaddr fvaddr paddr")
    host = Host(tmp_path, Recorder())
    host.damos_start(Restorer(host), 99, Cgroup(tmp_path, 1), 3.0)
    c = adm / "0/contexts/0"
    assert (c / "operations").read_text() == "vaddr"
    assert (c / "targets/0/pid_target").read_text() == "99"
    assert not (c / "schemes/0/ops_filters/0/type").exists()


def test_kill_action_kills_our_child_but_not_a_reused_pid() -> None:
    host = Host(Path("/"), Recorder(), wait_s=10)
    p = subprocess.Popen(["sleep", "60"])
    q = subprocess.Popen(["sleep", "60"])
    try:
        r = Restorer(host)
        r.push("kill", pid=p.pid, start_time=host.start_time(p.pid))
        r.push("kill", pid=q.pid, start_time=host.start_time(q.pid) + 1)  # someone else's
        assert r.restore() == []
        assert p.poll() is not None  # reaped by the restore
        assert q.poll() is None
    finally:
        q.kill()
        q.wait()
        p.kill()
        p.wait()


def test_restore_tries_every_action_and_reports_the_failures(tmp_path: Path) -> None:
    host = Host(tmp_path, Recorder(), wait_s=0.2)
    r = Restorer(host)
    (tmp_path / "d").mkdir()
    (tmp_path / "out").write_text("1")
    r.push("rmtree", path=str(tmp_path / "d"))
    r.push("write", path=str(tmp_path / "out"), value="0")
    r.push("bogus")
    r.push("rmcgroup", path=str(tmp_path / "gone"))  # already gone: fine
    errs = r.restore()
    assert len(errs) == 1 and "unknown restore action" in errs[0]
    assert not (tmp_path / "d").exists() and (tmp_path / "out").read_text() == "0"
    assert r.actions == []


def test_restore_down_to_a_mark_keeps_the_earlier_actions(tmp_path: Path) -> None:
    host = Host(tmp_path, Recorder())
    r = Restorer(host)
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    r.push("rmtree", path=str(tmp_path / "a"))
    m = r.mark()
    r.push("rmtree", path=str(tmp_path / "b"))
    r.push("rmtree", path=str(tmp_path / "c"))
    assert r.restore(m) == []
    assert (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert [a["path"] for a in r.actions] == [str(tmp_path / "a")]
