"""Fault injection against a running daemon: SIGHUP bursts (also before ready and during
the stop), broken and hostile reloads, HTTP floods. After each, the daemon is alive (or
exited 0 after the stop) and `run --verify` read back every page the built-in workload
wrote, evicted ones included, with nothing lost or corrupt."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import urllib.error
from collections.abc import Callable
from pathlib import Path

import pytest
from svc_floods import SlowLoris, parallel_scrapes, threads_of
from svc_helpers import Daemon, Samples, StartDaemon, poll_until, small_config, value

LINUX = pytest.param("linux", marks=pytest.mark.skipif(
    not os.path.exists("/dev/userfaultfd") or os.geteuid() != 0,
    reason="the linux backend needs /dev/userfaultfd as root"))
VERIFIED = re.compile(r"verify vm0: (\d+) pages: lost_writes 0, corrupt 0, poisoned 0: ok")


def start(start_daemon: StartDaemon, tmp_path: Path, backend: str, **cfg: str) -> Daemon:
    d: Daemon = start_daemon(["--config", str(small_config(tmp_path, interval="100ms",
                                                            **cfg)),
                              "--backend", backend, "--verify"])
    d.wait_ready()
    poll_until(lambda: value(d.scrape(), "vmm_tierd_evictions_total", region="vm0") > 0, 60,
               "pages evicted (so the verification covers pages that came back)")
    return d


def scrape_or_none(d: Daemon) -> Samples | None:
    try:
        return d.scrape()
    except urllib.error.HTTPError as e:
        if e.code == 503:
            return None
        raise


def cycles(d: Daemon) -> float:
    return value(d.scrape(), "vmm_tierd_cycles_total", region="vm0")


def still_cycling(d: Daemon) -> None:
    c0 = cycles(d)
    poll_until(lambda: cycles(d) > c0 + 2, 60, "the tracking cycles go on")


def stop_verified(d: Daemon) -> None:
    assert d.proc.poll() is None, d.output
    rc = d.stop()
    assert rc == 0, d.output
    m = VERIFIED.search(d.output)
    assert m and int(m.group(1)) == 16 << 20 >> 12, d.output


def sighups(d: Daemon, n: int, seconds: float) -> float:
    """n SIGHUPs spread over `seconds`; returns how long the burst really took."""
    t0 = time.monotonic()
    for i in range(n):
        d.send(signal.SIGHUP)
        time.sleep(max(0.0, t0 + seconds * (i + 1) / n - time.monotonic()))
    return time.monotonic() - t0


@pytest.mark.parametrize("backend", ["fake", LINUX])
def test_a_sighup_burst_is_coalesced_and_the_guest_verifies(
        backend: str, tmp_path: Path, start_daemon: StartDaemon) -> None:
    d = start(start_daemon, tmp_path, backend)
    took = sighups(d, 100, 1.0)
    poll_until(lambda: value(d.scrape(), "vmm_tierd_config_reloads_total") >= 1, 30,
               "a reload applied")
    still_cycling(d)
    stop_verified(d)
    reloads = len(re.findall(r"reloaded .*: interval", d.output))
    # at most one reload per MIN_RELOAD_SPACING_S (0.2 s) of the burst, plus the last
    assert 1 <= reloads <= took / 0.2 + 2, (reloads, took)
    assert "reload failed" not in d.output


def test_sighups_during_the_stop_are_ignored(tmp_path: Path, start_daemon: StartDaemon) -> None:
    d = start(start_daemon, tmp_path, "fake")
    mark = len(d.lines)
    d.send(signal.SIGTERM)
    d.wait_for(r"stopping \(SIGTERM\)", after=mark)
    sighups(d, 100, 1.0)  # some may land after the exit: the process is gone by then
    rc = d.proc.wait(60)
    d.stop()
    assert rc == 0, d.output
    assert VERIFIED.search(d.output), d.output
    ignored = [ln for ln in d.lines if "SIGHUP while stopping: ignored" in ln]
    assert 1 <= len(ignored) <= 4, ignored  # 3 lines, then one "suppressed" summary
    assert "reloaded" not in d.output


def _catches_sighup(pid: int) -> bool:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    return False


def test_a_sighup_during_start_up_is_applied_once_ready(tmp_path: Path,
                                                        start_daemon: StartDaemon) -> None:
    d: Daemon = start_daemon(["--config", str(small_config(tmp_path)), "--backend", "fake"])
    poll_until(lambda: _catches_sighup(d.proc.pid), 30, "the SIGHUP handler is installed")
    assert not any("ready:" in ln for ln in d.lines)
    d.send(signal.SIGHUP)
    d.wait_ready()
    d.wait_for(r"SIGHUP during start-up: reloading now that the daemon is ready")
    d.wait_for(r"reloaded .*: interval 200ms -> 200ms")
    assert d.stop() == 0, d.output


def _hostile(tmp_path: Path) -> list[tuple[str, Callable[[Path], None], str]]:
    def nested(p: Path) -> None:
        depth = 16_000
        p.write_text("a = " + "{b=" * depth + "1" + "}" * depth + "\n")  # 80 kB

    def fifo(p: Path) -> None:
        os.mkfifo(p)

    def regions(p: Path) -> None:
        p.write_text("".join(f'[[region]]\nname = "g{i}"\nsize = "4KiB"\n'
                             for i in range(100_000)))

    def many(p: Path) -> None:
        p.write_text("[[region]]\nsize = 1\n" * 20_000)

    def binary(p: Path) -> None:
        p.write_bytes(bytes(range(256)) * 64)

    def symlink(p: Path) -> None:
        p.symlink_to("/dev/zero")

    def directory(p: Path) -> None:
        p.mkdir()

    def no_region(p: Path) -> None:
        p.write_text('[tracking]\ninterval = "1s"\n')

    return [("nested inline tables", nested, "nested more than 16 levels"),
            ("FIFO", fifo, "it is a FIFO, not a regular file"),
            ("100,000 regions", regions, "is larger than a config may be"),
            ("20,000 regions", many, "must have between 1 and 64 entries, got 20000"),
            ("binary", binary, "not UTF-8 text"),
            ("symlink to /dev/zero", symlink, "it is a symbolic link"),
            ("directory", directory, "it is a directory"),
            ("missing", lambda p: None, "No such file or directory"),
            ("no guest memory", no_region, "no guest memory to tier")]


@pytest.mark.parametrize("backend", ["fake", LINUX])
def test_broken_reloads_keep_the_running_settings(backend: str, tmp_path: Path,
                                                  start_daemon: StartDaemon) -> None:
    d = start(start_daemon, tmp_path, backend)
    cfg = tmp_path / "vmm-tierd.toml"
    good = cfg.read_text()
    failures = 0
    cfg.unlink()
    for what, make, reason in _hostile(tmp_path):
        make(cfg)
        mark = len(d.lines)
        d.send(signal.SIGHUP)
        d.wait_for(re.escape(reason), after=mark)
        d.wait_for(r"reload failed; keeping the running settings", after=mark)
        failures += 1
        poll_until(lambda n=failures: value(d.scrape(), "vmm_tierd_config_reload_failures_total")
                   == n, 10, f"the failed reload ({what}) counted")
        assert d.proc.poll() is None, (what, d.output)
        if cfg.is_dir():
            cfg.rmdir()
        elif cfg.exists() or cfg.is_symlink():
            cfg.unlink()
    assert value(d.scrape(), "vmm_tierd_tracking_interval_seconds") == 0.1
    still_cycling(d)
    cfg.write_text(good.replace('interval = "100ms"', 'interval = "50ms"'))
    mark = len(d.lines)
    d.send(signal.SIGHUP)
    d.wait_for(r"reloaded .*: interval 100ms -> 50ms", after=mark)
    stop_verified(d)
    assert "Traceback" not in d.output


@pytest.mark.parametrize("backend", ["fake", LINUX])
def test_http_floods_leave_the_daemon_serving(backend: str, tmp_path: Path,
                                              start_daemon: StartDaemon) -> None:
    d = start(start_daemon, tmp_path, backend)
    pid = d.proc.pid
    base = threads_of(pid)
    peak = [base]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], threads_of(pid))
            done.wait(0.05)

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    try:
        with SlowLoris(d.url, n=300, seconds=6.0) as loris:
            poll_until(lambda: loris.opened + loris.closed >= 300, 20, "300 slow connections")
            # a normal scrape while they hold their connections: 503 while all of them
            # are younger than the idle grace (1 s), then served in place of the oldest
            m = poll_until(lambda: scrape_or_none(d), 10, "a scrape served during the loris")
            assert loris.holding(), "the slow connections were gone before the scrape"
            assert value(m, "vmm_tierd_region_guest_bytes", region="vm0") == 16 << 20
        flood = parallel_scrapes(d.url, n=1000, timeout_s=60)
        still_cycling(d)
        m = d.scrape()
    finally:
        done.set()
        w.join(5)
    assert flood["unfinished"] == 0 and flood["200"] > 0, flood
    assert flood["200"] + flood["503"] + flood["reset"] + flood["refused"] == 1000, flood
    # one server thread: the floods add none (the trio thread cache may add a couple)
    assert peak[0] <= base + 4, (base, peak[0])
    dropped = sum(v for lab, v in m["vmm_tierd_metrics_http_dropped_connections_total"])
    assert dropped >= flood["503"], (dropped, flood)
    stop_verified(d)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs for the store")
@pytest.mark.parametrize("backend", ["fake", LINUX])
def test_a_full_disk_pauses_eviction_and_the_guest_verifies(
        backend: str, tmp_path: Path, start_daemon: StartDaemon) -> None:
    """The store's filesystem fills up while the daemon runs: eviction pauses with one
    rate-limited line naming the path and ENOSPC, faults go on being served, the errno
    is counted, and the stop is graceful with every page verified."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mnt)],
                   check=True)
    try:
        cfg = small_config(tmp_path, interval="100ms")
        cfg.write_text(cfg.read_text().replace(f'path = "{tmp_path / "store"}"',
                                               f'path = "{mnt / "store"}"'))
        d: Daemon = start_daemon(["--config", str(cfg), "--backend", backend, "--verify"])
        d.wait_ready()
        d.wait_for(r"ENOSPC.*eviction paused|eviction paused.*ENOSPC", timeout=90)
        poll_until(lambda: value(d.scrape(), "vmm_tierd_store_errors_total",
                                 errno="ENOSPC") >= 1, 30, "ENOSPC counted")
        still_cycling(d)
        stop_verified(d)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
