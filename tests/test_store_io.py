"""The store beside LMDB: batched reads, keyed checksums, reused read txns, page cache
that doesn't stay, punched free pages, reopening under readers."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import lmdb
import numpy as np
import pytest

from tests.test_store import check, mixed, put
from vmm_tierd.engine.store import PageStore, RecordError
from vmm_tierd.engine.store_format import KEY
from vmm_tierd.kernel import linux_store as ls
from vmm_tierd.kernel import stamps

PAGE = 4096


def test_get_many_gives_each_page_its_own_result(tmp_path: Path) -> None:
    with PageStore(tmp_path, sync="none", instance_id="t") as s:
        r = s.region_id("g")
        data = mixed(50)
        put(s, r, list(range(50)), data)
        s.corrupt_for_test(r, 7)
        ask = [49, 3, 100, 8, 7, 3, 0]  # unsorted, a duplicate, a missing and a bad one
        got = s.get_many(r, ask)
        assert len(got) == len(ask)
        for p, g in zip(ask, got, strict=True):
            if p == 100:
                assert isinstance(g, KeyError)
            elif p == 7:
                assert isinstance(g, RecordError) and g.page == 7 and g.errno == errno.EBADMSG
            else:
                assert not isinstance(g, Exception)
                assert (g or bytes(PAGE)) == data[p] and (g is None) == (p % 10 == 8)
        assert s.get_many(r, []) == []
        assert s.get_many(r, np.arange(10, 20, dtype=np.uint64)) == [
            None if p % 10 == 8 else data[p] for p in range(10, 20)]


def test_a_swapped_index_entry_is_not_another_pages_data(tmp_path: Path) -> None:
    """The CRC covers the key: an index that hands out page 2's record for page 1 fails."""
    with PageStore(tmp_path, sync="commit", instance_id="t") as s:
        r = s.region_id("g")
        put(s, r, [1, 2, 3, 4], [stamps.page_bytes(1, 1), stamps.page_bytes(2, 1),
                                 bytes(PAGE), bytes(PAGE)])
    env = lmdb.open(str(tmp_path), max_dbs=4)
    idx = env.open_db(b"index")
    with env.begin(write=True, db=idx) as txn:
        for a, b in ((1, 2), (3, 4)):
            ka, kb = KEY.pack(r, a), KEY.pack(r, b)
            va, vb = txn.get(ka), txn.get(kb)
            assert va is not None and vb is not None
            txn.put(ka, vb)
            txn.put(kb, va)
    env.close()
    with PageStore(tmp_path, sync="none", instance_id="t") as s:
        for p in (1, 2, 3, 4):
            with pytest.raises(RecordError, match="checksum"):
                s.get(r, p)


def test_read_txn_is_reused_and_idle_stale_ones_are_released(tmp_path: Path) -> None:
    s = PageStore(tmp_path, sync="none", instance_id="t")
    r = s.region_id("g")
    put(s, r, [1], mixed(1))
    assert s.get(r, 1) == mixed(1)[0]
    slot = s._pool.slot()
    txn = slot.txn
    s.get(r, 1)
    assert slot.txn is txn  # no new txn per call (or per burst)
    ready, go = threading.Event(), threading.Event()
    seen: list[object] = []

    def idle_reader() -> None:
        s.get(r, 1)
        seen.append(s._pool.slot())
        ready.set()
        go.wait(10)

    t = threading.Thread(target=idle_reader)
    t.start()
    assert ready.wait(10)
    other = seen[0]
    assert other.txn is not None  # type: ignore[attr-defined]
    put(s, r, [2], mixed(1, 2))  # a commit: both snapshots are now stale
    assert other.txn is None  # type: ignore[attr-defined]  # released by the writer
    last = s._env.info()["last_txnid"]  # no reader pins an older snapshot
    held = [ln.split()[2] for ln in s._env.readers().splitlines()[1:]]
    assert all(t in ("-", str(last)) for t in held), (held, last)
    go.set()
    t.join(10)
    assert s.get(r, 2) == mixed(1, 2)[0]
    s.close()


