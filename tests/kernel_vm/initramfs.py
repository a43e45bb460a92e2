"""Build the pytest guest's initramfs: the 9p/overlay modules and an /init that chroots into
the host's root (shared read-only) and runs pytest there. Generic pieces: ``image.py``.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from .image import FILE, INIT_PROLOGUE, write_busybox_image


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
    return INIT_PROLOGUE + f"""mkdir -p /host /newroot
fail() {{ echo "guest setup failed: $1"; {say("SETUP-FAILED")}; poweroff -f; sleep 30; }}
mount -t tmpfs -o mode=1777 tmpfs /tmp
{say("INIT")}
# loopback, for tests that talk to a daemon's metrics or sockets (no network otherwise)
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up || echo "loopback: not up"
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
    """Write the initramfs cpio to ``out``."""
    run = ("kvm-run.sh", FILE, run_script(plan).encode())
    return write_busybox_image(init_script(plan), [run], out, modules)
