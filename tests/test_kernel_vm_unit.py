"""Host-side tests of the kernel_vm runner's pieces (no download, no boot)."""

from __future__ import annotations

import dataclasses
import json
import lzma
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.kernel_vm import boot, fetch, image, initramfs

DEB822 = """\
Types: deb
URIs: http://deb.example.org/debian-security
Suites: bookworm-security
Components: main

Types: deb-src
URIs: http://src.example.org/debian
Suites: bookworm

Types: deb
Enabled: no
URIs: http://disabled.example.org/debian
Suites: bookworm

Types: deb
# a comment
URIs: http://mirror.example.org/debian/
Suites: bookworm bookworm-updates
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def test_parse_mirror_deb822_skips_security_src_and_disabled() -> None:
    assert fetch.parse_mirror({"debian.sources": DEB822}) == "http://mirror.example.org/debian"


def test_parse_mirror_one_line_format_with_options() -> None:
    text = ("# deb http://commented.example.org/debian bookworm main\n"
            "deb https://packages.example.com/apt cloud-sdk main\n"
            "deb [arch=amd64 signed-by=/k.gpg] http://ftp.example.net/debian bookworm main\n")
    assert fetch.parse_mirror({"sources.list": text}) == "http://ftp.example.net/debian"


def test_parse_mirror_without_debian_archive_names_what_it_saw() -> None:
    with pytest.raises(fetch.KernelFetchError, match=r"packages\.example\.com"):
        fetch.parse_mirror({"x.list": "deb https://packages.example.com/apt stable main\n"})


NAMES = [
    "linux-image-7.2.12+deb13-amd64", "linux-image-7.3.4+deb13-amd64",
    "linux-image-7.3.10+deb13-amd64-unsigned", "linux-image-7.3.9+deb13-amd64",
    "linux-image-7.3.12+deb13-rt-amd64", "linux-image-7.3.12+deb13-cloud-amd64",
    "linux-image-7.3.12+deb13-amd64-dbg", "linux-image-amd64", "linux-image-6.12.1+deb13-amd64",
]


def test_pick_image_newest_plain_amd64_numerically() -> None:
    # 7.3.10 > 7.3.9 (numeric, not lexical); rt/cloud/dbg flavours are never picked.
    assert fetch.pick_image(NAMES) == "linux-image-7.3.10+deb13-amd64-unsigned"


def test_pick_image_prefers_signed_and_later_minor() -> None:
    names = ["linux-image-7.3.4+deb13-amd64-unsigned", "linux-image-7.3.4+deb13-amd64"]
    assert fetch.pick_image(names) == "linux-image-7.3.4+deb13-amd64"
    assert fetch.pick_image([*names, "linux-image-7.10.1+deb13-amd64"]) == \
        "linux-image-7.10.1+deb13-amd64"
    assert fetch.pick_image([*names, "linux-image-8.0.1-amd64"]) == "linux-image-8.0.1-amd64"


def test_pick_image_none_below_minimum() -> None:
    assert fetch.pick_image(["linux-image-7.2.12+deb13-amd64", "linux-image-6.1.0-amd64"]) is None
    assert fetch.pick_image([]) is None


def test_release_and_depends_parsing() -> None:
    assert fetch.release_of("linux-image-7.3.4+deb13-amd64-unsigned") == "7.3.4+deb13-amd64"
    text = """linux-image-7.3.4+deb13-amd64
  PreDepends: linux-base
 |Depends: <dracut>
  Depends: <linux-initramfs-tool>
  Depends: linux-base-7.3.4+deb13-amd64
  Depends: linux-binary-7.3.4+deb13-amd64
  Depends: linux-modules-7.3.4+deb13-amd64
  Suggests: linux-doc-7.3
