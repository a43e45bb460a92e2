"""cffi API-mode build of vmm_tierd._native, run by setup.py at install time.

Every ``native/<unit>.c`` is listed in UNITS and compiled into the one module. A unit
Python calls has ``<unit>.h`` (included by the module) and ``<unit>.cdef`` (the
declarations Python may call; all cdefs are concatenated in UNITS order, so a unit's
types come before the units that use them). A unit without them (guest_sig) is internal:
the guest units share it through ``guest_internal.h``, which cffi never sees.
cffi releases the GIL around every call, which is what lets C touch uffd-registered
memory (and block on a fault) while the trio loop in the same process serves it.
"""

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
UNITS = ["kernel", "process", "guest", "guest_sig", "guest_access", "guest_workload",
         "guest_verify", "store_io"]

_unlisted = sorted({p.stem for p in HERE.glob("*.c")} - set(UNITS))
if _unlisted:
    raise SystemExit(f"native/build.py: {_unlisted} not in UNITS")
_public = [u for u in UNITS if (HERE / f"{u}.cdef").exists()]
for _u in _public:
    if not (HERE / f"{_u}.h").exists():
        raise SystemExit(f"native/build.py: {_u}.cdef without {_u}.h")

ffibuilder = FFI()
ffibuilder.cdef("\n".join((HERE / f"{u}.cdef").read_text() for u in _public))
ffibuilder.set_source(
    "vmm_tierd._native",
    "\n".join(f'#include "{u}.h"' for u in _public),
    sources=[os.path.relpath(HERE / f"{u}.c") for u in UNITS],  # setuptools: relative only
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-pthread"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
