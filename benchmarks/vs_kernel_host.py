"""Host side of benchmarks/vs_kernel.py: memory cgroups (v1 or v2), a zram swap device and
a DAMOS pageout scheme, each change undone by a :class:`Restorer`.

Every change is registered as data (an action such as ``{"op": "rmcgroup", "path": ...}``)
before or right after it is made, and the list is kept in a state file as it changes, so
that a run killed with SIGKILL is undone by the next start (or ``vs_kernel.py --restore``).
All paths hang off ``Host.root`` and every command goes through ``Host.cmd``, so the tests
run this same code on a fake sysfs tree.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vs_kernel_parse import (
    MemSample,
    mem_from_v1,
    mem_from_v2,
    parse_keyed,
    parse_proc_cgroup,
    parse_start_time,
    parse_swaps,
)

Cmd = Callable[[Sequence[str]], None]
NAME_PREFIX = "vmm-vsk-"  # every cgroup this benchmark creates


class Unavailable(Exception):
    """A configuration cannot run on this host (the reason is the message)."""


def run_cmd(argv: Sequence[str]) -> None:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=300)
    if r.returncode:
        raise RuntimeError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()}")


# ---- a memory cgroup -----------------------------------------------------------------
class Cgroup:
    def __init__(self, path: Path, version: int) -> None:
        self.path = path
        self.version = version

    def set_limit(self, nbytes: int) -> None:
        name = "memory.limit_in_bytes" if self.version == 1 else "memory.max"
        (self.path / name).write_text(str(int(nbytes)))

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def pids(self) -> list[int]:
        return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]

    def oom_kills(self) -> int:
        """Processes the kernel's OOM killer ended in this cgroup (its limit held)."""
        f = self.path / ("memory.oom_control" if self.version == 1 else "memory.events")
        try:
            return parse_keyed(f.read_text()).get("oom_kill", 0)
        except OSError:
            return 0

    def sample(self) -> MemSample:
        stat = parse_keyed((self.path / "memory.stat").read_text())
        if self.version == 1:
            return mem_from_v1(stat, int((self.path / "memory.usage_in_bytes").read_text()))
        sw = self.path / "memory.swap.current"
        return mem_from_v2(stat, int((self.path / "memory.current").read_text()),
                           int(sw.read_text()) if sw.exists() else 0)


