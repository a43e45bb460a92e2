"""The store's directory is trusted only when it deserves it: every attack is set up for
real (as root, with files and links owned by uid 65534) and the victim file must stay
byte-for-byte untouched."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from vmm_tierd.engine.store import PageStore, StoreError

PAGE = 4096
NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to uid 65534")


@pytest.fixture
def victim(tmp_path: Path) -> Iterator[Path]:
    """A root-owned file elsewhere, 220 bytes, which the daemon must never write."""
    v = tmp_path / "victim" / "important.conf"
    v.parent.mkdir(mode=0o700)
    v.write_bytes(b"important = true\n" * 12 + b"#" * 16)
    before = v.read_bytes(), v.stat().st_mtime_ns, v.stat().st_ino
    yield v
    assert (v.read_bytes(), v.stat().st_mtime_ns, v.stat().st_ino) == before, "victim changed"
    assert len(v.read_bytes()) == 220


def hostile_dir(path: Path, mode: int = 0o755) -> Path:
    path.mkdir(mode=mode)
    os.chmod(path, mode)
    os.chown(path, NOBODY, NOBODY)
    return path


def plant(link: Path, target: Path, owner: int = NOBODY) -> None:
    link.symlink_to(target)
    os.lchown(link, owner, owner)


def test_directory_of_another_user_with_planted_symlinks(tmp_path: Path, victim: Path) -> None:
    d = hostile_dir(tmp_path / "store")
    plant(d / "lock.mdb", victim)
    plant(d / "store.lock", victim)
    with pytest.raises(StoreError, match=r"owned by uid 65534.*remove it") as ei:
        PageStore(d, sync="none")
    assert str(d) in str(ei.value)
    assert sorted(p.name for p in d.iterdir()) == ["lock.mdb", "store.lock"]


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777])
def test_store_directory_writable_by_others(tmp_path: Path, victim: Path, mode: int) -> None:
    d = tmp_path / "store"
    d.mkdir()
    os.chmod(d, mode)
    plant(d / "data.mdb", victim)
    with pytest.raises(StoreError, match=r"writable by other users.*chmod 0700"):
        PageStore(d, sync="none")


@pytest.mark.parametrize("name", ["data.mdb", "lock.mdb", "store.lock"])
def test_symlink_inside_our_own_directory(tmp_path: Path, victim: Path, name: str) -> None:
    d = tmp_path / "store"
    d.mkdir(mode=0o700)
    plant(d / name, victim, owner=0)  # even one of ours is never followed
    with pytest.raises(StoreError, match=rf"{name}: is a symlink; remove it"):
        PageStore(d, sync="none")


def test_hard_link_to_another_file(tmp_path: Path, victim: Path) -> None:
    d = tmp_path / "store"
    d.mkdir(mode=0o700)
    os.link(victim, d / "data.mdb")  # root-owned, regular: only the link count tells
    with pytest.raises(StoreError, match="2 hard links"):
        PageStore(d, sync="none")


@pytest.mark.parametrize("kind", ["fifo", "foreign"])
def test_file_that_is_not_ours(tmp_path: Path, kind: str) -> None:
    d = tmp_path / "store"
    d.mkdir(mode=0o700)
    if kind == "fifo":
        os.mkfifo(d / "lock.mdb")
        match = "not a regular file"
    else:
        (d / "data.mdb").write_bytes(b"")
        os.chown(d / "data.mdb", NOBODY, NOBODY)
        match = "owned by uid 65534"
    with pytest.raises(StoreError, match=match):
        PageStore(d, sync="none")


def test_parent_owned_by_another_user(tmp_path: Path, victim: Path) -> None:
    evil = hostile_dir(tmp_path / "evil")
    with pytest.raises(StoreError, match=r"evil: is owned by uid 65534"):
        PageStore(evil / "store", sync="none")
    assert not (evil / "store").exists()


def test_not_created_in_a_world_writable_directory(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # sticky, like /tmp: fine above, not as the parent
    with pytest.raises(StoreError, match="other users can write"):
        PageStore(shared / "store", sync="none")
    assert not (shared / "store").exists()
    (shared / "mine").mkdir(mode=0o700)
    with PageStore(shared / "mine" / "store", sync="none") as s:  # one level down: fine
        s.region_id("g")


def test_store_path_that_is_a_symlink(tmp_path: Path, victim: Path) -> None:
    plant(tmp_path / "store", victim.parent, owner=0)
    with pytest.raises(StoreError, match="store directory is a symlink"):
        PageStore(tmp_path / "store", sync="none")
    assert sorted(p.name for p in victim.parent.iterdir()) == ["important.conf"]


def test_symlinked_ancestor(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o755)
    plant(tmp_path / "ours", real, owner=0)  # like /var/run -> /run: followed
    with PageStore(tmp_path / "ours" / "store", sync="none") as s:
        r = s.region_id("g")
        s.put_batch(r, np.array([1], dtype=np.uint64), b"\x01" * PAGE)
    assert (real / "store" / "data.mdb").is_file()
    plant(tmp_path / "theirs", real)  # the same link, but another user's: refused
    with pytest.raises(StoreError, match=r"theirs: is a symlink owned by uid 65534"):
        PageStore(tmp_path / "theirs" / "store", sync="none")


def test_empty_path() -> None:
    with pytest.raises(StoreError, match="store path is empty"):
        PageStore("", sync="none")


def test_created_private_and_files_relative_to_it(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        with PageStore(tmp_path / "a" / "b" / "store", sync="none") as s:
            s.region_id("g")
            names = sorted(p.name for p in s.path.iterdir())
    finally:
        os.umask(old)
    for d in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "store"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    # lock.mdb is gone once LMDB has it open: the flock keeps every other process out
    assert names == ["data.mdb", "store.lock"]
    for f in (tmp_path / "a" / "b" / "store").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_an_existing_looser_directory_of_ours_is_tightened(tmp_path: Path) -> None:
    d = tmp_path / "store"
    d.mkdir(mode=0o755)
    with PageStore(d, sync="none") as s:
        s.region_id("g")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
