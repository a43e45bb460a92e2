"""Reading a config file that anyone with write access to it may have crafted.

The daemon reads its config at start and on every SIGHUP, as root, next to guest memory.
So the loader accepts only what a config can reasonably be, and says why otherwise:

- a **regular file**, opened with ``O_NOFOLLOW | O_NONBLOCK`` and checked with ``fstat``
  before a byte is read: a FIFO would block the reader forever (with no writer, ``read``
  waits), a device could be endless, and a symlink may point anywhere;
- at most :data:`MAX_CONFIG_BYTES` bytes of UTF-8;
- **nesting** of at most :data:`MAX_NESTING` levels: ``[``/``{`` inside each other, and the
  parts of a dotted key or table header (``a.b.c``). ``tomllib`` parses nested arrays and
  inline tables by recursion (an 80 kB ``a = {b={b=...}}`` raised RecursionError), and its
  bookkeeping for a dotted key grows with the square of the key's parts (one key of
  100,000 parts, a 200 kB line, took more than 24 GB here before the OOM killer ended it).
  Both are checked on the text, before tomllib sees it.

Every failure is a :class:`ConfigError` naming the file, whatever went wrong inside.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tomllib
from collections.abc import Sequence
from typing import Any

MAX_CONFIG_BYTES = 1 << 20  # the commented example is 6 kB; 64 regions fit in ~100 kB
MAX_NESTING = 16  # the config's own keys are 3 deep (region.workload.seed)


class ConfigError(Exception):
    """One or more config problems; ``errors`` holds each full line."""

    def __init__(self, errors: Sequence[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = list(errors)


_KIND = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
         stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


def read_config_text(path: str | os.PathLike[str]) -> str:
    """The file's text, if it is a regular file of at most MAX_CONFIG_BYTES of UTF-8."""
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError([f"{name}: cannot read: it is a symbolic link (the config is "
                               f"read only from a regular file; give the path of the file "
                               f"itself: {os.path.realpath(name)})"]) from e
        code = errno.errorcode.get(e.errno or 0, str(e.errno))
        raise ConfigError([f"{name}: cannot read: {e.strerror} ({code})"]) from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = _KIND.get(stat.S_IFMT(st.st_mode), "not a regular file")
            raise ConfigError([f"{name}: cannot read: it is {kind}, not a regular file"])
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError([f"{name}: cannot read: {st.st_size} bytes is larger than a "
                               f"config may be ({MAX_CONFIG_BYTES} bytes)"])
        chunks: list[bytes] = []
        left = MAX_CONFIG_BYTES + 1  # the file may grow while it is read
        while left > 0:
            b = os.read(fd, min(left, 1 << 16))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        data = b"".join(chunks)
    except OSError as e:
        raise ConfigError([f"{name}: cannot read: {e}"]) from e
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{name}: cannot read: larger than a config may be "
                           f"({MAX_CONFIG_BYTES} bytes)"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{name}: cannot read: not UTF-8 text ({e.reason} at byte "
                           f"{e.start})"]) from e


# what the nesting scanner stops at; strings and comments are skipped whole
_TOKEN = re.compile(r"""["'#\[\]{}=,.\n]""")
_BASIC_END = re.compile(r'(?:[^"\\\n]|\\.)*"')
_ML_BASIC_END = re.compile(r'(?:[^"\\]|\\.|"(?!""))*"""', re.S)


def check_nesting(text: str, name: str, limit: int = MAX_NESTING) -> None:
    """ConfigError if brackets nest, or a key or table header has parts, beyond ``limit``.

    A small TOML tokenizer: it knows strings (the four kinds), comments, brackets and
    where a key is (line start at the top level, after ``{`` or ``,`` in an inline table,
    inside a table header), and counts dots only there, so ``1.5`` or ``"a.b"`` is not a
    key part. It only bounds; tomllib still decides what is valid TOML.
    """
    stack: list[str] = []  # "[" array, "{" inline table, "h" table header
    in_key, parts, line, i, n = True, 1, 1, 0, len(text)
    while i < n:
        m = _TOKEN.search(text, i)
        if m is None:
            return
        c, i = m.group(), m.end()
        if c == "\n":
            line += 1
            if not stack:
                in_key, parts = True, 1
        elif c == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif c in "\"'":
            i, line = _skip_string(text, i - 1, name, line)
        elif c in "[{":
            if c == "[" and not stack and in_key:
                c = "h"  # a table header ([x] or [[x]]): its name is a key
                if text.startswith("[", i):
                    i += 1
            else:
                in_key = c == "{"
                parts = 1
            stack.append(c)
            if len(stack) > limit:
                raise ConfigError([f"{name}: line {line}: nested more than {limit} levels "
                                   "deep (arrays and inline tables)"])
        elif c in "]}":
            if stack:
                stack.pop()
            in_key = False  # after a header or a value comes "," "}" or the line's end
        elif c == "=":
            in_key = False
        elif c == ",":
            in_key, parts = bool(stack) and stack[-1] == "{", 1
        elif c == "." and (in_key or (stack and stack[-1] == "h")):
            parts += 1
            if parts > limit:
                raise ConfigError([f"{name}: line {line}: a key or table name has more than "
                                   f"{limit} dotted parts"])


def _skip_string(text: str, start: int, name: str, line: int) -> tuple[int, int]:
    """Index after the string that starts at ``start``, and the line it ends on."""
    q = text[start]
    if text.startswith(q * 3, start):
        if q == '"':
            m = _ML_BASIC_END.match(text, start + 3)
            end = m.end() if m else -1
        else:
            j = text.find("'''", start + 3)
            end = j + 3 if j >= 0 else -1
        if end < 0:
            raise ConfigError([f"{name}: invalid TOML: unterminated multi-line string at "
                               f"line {line}"])
        while text.startswith(q, end):  # up to two quotes may end the content: """a"""""
            end += 1
        return end, line + text.count("\n", start, end)
    if q == '"':
        m = _BASIC_END.match(text, start + 1)
        end = m.end() if m else -1
    else:
        j, nl = text.find("'", start + 1), text.find("\n", start + 1)
        end = j + 1 if j >= 0 and (nl < 0 or j < nl) else -1
    if end < 0:
        raise ConfigError([f"{name}: invalid TOML: unterminated string at line {line}"])
    return end, line


def parse_toml(text: str, name: str) -> dict[str, Any]:
    """Bounded, then parsed. Any failure at all is a ConfigError naming the file."""
    check_nesting(text, name)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{name}: invalid TOML: {e}"]) from e
    except Exception as e:  # a parser defect must not become the daemon's: say what it was
        raise ConfigError([f"{name}: cannot parse: {type(e).__name__}: {e}"]) from e
