"""Fixtures for the tests that reach into the target process (tests/remote/target.c):
``lk`` (a LinuxKernel), ``target`` (a running target), ``proc`` (a LinuxProcess on it),
``space`` (a RemoteSpace on it). Loaded by tests/conftest.py; imports of the native
module happen inside the fixtures, so collecting other tests never needs it."""

from __future__ import annotations

import faulthandler
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from .target import Target

if TYPE_CHECKING:
    from vmm_tierd.kernel.linux import LinuxKernel
    from vmm_tierd.kernel.linux_process import LinuxProcess
    from vmm_tierd.kernel.remote import RemoteSpace

RAM = 16 << 20  # 4096 pages


@pytest.fixture
def lk() -> Iterator[LinuxKernel]:
    if os.geteuid() != 0:
        pytest.skip("ptrace, pidfd_getfd and process_vm_writev on another process need root")
    from vmm_tierd.kernel.linux import LinuxKernel

    faulthandler.dump_traceback_later(120, exit=True)  # a hang dumps tracebacks and exits
    kern = LinuxKernel()
    yield kern
    kern.close()
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def target(lk: LinuxKernel) -> Iterator[Target]:
    t = Target.start(RAM, vcpus=2)
    yield t
    t.close()


@pytest.fixture
def proc(lk: LinuxKernel, target: Target) -> Iterator[LinuxProcess]:
    from vmm_tierd.kernel.linux_process import LinuxProcess

    p = lk.open_process(target.pid)
    assert isinstance(p, LinuxProcess)
    yield p
    p.close()


@pytest.fixture
def space(proc: LinuxProcess) -> Iterator[RemoteSpace]:
    from vmm_tierd.kernel.remote import RemoteSpace

    s = RemoteSpace(proc)
    yield s
    if proc.alive():
        s.release()
