"""The ABI numbers in vmm_tierd/kernel/uapi.py, checked four independent ways:
the _IOC formula recomputed here, literal values, the 7.3 facts in
/work/shared/kernel-facts.md, and (where it has them) the installed kernel header.
The cffi struct layouts are checked against uapi.SIZEOF_* and the header too."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from vmm_tierd.kernel import uapi

FACTS = Path("/work/shared/kernel-facts.md")

# asm-generic/ioctl.h, written out again rather than imported from uapi.
_NONE, _W, _R = 0, 1, 2


def ioc(direction: int, typ: int, nr: int, size: int) -> int:
    assert 0 <= nr < 1 << 8 and 0 <= typ < 1 << 8 and 0 <= size < 1 << 14
    return direction << 30 | size << 16 | typ << 8 | nr


# name -> (direction, type, nr, struct size in bytes counted from the UAPI field lists)
ENCODINGS = {
    "UFFDIO_API": (_R | _W, 0xAA, 0x3F, 3 * 8),
    "UFFDIO_REGISTER": (_R | _W, 0xAA, 0x00, 4 * 8),
    "UFFDIO_UNREGISTER": (_R, 0xAA, 0x01, 2 * 8),
    "UFFDIO_WAKE": (_R, 0xAA, 0x02, 2 * 8),
    "UFFDIO_COPY": (_R | _W, 0xAA, 0x03, 5 * 8),
    "UFFDIO_ZEROPAGE": (_R | _W, 0xAA, 0x04, 4 * 8),
    "UFFDIO_MOVE": (_R | _W, 0xAA, 0x05, 5 * 8),
    "UFFDIO_WRITEPROTECT": (_R | _W, 0xAA, 0x06, 3 * 8),
    "UFFDIO_CONTINUE": (_R | _W, 0xAA, 0x07, 4 * 8),
    "UFFDIO_POISON": (_R | _W, 0xAA, 0x08, 4 * 8),
    "UFFDIO_RWPROTECT": (_R | _W, 0xAA, 0x09, 3 * 8),
    "UFFDIO_SET_MODE": (_W, 0xAA, 0x0A, 2 * 8),
    "UFFDIO_DEACTIVATE": (_R, 0xAA, 0x09, 2 * 8),
    "USERFAULTFD_IOC_NEW": (_NONE, 0xAA, 0x00, 0),
    "PAGEMAP_SCAN": (_R | _W, ord("f"), 16, 12 * 8),
}

LITERALS = {
    "UFFDIO_API": 0xC018AA3F,
    "UFFDIO_REGISTER": 0xC020AA00,
    "UFFDIO_UNREGISTER": 0x8010AA01,
    "UFFDIO_WAKE": 0x8010AA02,
    "UFFDIO_COPY": 0xC028AA03,
    "UFFDIO_ZEROPAGE": 0xC020AA04,
    "UFFDIO_MOVE": 0xC028AA05,
    "UFFDIO_WRITEPROTECT": 0xC018AA06,
    "UFFDIO_CONTINUE": 0xC020AA07,
    "UFFDIO_POISON": 0xC020AA08,
    "UFFDIO_RWPROTECT": 0xC018AA09,
    "UFFDIO_SET_MODE": 0x4010AA0A,
    "UFFDIO_DEACTIVATE": 0x8010AA09,
    "USERFAULTFD_IOC_NEW": 0xAA00,
    "PAGEMAP_SCAN": 0xC0606610,
}

# cffi struct name -> uapi size constant
STRUCTS = {
    "uffdio_api": "SIZEOF_UFFDIO_API",
    "uffdio_range": "SIZEOF_UFFDIO_RANGE",
    "uffdio_register": "SIZEOF_UFFDIO_REGISTER",
    "uffdio_copy": "SIZEOF_UFFDIO_COPY",
    "uffdio_zeropage": "SIZEOF_UFFDIO_ZEROPAGE",
    "uffdio_writeprotect": "SIZEOF_UFFDIO_WRITEPROTECT",
    "uffdio_continue": "SIZEOF_UFFDIO_CONTINUE",
    "uffdio_move": "SIZEOF_UFFDIO_MOVE",
    "uffdio_poison": "SIZEOF_UFFDIO_POISON",
    "uffdio_rwprotect": "SIZEOF_UFFDIO_RWPROTECT",
    "uffdio_set_mode": "SIZEOF_UFFDIO_SET_MODE",
    "uffd_msg_raw": "SIZEOF_UFFD_MSG",
    "pm_scan_arg": "SIZEOF_PM_SCAN_ARG",
    "page_region": "SIZEOF_PAGE_REGION",
}


@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_ioctl_formula(name: str) -> None:
    assert getattr(uapi, name) == ioc(*ENCODINGS[name]), hex(getattr(uapi, name))


@pytest.mark.parametrize("name", sorted(LITERALS))
def test_ioctl_literal(name: str) -> None:
    assert getattr(uapi, name) == LITERALS[name], f"{hex(getattr(uapi, name))}"
    assert ioc(*ENCODINGS[name]) == LITERALS[name]


def test_rfc_deactivate_differs_from_rwprotect() -> None:
    # Same nr 0x09, different direction and size: a real kernel must never see it.
    assert uapi.UFFDIO_DEACTIVATE != uapi.UFFDIO_RWPROTECT
    assert uapi.UFFDIO_DEACTIVATE & 0xFF == uapi.UFFDIO_RWPROTECT & 0xFF == 0x09


def test_ioctl_bits_match_nr() -> None:
    for name, bit in uapi.IOCTL_BIT.items():
        assert getattr(uapi, f"UFFDIO_{name}") & 0xFF == bit, name


# ---- cffi layouts ---------------------------------------------------------------------
def _ffi() -> Any:
    native = pytest.importorskip("vmm_tierd._native")
    return native.ffi


@pytest.mark.parametrize("struct", sorted(STRUCTS))
def test_cffi_struct_size(struct: str) -> None:
    assert _ffi().sizeof(f"struct {struct}") == getattr(uapi, STRUCTS[struct])


def test_cffi_result_field_offsets() -> None:
    ffi = _ffi()
    assert ffi.offsetof("struct uffdio_copy", "copy") == 32
    assert ffi.offsetof("struct uffdio_move", "move") == 32
    assert ffi.offsetof("struct uffdio_zeropage", "zeropage") == 24
    assert ffi.offsetof("struct uffdio_continue", "mapped") == 24
    assert ffi.offsetof("struct uffdio_poison", "updated") == 24
    assert ffi.offsetof("struct uffdio_register", "ioctls") == 24
    assert ffi.offsetof("struct uffdio_rwprotect", "mode") == 16
    assert ffi.offsetof("struct pm_scan_arg", "walk_end") == 32
    assert ffi.offsetof("struct pm_scan_arg", "return_mask") == 88


# ---- kernel-facts.md (the 7.3 UAPI as read from linux-libc-dev 7.3) ---------------------
def _facts() -> str:
    if not FACTS.exists():
        pytest.skip(f"{FACTS} not present")
    return FACTS.read_text()


# How the facts file spells a name -> the uapi attribute it must equal.
FACT_ALIASES = {
    "_DONTWAKE": "UFFDIO_RWPROTECT_MODE_DONTWAKE",
    "ALLOW_SRC_HOLES": "UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES",
    "WP_ASYNC": "UFFD_FEATURE_WP_ASYNC",
    "WP_UNPOPULATED": "UFFD_FEATURE_WP_UNPOPULATED",
    "POISON": "UFFD_FEATURE_POISON",
}


def test_facts_bits() -> None:
    text = _facts()
    # `NAME` = 1<<N   and   `NAME` (1<<N)
    found = re.findall(r"`(\w+)`\s*(?:=\s*|\()1<<(\d+)", text)
    found += re.findall(r"`(\w+)`\s*=\s*(0x[0-9A-Fa-f]+)`?", text)
    assert len(found) >= 12, found
    checked = set()
    for name, value in found:
        attr = FACT_ALIASES.get(name, name)
        expected = int(value, 16) if value.startswith("0x") else 1 << int(value)
        assert hasattr(uapi, attr), f"kernel-facts names {name}, uapi lacks {attr}"
        assert getattr(uapi, attr) == expected, f"{name}: uapi {getattr(uapi, attr):#x}"
        checked.add(attr)
    for must in ("UFFD_FEATURE_RWP", "UFFD_FEATURE_RWP_ASYNC", "UFFDIO_REGISTER_MODE_RWP",
                 "UFFD_PAGEFAULT_FLAG_RWP", "UFFDIO_RWPROTECT_MODE_RWP", "PAGE_IS_ACCESSED",
                 "_UFFDIO_RWPROTECT", "_UFFDIO_SET_MODE", "UFFD_FEATURE_MOVE"):
        assert must in checked, f"{must} not found in {FACTS}"


def test_facts_ioctl_definitions() -> None:
    text = _facts()
    ffi = _ffi()
    defs = re.findall(r"`(\w+) = _IO(WR|R|W)?\((0x[0-9A-Fa-f]+|'\w'), (0x[0-9A-Fa-f]+|\d+), "
                      r"struct (\w+)", text)
    assert {d[0] for d in defs} >= {"UFFDIO_RWPROTECT", "UFFDIO_SET_MODE"}, defs
    dirs = {"WR": _R | _W, "R": _R, "W": _W}
    for name, d, typ, nr, struct in defs:
        t = ord(typ[1]) if typ.startswith("'") else int(typ, 16)
        expected = ioc(dirs[d], t, int(nr, 0), ffi.sizeof(f"struct {struct}"))
        assert getattr(uapi, name) == expected, name
    # The bare `_IOWR('f', 16, struct pm_scan_arg)` and `_IOWR(0xAA, 0x05, ...)` mentions.
    assert "_IOWR('f', 16, struct pm_scan_arg)" in text
    assert uapi.PAGEMAP_SCAN == ioc(_R | _W, ord("f"), 16, ffi.sizeof("struct pm_scan_arg"))
    assert "_IOWR(0xAA, 0x05, struct uffdio_move" in text


def test_facts_host_features() -> None:
    text = _facts()
    m = re.search(r"`UFFDIO_API` grants features `(0x[0-9a-f]+)`", text)
    assert m, "host feature line not found"
    granted = int(m.group(1), 16)
    assert granted == (uapi.UFFD_FEATURE_MOVE << 1) - 1  # every bit up to MOVE
    assert set(uapi.FEATURE_NAMES_COMMON) == {1 << b for b in range(17)}


# ---- the installed header (6.1-era: has some, not all) ----------------------------------
HEADER_MACROS = [
    "UFFDIO_API", "UFFDIO_REGISTER", "UFFDIO_UNREGISTER", "UFFDIO_WAKE", "UFFDIO_COPY",
    "UFFDIO_ZEROPAGE", "UFFDIO_MOVE", "UFFDIO_WRITEPROTECT", "UFFDIO_CONTINUE",
    "UFFDIO_POISON", "UFFDIO_RWPROTECT", "UFFDIO_SET_MODE", "USERFAULTFD_IOC_NEW",
    "PAGEMAP_SCAN", "UFFD_API", "UFFD_USER_MODE_ONLY",
    "UFFDIO_REGISTER_MODE_MISSING", "UFFDIO_REGISTER_MODE_WP", "UFFDIO_REGISTER_MODE_MINOR",
    "UFFDIO_REGISTER_MODE_RWP", "UFFDIO_COPY_MODE_DONTWAKE", "UFFDIO_COPY_MODE_WP",
    "UFFDIO_ZEROPAGE_MODE_DONTWAKE", "UFFDIO_WRITEPROTECT_MODE_WP",
    "UFFDIO_WRITEPROTECT_MODE_DONTWAKE", "UFFDIO_CONTINUE_MODE_DONTWAKE",
    "UFFDIO_CONTINUE_MODE_WP", "UFFDIO_POISON_MODE_DONTWAKE", "UFFDIO_MOVE_MODE_DONTWAKE",
    "UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES", "UFFDIO_RWPROTECT_MODE_RWP",
    "UFFDIO_RWPROTECT_MODE_DONTWAKE", "UFFD_EVENT_PAGEFAULT", "UFFD_EVENT_FORK",
    "UFFD_EVENT_REMAP", "UFFD_EVENT_REMOVE", "UFFD_EVENT_UNMAP",
    "UFFD_PAGEFAULT_FLAG_WRITE", "UFFD_PAGEFAULT_FLAG_WP", "UFFD_PAGEFAULT_FLAG_MINOR",
    "UFFD_PAGEFAULT_FLAG_RWP", "PM_SCAN_WP_MATCHING", "PM_SCAN_CHECK_WPASYNC",
    "PAGE_IS_WPALLOWED", "PAGE_IS_WRITTEN", "PAGE_IS_FILE", "PAGE_IS_PRESENT",
    "PAGE_IS_SWAPPED", "PAGE_IS_PFNZERO", "PAGE_IS_HUGE", "PAGE_IS_SOFT_DIRTY",
    "PAGE_IS_GUARD", "PAGE_IS_ACCESSED", "FALLOC_FL_KEEP_SIZE", "FALLOC_FL_PUNCH_HOLE",
    *(f"UFFD_FEATURE_{n}" for n in uapi.FEATURE_NAMES_RWP.values()),
]
# struct -> (uapi size constant, fields whose offsets must match cffi)
HEADER_STRUCTS = {
    "uffdio_api": ("SIZEOF_UFFDIO_API", ["features", "ioctls"]),
    "uffdio_range": ("SIZEOF_UFFDIO_RANGE", ["len"]),
    "uffdio_register": ("SIZEOF_UFFDIO_REGISTER", ["mode", "ioctls"]),
    "uffdio_copy": ("SIZEOF_UFFDIO_COPY", ["mode", "copy"]),
    "uffdio_zeropage": ("SIZEOF_UFFDIO_ZEROPAGE", ["mode", "zeropage"]),
    "uffdio_writeprotect": ("SIZEOF_UFFDIO_WRITEPROTECT", ["mode"]),
    "uffdio_continue": ("SIZEOF_UFFDIO_CONTINUE", ["mode", "mapped"]),
    "uffdio_move": ("SIZEOF_UFFDIO_MOVE", ["mode", "move"]),
    "uffdio_poison": ("SIZEOF_UFFDIO_POISON", ["mode", "updated"]),
    "uffdio_rwprotect": ("SIZEOF_UFFDIO_RWPROTECT", ["mode"]),
    "uffdio_set_mode": ("SIZEOF_UFFDIO_SET_MODE", ["disable"]),
    "uffd_msg": ("SIZEOF_UFFD_MSG", []),
    "pm_scan_arg": ("SIZEOF_PM_SCAN_ARG", ["walk_end", "return_mask"]),
    "page_region": ("SIZEOF_PAGE_REGION", ["categories"]),
}
# Which header macro guards each struct (the struct exists iff its ioctl does).
STRUCT_GUARD = {
    "uffdio_move": "UFFDIO_MOVE", "uffdio_poison": "UFFDIO_POISON",
    "uffdio_continue": "UFFDIO_CONTINUE", "uffdio_writeprotect": "UFFDIO_WRITEPROTECT",
    "uffdio_rwprotect": "UFFDIO_RWPROTECT", "uffdio_set_mode": "UFFDIO_SET_MODE",
    "pm_scan_arg": "PAGEMAP_SCAN", "page_region": "PAGEMAP_SCAN",
}
# uffd_msg offsets the Python decoder ("<B7xQQQ") relies on.
MSG_OFFSETS = {
    "arg.pagefault.flags": 8, "arg.pagefault.address": 16, "arg.pagefault.feat.ptid": 24,
    "arg.fork.ufd": 8, "arg.remap.from": 8, "arg.remap.to": 16, "arg.remap.len": 24,
    "arg.remove.start": 8, "arg.remove.end": 16,
}


@pytest.fixture(scope="module")
def header_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    if not Path("/usr/include/linux/userfaultfd.h").exists():
        pytest.skip("no /usr/include/linux/userfaultfd.h")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/userfaultfd.h>",
             "#include <linux/fs.h>", "#include <linux/falloc.h>", "int main(void) {"]
    for m in HEADER_MACROS:
        lines.append(f'#ifdef {m}\nprintf("{m} %llu\\n", (unsigned long long)({m}));\n#endif')
    for s, (_, fields) in HEADER_STRUCTS.items():
        body = [f'printf("sizeof:{s} %zu\\n", sizeof(struct {s}));']
        body += [f'printf("offsetof:{s}.{f} %zu\\n", offsetof(struct {s}, {f}));'
                 for f in fields]
        guard = STRUCT_GUARD.get(s)
        text = "\n".join(body)
        lines.append(f"#ifdef {guard}\n{text}\n#endif" if guard else text)
    for f, _ in MSG_OFFSETS.items():
        lines.append(f'printf("msg:{f} %zu\\n", offsetof(struct uffd_msg, {f}));')
    lines.append("return 0; }")
    d = tmp_path_factory.mktemp("hdr")
    (d / "probe.c").write_text("\n".join(lines))
    subprocess.run([cc, "-o", str(d / "probe"), str(d / "probe.c")], check=True,
                   capture_output=True, timeout=60)
    out = subprocess.run([str(d / "probe")], check=True, capture_output=True, text=True,
                         timeout=10).stdout
    return {k: int(v) for k, v in (ln.split() for ln in out.splitlines())}


def test_header_macros(header_values: dict[str, int]) -> None:
    present = [m for m in HEADER_MACROS if m in header_values]
    # A 6.1 header has the classic ioctls and features at least.
    assert {"UFFDIO_API", "UFFDIO_COPY", "UFFD_FEATURE_THREAD_ID"} <= set(present)
    for m in present:
        name = m.removeprefix("UFFD_FEATURE_") if m.startswith("UFFD_FEATURE_") else None
        if name is not None:
            bit = {v: k for k, v in uapi.FEATURE_NAMES_RWP.items()}[name]
            assert header_values[m] == bit, m
        else:
            assert header_values[m] == getattr(uapi, m), m


def test_header_structs(header_values: dict[str, int]) -> None:
    ffi = _ffi()
    assert header_values["sizeof:uffdio_copy"] == uapi.SIZEOF_UFFDIO_COPY
    for s, (size_name, fields) in HEADER_STRUCTS.items():
        if f"sizeof:{s}" not in header_values:
            continue
        assert header_values[f"sizeof:{s}"] == getattr(uapi, size_name), s
        cffi_name = "uffd_msg_raw" if s == "uffd_msg" else s
        for f in fields:
            assert header_values[f"offsetof:{s}.{f}"] == ffi.offsetof(f"struct {cffi_name}",
                                                                      f), (s, f)


def test_header_msg_layout(header_values: dict[str, int]) -> None:
    for f, off in MSG_OFFSETS.items():
        assert header_values[f"msg:{f}"] == off, f
