"""``python -m tests.kernel_vm [options] [-- pytest args]``

Obtains (and caches) Debian's newest Linux >= 7.3 kernel, builds a busybox initramfs with the
9p/overlay modules (and kvm-amd, so /dev/kvm exists in the guest), boots it under QEMU/TCG
with the host's root shared read-only (writes go to a tmpfs overlay), runs the pytest
selection as root in the guest, streams its output and exits with pytest's status. Without
pytest args the selection is ``-m guest -v`` over the files in which a host-side
``--collect-only -m guest`` finds tests (``tests/`` if that fails).

Exit status: pytest's own, or 70 host prerequisites missing, 71 kernel could not be
obtained, 72 guest did not boot or set up, 73 guest died or hung during the tests.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import boot, fetch, image, initramfs

PROJECT = Path(__file__).resolve().parents[2]
DEFAULT_SELECTION = ["-m", "guest", "-v", "tests/"]
EXIT_HOST, EXIT_KERNEL, EXIT_BOOT, EXIT_TESTS = 70, 71, 72, 73


def log(msg: str) -> None:
    print(f"[kernel_vm] {msg}", flush=True)


def echo(line: str) -> None:
    print(line, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.kernel_vm",
                                description=__doc__.splitlines()[2] if __doc__ else None)
    p.add_argument("--refresh", action="store_true",
                   help="ignore the kernel cache and download the newest >= 7.3 again")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="kernel cache (default $XDG_CACHE_HOME or ~/.cache, /vmm-tierd/kernel)")
    p.add_argument("--fetch-only", action="store_true", help="obtain the kernel, do not boot")
    p.add_argument("--memory", default="2G")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--idle-timeout", type=float, default=300.0,
                   help="kill the guest after this many seconds without console output")
    p.add_argument("--timeout", type=float, default=1200.0,
                   help="kill the guest after this many seconds in total")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment variable for the guest's pytest (repeatable)")
    p.add_argument("--no-kernel-info", action="store_true",
                   help="skip 'vmm-tierd kernel-info --json' before pytest")
    p.add_argument("--prelude", action="append", default=[], metavar="COMMAND",
                   help="extra command (shell words) run in the checkout before pytest, "
                        "e.g. a benchmark (repeatable; its failure does not stop the run)")
    p.add_argument("pytest_args", nargs="*", help="after --: the pytest selection")
    return p.parse_args(argv)


def guest_plan(args: argparse.Namespace, modules: list[str],
               selection: list[str], optional: list[str] | None = None) -> initramfs.GuestPlan:
    venv = PROJECT / ".venv"
    python = venv / "bin" / "python"
    env = {
        "PATH": f"{venv / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "VIRTUAL_ENV": str(venv), "HOME": "/tmp/home", "TMPDIR": "/tmp", "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
        "VMM_TIERD_GUEST": "1", "PY_COLORS": "0",
        # TCG runs Python about 10-30x slower than the host: widen the suite's waits.
        "VMM_TIERD_CONFORMANCE_TIMEOUT": "20",
    }
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise SystemExit(f"--env {item!r}: expected NAME=VALUE")
        env[name] = value
    prelude: list[list[str]] = []
    if not args.no_kernel_info:
        prelude.append([str(python), "-m", "vmm_tierd.cli", "kernel-info", "--json"])
    prelude += [shlex.split(cmd) for cmd in args.prelude]
    return initramfs.GuestPlan(
        token=secrets.token_hex(6), project=str(PROJECT), python=str(python),
        pytest_args=selection, modules=modules,
        env=env, prelude=prelude, optional_modules=optional or [])


def guest_files(python: Path) -> list[str] | None:
    """Test files holding ``-m guest`` tests, collected on the host (seconds) so the guest
    (Python under TCG: minutes for the whole tree) imports only those. None: collect all."""
    try:
        proc = subprocess.run(
            [str(python), "-m", "pytest", "--collect-only", "-q", "-m", "guest",
             "-p", "no:cacheprovider", "tests/"],
            cwd=PROJECT, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return files_from_collection(proc.stdout)


def files_from_collection(output: str) -> list[str]:
    """Unique file paths, in order, from ``pytest --collect-only -q`` node ids."""
    files: list[str] = []
    for line in output.splitlines():
        path, sep, _ = line.partition("::")
        if sep and path.endswith(".py") and path not in files:
            files.append(path)
    return files


def optional_modules(tree: Path, have: set[str]) -> list[tuple[str, bytes]]:
    """fetch.OPTIONAL_MODULES and their dependencies not in ``have``; [] (logged) if the
    kernel package lacks one."""
    try:
        mods = image.resolve_modules(tree, list(fetch.OPTIONAL_MODULES))
    except (image.InitramfsError, OSError) as exc:
        log(f"optional modules left out: {exc}")
        return []
    return [(name, data) for name, data in mods if name not in have]


def check_host() -> str | None:
    if shutil.which(boot.QEMU) is None:
        return f"{boot.QEMU} not found: run scripts/setup --test (installs qemu-system-x86)"
    try:
        image.find_busybox()
    except image.InitramfsError as exc:
        return str(exc)
    if not (PROJECT / ".venv" / "bin" / "python").exists():
        return f"{PROJECT}/.venv missing: run scripts/setup --test"
    return None


def summary(res: boot.RunResult, t_build: float) -> None:
    t = res.times
    init, start, end = t.get("INIT"), t.get("TESTS-START"), t.get("EXIT", t["end"])
    log(f"guest kernel: {res.uname or 'unknown'}")
    parts = [f"initramfs build {t_build:.1f} s"]
    if init is not None:
        parts.append(f"boot to /init {init:.1f} s")
    if init is not None and start is not None:
        parts.append(f"setup+prelude {start - init:.1f} s")
    if start is not None:
        parts.append(f"tests {end - start:.1f} s")
    parts.append(f"total {t['end']:.1f} s")
    log("times: " + ", ".join(parts))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    problem = None if args.fetch_only else check_host()
    if problem:
        log(f"FAILED (host): {problem}")
        return EXIT_HOST
    root = args.cache_dir or fetch.cache_root()
    try:
        bundle = fetch.ensure_kernel(root, log, refresh=args.refresh)
    except (fetch.KernelFetchError, OSError) as exc:
        log(f"FAILED (kernel): could not obtain a Linux >= 7.3 kernel: {exc}")
        return EXIT_KERNEL
    log(f"kernel {bundle.version} cached in {bundle.root}")
    if args.fetch_only:
        return 0
    selection = list(args.pytest_args)
    if not selection:
        files = guest_files(PROJECT / ".venv" / "bin" / "python")
        if files == []:
            log("no test carries the 'guest' marker: nothing to run in the guest")
            return 5
        selection = DEFAULT_SELECTION[:-1] + (files or DEFAULT_SELECTION[-1:])
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kernel_vm-") as tmp:
        try:
            mods = image.resolve_modules(bundle.modules, list(fetch.GUEST_MODULES))
            opt = optional_modules(bundle.modules, {name for name, _ in mods})
            plan = guest_plan(args, [name for name, _ in mods], selection,
                              [name for name, _ in opt])
            initrd = initramfs.build(plan, mods + opt, Path(tmp) / "initrd.cpio")
        except (image.InitramfsError, OSError) as exc:
            log(f"FAILED (boot): cannot build the initramfs: {exc}")
            return EXIT_BOOT
        t_build = time.monotonic() - t0
        cfg = boot.VmConfig(vmlinuz=bundle.vmlinuz, initrd=initrd, memory=args.memory,
                            cpus=args.cpus, idle_timeout=args.idle_timeout,
                            deadline=args.timeout, project=plan.project)
        log(f"booting {bundle.version} under TCG ({args.cpus} vCPUs, {args.memory}); "
            f"in the guest: pytest {' '.join(plan.pytest_args)}")
        if os.environ.get("KERNEL_VM_DEBUG"):
            log("qemu: " + " ".join(boot.qemu_command(cfg)))
        res = boot.run_vm(cfg, plan.token, echo, log)
    summary(res, t_build)
    if res.failure is None and res.exit_status is not None:
        log(f"guest pytest exit status {res.exit_status}")
        return res.exit_status
    phase = res.failed_phase or "tests"
    log(f"FAILED ({phase}): {res.failure}")
    return EXIT_TESTS if phase == "tests" else EXIT_BOOT


if __name__ == "__main__":
    sys.exit(main())
