"""cffi API-mode build of vmm_tierd._native, run by setup.py at install time.

Each C unit in native/ has a matching ``.cdef`` with the declarations Python may call.
cffi releases the GIL around every call, which is what lets C touch uffd-registered
memory (and block on a fault) while the trio loop in the same process serves it.
"""

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
UNITS = ["kernel", "guest"]

ffibuilder = FFI()
ffibuilder.cdef("\n".join((HERE / f"{u}.cdef").read_text() for u in UNITS))
ffibuilder.set_source(
    "vmm_tierd._native",
    "\n".join(f'#include "{u}.h"' for u in UNITS),
    sources=[os.path.relpath(HERE / f"{u}.c") for u in UNITS],  # setuptools: relative only
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-pthread"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
