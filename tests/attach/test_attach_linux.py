"""``vmm-tierd attach --pid`` on the real kernel, against the test target (a stand-in VMM
process with memfd RAM and vCPU-named threads): tiering, reads served from the store,
kill -9 and takeover by a new daemon, detach leaving the target as it was found."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.remote.target import Target, pattern
from vmm_tierd.kernel.api import AccessKind, AccessStatus
from vmm_tierd.kernel.linux import LinuxKernel

from ..engine.conftest import linux_ok
from .daemon import AttachDaemon, write_config

pytestmark = pytest.mark.skipif(not linux_ok(), reason="no userfaultfd here")
RAM = 32 << 20
PAGES = RAM // 4096


@pytest.fixture
def target() -> Iterator[Target]:
    t = Target.start(RAM)
    try:
        yield t
    finally:
        t.close()


def uffds(pid: int) -> list[int]:
    k = LinuxKernel()
    p = k.open_process(pid)
    try:
        return [f.fd for f in p.fds() if f.is_uffd]
    finally:
        p.close()
        k.close()


def check_pages(t: Target, pages: range, written: dict[int, bytes]) -> None:
    for pg in pages:
        r = t.start_access(t.ram_addr + pg * 4096, AccessKind.READ, 4096).wait(30)
        assert r.status is AccessStatus.OK, (pg, r)
        assert r.data == written.get(pg, pattern(pg)), f"page {pg} has the wrong content"


def test_attach_kill9_takeover_detach(target: Target, tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    store = tmp_path / "store"
    args = ["--pid", str(target.pid), "--name", "t1", "--config", str(cfg), "--store",
            str(store)]
    d = AttachDaemon(args)
    try:
        d.wait_ready()
        assert len(uffds(target.pid)) == 1  # injected, and the target keeps its reference
        d.wait_metric("vmm_tierd_region_evicted_bytes", RAM // 2, vm="t1")
        written: dict[int, bytes] = {}
        for pg in range(0, 64):  # writes into evicted pages fault and are served first
            data = bytes([pg % 251 + 1]) * 4096
            r = target.start_access(target.ram_addr + pg * 4096, AccessKind.WRITE, 4096,
                                    data).wait(30)
            assert r.status is AccessStatus.OK, r
            written[pg] = data
        check_pages(target, range(0, PAGES, 37), written)
        d.wait_metric("vmm_tierd_faults_total", 1, vm="t1", kind="store")  # (scrapes cache 1 s)
        d.wait_metric("vmm_tierd_region_evicted_bytes", RAM // 2, vm="t1")
        d.kill9()
        # The daemon is gone: the target still holds its uffd; an access to an evicted
        # page now waits (it is served once a daemon takes over).
        assert len(uffds(target.pid)) == 1
        waiting = target.start_access(target.ram_addr + 1000 * 4096, AccessKind.READ, 4096)
        # not zeros now, the right data later (below): a read that returned early fails
        # here, a late one fails the content check
        assert waiting.wait(0.5).status is AccessStatus.PENDING
        d2 = AttachDaemon(args)
        try:
            d2.wait_ready()
            assert "took over" in d2.output
            r = waiting.wait(30)
            assert r.status is AccessStatus.OK and r.data == pattern(1000)
            check_pages(target, range(0, PAGES, 13), written)
            assert d2.stop() == 0, d2.output
        finally:
            d2.kill()
        assert uffds(target.pid) == []  # detached: the target as it was found
        check_pages(target, range(0, PAGES, 7), written)
        target.ping()  # its main thread answers: the injections restored it
    finally:
        d.kill()


def test_attach_refuses_private_ram_with_a_fix(tmp_path: Path) -> None:
    """A process without a shared memfd: a clear refusal saying how to configure QEMU."""
    import subprocess
    import sys

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        d = AttachDaemon(["--pid", str(sleeper.pid), "--store", str(tmp_path / "s")])
        rc = d.proc.wait(60)
        assert rc == 1, d.output
        assert "memory-backend-memfd" in d.output and "share=on" in d.output, d.output
    finally:
        sleeper.kill()
        sleeper.wait()
