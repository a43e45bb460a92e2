"""A hostile or broken config file is a clear ConfigError naming the file, never a hang,
a traceback or an exception of another kind; the loader's bounds hold."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from vmm_tierd.service.config import ConfigError, load_settings
from vmm_tierd.service.loader import MAX_CONFIG_BYTES, MAX_NESTING, check_nesting

GOOD = '[tracking]\ninterval = "1s"\n[[region]]\nsize = "16MiB"\n'


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        load_settings(path)
    return ei.value.errors


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmm_tierd.cli", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60)


def nested_inline(nbytes: int) -> str:
    depth = (nbytes - 8) // 5
    return "a = " + "{b=" * depth + "1" + "}" * depth + "\n"


HOSTILE = {
    # 80 kB of nested inline tables: tomllib used to raise RecursionError
    "nested-inline-80k": (nested_inline(80_000), "nested more than 16 levels"),
    "nested-arrays": ("a = " + "[" * 5000 + "]" * 5000 + "\n", "nested more than 16 levels"),
    # a dotted key of many parts: tomllib's work grows with the square of the parts
    # (100,000 parts took > 24 GB); 5,000 parts show the bound without that risk
    "dotted-key": ("a" + ".a" * 5000 + " = 1\n", "more than 16 dotted parts"),
    "dotted-header": ("[" + "a." * 5000 + "a]\n", "more than 16 dotted parts"),
    "dotted-in-inline": ("x = {" + "a." * 100 + "a = 1}\n", "more than 16 dotted parts"),
    # tomllib raises a plain ValueError here: the catch-all names it
    "huge-integer": ("[tracking]\nmin_age = " + "9" * 5000 + "\n", "cannot parse: ValueError"),
    "not-utf8": ("\udcff", "not UTF-8 text"),
    "unterminated": ('a = "x\n', "invalid TOML"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_files_are_config_errors_naming_the_file(name: str, tmp_path: Path) -> None:
    text, expect = HOSTILE[name]
    f = tmp_path / "c.toml"
    f.write_bytes(text.encode("utf-8", "surrogateescape"))
    errs = errors_of(f)
    assert any(e.startswith(f"{f}: ") and expect in e for e in errs), errs
    r = check_config(f)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and expect in r.stderr, r.stderr


def test_the_bounds_let_real_configs_through(tmp_path: Path) -> None:
    # strings, comments and numbers with dots and brackets are not nesting or key parts
    text = ('# [[[[ a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q ]]]] {{{{\n'
            '[daemon]\nmetrics_listen = "127.0.0.1:0" # a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q\n'
            "[store]\npath = '" + "/x.y" * 20 + "'\n"
            '[tracking]\ninterval = 0.5\n'
            '[[region]]\nname = "a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q"\nsize = "16MiB"\n'
            '[region.workload]\nhot_fraction = 0.25\nwrite_fraction = 0.5\n')
    f = tmp_path / "ok.toml"
    f.write_text(text)
    s = load_settings(f)
    assert s.regions[0].name == "a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q"
    assert s.store.path == Path("/x.y" * 20)
    check_nesting("a = " + "[" * MAX_NESTING + "]" * MAX_NESTING, "x")
    check_nesting("a" + ".a" * (MAX_NESTING - 1) + " = 1", "x")
    check_nesting('a = """ [[[[[[[[[[[[[[[[[[[[ \\""" """\nb = \'\'\'{{{{{{{{{{{{{{{{{{{\'\'\'',
                  "x")
    with pytest.raises(ConfigError):
        check_nesting("a" + ".a" * MAX_NESTING + " = 1", "x")


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "c.toml"
    os.mkfifo(fifo)
    out: list[list[str]] = []
    t = threading.Thread(target=lambda: out.append(errors_of(fifo)), daemon=True)
    t.start()
    t.join(30)  # a bound on a hang (there is no writer), not a measurement
    assert not t.is_alive(), "load_settings blocked on a FIFO"
    assert out[0] == [f"{fifo}: cannot read: it is a FIFO, not a regular file"]


def test_symlinks_directories_and_missing_files(tmp_path: Path) -> None:
    real = tmp_path / "real.toml"
    real.write_text(GOOD)
    link = tmp_path / "link.toml"
    link.symlink_to(real)
    errs = errors_of(link)
    assert errs[0].startswith(f"{link}: cannot read: it is a symbolic link") and str(real) in \
        errs[0], errs
    assert errors_of(tmp_path) == [f"{tmp_path}: cannot read: it is a directory, not a "
                                   "regular file"]
    missing = tmp_path / "missing.toml"
    assert errors_of(missing) == [f"{missing}: cannot read: No such file or directory (ENOENT)"]
    assert load_settings(real).regions[0].size_bytes == 16 << 20


def test_size_bound_and_the_100000_region_file(tmp_path: Path) -> None:
    big = tmp_path / "big.toml"
    big.write_text("".join(f'[[region]]\nname = "g{i}"\nsize = "4KiB"\n'
                           for i in range(100_000)))
    assert big.stat().st_size > MAX_CONFIG_BYTES
    errs = errors_of(big)
    assert errs == [f"{big}: cannot read: {big.stat().st_size} bytes is larger than a config "
                    f"may be ({MAX_CONFIG_BYTES} bytes)"]
    # within the size bound, too many regions are one error, not one per region
    many = tmp_path / "many.toml"
    many.write_text("".join("[[region]]\nsize = 1\n" for _ in range(20_000)))
    assert errors_of(many) == [f"{many}: region: must have between 1 and 64 entries, "
                               "got 20000"]


def test_long_values_in_errors_are_cut(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[tracking]\ninterval = "' + "x" * 10_000 + '"\n[[region]]\nsize = 4096\n')
    (err,) = errors_of(f)
    assert err.endswith('got "' + 'x' * 76 + '...'), err
    assert len(err) < 400
