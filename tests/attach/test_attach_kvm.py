"""Attach with KVM as the accessor, as in a production VM: minivmm (a KVM VMM of the
project's own, memfd RAM, a vCPU thread "CPU 0/KVM") is tiered by ``vmm-tierd attach``
(uffd injected into its main thread) and, in handoff mode, over the handoff socket with
Firecracker's message. On this host that is the wp strategy; the ``guest`` variants run
inside the Linux 7.3 guest (nested SVM under TCG), where it is rwp."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.minivmm.driver import MiniVmm, build, kvm_unavailable

from ..engine.conftest import linux_ok
from .daemon import AttachDaemon, write_config

_why = kvm_unavailable()
needs_kvm = pytest.mark.skipif(_why is not None or not linux_ok(),
                               reason=f"no usable KVM or userfaultfd: {_why}")
IN_GUEST = os.environ.get("VMM_TIERD_GUEST") == "1"
MODES = [pytest.param("attach", marks=[needs_kvm, pytest.mark.guest]),
         pytest.param("handoff", marks=[needs_kvm, pytest.mark.guest])]
RAM_MIB = 32 if IN_GUEST else 64  # Python under TCG is slow: less to verify
FILL = 14  # 64-byte stamps: this host's KVM emulates the payload (0.5 us/instruction)
TIMEOUT = 900.0 if IN_GUEST else 300.0


@pytest.fixture(scope="module")
def binary() -> Path:
    return build()


@pytest.fixture
def cleanup() -> Iterator[list[object]]:
    things: list[object] = []
    yield things
    for t in reversed(things):
        t.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("mode", MODES)
def test_kvm_guest_memory_tiered_and_given_back(mode: str, binary: Path, tmp_path: Path,
                                                cleanup: list[object]) -> None:
    sock = tmp_path / "handoff.sock"
    cfg = write_config(tmp_path, interval="500ms")
    if mode == "handoff":
        text = cfg.read_text().replace("[daemon]\n", f'[daemon]\nhandoff_socket = "{sock}"\n')
        cfg.write_text(text)
        d = AttachDaemon(["--config", str(cfg), "--store", str(tmp_path / "store")])
        cleanup.append(_Killer(d))
        d.wait_ready(TIMEOUT)
        vmm = MiniVmm.start(RAM_MIB, fill_dwords=FILL, handoff=sock, binary=binary,
                            timeout=TIMEOUT)
        cleanup.append(vmm)
        name = f"handoff-{vmm.pid}"
    else:
        vmm = MiniVmm.start(RAM_MIB, fill_dwords=FILL, binary=binary, timeout=TIMEOUT)
        cleanup.append(vmm)
        name = "kvm"
        d = AttachDaemon(["--pid", str(vmm.pid), "--name", name, "--config", str(cfg),
                          "--store", str(tmp_path / "store")])
        cleanup.append(_Killer(d))
        d.wait_ready(TIMEOUT)
    pages = len(vmm.data_pages)
    vmm.write(1)  # KVM writes every data page (first touch: MISSING faults, ours)
    d.wait_metric("vmm_tierd_region_evicted_bytes", pages * 4096 // 2, TIMEOUT, vm=name)
    got, bad = vmm.verify(1)  # KVM reads every page: evicted ones come back
    assert (got, bad) == (pages, 0)
    d.wait_metric("vmm_tierd_faults_total", 1, TIMEOUT, vm=name, kind="store")
    first = vmm.data_pages.start
    vmm.write(2, first, pages // 4)  # KVM writes into evicted pages
    d.wait_metric("vmm_tierd_region_evicted_bytes", pages * 4096 // 4, TIMEOUT, vm=name)
    assert d.stop(timeout=TIMEOUT) == 0, d.output[-4000:]  # detach: every page back
    assert vmm.verify(2, first, pages // 4) == (pages // 4, 0)
    assert vmm.verify(1, first + pages // 4, pages - pages // 4) == (pages - pages // 4, 0)
    assert vmm.alive()


class _Killer:
    def __init__(self, d: AttachDaemon) -> None:
        self.d = d

    def close(self) -> None:
        self.d.kill()
