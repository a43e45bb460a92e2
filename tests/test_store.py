"""PageStore on real LMDB files: records, checksums, segments, reclaim, errors."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import lmdb
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmm_tierd.engine.store import (
    PageStore,
    RecordError,
    StoreError,
    StoreFullError,
)
from vmm_tierd.engine.store_format import REGION_ID, owner_key
from vmm_tierd.kernel import stamps

PAGE = 4096


def text_page(i: int) -> bytes:
    words = [b"guest", b"memory", b"page", b"kernel", b"tier", b"cold", b"lmdb", b"zstd"]
    rng = np.random.default_rng(i)
    out = b" ".join(words[k] for k in rng.integers(0, len(words), 900))
    return out[:PAGE].ljust(PAGE, b".")


def mixed(n: int, start: int = 0) -> list[bytes]:
    """Stamped, text-like, zero and incompressible pages."""
    out = []
    for i in range(start, start + n):
        kind = i % 10
        if kind < 6:
            out.append(stamps.page_bytes(i, 1 + i % 3))
        elif kind < 8:
            out.append(text_page(i))
        elif kind == 8:
            out.append(bytes(PAGE))
        else:
            out.append(np.random.default_rng(i).bytes(PAGE))
    return out


def put(s: PageStore, region: int, pages: list[int], data: list[bytes]) -> None:
    s.put_batch(region, np.array(pages, dtype=np.uint64), memoryview(b"".join(data)))


def check(s: PageStore, region: int, model: dict[int, bytes]) -> None:
    for p, want in model.items():
        got = s.get(region, p)
        assert (bytes(PAGE) if got is None else got) == want, p
        assert (got is None) == (want == bytes(PAGE))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PageStore]:
    s = PageStore(tmp_path / "store", sync="none", instance_id="test")
    yield s
    s.close()


def test_roundtrip_kinds_and_counters(store: PageStore) -> None:
    r = store.region_id("guest0")
    data = mixed(1000)
    res = store.put_batch(r, np.arange(1000, dtype=np.uint64), memoryview(b"".join(data)))
    assert (res.pages, res.zero_pages, res.raw_pages) == (1000, 100, 100)
    check(store, r, dict(enumerate(data)))
    s = store.stats()
    assert (s.records, s.zero_records, s.raw_records) == (1000, 100, 100)
    assert s.compressed_bytes == res.stored_bytes
    assert s.guest_bytes == 1000 * PAGE
    assert store.scan_stats().compressed_bytes == s.compressed_bytes
    assert store.pages(r).tolist() == list(range(1000))
    with pytest.raises(KeyError):
        store.get(r, 1000)


def test_batch_order_does_not_matter(store: PageStore) -> None:
    r = store.region_id("g")
    pages = [9, 3, 7, 1]
    data = mixed(4)
    put(store, r, pages, data)
    check(store, r, dict(zip(pages, data, strict=True)))


def test_regions_are_separate_and_ids_stable(tmp_path: Path) -> None:
    with PageStore(tmp_path, sync="none", instance_id="x") as s:
        a, b = s.region_id("a"), s.region_id("b")
        assert a != b and s.region_id("a") == a
        put(s, a, [5], [stamps.page_bytes(5, 1)])
        put(s, b, [5], [stamps.page_bytes(5, 2)])
        assert s.get(a, 5) == stamps.page_bytes(5, 1)
        assert s.get(b, 5) == stamps.page_bytes(5, 2)
    with PageStore(tmp_path, sync="none", instance_id="y") as s:
        assert (s.region_id("b"), s.region_id("a")) == (b, a)


def test_overwrite_replaces_record(tmp_path: Path) -> None:
    store = PageStore(tmp_path, sync="none", instance_id="t", compact_in_put=0)
    r = store.region_id("g")
    put(store, r, [1, 2, 3], mixed(3))
    new = [stamps.page_bytes(2, 9), bytes(PAGE), text_page(77)]
    put(store, r, [2, 3, 4], new)
    check(store, r, {1: mixed(3)[0], 2: new[0], 3: new[1], 4: new[2]})
    s = store.stats()
    assert s.records == 4
    assert store.scan_stats() == s
    assert s.dead_bytes > 0  # the replaced payloads are dead until compaction
    put(store, r, [2, 3, 4], new)  # identical again (zero record over zero record)
    assert store.stats().records == 4 and store.scan_stats() == store.stats()
    store.close()


def test_delete_and_delete_range(store: PageStore) -> None:
    r, other = store.region_id("g"), store.region_id("h")
    data = mixed(100)
    put(store, r, list(range(100)), data)
    put(store, other, list(range(100)), data)
    assert store.delete(r, np.array([3, 3, 5, 500])) == 2
    assert store.delete_range(r, 10, 20) == 10
    assert store.delete_range(r, 20, 20) == 0
    assert store.delete_range(r, 90, 1 << 64) == 10
    for p in (3, 5, 10, 19, 90, 99):
        with pytest.raises(KeyError):
            store.get(r, p)
    check(store, r, {p: data[p] for p in (0, 4, 9, 20, 89)})
    check(store, other, dict(enumerate(data)))
    assert store.stats().records == 200 - 22
    assert store.scan_stats() == store.stats()


def test_segments_keep_disk_close_to_compressed_bytes(store: PageStore) -> None:
    r = store.region_id("g")
    n = 4096
    pages = [stamps.page_bytes(i, 1) for i in range(n)]
    for b in range(0, n, 512):
        put(store, r, list(range(b, b + 512)), pages[b:b + 512])
    s = store.stats()
    assert s.disk_bytes <= 1.1 * s.compressed_bytes, s
    assert s.compressed_bytes < 0.6 * s.guest_bytes


def test_dead_segments_are_freed_without_compaction(tmp_path: Path) -> None:
    s = PageStore(tmp_path, sync="none", instance_id="t", compact_in_put=0)
    r = s.region_id("g")
    put(s, r, list(range(512)), mixed(512))
    assert s.stats().segments > 1
    s.delete(r, np.arange(256))
    s.delete_range(r, 256, 512)
    assert (s.stats().segments, s.stats().dead_bytes, s.stats().records) == (0, 0, 0)
    s.close()
    with PageStore(tmp_path, sync="none", instance_id="t") as s2:
        assert s2.stats().segments == 0


def test_compaction_rewrites_sparse_segments(tmp_path: Path) -> None:
    s = PageStore(tmp_path, sync="none", instance_id="t", compact_in_put=0)
    r = s.region_id("g")
    data = [stamps.page_bytes(i, 1) for i in range(2048)]
    for b in range(0, 2048, 512):
        put(s, r, list(range(b, b + 512)), data[b:b + 512])
    before = s.stats()
    keep = np.arange(0, 2048, 3)
    s.delete(r, np.setdiff1d(np.arange(2048), keep))
    mid = s.stats()
    assert mid.segments == before.segments and mid.dead_bytes > 0.6 * before.compressed_bytes
    while s.compact(4):
        pass
    after = s.stats()
    assert after.dead_bytes == 0 and after.segments < before.segments / 2
    assert after == s.scan_stats()
    check(s, r, {int(p): data[p] for p in keep})
    # freed LMDB pages get reused: refilling the deleted pages barely grows the file
    gone = np.setdiff1d(np.arange(2048), keep)
    put(s, r, gone.tolist(), [data[p] for p in gone])
    assert s.stats().file_bytes <= 1.25 * before.file_bytes
    s.close()


def test_gc_keeps_dead_bytes_bounded_under_churn(tmp_path: Path) -> None:
    s = PageStore(tmp_path, sync="none", instance_id="t", gc_dead=0.1)
    r = s.region_id("g")
    data = [stamps.page_bytes(i, 1) for i in range(3072)]
    put(s, r, list(range(3072)), data)
    rng = np.random.default_rng(1)
    for _ in range(3):
        gone = np.sort(rng.choice(3072, 1024, replace=False))
        s.delete(r, gone)
        assert s.stats().dead_bytes > 0.2 * s.stats().compressed_bytes
        while s.compact(4):
            pass
        st = s.stats()
        assert st.dead_bytes <= 0.1 * st.compressed_bytes
        for b in range(0, 1024, 512):
            idx = gone[b:b + 512]
            put(s, r, idx.tolist(), [data[i] for i in idx])
    st = s.stats()
    assert st.used_bytes <= st.file_bytes
    assert st.used_bytes <= 1.2 * st.compressed_bytes, st
    assert st == s.scan_stats()
    check(s, r, dict(enumerate(data)))
    s.close()


def test_compaction_inside_put_batch(tmp_path: Path) -> None:
    s = PageStore(tmp_path, sync="none", instance_id="t", compact_in_put=2)
    r = s.region_id("g")
    data = [stamps.page_bytes(i, 1) for i in range(1024)]
    put(s, r, list(range(1024)), data)
    s.delete(r, np.arange(0, 1024, 4) + np.arange(3)[:, None])  # 3 of every 4 pages
    dead = s.stats().dead_bytes
    put(s, r, [5000], [bytes(PAGE)])
    assert s.stats().dead_bytes < dead
    check(s, r, {p: data[p] for p in range(3, 1024, 4)})
    s.close()


@pytest.mark.parametrize("which", [0, 6, 8, 9])  # stamped (zstd), text, zero, raw
def test_corruption_is_detected(store: PageStore, which: int) -> None:
    r = store.region_id("vm-a")
    data = mixed(10)
    put(store, r, list(range(10)), data)
    store.corrupt_for_test(r, which)
    with pytest.raises(RecordError) as ei:
        store.get(r, which)
    e = ei.value
    assert (e.region, e.page) == ("vm-a", which)
    assert "vm-a" in str(e) and str(which) in str(e)
    assert e.reason.startswith(("checksum mismatch", "decompress failed"))
    check(store, r, {p: data[p] for p in range(10) if p != which})


def test_get_on_closed_store_is_a_record_error(tmp_path: Path) -> None:
    s = PageStore(tmp_path, sync="none", instance_id="t")
    r = s.region_id("g")
    put(s, r, [0], mixed(1))
    s.close()
    with pytest.raises(RecordError, match="lmdb"):
        s.get(r, 0)
    with pytest.raises(StoreError, match="closed"):
        put(s, r, [1], mixed(1))


def test_reclaim_records_of_dead_instances(tmp_path: Path) -> None:
    with PageStore(tmp_path, sync="commit", instance_id="one") as s:
        r = s.region_id("g")
        put(s, r, list(range(300)), mixed(300))
    with PageStore(tmp_path, sync="commit", instance_id="one") as s:
        assert s.reclaimed == 0 and s.stats().records == 300
        check(s, r, dict(enumerate(mixed(300))))
    with PageStore(tmp_path, sync="commit") as s:  # a new process: fresh uuid
        assert s.reclaimed == 300
        assert s.stats().records == 0 and s.stats().segments == 0
        assert s.region_id("g") == r
        with pytest.raises(KeyError):
            s.get(r, 0)


def test_reclaim_keeps_regions_of_this_instance(tmp_path: Path) -> None:
    with PageStore(tmp_path, sync="none", instance_id="me") as s:
        mine, dead = s.region_id("mine"), s.region_id("dead")
        put(s, mine, [1, 2], mixed(2))
        put(s, dead, [1, 2, 3], mixed(3))
    env = lmdb.open(str(tmp_path), max_dbs=4)  # as if "dead" was written by another process
    with env.begin(write=True) as txn:
        txn.put(owner_key(dead), b"other", db=env.open_db(b"meta", txn=txn))
    env.close()
    with PageStore(tmp_path, sync="none", instance_id="me") as s:
        assert s.reclaimed == 3
        check(s, mine, dict(zip([1, 2], mixed(2), strict=True)))
        assert s.pages(dead).tolist() == []
        assert s.stats() == s.scan_stats()
    assert REGION_ID.size == 4


def test_permissions(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        with PageStore(tmp_path / "d", sync="none") as s:
            s.region_id("g")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o700
    for f in (tmp_path / "d").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_corrupt_data_file_is_a_clear_error(tmp_path: Path) -> None:
    with PageStore(tmp_path, sync="commit", instance_id="t") as s:
        put(s, s.region_id("g"), [1], mixed(1))
    (tmp_path / "data.mdb").write_bytes(b"not an lmdb file" * 1000)
    with pytest.raises(StoreError, match=str(tmp_path)) as ei:  # its records may be ours
        PageStore(tmp_path, sync="none", instance_id="t")
    assert "move it aside" in str(ei.value)
    with PageStore(tmp_path, sync="none") as s:  # a new instance: every record was dead
        assert s.stats().records == 0 and s.reclaimed == 0
        assert any("unreadable" in n and "replaced" in n for n in s.notes), s.notes
        put(s, s.region_id("g"), [1], mixed(1))
        check(s, s.region_id("g"), {1: mixed(1)[0]})


def test_second_open_is_refused(store: PageStore) -> None:
    with pytest.raises(StoreError, match="in use"):
        PageStore(store.path, sync="none")


def test_bad_arguments(store: PageStore, tmp_path: Path) -> None:
    r = store.region_id("g")
    with pytest.raises(ValueError, match="sync"):
        PageStore(tmp_path / "x", sync="sometimes")
    with pytest.raises(ValueError, match="bytes"):
        store.put_batch(r, np.arange(2, dtype=np.uint64), b"\0" * PAGE)
    with pytest.raises(ValueError, match="duplicate"):
        store.put_batch(r, np.array([1, 1], dtype=np.uint64), b"\1" * 2 * PAGE)
    with pytest.raises(ValueError, match="region"):
        store.put_batch(99, np.array([1], dtype=np.uint64), b"\1" * PAGE)
    assert store.stats().records == 0


def test_map_full_writes_nothing_and_names_the_fix(tmp_path: Path) -> None:
    s = PageStore(tmp_path, sync="none", instance_id="t", map_size=1 << 20)
    r = s.region_id("g")
    put(s, r, list(range(64)), mixed(64))
    before = s.stats()
    incompressible = [np.random.default_rng(i).bytes(PAGE) for i in range(512)]
    with pytest.raises(StoreFullError) as ei:
        put(s, r, list(range(1000, 1512)), incompressible)
    assert str(tmp_path) in str(ei.value) and "map_size" in str(ei.value)
    assert s.stats().records == before.records
    assert s.scan_stats().records == before.records
    with pytest.raises(KeyError):
        s.get(r, 1000)
    check(s, r, dict(enumerate(mixed(64))))
    put(s, r, [2000], [stamps.page_bytes(2000, 1)])  # still usable
    s.close()


def test_full_disk_writes_nothing(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("needs root and mount(8) for a small tmpfs")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)],
                         capture_output=True, timeout=20)
    if res.returncode:
        pytest.skip(f"can't mount tmpfs: {res.stderr.decode().strip()}")
    try:
        s = PageStore(mnt / "store", sync="commit", instance_id="t", map_size=64 << 20)
        r = s.region_id("g")
        put(s, r, list(range(32)), mixed(32))
        incompressible = [np.random.default_rng(i).bytes(PAGE) for i in range(512)]
        with pytest.raises(StoreFullError) as ei:
            put(s, r, list(range(1000, 1512)), incompressible)
        assert str(mnt) in str(ei.value) and "disk" in str(ei.value)
        assert ei.value.errno == errno.ENOSPC and ei.value.path == str(mnt / "store")
        assert s.stats().records == 32
        with pytest.raises(KeyError):
            s.get(r, 1000)
        check(s, r, dict(enumerate(mixed(32))))
        s.close()
        with PageStore(mnt / "store", sync="commit", instance_id="t") as s2:
            assert s2.stats().records == 32
            check(s2, r, dict(enumerate(mixed(32))))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], timeout=20, check=False)


@pytest.mark.parametrize("mode", ["commit", "periodic", "none"])
def test_sync_modes(tmp_path: Path, mode: str) -> None:
    with PageStore(tmp_path, sync=mode, instance_id="t") as s:
        r = s.region_id("g")
        put(s, r, [1, 2], mixed(2))
        s.sync()
    with PageStore(tmp_path, sync=mode, instance_id="t") as s:
        check(s, r, dict(zip([1, 2], mixed(2), strict=True)))


def test_concurrent_writers_and_reader(store: PageStore) -> None:
    r = store.region_id("g")
    data = mixed(2048)
    errors: list[BaseException] = []

    def writer(first: int) -> None:
        try:
            for b in range(first, 2048, 512):
                put(store, r, list(range(b, b + 256)), data[b:b + 256])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(o,)) for o in (0, 256)]
    for t in threads:
        t.start()
    seen = 0
    while any(t.is_alive() for t in threads):
        for p in store.pages(r)[:: 37].tolist():
            got = store.get(r, p)
            assert (got or bytes(PAGE)) == data[p]
            seen += 1
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert store.stats().records == 2048 and store.stats() == store.scan_stats()
    check(store, r, dict(enumerate(data)))


ops = st.lists(st.one_of(
    st.tuples(st.just("put"), st.lists(st.integers(0, 200), min_size=1, max_size=40,
                                        unique=True), st.integers(0, 10**6)),
    st.tuples(st.just("del"), st.lists(st.integers(0, 200), max_size=40), st.just(0)),
    st.tuples(st.just("range"), st.tuples(st.integers(0, 200), st.integers(0, 200)),
              st.just(0)),
    st.tuples(st.just("many"), st.lists(st.integers(0, 210), max_size=30), st.just(0)),
    st.tuples(st.just("compact"), st.integers(1, 4), st.just(0)),
    st.tuples(st.just("reopen"), st.just(0), st.just(0)),
    st.tuples(st.just("trim"), st.just(0), st.just(0)),
), max_size=25)


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops)
def test_matches_a_dict_model_through_reopens_and_punches(tmp_path: Path,
                                                          program: list[tuple]) -> None:
    path = tmp_path / f"m{os.getpid()}-{abs(hash(str(program))) % 10**9}"
    s = PageStore(path, sync="none", instance_id="t", segment_pages=3, compact_in_put=1)
    r = s.region_id("g")
    model: dict[int, bytes] = {}
    try:
        for op, arg, salt in program:
            if op == "put":
                data = mixed(len(arg), salt)
                put(s, r, arg, data)
                model.update(zip(arg, data, strict=True))
            elif op == "del":
                assert s.delete(r, np.array(arg, dtype=np.uint64)) == len(set(arg) & set(model))
                for p in arg:
                    model.pop(p, None)
            elif op == "range":
                lo, hi = arg
                gone = [p for p in model if lo <= p < hi]
                assert s.delete_range(r, lo, hi) == len(gone)
                for p in gone:
                    del model[p]
            elif op == "many":
                for p, g in zip(arg, s.get_many(r, arg), strict=True):
                    if p in model:
                        assert (g or bytes(PAGE)) == model[p] and not isinstance(g, Exception)
                    else:
                        assert isinstance(g, KeyError)
            elif op == "compact":
                s.compact(arg)
            elif op == "reopen":
                with s._wlock:
                    s._reopen()
            else:  # trim: the punches of a cycle
                with s._wlock:
                    s._data.trim(s._env, list(s._dbs.values()))
                    s._pool.committed()  # as after a commit: stale snapshots let go
            assert s.stats() == s.scan_stats()
        check(s, r, model)
        assert s.pages(r).tolist() == sorted(model)
    finally:
        s.close()
        shutil.rmtree(path, ignore_errors=True)


def test_get_reuses_a_read_txn_yet_sees_every_commit(tmp_path: Path) -> None:
    s = PageStore(tmp_path, sync="none", instance_id="t")
    r = s.region_id("g")
    a, b = stamps.page_bytes(1, 1), stamps.page_bytes(2, 1)
    put(s, r, [1], [a])
    assert s.get(r, 1) == a
    with pytest.raises(KeyError):
        s.get(r, 2)  # the read txn is kept from here on
    put(s, r, [2], [b])
    assert s.get(r, 2) == b  # committed after the txn began: renewed
    s.delete(r, np.array([1], dtype=np.uint64))
    with pytest.raises(KeyError):
        s.get(r, 1)
    got: list[bytes | None] = []
    t = threading.Thread(target=lambda: got.append(s.get(r, 2)))  # its own txn
    t.start()
    t.join(10)
    assert got == [b]
    s.release_reader()
    assert s.get(r, 2) == b
    s.close()  # with live read txns of two threads: they are aborted, nothing crashes
    with pytest.raises(RecordError, match="closed"):
        s.get(r, 2)
