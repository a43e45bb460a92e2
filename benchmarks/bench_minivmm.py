"""KVM as the accessor: minivmm's guest writing and verifying its RAM, and the MISSING
faults its accesses raise, served over a handed-off uffd from this process (Python,
tests/minivmm/serve.py) and from a C reference server (minivmm_server.c) (see run.py).

Rates are the guest's own: pages / the wall time of one guest command (the VMM times each
from handing it to the vCPU to the vCPU reporting it done), faults included.

    .venv/bin/python benchmarks/bench_minivmm.py [--quick]

On these hosts KVM is nested (kvm_pvm) and emulates the payload; inside the Linux 7.3 guest
(``python -m tests.kernel_vm --prelude '.venv/bin/python benchmarks/bench_minivmm.py'``)
it is nested SVM under TCG.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script
    sys.path[:0] = [str(HERE), str(HERE.parent)]

from tests.minivmm.driver import FULL_FILL, MiniVmm, build, kvm_unavailable  # noqa: E402
from tests.minivmm.handoff import listen, receive  # noqa: E402
from tests.minivmm.serve import FaultServer  # noqa: E402
from vmm_tierd.kernel import uapi  # noqa: E402
from vmm_tierd.kernel.linux import LinuxKernel  # noqa: E402

STAMP = 14  # fill dwords of the short stamp: 64 bytes per page


def rate(pages: int, ns: int) -> float:
    return pages / (ns / 1e9) if ns > 0 else 0.0


def guest_rates(binary: Path, ram_mib: int, full_pages: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with MiniVmm.start(ram_mib, fill_dwords=STAMP, binary=binary) as vmm:
        first = vmm.write(1)                  # first touch: the kernel allocates each page
        again = vmm.write(2)
        v = vmm.verify_report(2)
        assert v.bad == 0, v
        out["first-touch writes/s, 64 B stamp"] = {"value": rate(first.pages, first.ns),
                                                   "unit": "pages/s"}
        out["writes/s, 64 B stamp"] = {"value": rate(again.pages, again.ns), "unit": "pages/s"}
        out["verifies/s, 64 B stamp"] = {"value": rate(v.pages, v.ns), "unit": "pages/s"}
        hot = vmm.touch_hot(vmm.data_pages.start, 256, rounds=8, write=True)
        out["hot touches/s"] = {"value": rate(hot.touches, hot.ns), "unit": "touches/s"}
    with MiniVmm.start(ram_mib, fill_dwords=FULL_FILL, binary=binary) as vmm:
        n = min(full_pages, len(vmm.data_pages))
        vmm.write(1, vmm.data_pages.start, n)
        w = vmm.write(2, vmm.data_pages.start, n)
        out["writes/s, full 4 KiB page"] = {"value": rate(w.pages, w.ns), "unit": "pages/s",
                                            "note": f"{n} pages"}
    return out


def pin(pid: int, cpu: int | None) -> None:
    """Every thread of ``pid`` onto ``cpu`` (None: leave it to the scheduler)."""
    if cpu is not None:
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), {cpu})


def where(cpu: int | None) -> str:
    return "same CPU" if cpu is not None else "unpinned"


def py_fault_rates(binary: Path, ram_mib: int, pages: int, cpu: int | None) -> dict[str, Any]:
    k = LinuxKernel()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-minivmm-") as tmp:
            sock = Path(tmp) / "uffd.sock"
            with listen(sock) as lst:
                vmm = MiniVmm.start(ram_mib, fill_dwords=STAMP, handoff=sock, wait=False,
                                    binary=binary)
                try:
                    h = receive(lst, vmm)
                    try:
                        k.uffd_api(h.uffd, 0)
                        k.uffd_register(h.uffd, h.regions[0].base_host_virt_addr,
                                        h.regions[0].size, uapi.UFFDIO_REGISTER_MODE_MISSING)
                        server = FaultServer(k, h.uffd, cpu=cpu).start()
                        try:
                            h.ack()
                            pin(vmm.pid, cpu)
                            w = vmm.write(1, vmm.data_pages.start, pages)
                        finally:
                            server.stop()
                        assert vmm.verify(1, vmm.data_pages.start, pages)[1] == 0
                    finally:
                        h.close()
                finally:
                    vmm.close()
    finally:
        k.close()
    nf = len(server.faults)
    return {
        f"MISSING faults served/s, Python server, {where(cpu)}": {
            "value": rate(nf, w.ns), "unit": "faults/s",
            "note": f"{nf} faults, one per page, from the vCPU's first writes"},
        f"Python server busy per fault, {where(cpu)}": {
            "value": server.busy_s / nf * 1e6 if nf else 0.0, "unit": "µs"},
    }


def c_fault_rates(binary: Path, server_bin: Path, ram_mib: int, pages: int,
                  cpu: int | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-minivmm-") as tmp:
        sock = Path(tmp) / "uffd.sock"
        srv = subprocess.Popen([str(server_bin), str(sock)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
        try:
            assert srv.stdout is not None and srv.stdin is not None
            pin(srv.pid, cpu)
            assert srv.stdout.readline().strip() == "LISTENING"
            with MiniVmm.start(ram_mib, fill_dwords=STAMP, handoff=sock, wait=False,
                               binary=binary) as vmm:
                vmm.wait_ready()
                pin(vmm.pid, cpu)
                w = vmm.write(1, vmm.data_pages.start, pages)
                assert vmm.verify(1, vmm.data_pages.start, pages)[1] == 0
            assert srv.stdout.readline().startswith("SERVING regions=1")
            srv.stdin.close()
            last = srv.stdout.readline()
            assert srv.wait(timeout=60) == 0, last
        finally:
            if srv.poll() is None:
                srv.kill()
                srv.wait()
    f = {k: int(v) for k, v in (w_.split("=") for w_ in last.split()[1:])}
    nf = f["faults"]
    return {
        f"MISSING faults served/s, C server, {where(cpu)}": {
            "value": rate(nf, w.ns), "unit": "faults/s",
            "note": f"{nf} faults, {nf / max(f['reads'], 1):.2f} per read()"},
        f"C server busy per fault, {where(cpu)}": {
            "value": f["busy_ns"] / nf / 1e3 if nf else 0.0, "unit": "µs"},
    }


def bench_minivmm(quick: bool) -> dict[str, Any]:
    why = kvm_unavailable()
    if why is not None:
        return {"kvm available": {"value": 0, "note": why}}
    binary = build()
    in_guest = os.environ.get("VMM_TIERD_GUEST") == "1"
    ram_mib = 16 if quick else 64
    # Emulated on the host: a full-page write costs about 0.5 ms there.
    full_pages = len(range(16, ram_mib * 256)) if in_guest else (128 if quick else 1024)
    figs = guest_rates(binary, ram_mib, full_pages)
    server = build(source=HERE / "minivmm_server.c")
    # Faults are cross-process wake-ups: their rate depends on whether the vCPU and the
    # server share a CPU (no IPI, a direct switch), so both placements are measured.
    pages = (512 if quick else 2048) if in_guest else (2048 if quick else 8192)
    cpu0 = min(os.sched_getaffinity(0))
    for cpu in (cpu0, None):
        figs.update(c_fault_rates(binary, server, ram_mib, pages, cpu))
        figs.update(py_fault_rates(binary, ram_mib, pages, cpu))
    return figs


if __name__ == "__main__":
    import run

    quick = "--quick" in sys.argv[1:]
    t0 = time.perf_counter()
    figures = {k: run.normalise(v) for k, v in bench_minivmm(quick).items()}
    run.print_table("bench_minivmm:bench_minivmm", figures, time.perf_counter() - t0)
