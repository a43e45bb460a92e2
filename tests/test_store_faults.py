"""Storage faults, injected for real, are contained: a write that can't be done raises a
typed StoreWriteError with the real errno and writes nothing; a record that can't be read
is a RecordError for that page only; nothing kills the process (truncation runs in a child
so that a SIGBUS would show as its exit status, not end the test run)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.store_fs import loop_ext4
from tests.test_store import check, mixed, put
from vmm_tierd.engine.store import (
    PageStore,
    RecordError,
    StoreError,
    StoreFullError,
    StoreWriteError,
)

PAGE = 4096


def incompressible(n: int, seed: int = 0) -> list[bytes]:
    return [np.random.default_rng(seed + i).bytes(PAGE) for i in range(n)]


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_full_disk(tmp_path: Path) -> None:
    with loop_ext4(tmp_path) as fs:
        s = PageStore(fs.mnt / "store", sync="none")
        try:
            r = s.region_id("g")
            data = mixed(64)
            put(s, r, list(range(64)), data)
            fs.fill(leave=128 << 10)
            with pytest.raises(StoreFullError) as ei:
                put(s, r, list(range(1000, 1512)), incompressible(512))
            e = ei.value
            assert e.errno == errno.ENOSPC and e.errno_name == "ENOSPC"
            assert e.path == str(fs.mnt / "store") and "free disk space" in str(e)
            assert s.stats().records == 64 and s.scan_stats().records == 64
            with pytest.raises(KeyError):
                s.get(r, 1000)
            check(s, r, dict(enumerate(data)))
            h = s.health()
            assert h.writable and h.last_error is not None
            assert h.last_error.errno == errno.ENOSPC and h.errors["ENOSPC"] >= 1
            fs.unfill()
            put(s, r, list(range(1000, 1100)), incompressible(100))  # space again: it works
            check(s, r, dict(zip(range(1000, 1100), incompressible(100), strict=True)))
        finally:
            s.close()


def test_read_only_after_a_file_system_error(tmp_path: Path) -> None:
    with loop_ext4(tmp_path) as fs:
        path = fs.mnt / "store"
        s = PageStore(path, sync="none")
        r = s.region_id("g")
        data = mixed(300)
        put(s, r, list(range(300)), data)
        fs.error_remount_ro()
        with pytest.raises(StoreWriteError) as ei:
            put(s, r, list(range(300, 400)), mixed(100, 300))
        assert ei.value.errno == errno.EROFS and "read-only" in str(ei.value)
        check(s, r, dict(enumerate(data)))  # every page is still served
        with pytest.raises(StoreWriteError) as ei:  # a stop's delete: typed, tolerable
            s.delete_range(r, 0, 300)
        assert ei.value.errno == errno.EROFS
        assert s.stats().records == 300
        h = s.health()
        assert h.last_error is not None and h.last_error.errno == errno.EROFS
        s.close()
        with pytest.raises(StoreError) as ei2:  # a restart on it refuses, clearly
            PageStore(path, sync="none")
        assert ei2.value.errno == errno.EROFS and str(path) in str(ei2.value)


def test_disk_io_errors(tmp_path: Path) -> None:
    """The disk dies (see LoopFs.fail_disk): every read and write fails with EIO. Pages
    still in the page cache are served (through the guarded map), the others are
    RecordErrors, none is wrong."""
    with loop_ext4(tmp_path) as fs:
        s = PageStore(fs.mnt / "store", sync="none")
        r = s.region_id("g")
        data = mixed(600)
        put(s, r, list(range(600)), data)
        for p in range(5000, 5003):  # more commits: the first batch is written back
            put(s, r, [p], mixed(1, p))
        drop_cache(fs.mnt / "store" / "data.mdb")
        check(s, r, {p: data[p] for p in range(100)})  # these are cached again
        sigbus = s.health().sigbus
        fs.fail_disk()
        check(s, r, {p: data[p] for p in range(100)})
        bad = 0
        for p in range(100, 600):
            try:
                got = s.get(r, p)
            except RecordError as e:
                assert e.errno in (errno.EIO, errno.EUCLEAN), e
                assert (e.region, e.page) == ("g", p)
                bad += 1
            else:
                assert (got or bytes(PAGE)) == data[p], p
        assert bad > 0
        assert s.health().sigbus > sigbus  # uncached map pages faulted; contained
        for op in (lambda: put(s, r, [7000], mixed(1, 7)), lambda: s.delete_range(r, 0, 600)):
            with pytest.raises(StoreWriteError) as ei:
                op()
            assert ei.value.errno == errno.EIO
        s.close()


def test_permission_change_the_kernel_enforces(tmp_path: Path) -> None:
    if shutil.which("chattr") is None:
        pytest.skip("no chattr")
    with loop_ext4(tmp_path) as fs:
        s = PageStore(fs.mnt / "store", sync="none")
        f = fs.mnt / "store" / "data.mdb"
        try:
            r = s.region_id("g")
            put(s, r, [1, 2], mixed(2))
            assert subprocess.run(["chattr", "+i", str(f)], timeout=20).returncode == 0
            with pytest.raises(StoreWriteError) as ei:
                put(s, r, list(range(10, 200)), mixed(190))
            assert ei.value.errno == errno.EPERM
            check(s, r, dict(zip([1, 2], mixed(2), strict=True)))
            subprocess.run(["chattr", "-i", str(f)], timeout=20, check=True)
            put(s, r, list(range(10, 200)), mixed(190))
        finally:
            subprocess.run(["chattr", "-i", str(f)], timeout=20)
            s.close()


@pytest.mark.parametrize("change", ["dir-mode", "dir-owner", "file-mode", "file-owner"])
def test_ownership_or_mode_changed_under_the_daemon(tmp_path: Path, change: str) -> None:
    s = PageStore(tmp_path / "store", sync="none")
    r = s.region_id("g")
    put(s, r, [1], mixed(1))
    target = s.path if change.startswith("dir") else s.path / "data.mdb"
    if change.endswith("mode"):
        os.chmod(target, 0o777)
    else:
        os.chown(target, 65534, 65534)
    h = s.health()
    assert not h.writable and "ownership or mode changed" in h.reason
    with pytest.raises(StoreWriteError) as ei:
        put(s, r, [2], mixed(1))
    assert ei.value.errno == errno.EPERM and "restart" in str(ei.value)
    check(s, r, {1: mixed(1)[0]})
    s.close()


def test_deleted_directory(tmp_path: Path) -> None:
    path = tmp_path / "store"
    s = PageStore(path, sync="none")
    r = s.region_id("g")
    data = mixed(200)
    put(s, r, list(range(200)), data)
    shutil.rmtree(path)
    h = s.health()
    assert not h.writable and "deleted" in h.reason, h
    assert h.last_error is not None and h.last_error.errno == errno.ENOENT
    with pytest.raises(StoreWriteError) as ei:
        put(s, r, [500], mixed(1))
    assert ei.value.errno == errno.ENOENT and str(path) in str(ei.value)
    with pytest.raises(StoreWriteError):
        s.delete_range(r, 0, 200)
    check(s, r, dict(enumerate(data)))  # the open files still serve every page
    with PageStore(path, sync="none") as other:  # the path is free again: a new store
        other.region_id("g")
    with pytest.raises(StoreWriteError):  # and the old one still never writes to it
        put(s, r, [501], mixed(1))
    s.close()


def test_replaced_directory(tmp_path: Path) -> None:
    path = tmp_path / "store"
    s = PageStore(path, sync="none")
    r = s.region_id("g")
    put(s, r, [1], mixed(1))
    os.rename(path, tmp_path / "moved")
    path.mkdir(mode=0o700)
    assert "replaced" in s.health().reason or "deleted" in s.health().reason
    with pytest.raises(StoreWriteError):
        put(s, r, [2], mixed(1))
    s.close()


# ---- faults inside LMDB's memory map, in a child process ------------------------------
_CHILD = r"""
import errno, faulthandler, json, mmap, os, sys
import numpy as np
from vmm_tierd.engine.store import PageStore, RecordError, StoreWriteError
from vmm_tierd.kernel import stamps
mode, path, cut = sys.argv[1], sys.argv[2], sys.argv[3]
if "faulthandler" in mode:
    faulthandler.enable()
