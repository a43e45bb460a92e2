"""Pieces every busybox guest image needs: modules, a newc cpio writer, the /init prologue.

Shared by the 7.3 pytest guest (``initramfs.py``) and the real-VM rig (``tests/realvm``).

The kernel package ships no modules.dep (depmod runs at install time), so dependencies come
from each module's own ``.modinfo`` ``depends=`` field. Modules are .ko.xz; they are
decompressed here so busybox ``insmod`` can load them without a decompressor in the guest.
"""

from __future__ import annotations

import lzma
import re
import shutil
import stat
from pathlib import Path

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")

# (path, mode, content); symlinks carry their target as content.
Entry = tuple[str, int, bytes]
DIR = stat.S_IFDIR | 0o755
EXEC = stat.S_IFREG | 0o755
FILE = stat.S_IFREG | 0o644

# The first lines of every /init: busybox applets, PATH, and the kernel's pseudo file systems.
INIT_PROLOGUE = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
"""


class InitramfsError(RuntimeError):
    """The initramfs could not be built (missing busybox, module, ...)."""


def modinfo(ko: bytes) -> dict[str, str]:
    """``key=value`` strings of a module's .modinfo section (first occurrence of each key)."""
    out: dict[str, str] = {}
    for m in re.finditer(rb"(?:^|\x00)([a-z_]+)=([^\x00]*)", ko):
        key = m[1].decode()
        if key in ("name", "depends", "vermagic", "license") and key not in out:
            out[key] = m[2].decode(errors="replace")
    return out


def read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def module_name(path: Path) -> str:
    name = path.name
    for suffix in (".xz", ".zst", ".gz"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".ko").replace("-", "_")


def resolve_modules(tree: Path, wanted: list[str]) -> list[tuple[str, bytes]]:
    """(name, decompressed .ko) for ``wanted`` and their dependencies, dependencies first."""
    index = {module_name(p): p for p in tree.rglob("*.ko*")}
    order: list[tuple[str, bytes]] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in done:
            return
        if name in chain:
            raise InitramfsError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in index:
            raise InitramfsError(
                f"module {name!r} (needed by {chain[-1] if chain else 'the guest'}) "
                f"is not in {tree}")
        data = read_module(index[name])
        for dep in filter(None, modinfo(data).get("depends", "").split(",")):
            visit(dep, (*chain, name))
        done.add(name)
        order.append((name, data))

    for name in wanted:
        visit(name, ())
    return order


def _cpio_entry(name: str, mode: int, data: bytes, ino: int, rdev: tuple[int, int]) -> bytes:
    """One ``newc`` cpio record (uid/gid 0, mtime 0)."""
    namez = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(namez), 0)
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + namez
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def cpio_newc(entries: list[Entry], devices: dict[str, tuple[int, int]] | None = None) -> bytes:
    """An uncompressed newc archive of (path, mode, content); symlinks carry the target,
    device nodes take (major, minor) from ``devices``."""
    devices = devices or {}
    out = [_cpio_entry(name, mode, data, i + 1, devices.get(name, (0, 0)))
           for i, (name, mode, data) in enumerate(entries)]
    out.append(_cpio_entry("TRAILER!!!", 0, b"", 0, (0, 0)))
    return b"".join(out)


def find_busybox() -> Path:
    for cand in BUSYBOX_CANDIDATES:
        p = Path(cand)
        if p.is_file():
            return p
    found = shutil.which("busybox")
    if found:
        return Path(found)
    raise InitramfsError("busybox not found: install busybox-static (scripts/setup --test)")


def write_busybox_image(init: str, extra: list[Entry], out: Path,
                        modules: list[tuple[str, bytes]] | None = None) -> Path:
    """Write an initramfs (uncompressed newc: the kernel loads it as is) holding a static
    busybox as /bin/sh, /dev/console, the ``init`` script, ``modules`` under /lib/modules
    and the ``extra`` entries (their parent directories must be listed before them)."""
    bb = find_busybox()
    entries: list[Entry] = [
        ("bin", DIR, b""), ("lib", DIR, b""), ("lib/modules", DIR, b""), ("dev", DIR, b""),
        ("dev/console", stat.S_IFCHR | 0o600, b""),
        ("bin/busybox", EXEC, bb.read_bytes()),
        ("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
        ("init", EXEC, init.encode()),
        *extra,
    ]
    entries += [(f"lib/modules/{name}.ko", FILE, data) for name, data in modules or []]
    out.write_bytes(cpio_newc(entries, {"dev/console": (5, 1)}))
    return out