# ---- the host ------------------------------------------------------------------------
class Host:
    def __init__(self, root: Path = Path("/"), cmd: Cmd = run_cmd,
                 wait_s: float = 30.0) -> None:
        self.root = root
        self.cmd = cmd
        self.wait_s = wait_s

    def p(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    # -- cgroups
    def cgroup_parent(self) -> tuple[Path, int]:
        """Where this benchmark's cgroups go: below our own memory cgroup on v1 (charges
        still add up in the hierarchy above us); on v2 below our own cgroup if it
        delegates the memory controller, else below the root."""
        v1, v2 = parse_proc_cgroup(self.p("/proc/self/cgroup").read_text())
        mem = self.p("/sys/fs/cgroup/memory")
        if v1 is not None and (mem / "memory.stat").exists():
            return mem / v1.lstrip("/"), 1
        for base in (self.p("/sys/fs/cgroup"), self.p("/sys/fs/cgroup/unified")):
            ctl = base / "cgroup.controllers"
            if not ctl.exists() or "memory" not in ctl.read_text().split():
                continue
            own = base / (v2 or "/").lstrip("/")
            sub = own / "cgroup.subtree_control"
            if own != base and sub.exists() and "memory" in sub.read_text().split():
                return own, 2
            if "memory" in (base / "cgroup.subtree_control").read_text().split():
                return base, 2
        raise Unavailable("no memory cgroup controller this process may use "
                          "(/sys/fs/cgroup/memory or a cgroup2 with +memory)")

    def make_cgroup(self, r: Restorer, name: str) -> Cgroup:
        parent, version = self.cgroup_parent()
        path = parent / (NAME_PREFIX + name)
        path.mkdir()
        r.push("rmcgroup", path=str(path))
        return Cgroup(path, version)

    def own_cgroups(self) -> list[str]:
        try:
            parent, _ = self.cgroup_parent()
        except Unavailable:
            return []
        return sorted(d.name for d in parent.iterdir() if d.name.startswith(NAME_PREFIX))

    # -- zram swap
    def zram_swap_on(self, r: Restorer, disksize: int, algorithm: str = "lz4") -> Path:
        """A zram device of our own as swap: hot_add (or an unused zram0), algorithm,
        disksize, mkswap, swapon. Returns its /sys/block directory."""
        ctl = self.p("/sys/class/zram-control/hot_add")
        if ctl.exists():
            n = int(ctl.read_text().strip())
            r.push("zram_remove", id=n)
        else:
            n = 0
            init = self.p("/sys/block/zram0/initstate")
            if not init.exists():
                raise Unavailable("no zram (neither /sys/class/zram-control nor zram0)")
            if init.read_text().strip() != "0":
                raise Unavailable("zram0 is in use and zram-control/hot_add is missing")
        blk = self.p(f"/sys/block/zram{n}")
        r.push("zram_reset", path=str(blk))
        algos = (blk / "comp_algorithm").read_text().replace("[", " ").replace("]", " ")
        if algorithm not in algos.split():
            raise Unavailable(f"zram{n}: no {algorithm} (has: {algos.strip()})")
        (blk / "comp_algorithm").write_text(algorithm)
        (blk / "disksize").write_text(str(disksize))
        dev = f"/dev/zram{n}"
        self.cmd(["mkswap", dev])
        r.push("swapoff", dev=dev)
        self.cmd(["swapon", "-p", "32767", dev])
        return blk

    # -- DAMOS pageout
    def damos_check(self) -> Path:
        """The kdamonds directory if we may set up a kdamond of our own, else Unavailable:
        writing nr_kdamonds rebuilds every kdamond directory (dropping the configuration
        of any that exist) and is EBUSY while one runs, so only nr_kdamonds 0 is ours."""
        adm = self.p("/sys/kernel/mm/damon/admin/kdamonds")
        if not (adm / "nr_kdamonds").exists():
            raise Unavailable("no DAMON sysfs (/sys/kernel/mm/damon/admin)")
        nr = int((adm / "nr_kdamonds").read_text())
        if nr:
            states = [(adm / str(i) / "state").read_text().strip() for i in range(nr)]
            raise Unavailable(f"DAMON is taken: {nr} kdamond(s) already configured "
                              f"(state {', '.join(states)}); nr_kdamonds can only change "
                              f"while none runs, and changing it drops their setup")
        return adm

    def damos_start(self, r: Restorer, pid: int, cgroup: Cgroup, min_age_s: float,
                    aggr_us: int = 100_000) -> int:
        """A kdamond of our own with one pageout scheme for regions not accessed for
        ``min_age_s``: on the runner's address space (vaddr), or on physical memory with a
        filter keeping only the runner's cgroup (paddr). Returns the kdamond's pid.

        Refused when any kdamond exists (see damos_check)."""
        adm = self.damos_check()
        (adm / "nr_kdamonds").write_text("1")
        r.push("write", path=str(adm / "nr_kdamonds"), value="0")
        k = adm / "0"
        (k / "contexts/nr_contexts").write_text("1")
        c = k / "contexts/0"
        avail = (c / "avail_operations").read_text().split()
        ops = "vaddr" if "vaddr" in avail else "paddr" if "paddr" in avail else None
        if ops is None:
            raise Unavailable(f"DAMON has neither vaddr nor paddr operations ({avail})")
        (c / "operations").write_text(ops)
        iv = c / "monitoring_attrs/intervals"
        for f, v in (("sample_us", aggr_us // 20), ("aggr_us", aggr_us),
                     ("update_us", 1_000_000)):
            (iv / f).write_text(str(v))
        (c / "monitoring_attrs/nr_regions/min").write_text("10")
        (c / "monitoring_attrs/nr_regions/max").write_text("1000")
        (c / "targets/nr_targets").write_text("1")
        if ops == "vaddr":
            (c / "targets/0/pid_target").write_text(str(pid))
        (c / "schemes/nr_schemes").write_text("1")
        s = c / "schemes/0"
        (s / "action").write_text("pageout")
        (s / "access_pattern/nr_accesses/min").write_text("0")
        (s / "access_pattern/nr_accesses/max").write_text("0")
        (s / "access_pattern/age/min").write_text(str(max(1, round(min_age_s * 1e6
                                                                       / aggr_us))))
        if ops == "paddr":
            self._memcg_filter(s, cgroup)
        r.push("write", path=str(k / "state"), value="off")
        (k / "state").write_text("on")
        return int((k / "pid").read_text())

    def _memcg_filter(self, scheme: Path, cgroup: Cgroup) -> None:
        # One reject filter for pages *not* in our cgroup (matching=N): with a single
        # reject filter every kernel with memcg filters lets the rest through, whatever
        # its rule for pages that match no filter.
        d = scheme / "ops_filters" if (scheme / "ops_filters").exists() else scheme / "filters"
        (d / "nr_filters").write_text("1")
        f = d / "0"
        rel = self._cgroup_rel(cgroup)
        (f / "type").write_text("memcg")
        (f / "memcg_path").write_text(rel)
        (f / "matching").write_text("N")
        if (f / "allow").exists():
            (f / "allow").write_text("N")

    def _cgroup_rel(self, cgroup: Cgroup) -> str:
        base = self.p("/sys/fs/cgroup/memory" if cgroup.version == 1 else "/sys/fs/cgroup")
        try:
            return "/" + str(cgroup.path.relative_to(base))
        except ValueError:  # cgroup2 mounted at /sys/fs/cgroup/unified (hybrid)
            return "/" + str(cgroup.path.relative_to(self.p("/sys/fs/cgroup/unified")))

    # -- threads of the kernel whose CPU counts for the kernel's side
    def kthreads(self, prefix: str) -> list[int]:
        out = []
        for d in self.p("/proc").iterdir():
            if d.name.isdigit():
                with contextlib.suppress(OSError):
                    if (d / "comm").read_text().startswith(prefix):
                        out.append(int(d.name))
        return sorted(out)

    def start_time(self, pid: int) -> int:
        return parse_start_time(self.p(f"/proc/{pid}/stat").read_text())

    # -- what "restored" is checked against
    def snapshot(self) -> dict[str, Any]:
        def read(p: str) -> str:
            try:
                return self.p(p).read_text().strip()
            except OSError:
                return ""

        zram = sorted(d.name for d in self.p("/sys/block").glob("zram*"))
        adm = "/sys/kernel/mm/damon/admin/kdamonds"
        nr = int(read(adm + "/nr_kdamonds") or 0)
        return {"swaps": parse_swaps(read("/proc/swaps")),
                "zram": {z: read(f"/sys/block/{z}/initstate") for z in zram},
                "cgroups": self.own_cgroups(),
                "damon": [read(f"{adm}/{i}/state") for i in range(nr)]}

    # -- undo one action
    def undo(self, a: dict[str, Any]) -> None:
        op = a["op"]
        if op == "kill":
            self._kill(int(a["pid"]), int(a.get("start_time", 0)))
        elif op == "rmcgroup":  # whatever still runs in it first (say a runner whose
            path = Path(a["path"])  # kill record a signal kept from being written)
            procs = path / "cgroup.procs"
            for pid in (procs.read_text().split() if procs.exists() else []):
                self._kill(int(pid), 0)
            self._retry(lambda: path.rmdir(), FileNotFoundError)
        elif op == "rmtree":
            shutil.rmtree(a["path"], ignore_errors=True)
        elif op == "swapoff":
            if a["dev"] in parse_swaps(self.p("/proc/swaps").read_text()):
                self.cmd(["swapoff", a["dev"]])
        elif op == "zram_reset":
            if Path(a["path"]).exists():
                self._retry(lambda: (Path(a["path"]) / "reset").write_text("1"), None)
        elif op == "zram_remove":
            if self.p(f"/sys/block/zram{a['id']}").exists():
                self._retry(lambda: self.p("/sys/class/zram-control/hot_remove")
                            .write_text(str(a["id"])), None)
        elif op == "write":
            Path(a["path"]).write_text(a["value"])
        else:
            raise ValueError(f"unknown restore action {a!r}")

    def _retry(self, fn: Callable[[], object], done: type[BaseException] | None) -> None:
        """EBUSY while a killed process is still being torn down: retry for wait_s."""
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fn()
                return
            except OSError as e:
                if done is not None and isinstance(e, done):
                    return
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _kill(self, pid: int, start_time: int) -> None:
        try:
            if start_time and self.start_time(pid) != start_time:
                return  # that process is gone and the pid is someone else's now
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, FileNotFoundError):
            return
        deadline = time.monotonic() + self.wait_s
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:  # not our child (a crashed run's): watch /proc
                if not self.p(f"/proc/{pid}").exists():
                    return
            time.sleep(0.05)
        raise TimeoutError(f"pid {pid} still alive {self.wait_s:.0f} s after SIGKILL")


# ---- the undo list -------------------------------------------------------------------
@dataclass
class Restorer:
    host: Host
    state_file: Path | None = None

    def __post_init__(self) -> None:
        self.actions: list[dict[str, Any]] = []
        if self.state_file is not None and self.state_file.exists():
            self.actions = json.loads(self.state_file.read_text() or "[]")

    def push(self, op: str, **args: Any) -> None:
        self.actions.append({"op": op, **args})
        self._save()

    def mark(self) -> int:
        return len(self.actions)

    def restore(self, mark: int = 0) -> list[str]:
        """Undo (newest first) down to ``mark``; every action is tried whatever failed
        before it. Returns the failures."""
        errors = []
        while len(self.actions) > mark:
            a = self.actions[-1]
            try:
                self.host.undo(a)
            except Exception as e:  # keep going: the rest must still be undone
                errors.append(f"{a}: {type(e).__name__}: {e}")
            self.actions.pop()
            self._save()
        return errors

    def _save(self) -> None:
        if self.state_file is None:
            return
        if not self.actions:
            self.state_file.unlink(missing_ok=True)
            return
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.actions))
        tmp.replace(self.state_file)


def snapshot_diff(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    return [f"{k}: {before.get(k)!r} -> {after.get(k)!r}"
            for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]


__all__ = ["NAME_PREFIX", "Cgroup", "Host", "MemSample", "Restorer", "Unavailable",
           "snapshot_diff"]
