"""``vmm-tierd attach --pid`` on an unmodified QEMU (Debian's 7.2, TCG) booting a real
Linux guest with 768 MiB of memfd RAM, on this 6.18 host (the wp strategy: WP_ASYNC
tracking through QEMU's pagemap, PTE zaps injected into QEMU's main thread).

The guest's own verifier (sha256 of every file on its tmpfs) must pass throughout:
after the daemon evicted at least 100 MiB, after a kill -9 of the daemon in the middle of
a verify (the guest waits; a new daemon takes QEMU's uffd back and serves it), after
churn, and after the daemon detached. QEMU stays alive and is left without our uffd.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.attach.daemon import AttachDaemon, write_config
from tests.realvm.guest import QemuGuest, RigUnavailable, VerifyResult
from vmm_tierd.kernel.linux import LinuxKernel

pytestmark = pytest.mark.realvm

RAM_MIB = 768
BOOT_TIMEOUT = 600.0
REPLY_TIMEOUT = 600.0  # a verify that faults most of the fill back in, under TCG
EVICT_AT_LEAST = 100 << 20


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QemuGuest]:
    try:
        g = QemuGuest.start(workdir=tmp_path_factory.mktemp("attach-qemu"), ram_mib=RAM_MIB,
                            fill_fraction=0.65)
    except RigUnavailable as exc:
        pytest.skip(str(exc))
    with g:
        g.wait_ready(BOOT_TIMEOUT)
        yield g


def qemu_uffds(pid: int) -> int:
    k = LinuxKernel()
    p = k.open_process(pid)
    try:
        return sum(1 for f in p.fds() if f.is_uffd)
    finally:
        p.close()
        k.close()


def all_ok(r: VerifyResult) -> None:
    assert r.bad == 0 and r.ok > 0, f"guest verifier: {r.bad} bad files {r.bad_files[:5]}"


def test_attach_a_real_qemu_through_kill9_and_detach(guest: QemuGuest, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    cfg = write_config(tmp_path, interval="1s")
    args = ["--pid", str(guest.pid), "--name", "qemu", "--config", str(cfg), "--store",
            str(tmp_path / "store")]
    vm = {"vm": "qemu"}
    d = AttachDaemon(args)
    try:
        d.wait_ready()
        assert qemu_uffds(guest.pid) == 1
        ev1 = d.wait_metric("vmm_tierd_region_evicted_bytes", EVICT_AT_LEAST, 300, **vm)
        all_ok(guest.verify(REPLY_TIMEOUT))  # reads every file: faults it all back
        faults1 = d.total("vmm_tierd_faults_total", **vm)
        assert d.total("vmm_tierd_faults_total", kind="store", **vm) > 0
        d.wait_metric("vmm_tierd_region_evicted_bytes", EVICT_AT_LEAST, 300, **vm)
        lat = d.scrape()  # for the figures below
        # kill -9 while the guest verifies: its reads of evicted pages wait for a daemon
        result: list[VerifyResult | BaseException] = []

        def verify() -> None:
            try:
                result.append(guest.verify(REPLY_TIMEOUT))
            except BaseException as e:  # reported by the assert below
                result.append(e)
        t = threading.Thread(target=verify)
        t.start()
        d.kill9()
        assert qemu_uffds(guest.pid) == 1  # QEMU still holds it: its guest stalls
        d2 = AttachDaemon(args)
        try:
            d2.wait_ready()
            assert "took over" in d2.output, d2.output
            t.join(REPLY_TIMEOUT + 30)
            assert result and isinstance(result[0], VerifyResult), result
            all_ok(result[0])
            guest.churn(20, REPLY_TIMEOUT)
            d2.wait_metric("vmm_tierd_region_evicted_bytes", EVICT_AT_LEAST, 300, **vm)
            all_ok(guest.verify(REPLY_TIMEOUT))
            pauses = d2.total("vmm_tierd_vm_inject_pause_max_seconds", **vm)
            stops = d2.total("vmm_tierd_vm_inject_stops_total", **vm)
            assert d2.stop(timeout=300) == 0, d2.output[-4000:]
        finally:
            d2.kill()
        assert guest.alive()
        assert qemu_uffds(guest.pid) == 0  # detached: QEMU as it was found
        all_ok(guest.verify(REPLY_TIMEOUT))
        with capsys.disabled():
            print(f"\nreal QEMU attach: evicted {ev1 / 2**20:.0f} MiB before the first "
                  f"verify, {faults1:.0f} faults served by then; injected stops "
                  f"{stops:.0f}, longest {pauses * 1e3:.2f} ms; "
                  f"{_latency(lat)}")
    finally:
        d.kill()


def _latency(m: dict[str, list[tuple[dict[str, str], float]]]) -> str:
    """p50/p99 of the daemon's fault service histogram (store faults)."""
    rows = [(float(lab["le"]), v) for lab, v in m.get("vmm_tierd_fault_service_seconds_bucket",
                                                       [])
            if lab.get("kind") == "store"]
    if not rows:
        return "no store faults in the histogram"
    acc: dict[float, float] = {}
    for le, v in rows:
        acc[le] = acc.get(le, 0.0) + v
    les = sorted(acc)
    total = acc[les[-1]]
    out = []
    for q in (0.5, 0.99):
        le = next(x for x in les if acc[x] >= q * total)
        out.append(f"p{int(q * 100)} <= {le * 1e6:.0f} us")
    return "fault service " + ", ".join(out) + f" ({total:.0f} store faults)"
