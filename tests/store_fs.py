"""Real file-system faults for the store's tests: a small loop-mounted ext4 that can be
filled (ENOSPC), turned read-only by an ext4 error (EROFS, as errors=remount-ro does), or
shut down (every read and write then fails with EIO, as a dying disk would; this kernel
has no device-mapper for dm-error/dm-flakey), with the device shrunk under it so that
block reads fail too. Cleanup runs on every path."""

from __future__ import annotations

import fcntl
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

FS_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
SHUTDOWN_NOLOGFLUSH = 2


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


class LoopFs:
    def __init__(self, mnt: Path, dev: str, img: Path) -> None:
        self.mnt = mnt
        self.dev = dev
        self.img = img
        self.filler = mnt / "filler"

    def fill(self, leave: int) -> None:
        """Take all free space but ``leave`` bytes."""
        vfs = os.statvfs(self.mnt)
        n = max(0, vfs.f_bavail * vfs.f_frsize - leave)
        with open(self.filler, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, max(n, 1))

    def unfill(self) -> None:
        self.filler.unlink(missing_ok=True)

    def error_remount_ro(self) -> None:
        """An ext4 error, as a failing disk raises it: errors=remount-ro makes it read-only
        (``mount -o remount,ro`` itself is refused while data.mdb is open for writing)."""
        Path(f"/sys/fs/ext4/{os.path.basename(self.dev)}/trigger_fs_error").write_text("test\n")

    def fail_disk(self) -> None:
        """The disk dies: the file system is shut down (system calls fail with EIO) and
        the device shrinks to 1 MiB, so that reads of blocks past it, page faults of a
        mapping included, fail with EIO in the block layer."""
        self.shutdown()
        os.truncate(self.img, 1 << 20)
        if _run("losetup", "-c", self.dev).returncode:
            pytest.skip("losetup -c failed")

    def shutdown(self) -> None:
        fd = os.open(self.mnt, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, FS_IOC_SHUTDOWN, struct.pack("I", SHUTDOWN_NOLOGFLUSH))
        finally:
            os.close(fd)


@contextmanager
def loop_ext4(base: Path, size_mib: int = 32) -> Iterator[LoopFs]:
    if os.geteuid() != 0:
        pytest.skip("needs root for a loop mount")
    for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    img, mnt = base / "fs.img", base / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(size_mib << 20)
    if _run("mkfs.ext4", "-q", "-F", "-m", "0", str(img)).returncode:
        pytest.skip("mkfs.ext4 failed")
    lo = _run("losetup", "-f", "--show", str(img))
    if lo.returncode:
        pytest.skip(f"no loop device: {lo.stderr.strip()}")
    dev = lo.stdout.strip()
    try:
        m = _run("mount", "-o", "errors=remount-ro", dev, str(mnt))
        if m.returncode:
            pytest.skip(f"can't mount {dev}: {m.stderr.strip()}")
        try:
            yield LoopFs(mnt, dev, img)
        finally:
            if _run("umount", str(mnt)).returncode:
                _run("umount", "-l", str(mnt))
    finally:
        _run("losetup", "-d", dev)
        with suppress(OSError):
            img.unlink()