def test_written_pages_do_not_stay_in_the_page_cache(tmp_path: Path) -> None:
    """What put_batch wrote leaves the page cache once written back (write-behind); only
    LMDB's B-tree pages and the last batch stay."""
    with PageStore(tmp_path, sync="none", instance_id="t") as s:
        r = s.region_id("g")
        n = 16384
        for b in range(0, n, 512):
            s.put_batch(r, np.arange(b, b + 512, dtype=np.uint64),
                        b"".join(stamps.page_bytes(i, 1) for i in range(b, b + 512)))
        st_ = s.stats(cache=True)
        assert st_.compressed_bytes > 24 << 20
        assert 0 <= st_.cache_bytes < 0.15 * st_.compressed_bytes, st_
        assert s.stats().cache_bytes == -1  # only measured when asked
        for p in range(0, n, 3):  # faults read records back, then delete them
            assert s.get(r, p) == stamps.page_bytes(p, 1)
        s.delete(r, np.arange(0, n, 3, dtype=np.uint64))
        st2 = s.stats(cache=True)
        assert 0 <= st2.cache_bytes < 0.15 * st2.compressed_bytes, st2
        fd = os.open(s.path / "data.mdb", os.O_RDONLY)  # mincore's count is cachestat's
        try:
            assert abs(ls.cachestat(fd).cached - st2.cache_bytes) <= 64 * PAGE
        finally:
            os.close(fd)


def test_free_pages_are_punched_and_reused(tmp_path: Path) -> None:
    s = PageStore(tmp_path, sync="none", instance_id="t")
    r = s.region_id("g")
    n = 8192
    data = [stamps.page_bytes(i, 1) for i in range(n)]
    for b in range(0, n, 512):
        put(s, r, list(range(b, b + 512)), data[b:b + 512])
    full = s.stats()
    s.delete(r, np.arange(n // 4, n, dtype=np.uint64))
    while s.compact(8):
        pass
    put(s, r, [n + 1], [data[1]])  # a commit after the frees: punching happens after it
    after = s.stats()
    assert after.file_bytes >= full.file_bytes  # LMDB never shrinks the file...
    assert after.disk_bytes < 0.5 * full.disk_bytes, (full, after)  # ...its blocks do
    assert after.disk_bytes <= after.used_bytes * 1.1 + (4 << 20), after
    check(s, r, {p: data[p] for p in range(0, n // 4, 7)})
    gone = list(range(n // 4, n))
    for b in range(0, len(gone), 512):  # LMDB reuses the punched pages: all reads back
        put(s, r, gone[b:b + 512], [data[p] for p in gone[b:b + 512]])
    check(s, r, {p: data[p] for p in range(0, n, 5)})
    assert s.stats() == s.scan_stats()
    s.close()


def test_reopen_under_concurrent_readers(tmp_path: Path) -> None:
    """What MDB_PANIC triggers: the environment closed and opened again while readers run
    (each waits for it; none crashes or reads a wrong page)."""
    s = PageStore(tmp_path, sync="none", instance_id="t")
    r = s.region_id("g")
    data = mixed(500)
    put(s, r, list(range(500)), data)
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader(k: int) -> None:
        try:
            while not stop.is_set():
                for p in range(k, 500, 13):
                    assert (s.get(r, p) or bytes(PAGE)) == data[p]
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for _ in range(5):
        with s._wlock:
            s._reopen()
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors[0]
    assert s.health().reopened == 5
    put(s, r, [600], mixed(1, 600))
    check(s, r, dict(enumerate(data)))
    s.close()


def test_leftovers_of_a_killed_daemon_are_reclaimed(tmp_path: Path) -> None:
    s = PageStore(tmp_path, sync="commit")
    r = s.region_id("vm0")
    put(s, r, list(range(300)), mixed(300))
    s._env.close()  # as if killed: no delete, no close
    os.close(s._dir.lock_fd)
    with PageStore(tmp_path, sync="none") as s2:
        assert s2.reclaimed == 300 and s2.stats().records == 0
        assert any("reclaimed 300" in n for n in s2.notes)
        assert s2.region_id("vm0") == r
        assert s2.stats().disk_bytes < 1 << 20  # the old file is gone, not kept around


