"""The rig's pieces without QEMU: the plan, the seed, the guest's rig.sh (run here under the
host's busybox, on a small plan in a temp dir), the channel parser and the QEMU command."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel_vm import fetch
from tests.realvm import guest, workload
from tests.realvm.channel import Channel, ChannelClosed, ChannelTimeout, Reply

PAGE = workload.PAGE
needs_busybox = pytest.mark.skipif(shutil.which("busybox") is None, reason="needs busybox")


def test_plan_is_fixed_mixed_and_sized() -> None:
    total = 200 << 20
    plan = workload.plan_files(total)
    assert plan == workload.plan_files(total)
    assert len({f.name for f in plan}) == len(plan)
    by_kind = {k: sum(f.size for f in plan if f.kind == k) for k, _ in workload.MIX}
    for kind, share in workload.MIX:
        assert share * total - workload.MIN_FILE <= by_kind[kind] <= share * total, kind
    assert all(0 < f.size <= workload.MAX_FILE for f in plan)
    assert all(f.offset == 0 for f in plan if f.kind != "t")
    assert [f.kind for f in plan[:12]] != sorted(f.kind for f in plan[:12])   # interleaved


def test_no_page_of_the_data_equals_another_now_or_after_churns() -> None:
    seed = workload.seed_text()
    assert len(seed) == workload.SEED_BYTES and seed == workload.seed_text()
    plan = workload.plan_files(64 << 20)
    text = [f for f in plan if f.kind == "t"]
    stride = workload.text_stride(plan)
    assert stride == workload.TEXT_STEP * len(text)
    doubled = seed + seed
    # The seed's own pages, and every full page of every text file in generations 0-3
    # (the offsets rig.sh's churn moves them to): all different.
    pages = [doubled[i:i + PAGE] for i in range(0, len(seed), PAGE)]
    for f in text:
        for gen in range(4):
            off = (f.offset + gen * stride) % len(seed)
            pages += [doubled[off + k:off + k + PAGE] for k in range(0, f.size - PAGE + 1, PAGE)]
    assert len({hashlib.blake2b(p, digest_size=16).digest() for p in pages}) == len(pages)


def test_seed_pages_compress_like_text() -> None:
    import zstandard

    seed = workload.seed_text()
    c = zstandard.ZstdCompressor(level=1)
    sample = [seed[i:i + PAGE] for i in range(0, len(seed), 64 * PAGE)]
    ratio = sum(map(len, sample)) / sum(len(c.compress(p)) for p in sample)
    assert 1.5 < ratio < 5, ratio


class LocalRig:
    """rig.sh under the host's busybox, its channel on two pipes."""

    def __init__(self, root: Path, files: list[workload.FileSpec], token: str = "t0k3n") -> None:
        self.data, state = root / "data", root / "state"
        self.data.mkdir()
        state.mkdir()
        self.seed = workload.seed_text()
        (root / "seed").write_bytes(self.seed)
        (root / "plan").write_text(workload.plan_text(files))
        env = workload.rig_env(token, str(self.data), str(state), str(root / "seed"),
                               str(root / "plan"), STRIDE)
        self.proc = subprocess.Popen(
            ["busybox", "sh", str(workload.RIG_SH)], env={**env, "PATH": "/usr/bin:/bin"},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(root / "log", "wb"))
        assert self.proc.stdin and self.proc.stdout
        self.channel = Channel(self.proc.stdout.fileno(), self.proc.stdin.fileno(), token)

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"rig.sh exited with {self.proc.returncode}")

    def ask(self, verb: str, arg: int | None = None) -> Reply:
        return self.channel.wait(self.channel.send(verb, arg), 60, self.check)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