"""
    assert fetch.parse_depends(text) == ["linux-base-7.3.4+deb13-amd64",
                                         "linux-binary-7.3.4+deb13-amd64",
                                         "linux-modules-7.3.4+deb13-amd64"]


def _fake_bundle(root: Path, release: str, package: str, with_vmlinuz: bool = True,
                 dirs: tuple[str, ...] = fetch.MODULE_DIRS) -> None:
    d = root / release
    mod = d / "usr/lib/modules" / release
    mod.mkdir(parents=True)
    for sub in dirs:
        (mod / sub).mkdir(parents=True)
    if with_vmlinuz:
        (mod / "vmlinuz").write_bytes(b"kernel")
    (d / "bundle.json").write_text(json.dumps({
        "version": release, "package": package, "vmlinuz": f"usr/lib/modules/{release}/vmlinuz",
        "modules": f"usr/lib/modules/{release}"}))


def test_cached_bundle_picks_newest_complete(tmp_path: Path) -> None:
    assert fetch.cached_bundle(tmp_path / "missing") is None
    _fake_bundle(tmp_path, "7.3.4+deb13-amd64", "linux-image-7.3.4+deb13-amd64")
    _fake_bundle(tmp_path, "7.3.9+deb13-amd64", "linux-image-7.3.9+deb13-amd64")
    _fake_bundle(tmp_path, "7.3.11+deb13-amd64", "linux-image-7.3.11+deb13-amd64",
                 with_vmlinuz=False)                      # interrupted extraction
    _fake_bundle(tmp_path, "7.2.1+deb13-amd64", "linux-image-7.2.1+deb13-amd64")
    _fake_bundle(tmp_path, "7.3.10+deb13-amd64", "linux-image-7.3.10+deb13-amd64",
                 dirs=fetch.MODULE_DIRS[:4])              # cached before the kvm modules
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "bundle.json").write_text("{not json")
    b = fetch.cached_bundle(tmp_path)
    assert b is not None and b.version == "7.3.9+deb13-amd64"
    assert b.vmlinuz.read_bytes() == b"kernel"
    logs: list[str] = []
    assert fetch.ensure_kernel(tmp_path, logs.append) == b     # no network: cache hit
    assert "cache" in logs[0]


def test_cached_bundle_without_the_kvm_modules_is_downloaded_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_bundle(tmp_path, "7.3.4+deb13-amd64", "linux-image-7.3.4+deb13-amd64",
                 dirs=fetch.MODULE_DIRS[:4])
    assert fetch.cached_bundle(tmp_path) is None
    seen: list[Path] = []

    def download(root: Path, log: fetch.LogFn) -> fetch.KernelBundle:
        seen.append(root)
        raise fetch.KernelFetchError("offline")

    monkeypatch.setattr(fetch, "download", download)
    logs: list[str] = []
    with pytest.raises(fetch.KernelFetchError, match="offline"):
        fetch.ensure_kernel(tmp_path, logs.append)
    assert seen == [tmp_path]
    assert any("lacks kernel/arch/x86/kvm" in line for line in logs), logs


def test_private_apt_options_never_point_at_system_state(tmp_path: Path) -> None:
    apt = fetch.PrivateApt(tmp_path, "http://mirror.example.org/debian")
    opts = dict(o.split("=", 1) for o in apt.opts[1::2])
    assert opts["Dir::Etc::SourceParts"] == "/dev/null"
    for key in ("Dir::Etc::SourceList", "Dir::State::Lists", "Dir::Cache::archives"):
        assert opts[key].startswith(str(tmp_path)), key
    line = apt.sources.read_text()
    assert line == (f"deb [signed-by={fetch.KEYRING}] http://mirror.example.org/debian "
                    "trixie-backports main\n")


def _ko(tree: Path, rel: str, name: str, depends: str) -> None:
    p = tree / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    body = (b"\x7fELF" + b"\x00" * 60 + b"license=GPL\x00depends=" + depends.encode()
            + b"\x00name=" + name.encode() + b"\x00vermagic=7.3.4 SMP\x00")
    p.write_bytes(lzma.compress(body, format=lzma.FORMAT_XZ))


def test_resolve_modules_dependencies_first(tmp_path: Path) -> None:
    _ko(tmp_path, "kernel/fs/9p/9p.ko.xz", "9p", "9pnet,netfs")
    _ko(tmp_path, "kernel/net/9p/9pnet.ko.xz", "9pnet", "netfs")
    _ko(tmp_path, "kernel/net/9p/9pnet_virtio.ko.xz", "9pnet_virtio", "9pnet")
    _ko(tmp_path, "kernel/fs/netfs/netfs.ko.xz", "netfs", "")
    _ko(tmp_path, "kernel/fs/overlayfs/overlay.ko.xz", "overlay", "")
    mods = image.resolve_modules(tmp_path, ["9p", "9pnet_virtio", "overlay"])
    names = [n for n, _ in mods]
    assert names == ["netfs", "9pnet", "9p", "9pnet_virtio", "overlay"]
    assert all(data.startswith(b"\x7fELF") for _, data in mods)       # decompressed
    assert image.modinfo(mods[2][1])["depends"] == "9pnet,netfs"


def test_resolve_modules_missing_and_cycle(tmp_path: Path) -> None:
    _ko(tmp_path, "a.ko.xz", "a", "b")
    with pytest.raises(image.InitramfsError, match=r"'b' .*needed by a"):
        image.resolve_modules(tmp_path, ["a"])
    _ko(tmp_path, "b.ko.xz", "b", "a")
    with pytest.raises(image.InitramfsError, match="cycle"):
        image.resolve_modules(tmp_path, ["a"])


def _plan(tmp_path: Path, python: str, args: list[str]) -> initramfs.GuestPlan:
    return initramfs.GuestPlan(
        token="abc123", project=str(tmp_path), python=python, pytest_args=args,
        modules=["netfs", "9pnet"], env={"HOME": "/tmp/h o", "X": "it's"},
        prelude=[["echo", "prelude ran"]])


needs_busybox = pytest.mark.skipif(shutil.which("busybox") is None, reason="needs busybox")


@needs_busybox
def test_cpio_archive_extracts_with_busybox_cpio(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "/usr/bin/python3", ["-q"])
    out = initramfs.build(plan, [("netfs", b"\x7fELFnetfs")], tmp_path / "initrd.cpio")
    listing = subprocess.run(["busybox", "cpio", "-t", "-v"], stdin=out.open("rb"),
                             capture_output=True, text=True, check=True).stdout
    assert "lib/modules/netfs.ko" in listing and "kvm-run.sh" in listing
    assert any(line.startswith("c") and line.endswith(" dev/console")
               for line in listing.splitlines()), listing
    raw = out.read_bytes()
    head = raw[raw.index(b"dev/console\0") - 110:]
    assert head[:6] == b"070701"
    fields = [int(head[6 + 8 * i: 14 + 8 * i], 16) for i in range(13)]
    assert (fields[9], fields[10]) == (5, 1)                   # rdev major, minor
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(["busybox", "cpio", "-i", "-d"], stdin=out.open("rb"), cwd=dest,
                   capture_output=True, check=True)
    assert (dest / "lib/modules/netfs.ko").read_bytes() == b"\x7fELFnetfs"
    assert (dest / "init").stat().st_mode & stat.S_IXUSR
    assert (dest / "init").read_text() == initramfs.init_script(plan)
    assert (dest / "bin/busybox").stat().st_size > 100_000


@needs_busybox
def test_scripts_are_valid_sh_with_markers_and_modules(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "/usr/bin/python3", ["-q"])
    init = initramfs.init_script(plan)
    for script in (init, initramfs.run_script(plan)):
        subprocess.run(["busybox", "sh", "-n", "-c", script], check=True)
    for word in ("INIT", "SETUP-DONE", "EXIT $rc", "UNAME $(uname -r)"):
        assert initramfs.marker("abc123", word) in init
    assert init.index("insmod /lib/modules/netfs.ko") < init.index("insmod /lib/modules/9pnet.ko")
    assert "poweroff -f" in init and "mount -t 9p" in init


@needs_busybox
def test_optional_modules_load_after_the_others_and_may_fail(tmp_path: Path) -> None:
    plan = dataclasses.replace(_plan(tmp_path, "/usr/bin/python3", ["-q"]),
                               optional_modules=["kvm", "kvm_amd"])
    init = initramfs.init_script(plan)
    lines = [line for line in init.splitlines() if line.startswith("insmod ")]
    assert [line.split()[1] for line in lines] == [
        f"/lib/modules/{m}.ko" for m in ("netfs", "9pnet", "kvm", "kvm_amd")]
    assert all("|| fail" in line for line in lines[:2])
    assert not any("fail '" in line for line in lines[2:])
    # A failing optional insmod does not stop the script.
    script = "\n".join(lines[2:]).replace("insmod /", "false /") + "\necho after"
    proc = subprocess.run(["busybox", "sh", "-c", script], capture_output=True, text=True)
    assert proc.stdout.splitlines() == ["insmod kvm failed (optional)",
                                        "insmod kvm_amd failed (optional)", "after"]
    assert "/dev/kvm present" in init


@needs_busybox
def test_run_script_passes_pytest_args_and_env_verbatim(tmp_path: Path) -> None:
    fake = tmp_path / "fakepython"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "PWD=$(pwd)" "HOME=$HOME" "X=$X" "$@"\nexit 3\n')
    fake.chmod(0o755)
    args = ["-k", "rwp and not memfd", "tests/a b.py", "it's", "$HOME", "-q"]
    script = initramfs.run_script(_plan(tmp_path, str(fake), args))
    proc = subprocess.run(["busybox", "sh", "-c", script], capture_output=True, text=True)
    assert proc.returncode == 3
    lines = proc.stdout.splitlines()
    assert lines[0] == "prelude ran"
    assert lines[1] == initramfs.marker("abc123", "TESTS-START")
    assert lines[2:] == [f"PWD={tmp_path}", "HOME=/tmp/h o", "X=it's", "-m", "pytest", "-p",
                         "no:cacheprovider", *args]


def test_marker_parser_phases_and_exit_status() -> None:
    p = boot.MarkerParser("tok")
    p.feed("@@KVM-tok INIT@@", 5.0)
    p.feed("@@KVM-tok UNAME 7.3.4+deb13-amd64@@", 5.1)
    assert p.phase == "setup" and p.uname == "7.3.4+deb13-amd64"
    p.feed("@@KVM-other EXIT 0@@", 6.0)                       # another run's token: ignored
    p.feed("@@KVM-tok TESTS-START@@", 9.0)
    assert p.phase == "tests" and p.exit_status is None
    p.feed("prefix noise @@KVM-tok EXIT 1@@", 30.0)
    assert p.phase == "done" and p.exit_status == 1
    assert p.seen == {"INIT": 5.0, "UNAME": 5.1, "TESTS-START": 9.0, "EXIT": 30.0}


def test_marker_parser_exit_before_tests_is_setup_failure() -> None:
    p = boot.MarkerParser("tok")
    p.feed("@@KVM-tok INIT@@", 1.0)
    p.feed("@@KVM-tok EXIT 97@@", 2.0)
    assert p.exit_status is None and p.setup_failed


def _fake_qemu(monkeypatch: pytest.MonkeyPatch, script: str,
               idle: float = 60.0) -> boot.VmConfig:
    monkeypatch.setattr(boot, "qemu_command", lambda cfg: ["sh", "-c", script])
    return boot.VmConfig(vmlinuz=Path("/nonexistent"), initrd=Path("/nonexistent"),
                         idle_timeout=idle, deadline=120.0)


def test_run_vm_streams_and_returns_exit_status(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _fake_qemu(monkeypatch, "printf '@@KVM-t INIT@@\\r\\n@@KVM-t TESTS-START@@\\n"
                                  "1 passed\\n@@KVM-t EXIT 0@@\\n'")
    out: list[str] = []
    res = boot.run_vm(cfg, "t", out.append, lambda m: None)
    assert res.failure is None and res.exit_status == 0 and res.failed_phase is None
    assert out == ["@@KVM-t INIT@@", "@@KVM-t TESTS-START@@", "1 passed", "@@KVM-t EXIT 0@@"]


def test_run_vm_watchdog_kills_a_silent_guest(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _fake_qemu(monkeypatch, "echo '@@KVM-t INIT@@'; echo '@@KVM-t TESTS-START@@'; "
                                  "exec sleep 600", idle=1.5)
    res = boot.run_vm(cfg, "t", lambda s: None, lambda m: None)
    assert res.exit_status is None and res.failed_phase == "tests"
    assert res.failure is not None and "no console output" in res.failure
    assert res.times["end"] < 100


def test_run_vm_guest_that_never_reaches_init_is_a_boot_failure(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _fake_qemu(monkeypatch, "echo 'Kernel panic - not syncing'; exit 0")
    res = boot.run_vm(cfg, "t", lambda s: None, lambda m: None)
    assert res.failed_phase == "boot" and res.failure is not None
    assert "did not boot" in res.failure


def test_qemu_command_uses_tcg_and_read_only_share() -> None:
    cmd = boot.qemu_command(boot.VmConfig(vmlinuz=Path("/k"), initrd=Path("/i")))
    assert cmd[cmd.index("-accel") + 1] == "tcg" and cmd[cmd.index("-cpu") + 1] == "max"
    virtfs = cmd[cmd.index("-virtfs") + 1]
    assert "readonly=on" in virtfs and "path=/," in virtfs and "mount_tag=hostroot" in virtfs
    assert "-no-reboot" in cmd and "console=ttyS0" in cmd[cmd.index("-append") + 1]


def test_run_vm_boot_timeout_while_guest_prints_without_reaching_init(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _fake_qemu(monkeypatch, "while :; do echo booting; sleep 0.2; done")
    cfg.boot_timeout = 1.0
    res = boot.run_vm(cfg, "t", lambda s: None, lambda m: None)
    assert res.failed_phase == "boot" and res.failure is not None
    assert "did not reach /init" in res.failure


def test_files_from_collection_unique_in_order() -> None:
    from tests.kernel_vm.__main__ import files_from_collection

    out = ("tests/conformance/test_conformance.py::test_conformance[linux-anon-rwp-sync]\n"
           "tests/test_e2e.py::test_integrity[rwp]\n"
           "tests/conformance/test_conformance.py::test_conformance[linux-memfd-rwp-sync]\n"
           "\n50/371 tests collected (321 deselected) in 11.59s\n")
    assert files_from_collection(out) == ["tests/conformance/test_conformance.py",
                                          "tests/test_e2e.py"]


def test_prelude_option_adds_commands_after_kernel_info() -> None:
    from tests.kernel_vm import __main__ as kvm_main

    args = kvm_main.parse_args(["--prelude", "python bench.py --quick 'a b'", "--prelude", "true"])
    plan = kvm_main.guest_plan(args, ["netfs"], ["-q"], ["kvm"])
    assert plan.prelude[0][-2:] == ["kernel-info", "--json"]
    assert plan.prelude[1:] == [["python", "bench.py", "--quick", "a b"], ["true"]]
    assert (plan.modules, plan.optional_modules) == (["netfs"], ["kvm"])
