"""Build the guest's initramfs: static busybox, the 9p/overlay modules and an /init script.

The kernel package ships no modules.dep (depmod runs at install time), so dependencies come
from each module's own ``.modinfo`` ``depends=`` field. Modules are .ko.xz; they are
decompressed here so busybox ``insmod`` can load them without a decompressor in the guest.
"""

from __future__ import annotations

import lzma
import re
import shlex
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")


class InitramfsError(RuntimeError):
    """The initramfs could not be built (missing busybox, module, ...)."""


@dataclass(frozen=True)
class GuestPlan:
    """What the guest's /init does."""

    token: str                 # per-run nonce in every marker line
    project: str               # the host checkout's path (same path inside the guest)
    python: str                # interpreter to run pytest with (a path inside the guest)
    pytest_args: list[str]
    modules: list[str]         # module file names in load order (under /lib/modules)
    env: dict[str, str]
    prelude: list[list[str]]   # commands run in the chroot before pytest (e.g. kernel-info)
    # Loaded after ``modules``, in order; a failed insmod is reported, not fatal.
    optional_modules: list[str] = field(default_factory=list)


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


def cpio_newc(entries: list[tuple[str, int, bytes]],
              devices: dict[str, tuple[int, int]] | None = None) -> bytes:
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


def marker(token: str, what: str) -> str:
    return f"@@KVM-{token} {what}@@"


def init_script(plan: GuestPlan) -> str:
    """The guest's /init (busybox sh). Every phase prints a marker the host parses."""
    t = plan.token

    def say(what: str) -> str:
        return f'echo "{marker(t, what)}"'

    insmods = "\n".join(f"insmod /lib/modules/{m}.ko || fail 'insmod {m}'" for m in plan.modules)
    insmods += "".join(f"\ninsmod /lib/modules/{m}.ko || echo 'insmod {m} failed (optional)'"
                       for m in plan.optional_modules)
    return f"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /host /newroot /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
fail() {{ echo "guest setup failed: $1"; {say("SETUP-FAILED")}; poweroff -f; sleep 30; }}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=1777 tmpfs /tmp
{say("INIT")}
echo "uname -r: $(uname -r)"
echo "/proc/version: $(cat /proc/version)"
echo "cpus: $(nproc)  $(grep MemTotal /proc/meminfo)"
{say("UNAME $(uname -r)")}
{insmods}
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /host \\
  || fail 'mount 9p hostroot'
mkdir -p /tmp/.kvm/upper /tmp/.kvm/work
if mount -t overlay overlay -o lowerdir=/host,upperdir=/tmp/.kvm/upper,workdir=/tmp/.kvm/work \\
  /newroot
then echo "root: host / over 9p (read-only) under a tmpfs overlay"
else echo "overlay failed; root: host / over 9p, read-only"; mount --bind /host /newroot
fi
for d in proc sys dev tmp; do mount --bind /$d /newroot/$d || fail "bind /$d"; done
# The checkout has its own share: CI may clone it under /tmp, which the guest's tmpfs hides.
proj={shlex.quote(plan.project)}; k=/tmp/.kvm
mkdir -p $k/proj $k/pupper $k/pwork "/newroot$proj"
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 project $k/proj \\
  || fail 'mount 9p project'
mount -t overlay overlay -o lowerdir=$k/proj,upperdir=$k/pupper,workdir=$k/pwork "/newroot$proj" \\
  || mount --bind $k/proj "/newroot$proj" || fail 'mount project'
mkdir -p /dev/shm /tmp/home
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm || true
if [ -c /dev/userfaultfd ]; then echo "/dev/userfaultfd present"
else echo "/dev/userfaultfd MISSING"; fi
if [ -c /dev/kvm ]; then echo "/dev/kvm present"; else echo "/dev/kvm MISSING"; fi
cp /kvm-run.sh /tmp/kvm-run.sh || fail 'copy run script'
{say("SETUP-DONE")}
chroot /newroot /bin/sh /tmp/kvm-run.sh </dev/null
rc=$?
{say("EXIT $rc")}
echo "--- guest kernel log, warnings and worse (quiet hides them from the console) ---"
dmesg -r | grep '^<[0-4]>' | tail -n 60
sync
poweroff -f
sleep 30
"""


def run_script(plan: GuestPlan) -> str:
    """Runs inside the chroot (the host's root): prelude commands, then pytest."""
    exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(plan.env.items()))
    prelude = "\n".join(
        " ".join(shlex.quote(a) for a in cmd) + ' || echo "(exit status $?)"'
        for cmd in plan.prelude)
    pytest = " ".join(shlex.quote(a) for a in
                      [plan.python, "-m", "pytest", "-p", "no:cacheprovider", *plan.pytest_args])
    return f"""cd {shlex.quote(plan.project)} || exit 97
{exports}
{prelude}
echo '{marker(plan.token, "TESTS-START")}'
exec {pytest}
"""


def build(plan: GuestPlan, modules: list[tuple[str, bytes]], out: Path) -> Path:
    """Write the initramfs cpio (uncompressed: the kernel loads it as is) to ``out``."""
    bb = find_busybox()
    d = stat.S_IFDIR | 0o755
    entries: list[tuple[str, int, bytes]] = [
        ("bin", d, b""), ("lib", d, b""), ("lib/modules", d, b""), ("dev", d, b""),
        ("dev/console", stat.S_IFCHR | 0o600, b""),
        ("bin/busybox", stat.S_IFREG | 0o755, bb.read_bytes()),
        ("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
        ("init", stat.S_IFREG | 0o755, init_script(plan).encode()),
        ("kvm-run.sh", stat.S_IFREG | 0o644, run_script(plan).encode()),
    ]
    entries += [(f"lib/modules/{name}.ko", stat.S_IFREG | 0o644, data)
                for name, data in modules]
    out.write_bytes(cpio_newc(entries, {"dev/console": (5, 1)}))
    return out