STRIDE = 3 * workload.TEXT_STEP
SMALL = [
    workload.FileSpec("t0000", "t", 3 * PAGE + 17, 263),
    workload.FileSpec("z0000", "z", 5 * PAGE, 0),
    # Wraps at the end of the seed: the last 1000 bytes, then its start.
    workload.FileSpec("t0001", "t", 2 * PAGE, workload.SEED_BYTES - 1000),
    workload.FileSpec("r0000", "r", 70000, 0),
    workload.FileSpec("t0002", "t", PAGE - 5, 526 + 7 * PAGE),
]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[LocalRig]:
    r = LocalRig(tmp_path, SMALL)
    try:
        yield r
    finally:
        r.close()


def _window(seed: bytes, off: int, size: int) -> bytes:
    return (seed + seed)[off:off + size]


@needs_busybox
def test_fill_writes_the_planned_content_and_a_unique_canary(rig: LocalRig) -> None:
    ready = rig.channel.wait(0, 60, rig.check)
    assert ready.verb == "ready"
    assert (ready.as_int("files"), ready.as_int("bytes")) == (6, sum(f.size for f in SMALL))
    for f in SMALL:
        data = (rig.data / f.name).read_bytes()
        assert len(data) == f.size, f.name
        if f.kind == "t":
            assert data == _window(rig.seed, f.offset, f.size), f.name
        elif f.kind == "z":
            assert data == bytes(f.size)
        else:
            assert data.count(0) < f.size // 100
    marker = workload.canary_marker("t0k3n")
    canary = (rig.data / workload.CANARY).read_bytes()
    assert canary.startswith(marker) and len(canary) < PAGE
    scripts = [p.read_bytes() for p in rig.data.parent.rglob("*") if p.is_file()]
    assert sum(s.count(marker) for s in scripts) == 1          # only the canary holds it


@needs_busybox
def test_verify_names_the_corrupted_and_the_missing_files(rig: LocalRig) -> None:
    rig.channel.wait(0, 60, rig.check)
    v = rig.ask("verify")
    assert (v.as_int("ok"), v.as_int("bad"), v.as_names("files")) == (6, 0, [])
    with open(rig.data / "t0001", "r+b") as f:
        f.seek(PAGE + 9)
        f.write(b"#")
    (rig.data / "r0000").unlink()
    v = rig.ask("verify")
    assert (v.as_int("ok"), v.as_int("bad")) == (4, 2)
    assert sorted(v.as_names("files")) == ["r0000", "t0001"]


@needs_busybox
def test_churn_rewrites_in_rotation_and_records_new_sums(rig: LocalRig) -> None:
    rig.channel.wait(0, 60, rig.check)
    before = {f.name: (rig.data / f.name).read_bytes() for f in SMALL}
    c = rig.ask("churn", 40)                                   # ceil(40 % of 5) = 2
    assert (c.as_int("files"), c.as_int("changed")) == (2, 1)  # t0000 changed, z0000 not
    t0000 = (rig.data / "t0000").read_bytes()
    assert t0000 == _window(rig.seed, 263 + STRIDE, SMALL[0].size)
    assert (rig.data / "z0000").read_bytes() == before["z0000"]
    c = rig.ask("churn", 60)                                   # the next 3: t0001 r0000 t0002
    assert (c.as_int("files"), c.as_int("changed")) == (3, 3)
    assert all((rig.data / f.name).read_bytes() != before[f.name] for f in SMALL[2:])
    v = rig.ask("verify")
    assert (v.as_int("ok"), v.as_int("bad")) == (6, 0)
    assert rig.ask("churn", 0).as_int("files") == 0


@needs_busybox
def test_touch_stats_errors_and_poweroff(rig: LocalRig) -> None:
    rig.channel.wait(0, 60, rig.check)
    t = rig.ask("touch", 100)
    assert (t.as_int("files"), t.as_int("bytes")) == (5, sum(f.size for f in SMALL))
    s = rig.ask("stats")
    assert s.as_int("files") == 6 and s.as_int("mem_total_kib") > s.as_int("mem_free_kib") > 0
    assert s.as_int("data_kib") >= sum(f.size for f in SMALL) // 1024
    for verb, arg, reason in (("churn", 101, "bad-percent"), ("touch", None, "bad-percent"),
                              ("reboot", None, "unknown-command")):
        r = rig.ask(verb, arg)
        assert (r.verb, r.fields) == ("error", {"reason": reason}), verb
    assert rig.ask("poweroff").verb == "bye"
    assert rig.proc.wait(10) == 0


