"""`vmm-tierd run` end to end: metrics over HTTP, SIGHUP reload, sd_notify, stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from svc_helpers import Daemon, StartDaemon, poll_until, small_config, value

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmm_tierd.cli", *args], capture_output=True,
                          text=True, timeout=60)


def test_check_config_exit_codes(tmp_path: Path) -> None:
    ok = cli("check-config", str(ROOT / "configs" / "vmm-tierd.toml"))
    assert ok.returncode == 0, ok.stderr
    assert ": ok: 1 region(s)" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[tracking]\ninterval = "fast"\nmin_age = 0\n[[region]]\nsize = "1GiB"\n')
    r = cli("check-config", str(bad))
    assert r.returncode == 2
    assert (f'{bad}: tracking.interval: must be a duration between 10ms and 1h '
            f'(e.g. "3s", "250ms" or seconds), got "fast"') in r.stderr.splitlines()
    assert f"{bad}: tracking.min_age: must be an integer between 1 and 250, got 0" in r.stderr
    assert f"{bad}: 2 errors" in r.stderr
    # run refuses the same file the same way, before touching any kernel
    r = cli("run", "--config", str(bad), "--backend", "fake")
    assert r.returncode == 2 and "tracking.interval: must be a duration" in r.stderr


@pytest.mark.parametrize("memtype", ["anon", "memfd"])
def test_run_fake_serves_metrics_and_stops_cleanly(
        memtype: str, tmp_path: Path, start_daemon: StartDaemon) -> None:
    d: Daemon = start_daemon(["--config", str(small_config(tmp_path, memtype=memtype)),
                              "--backend", "fake"])
    url = d.wait_ready()
    assert url.startswith("http://127.0.0.1:")
    line = d.wait_for(r"vm0: ws .* cold .* evicted .* resident .* faults \d+ +store \d+ rec")
    assert line
    m = poll_until(lambda: (lambda s: s if value(s, "vmm_tierd_cycles_total", region="vm0")
                            >= 3 else None)(d.scrape()), 30, "3 cycles")
    assert value(m, "vmm_tierd_region_guest_bytes", region="vm0") == 16 << 20
    assert value(m, "vmm_tierd_region_info", region="vm0", memtype=memtype) == 1
    res = value(m, "vmm_tierd_region_resident_bytes", region="vm0")
    ev = value(m, "vmm_tierd_region_evicted_bytes", region="vm0")
    # resident counts what is really in memory: never-touched (all-zero) pages are not
    assert 0 < res and res + ev <= 16 << 20
    assert 0 <= value(m, "vmm_tierd_region_working_set_bytes", region="vm0") <= 16 << 20
    info = m["vmm_tierd_kernel_info"][0][0]
    assert info["backend"] == "fake-rwp" and info["strategy"] == "rwp"
    assert value(m, "vmm_tierd_tracking_interval_seconds") == 0.2
    assert value(m, "vmm_tierd_store_records") >= 0
    assert "vmm_tierd_fault_service_seconds_bucket" in m
    # the store holds guest memory: 0700 directory, 0600 files
    store = tmp_path / "store"
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    files = [p for p in store.rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files), files
    # one store, one daemon: a second one on the same path refuses to start
    r = cli("run", "--config", str(tmp_path / "vmm-tierd.toml"), "--backend", "fake")
    assert r.returncode == 1 and "store is in use by another process" in r.stderr, r.stderr
    assert d.stop() == 0, d.output
    assert "stopping (SIGTERM)" in d.output and d.lines[-1].endswith("stopped")


def test_sighup_applies_a_new_interval_and_rejects_a_broken_file(
        tmp_path: Path, start_daemon: StartDaemon) -> None:
    cfg = small_config(tmp_path, interval="2s")
    d: Daemon = start_daemon(["--config", str(cfg), "--backend", "fake"])
    d.wait_ready()
    assert value(d.scrape(), "vmm_tierd_tracking_interval_seconds") == 2.0

    # broken file: old settings stay, the error names file and key, the daemon lives on
    good = cfg.read_text()
    cfg.write_text(good.replace('interval = "2s"', 'interval = "fast"'))
    mark = len(d.lines)
    d.send(signal.SIGHUP)
    d.wait_for(r"reload: .*tracking.interval: must be a duration", after=mark)
    d.wait_for(r"reload failed; keeping the running settings", after=mark)
    # scrapes are cached for a second: wait until the failure is counted, then look
    poll_until(lambda: value(d.scrape(), "vmm_tierd_config_reload_failures_total") == 1, 10,
               "the failed reload counted")
    assert value(d.scrape(), "vmm_tierd_tracking_interval_seconds") == 2.0

    # a valid new interval (and a region change, which needs a restart)
    cfg.write_text(good.replace('interval = "2s"', 'interval = "50ms"')
                   .replace('size = "16MiB"', 'size = "32MiB"'))
    mark = len(d.lines)
    d.send(signal.SIGHUP)
    d.wait_for(r"reloaded .*: interval 2s -> 50ms", after=mark)
    d.wait_for(r"reload: region changed: requires restart", after=mark)
    m = poll_until(lambda: (lambda s: s if value(s, "vmm_tierd_config_reloads_total") == 1
                            else None)(d.scrape()), 10, "the reload counted")
    assert value(m, "vmm_tierd_tracking_interval_seconds") == 0.05
    assert value(m, "vmm_tierd_region_guest_bytes", region="vm0") == 16 << 20
    c0 = value(m, "vmm_tierd_cycles_total", region="vm0")
    # at 2s per cycle, 20 more cycles would take 40s; at 50ms they come well within 20s
    poll_until(lambda: value(d.scrape(), "vmm_tierd_cycles_total", region="vm0") >= c0 + 20,
               20, "20 cycles at the new 50ms interval")
    poll_until(lambda: value(d.scrape(), "vmm_tierd_region_interval_seconds", region="vm0")
               == 0.05, 10, "the engine's cycles run with the new interval")
    assert d.stop() == 0, d.output


def test_sd_notify_ready_status_watchdog_reload_stopping(
        tmp_path: Path, start_daemon: StartDaemon) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(0.2)
    msgs: list[str] = []

    def drain() -> list[str]:
        try:
            while True:
                msgs.append(sock.recv(65536).decode())
        except TimeoutError:
            pass
        return msgs

    try:
        cfg = small_config(tmp_path)
        d: Daemon = start_daemon(["--config", str(cfg), "--backend", "fake"],
                                 env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})
        d.wait_ready()
        poll_until(lambda: any(x.startswith("STATUS=working set") for x in drain()), 20,
                   "a STATUS= line per cycle")
        poll_until(lambda: drain().count("WATCHDOG=1") >= 2, 20, "WATCHDOG=1 pings")
        ready_at = next(i for i, x in enumerate(msgs) if x.startswith("READY=1"))
        assert not any(x.startswith("STATUS=working set") for x in msgs[:ready_at]
                       if "READY=1" not in x)
        d.send(signal.SIGHUP)
        poll_until(lambda: any(x.startswith("RELOADING=1") for x in drain()), 20, "RELOADING")
        i = next(i for i, x in enumerate(msgs) if x.startswith("RELOADING=1"))
        poll_until(lambda: any(x.startswith("READY=1") for x in drain()[i + 1:]), 20,
                   "READY=1 after the reload")
        assert d.stop() == 0, d.output
        drain()
        stopping = [x for x in msgs if x.startswith("STOPPING=1")]
        assert len(stopping) == 1 and "EXTEND_TIMEOUT_USEC=" in stopping[0]
    finally:
        sock.close()


def test_real_prometheus_scrapes_the_daemon(tmp_path: Path, start_daemon: StartDaemon) -> None:
    prom = shutil.which("prometheus")
    if prom is None:
        pytest.skip("prometheus missing (scripts/setup --test installs Debian's prometheus)")
    d: Daemon = start_daemon(["--config", str(small_config(tmp_path)), "--backend", "fake"])
    url = d.wait_ready()
    target = url.removeprefix("http://").removesuffix("/metrics")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        prom_port = s.getsockname()[1]
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: vmm-tierd\n    static_configs:\n"
        f"      - targets: ['{target}']\n")
    p = subprocess.Popen([prom, f"--config.file={tmp_path / 'prometheus.yml'}",
                          f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                          f"--web.listen-address=127.0.0.1:{prom_port}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        api = f"http://127.0.0.1:{prom_port}/api/v1/query?query="

        def query(q: str) -> list[dict[str, object]] | None:
            try:
                with urllib.request.urlopen(api + urllib.parse.quote(q), timeout=5) as r:
                    body = json.load(r)
            except OSError:
                return None
            assert body["status"] == "success", body
            result: list[dict[str, object]] = body["data"]["result"]
            return result or None

        res = poll_until(lambda: query('vmm_tierd_region_guest_bytes{region="vm0"}'), 60,
                         "Prometheus has scraped vmm_tierd_region_guest_bytes", 0.5)
        assert float(res[0]["value"][1]) == 16 << 20
        assert res[0]["metric"]["job"] == "vmm-tierd"
        up = poll_until(lambda: query('up{job="vmm-tierd"}'), 30, "up", 0.5)
        assert float(up[0]["value"][1]) == 1
        cyc = poll_until(lambda: query('vmm_tierd_cycles_total{region="vm0"} > 0'), 30,
                         "cycles counted", 0.5)
        assert float(cyc[0]["value"][1]) >= 1
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
    assert d.stop() == 0, d.output


def test_readme_first_command_linux_default(tmp_path: Path, start_daemon: StartDaemon) -> None:
    """`vmm-tierd run` with no config: the 1 GiB default on the real kernel; metrics answer
    on loopback within seconds; Ctrl-C (SIGINT) stops it cleanly."""
    args: list[str] = []
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 9187))
        except OSError:  # the default port is taken here: only then pick another
            args = ["--metrics-listen", "127.0.0.1:0"]
    d: Daemon = start_daemon(args, env={"XDG_STATE_HOME": str(tmp_path)})
    url = d.wait_ready(timeout=60)
    assert url.startswith("http://127.0.0.1:")
    m = d.scrape()
    assert value(m, "vmm_tierd_region_guest_bytes", region="guest0") == 1 << 30
    info = m["vmm_tierd_kernel_info"][0][0]
    assert info["backend"] == "linux" and info["strategy"] in ("wp", "rwp")
    d.wait_for(r"guest0: ws ", timeout=30)
    assert os.path.isdir(tmp_path / "vmm-tierd" / "store")
    assert d.stop(signal.SIGINT) == 0, d.output
    assert "stopping (SIGINT)" in d.output


def test_records_of_a_killed_instance_are_reclaimed_at_the_next_start(
        tmp_path: Path, start_daemon: StartDaemon) -> None:
    cfg = str(small_config(tmp_path, interval="100ms"))
    d: Daemon = start_daemon(["--config", cfg, "--backend", "fake"])
    d.wait_ready()
    poll_until(lambda: (lambda s: value(s, "vmm_tierd_store_records") > 0 and value(
        s, "vmm_tierd_region_evicted_bytes", region="vm0") > 0)(d.scrape()), 30,
        "pages evicted into the store")
    d.kill()  # SIGKILL: no graceful stop, the records stay behind
    d2: Daemon = start_daemon(["--config", cfg, "--backend", "fake"])
    d2.wait_ready()
    n = int(d2.wait_for(r"reclaimed (\d+) store records left by an earlier instance").group(1))
    assert n > 0
    assert value(d2.scrape(), "vmm_tierd_store_reclaimed_records") == n
    # a graceful stop brings every page back and deletes its records: nothing to reclaim
    poll_until(lambda: value(d2.scrape(), "vmm_tierd_store_records") > 0, 30,
               "evictions by the second instance")
    assert d2.stop() == 0, d2.output
    d3: Daemon = start_daemon(["--config", cfg, "--backend", "fake"])
    d3.wait_ready()
    assert value(d3.scrape(), "vmm_tierd_store_reclaimed_records") == 0
    assert "reclaimed" not in d3.output
    assert d3.stop() == 0, d3.output
