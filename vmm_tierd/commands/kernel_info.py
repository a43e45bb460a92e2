"""``vmm-tierd kernel-info``: the uffd features a kernel backend grants and the strategy."""

from __future__ import annotations

import argparse
import json
import sys

from vmm_tierd.kernel import KernelError, open_kernel, uapi
from vmm_tierd.service.access import describe, explain_open_failure, permission_hint

BACKEND_CHOICES = ("linux", "fake", "fake-rwp", "fake-rfc")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--backend", default="linux", choices=BACKEND_CHOICES,
                   help="kernel backend to probe (default: linux)")


def ioctl_names(ioctls: int) -> list[str]:
    by_bit = {bit: name for name, bit in uapi.IOCTL_BIT.items()}
    return [by_bit.get(bit, f"bit{bit}") for bit in range(64) if ioctls >> bit & 1]


def main(args: argparse.Namespace) -> int:
    try:
        kernel = open_kernel(args.backend)
    except (KernelError, OSError) as e:
        print(f"vmm-tierd kernel-info: {explain_open_failure(args.backend, e)}",
              file=sys.stderr)
        return 1
    try:
        caps = kernel.capabilities()
    except KernelError as e:
        print(f"vmm-tierd kernel-info: probing {args.backend} failed: {describe(e)}"
              f"{permission_hint(e)}", file=sys.stderr)
        return 1
    finally:
        kernel.close()
    if args.json:
        out = caps.as_dict()
        out["ioctl_names"] = ioctl_names(caps.ioctls)
        print(json.dumps(out, indent=2))
        return 0
    strategy = caps.strategy.value if caps.strategy else "none (unsupported)"
    print(f"backend:  {caps.backend}")
    print(f"release:  {caps.release}")
    print(f"dialect:  {caps.dialect.value}")
    print(f"features: 0x{caps.features:x}")
    for name in caps.feature_names:
        print(f"  {name}")
    print(f"ioctls:   0x{caps.ioctls:x} ({', '.join(ioctl_names(caps.ioctls))})")
    print(f"strategy: {strategy}")
    print(f"reason:   {caps.reason}")
    return 0
