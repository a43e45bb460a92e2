"""Why a kernel backend could not be opened, said so that the reader can fix it."""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat

DEVICE = "/dev/userfaultfd"
SYSCTL = "/proc/sys/vm/unprivileged_userfaultfd"


def _device_state() -> str:
    try:
        st = os.stat(DEVICE)
    except OSError as e:
        return f"{DEVICE} is missing ({e.strerror})"
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{DEVICE} is {stat.filemode(st.st_mode)} {owner}:{group}"


def _sysctl_state() -> str:
    try:
        with open(SYSCTL, encoding="ascii") as f:
            return f"vm.unprivileged_userfaultfd is {f.read().strip()}"
    except OSError:
        return "vm.unprivileged_userfaultfd is not readable"


def permission_hint(e: BaseException) -> str:
    """For EPERM/EACCES: what userfaultfd needs and what this process has; else ""."""
    if getattr(e, "errno", None) not in (errno.EPERM, errno.EACCES):
        return ""
    return (f". userfaultfd needs one of: root; read and write access to {DEVICE}; or the "
            f"sysctl vm.unprivileged_userfaultfd=1. Here, uid {os.geteuid()}: "
            f"{_device_state()}, {_sysctl_state()}")


def describe(e: BaseException) -> str:
    """An OSError without its ``[Errno N]`` prefix (KernelError already names the errno)."""
    return (e.strerror or str(e)) if isinstance(e, OSError) else str(e)


def explain_open_failure(backend: str, e: BaseException) -> str:
    """``cannot open the linux backend: ...`` and, for a permission error, what is needed."""
    return f"cannot open the {backend} backend: {describe(e)}{permission_hint(e)}"
