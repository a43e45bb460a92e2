"""Kernel backends behind one Protocol (see api.py)."""

from __future__ import annotations

from .api import Backend, Dialect, Kernel, KernelError


def open_kernel(backend: str, **kwargs: object) -> Backend:
    """Open a backend by name: ``linux``, ``fake`` (= ``fake-rwp``), ``fake-rwp``, ``fake-rfc``."""
    if backend == "linux":
        from .linux import LinuxKernel

        return LinuxKernel(**kwargs)  # type: ignore[arg-type]
    if backend in ("fake", "fake-rwp", "fake-rfc"):
        from .fake import FakeKernel

        dialect = Dialect.RFC if backend == "fake-rfc" else Dialect.RWP
        return FakeKernel(dialect=dialect, **kwargs)
    raise ValueError(f"unknown kernel backend {backend!r}; choose one of linux, fake, "
                     f"fake-rwp, fake-rfc")


__all__ = ["Backend", "Dialect", "Kernel", "KernelError", "open_kernel"]
