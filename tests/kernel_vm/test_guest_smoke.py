"""Smoke test of the guest itself: runs only inside the kernel_vm guest (VMM_TIERD_GUEST=1).

Checks what every other guest test relies on: a >= 7.3 kernel, /dev/userfaultfd, the RWP
feature bits granted by UFFDIO_API, and a root that can be written without touching the host.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import platform
import re
import struct
import tempfile

import pytest

from vmm_tierd.kernel import uapi

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(os.environ.get("VMM_TIERD_GUEST") != "1",
                       reason="only inside the kernel_vm guest"),
]


def test_kernel_is_at_least_7_3() -> None:
    m = re.match(r"(\d+)\.(\d+)", platform.release())
    assert m, platform.release()
    assert (int(m[1]), int(m[2])) >= (7, 3), platform.release()


def test_uffdio_api_grants_rwp() -> None:
    fd = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    try:
        uffd = fcntl.ioctl(fd, uapi.USERFAULTFD_IOC_NEW, 0)
    finally:
        os.close(fd)
    try:
        want = uapi.UFFD_FEATURE_RWP | uapi.UFFD_FEATURE_RWP_ASYNC
        buf = bytearray(struct.pack("QQQ", uapi.UFFD_API, want, 0))
        fcntl.ioctl(uffd, uapi.UFFDIO_API, buf)
        _, features, _ = struct.unpack("QQQ", buf)
        assert features & want == want, hex(features)
    finally:
        os.close(uffd)


def test_userfaultfd_syscall_works_as_root() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    nr_userfaultfd = 323  # x86_64
    fd = libc.syscall(nr_userfaultfd, os.O_CLOEXEC | os.O_NONBLOCK)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    os.close(fd)


def test_root_is_writable_in_guest_only() -> None:
    # The host's root is shared read-only; the guest writes to a tmpfs overlay on top.
    with tempfile.NamedTemporaryFile(dir=os.getcwd(), prefix=".kernel_vm-probe-") as f:
        f.write(b"guest")
        f.flush()
        assert os.path.getsize(f.name) == 5