@needs_busybox
def test_fill_failure_is_reported_as_fail(tmp_path: Path) -> None:
    r = LocalRig(tmp_path, [*SMALL[:2], workload.FileSpec("x0000", "x", PAGE, 0)])
    try:
        reply = r.channel.wait(0, 60, lambda: None)
        assert (reply.verb, reply.fields) == ("fail", {"reason": "write-x0000"})
        assert r.proc.wait(10) == 1
    finally:
        r.close()


@needs_busybox
def test_guest_scripts_parse() -> None:
    for script in (workload.init_script(), workload.RIG_SH.read_text()):
        subprocess.run(["busybox", "sh", "-n", "-c", script], check=True)


def _pipe_channel() -> tuple[Channel, int]:
    r, w = os.pipe()
    sink = os.open(os.devnull, os.O_WRONLY)
    return Channel(r, sink, "tok"), w


def test_channel_takes_only_the_answer_with_its_id_and_token() -> None:
    ch, w = _pipe_channel()
    os.write(w, b"[  3.1] @@RIG-tok 1 verify ok=9 bad=0@@\n"        # id 1: not awaited
                b"@@RIG-other 2 verify ok=1 bad=1 files=x@@\n"       # another run's token
                b"@@RIG-tok 2 verify ok=8 bad=1 seconds=7.5 files=t0001@@\r\n")
    assert ch.send("verify") == 1 and ch.send("verify") == 2
    r = ch.wait(2, 5, lambda: None)
    assert (r.as_int("ok"), r.as_int("bad"), r.as_names("files"), r.as_float("seconds")) == \
        (8, 1, ["t0001"], 7.5)
    assert len(ch.other) == 2
    with pytest.raises(ChannelTimeout):
        ch.wait(3, 0.3, lambda: None)
    os.write(w, b"@@RIG-tok 3 verify ok=1")                           # cut off, then EOF
    os.close(w)
    checked: list[bool] = []
    with pytest.raises(ChannelClosed):
        ch.wait(3, 5, lambda: checked.append(True))
    assert checked


def test_qemu_command_backs_ram_with_a_shared_memfd_under_tcg(tmp_path: Path) -> None:
    k = fetch.KernelBundle("v", "linux-image-v", tmp_path, tmp_path / "vmlinuz", tmp_path)
    cmd = guest.qemu_command(k, tmp_path / "i", Path("/x,y/console"), 7, 768, 2)
    assert cmd[cmd.index("-accel") + 1] == "tcg" and cmd[cmd.index("-cpu") + 1] == "max"
    assert cmd[cmd.index("-object") + 1] == "memory-backend-memfd,id=ram,size=768M,share=on"
    assert cmd[cmd.index("-machine") + 1] == "memory-backend=ram"
    assert cmd[cmd.index("-m") + 1] == "768M" and cmd[cmd.index("-smp") + 1] == "2"
    serials = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-serial"]
    assert serials == ["chardev:console", "chardev:control"]      # ttyS0, ttyS1
    assert "socket,id=control,fd=7" in cmd and "-nodefaults" in cmd and "-nic" in cmd
    assert "file,id=console,path=/x,,y/console" in cmd


def test_start_rejects_bad_sizes(tmp_path: Path) -> None:
    for kw in ({"ram_mib": 256}, {"fill_fraction": 0.9}, {"fill_fraction": 0.0}, {"smp": 0}):
        with pytest.raises(ValueError):
            guest.QemuGuest.start(workdir=tmp_path, **kw)
    assert list(tmp_path.iterdir()) == []