probe = lambda: None
if "guest" in mode:  # guest_sig's handler too, installed after the store's (as in a daemon)
    from vmm_tierd.kernel.api import AccessKind, AccessStatus
    from vmm_tierd.kernel.linux import LinuxKernel
    k = LinuxKernel()
    g = k.map_memfd(2 * 4096)
    os.ftruncate(g.fd, 4096)
    def probe():
        res = k.start_access(g.addr + 4096, AccessKind.READ, 8).wait(10)
        assert res.status is AccessStatus.SIGBUS, res
s = PageStore(path, sync="none")
probe()
rid = s.region_id("g")
n = 3000
pages = [stamps.page_bytes(i, 1) if i % 5 else bytes(4096) for i in range(n)]
for b in range(0, n, 500):
    s.put_batch(rid, np.arange(b, b + 500, dtype=np.uint64), b"".join(pages[b:b + 500]))
for p in range(0, n, 11):
    assert (s.get(rid, p) or bytes(4096)) == pages[p]
f = os.path.join(path, "data.mdb")
size = os.path.getsize(f)
os.truncate(f, 0 if cut == "all" else size // 2)
fd = os.open(f, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
probe()
res = {"ok": 0, "bad": 0, "errnos": []}
for p in range(n):
    try:
        got = s.get(rid, p)
    except RecordError as e:
        res["bad"] += 1
        res["errnos"] = sorted(set(res["errnos"]) | {errno.errorcode[e.errno]})
    else:
        assert (got or bytes(4096)) == pages[p], p
        res["ok"] += 1
many = s.get_many(rid, list(range(0, n, 3)))
assert all(isinstance(x, RecordError) or (x or bytes(4096)) == pages[3 * i]
           for i, x in enumerate(many))
probe()
for name, op in (("put", lambda: s.put_batch(rid, np.array([n], dtype=np.uint64), pages[1])),
                 ("delete", lambda: s.delete_range(rid, 0, n))):
    try:
        op()
        res[name] = "done"
    except StoreWriteError as e:
        res[name] = e.errno_name
h = s.health()
res.update(writable=h.writable, reason=h.reason, sigbus=h.sigbus)
s.close()
probe()
print(json.dumps(res), flush=True)
if "crash" in mode:  # a SIGBUS outside the store's map must still end the process
    t = os.open(os.path.join(path, "other"), os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(t, 8192)
    m = mmap.mmap(t, 8192, prot=mmap.PROT_READ)
    os.ftruncate(t, 0)
    m[100]
    print("survived", flush=True)
"""


@pytest.mark.parametrize("mode,cut", [("plain", "all"), ("plain", "half"),
                                      ("faulthandler", "half"), ("guest", "half"),
                                      ("guest-crash", "all")])
def test_data_file_truncated_under_the_store(tmp_path: Path, mode: str, cut: str) -> None:
    if mode.startswith("guest") and not os.path.exists("/dev/userfaultfd"):
        pytest.skip("no userfaultfd")
    p = subprocess.run([sys.executable, "-c", _CHILD, mode, str(tmp_path / "store"), cut],
                       capture_output=True, text=True, timeout=120)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert lines, (p.returncode, p.stderr[-3000:])
    res = json.loads(lines[0])
    if mode.endswith("crash"):
        assert p.returncode == -signal.SIGBUS and "survived" not in p.stdout, p.stderr[-2000:]
    else:
        assert p.returncode == 0, p.stderr[-3000:]
    assert res["bad"] > 0 and res["sigbus"] > 0, res
    assert set(res["errnos"]) <= {"EIO", "EUCLEAN", "EBADMSG"}, res
    assert res["put"] == "EIO" and res["delete"] == "EIO", res
    assert not res["writable"] and "truncated" in res["reason"], res
    if cut == "all":
        assert res["ok"] == 0, res


_FLIPS = r"""
import json, os, sys
import numpy as np
from vmm_tierd.engine.store import PageStore, RecordError, StoreWriteError
from vmm_tierd.kernel import stamps
path, seed, density = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = PageStore(path, sync="none")
rid = s.region_id("g")
n = 2000
pages = [stamps.page_bytes(i, 1) if i % 7 else bytes(4096) for i in range(n)]
for b in range(0, n, 400):
    s.put_batch(rid, np.arange(b, b + 400, dtype=np.uint64), b"".join(pages[b:b + 400]))
s.sync()
f = os.path.join(path, "data.mdb")
size = os.path.getsize(f)
rng = np.random.default_rng(seed)
fd = os.open(f, os.O_RDWR)
for off in rng.integers(2 * 4096, size, int(size * density)).tolist():  # not the meta pages
    os.pwrite(fd, bytes([int(rng.integers(1, 256)) ^ os.pread(fd, 1, off)[0]]), off)
os.close(fd)
ok = bad = 0
for p in range(n):
    try:
        got = s.get(rid, p)
    except (RecordError, KeyError):  # a flipped index byte can also hide a key
        bad += 1
    else:
        assert (got or bytes(4096)) == pages[p], p  # never wrong data: CRC
        ok += 1
try:
    s.delete_range(rid, 0, n)
    deleted = "done"
except StoreWriteError as e:
    deleted = e.errno_name
s.close()
again = PageStore(path, sync="none")  # the next start: everything was dead, so replaced
again.region_id("g")
again.close()
print(json.dumps({"ok": ok, "bad": bad, "delete": deleted}), flush=True)
"""


@pytest.mark.parametrize("seed,density", [(1, 1e-4), (2, 1e-3), (3, 1e-2)])
def test_random_byte_flips(tmp_path: Path, seed: int, density: float) -> None:
    p = subprocess.run([sys.executable, "-c", _FLIPS, str(tmp_path / "s"), str(seed),
                        str(density)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["ok"] + res["bad"] == 2000
    assert res["delete"] in ("done", "EUCLEAN", "EIO", "EBADMSG"), res


_RESTART = r"""
import os, sys
import numpy as np
from vmm_tierd.engine.store import PageStore
from vmm_tierd.kernel import stamps
path = sys.argv[1]
s = PageStore(path, sync="none")
r = s.region_id("g")
for b in range(0, 3000, 300):  # several commits: the B-tree spreads over the file
    s.put_batch(r, np.arange(b, b + 300, dtype=np.uint64),
                b"".join(stamps.page_bytes(i, 1) for i in range(b, b + 300)))
s.close()
f = os.path.join(path, "data.mdb")
os.truncate(f, os.path.getsize(f) // 2 // 4096 * 4096)
again = PageStore(path, sync="none")  # reads what is left of the old file, then replaces it
r2 = again.region_id("g")
again.put_batch(r2, np.array([7], dtype=np.uint64), stamps.page_bytes(7, 2))
assert again.get(r2, 7) == stamps.page_bytes(7, 2) and again.health().writable
print(again.reclaimed, again.stats().records, "|".join(again.notes), flush=True)
"""


def test_restart_on_a_truncated_file_replaces_it(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-c", _RESTART, str(tmp_path / "s")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    reclaimed, records, notes = p.stdout.strip().split(" ", 2)
    assert records == "1"
    assert reclaimed == "3000" or "unreadable" in notes, p.stdout
