"""Injection into a real QEMU (manual measurement, not part of run.py; prints figures).

    .venv/bin/python -m benchmarks.qemu_inject [--kernel VMLINUZ] [--rounds N]

Boots Debian's qemu-system-x86_64 under TCG with 512 MiB of memfd RAM
(``-object memory-backend-memfd,id=ram,size=512M,share=on -machine memory-backend=ram``)
and a busybox initramfs whose /init keeps rewriting a 64 MiB file in guest RAM, finds the
memfd and its mapping with LinuxProcess, then with RemoteSpace injects userfaultfd (+
pidfd_getfd) and close into the thread pick_inject_thread chooses, ``--rounds`` times,
and getpid as often. The guest must keep printing its loop counter afterwards. QEMU is
killed at the end. Kernel: the one ``python -m tests.kernel_vm`` caches, by default.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

from vmm_tierd.kernel.linux import LinuxKernel  # noqa: E402
from vmm_tierd.kernel.process import SYS_GETPID, Syscall  # noqa: E402
from vmm_tierd.kernel.remote import RemoteSpace  # noqa: E402

RAM = 512 << 20
INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
echo GUEST-UP
i=0
while true; do
  dd if=/dev/urandom of=/tmp/x bs=1M count=64 2>/dev/null
  i=$((i+1)); echo "guest loop $i"; sleep 1
done
"""


def initramfs(d: Path) -> Path:
    root = d / "root"
    (root / "bin").mkdir(parents=True)
    for sub in ("proc", "tmp", "dev"):
        (root / sub).mkdir()
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)
    out = d / "initrd.cpio"
    names = subprocess.run(["/bin/busybox", "find", "."], cwd=root, capture_output=True,
                           check=True).stdout
    with open(out, "wb") as f:
        subprocess.run(["/bin/busybox", "cpio", "-o", "-H", "newc"], cwd=root, input=names,
                       stdout=f, stderr=subprocess.DEVNULL, check=True)
    return out


def wait_for(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise SystemExit(f"guest did not print {text!r} within {timeout}s; see {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cached = sorted(Path.home().glob(".cache/vmm-tierd/kernel/*/usr/lib/modules/*/vmlinuz"))
    ap.add_argument("--kernel", type=Path, default=cached[-1] if cached else None)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--debug-threads", action="store_true",
                    help="-name ...,debug-threads=on (as libvirt does): QEMU names its "
                         "threads (\"CPU 0/TCG\"...) only then")
    args = ap.parse_args()
    if args.kernel is None:
        raise SystemExit("no kernel: run `python -m tests.kernel_vm` once or pass --kernel")
    with tempfile.TemporaryDirectory(prefix="vmm-tierd-qemu-") as tmp:
        d = Path(tmp)
        console = d / "console.log"
        qemu = subprocess.Popen([
            "qemu-system-x86_64", "-accel", "tcg", "-smp", "1", "-m", "512M",
            "-object", f"memory-backend-memfd,id=ram,size={RAM},share=on",
            "-machine", "q35,memory-backend=ram", "-kernel", str(args.kernel),
            "-initrd", str(initramfs(d)), "-append", "console=ttyS0 rdinit=/init quiet",
            "-display", "none", "-monitor", "none", "-serial", f"file:{console}",
            "-no-reboot", *(["-name", "measure,debug-threads=on"] if args.debug_threads
                            else [])], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        k = LinuxKernel()
        try:
            wait_for(console, "guest loop 1", 300)
            p = k.open_process(qemu.pid)
            threads = p.threads()
            print("threads:", ", ".join(f"{t.tid} {t.comm!r}" for t in threads))
            memfd = next(f for f in p.fds() if f.memfd_name == "memory-backend-memfd")
            ram = next(m for m in p.maps() if m.inode == memfd.inode and m.shared)
            print(f"memfd: fd {memfd.fd} {memfd.target!r}; mapping "
                  f"[0x{ram.start:x}, 0x{ram.end:x}) {ram.perms} {ram.length >> 20} MiB")
            space = RemoteSpace(p)
            comm = {t.tid: t.comm for t in threads}[space.tid]
            print(f"injecting into tid {space.tid} {comm!r}")
            uffd, close, getpid, wall = [], [], [], []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                remote, local = space.create_uffd()
                wall.append(time.perf_counter() - t0)
                uffd.append(space.stats.last_s)
                assert next(f for f in p.fds() if f.fd == remote).is_uffd
                os.close(local)
                space.close_remote([remote])
                close.append(space.stats.last_s)
                getpid.append(p.inject(space.tid, [Syscall(SYS_GETPID)]).pause_s)
            for name, xs in (("userfaultfd", uffd), ("close", close), ("getpid", getpid),
                             ("userfaultfd+getfd wall", wall)):
                us = sorted(x * 1e6 for x in xs)
                print(f"{name:24s} p50 {statistics.median(us):7.1f} µs  p90 "
                      f"{us[int(0.9 * (len(us) - 1))]:7.1f}  max {us[-1]:7.1f}  ({len(us)})")
            print(f"stats: {space.stats}")
            n = console.read_text().count("guest loop")
            wait_for(console, f"guest loop {n + 2}", 60)
            print(f"guest still running: loop {n + 2} printed after the injections")
            assert not any(f.is_uffd for f in p.fds()), "a uffd was left in QEMU"
            p.close()
        finally:
            qemu.kill()
            qemu.wait()
            err = qemu.stderr.read().decode() if qemu.stderr else ""
            if err.strip():
                print("qemu stderr:", err.strip())
            k.close()


if __name__ == "__main__":
    main()
