"""The store's directory, trusted only when it deserves it.

The daemon runs as root and the store holds guest memory, so the directory is refused
unless every directory on its path is owned by root or by us and writable by nobody else
(a sticky world-writable one such as /tmp is fine above the directory we create the store
in, but not as that directory itself), the store directory is ours and not group- or
world-writable, and each file LMDB will open (data.mdb, lock.mdb, store.lock) is absent or
a regular file of ours with one link. The path is walked with O_NOFOLLOW from its resolved
form, directories we create are 0700, our own files are opened relative to the directory
fd with O_NOFOLLOW, and LMDB is given /proc/self/fd/N, so a rename of the path after the
checks doesn't redirect anything. ``problem()`` tells later whether the directory or its
files were deleted, replaced or had their ownership or modes changed under us.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from .store_format import StoreError

FILES = ("data.mdb", "lock.mdb", "store.lock")
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _refuse(path: Path | str, what: str, fix: str, err: int = errno.EPERM) -> StoreError:
    return StoreError(f"{path}: {what}; {fix}", path=str(path), op="open", err=err)


class StoreDir:
    """An open, checked store directory and its exclusive lock."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        if not os.fspath(path):
            raise StoreError("store path is empty: set store.path (or --store) to a "
                             "directory", path="", op="open", err=errno.EINVAL)
        self.path = Path(os.path.abspath(Path(path).expanduser()))
        self.uid = os.geteuid()
        self.fd = self._open_dir()
        self.lock_fd = -1
        try:
            self.check_files()
            self.lock_fd = self.open_file("store.lock", os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                raise StoreError(f"{self.path}: store is in use by another process",
                                 path=str(self.path), op="flock",
                                 err=e.errno or errno.EBUSY) from e
        except BaseException:
            self.close()
            raise
        self._ids = self._identity()

    # ---- opening -------------------------------------------------------------------
    def _open_dir(self) -> int:
        """Walk to the store directory from "/" with O_NOFOLLOW, creating what is missing
        (0700). A symlink on the way is followed only if it and the directory holding it
        passed the checks (e.g. /var/run -> /run); the store directory itself can't be one."""
        todo = list(self.path.parts[1:])
        fd = os.open("/", DIR_FLAGS)
        here = Path("/")
        hops = 0
        try:
            self._check_ancestor(fd, here)
            while todo:
                name = todo.pop(0)
                if name in ("", "."):
                    continue
                if name == "..":
                    nfd = os.open("..", DIR_FLAGS, dir_fd=fd)
                    os.close(fd)
                    fd, here = nfd, here.parent
                    continue
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    self._check_parent_for_mkdir(fd, here)
                    try:
                        os.mkdir(name, 0o700, dir_fd=fd)
                    except FileExistsError:
                        pass
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    hops += 1
                    if not todo:
                        raise _refuse(here / name, "the store directory is a symlink",
                                      "set store.path to the directory it points to",
                                      errno.ELOOP)
                    if st.st_uid not in (0, self.uid) or hops > 40:
                        raise _refuse(here / name, f"is a symlink owned by uid {st.st_uid}"
                                      if hops <= 40 else "too many symlinks",
                                      "use a path without links other users control",
                                      errno.ELOOP)
                    target = Path(os.readlink(name, dir_fd=fd))
                    if target.is_absolute():
                        os.close(fd)
                        fd, here = os.open("/", DIR_FLAGS), Path("/")
                    todo[:0] = target.parts[1:] if target.is_absolute() else target.parts
                    continue
                try:
                    nfd = os.open(name, DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    raise self._walk_error(here / name, e) from e
                os.close(fd)
                fd, here = nfd, here / name
                if todo:
                    self._check_ancestor(fd, here)
            self._check_store_dir(fd)
            self.real = here
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _walk_error(self, where: Path, e: OSError) -> StoreError:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            return _refuse(where, "is not a directory (a symlink or a file)",
                           "the store path must be made of real directories", e.errno)
        return StoreError(f"{self.path}: can't open {where}: {e.strerror}",
                          path=str(self.path), op="open", err=e.errno or errno.EIO)

    def _check_ancestor(self, fd: int, where: Path) -> None:
        st = os.fstat(fd)
        if st.st_uid not in (0, self.uid):
            raise _refuse(where, f"is owned by uid {st.st_uid}, another user who could "
                          "replace the store", f"use a path whose directories belong to "
                          f"root or uid {self.uid}")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise _refuse(where, f"is writable by other users (mode "
                          f"{stat.S_IMODE(st.st_mode):o})", f"chmod go-w {where}")

    def _check_parent_for_mkdir(self, fd: int, where: Path) -> None:
        st = os.fstat(fd)
        if st.st_uid not in (0, self.uid) or st.st_mode & 0o022:
            raise _refuse(where, f"is owned by uid {st.st_uid} with mode "
                          f"{stat.S_IMODE(st.st_mode):o}: the store would be created in "
                          "a directory that other users can write",
                          f"create the store's parent directory as uid {self.uid} with "
                          "mode 0700, or point store.path elsewhere")

    def _check_store_dir(self, fd: int) -> None:
        st = os.fstat(fd)
        if st.st_uid != self.uid:
            raise _refuse(self.path, f"store directory is owned by uid {st.st_uid}, not by "
                          f"this daemon (uid {self.uid})",
                          f"remove it (its contents can't be trusted) or chown {self.uid} "
                          "it after checking them")
        if st.st_mode & 0o022:
            raise _refuse(self.path, f"store directory is writable by other users (mode "
                          f"{stat.S_IMODE(st.st_mode):o})",
                          "remove it (its contents can't be trusted) or chmod 0700 it "
                          "after checking them")
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.fchmod(fd, 0o700)

    def check_files(self) -> None:
        """Each file LMDB or we will open: absent, or a regular file of ours, one link."""
        for name in FILES:
            try:
                st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            where = self.path / name
            if stat.S_ISLNK(st.st_mode):
                raise _refuse(where, "is a symlink", "remove it: the store never "
                              "follows links", errno.ELOOP)
            if not stat.S_ISREG(st.st_mode):
                raise _refuse(where, "is not a regular file", "remove it")
            if st.st_uid != self.uid:
                raise _refuse(where, f"is owned by uid {st.st_uid}, not {self.uid}",
                              "remove it (it can't be trusted)")
            if st.st_nlink != 1:
                raise _refuse(where, f"has {st.st_nlink} hard links (it may be another "
                              "file's name)", "remove it")
            if stat.S_IMODE(st.st_mode) != 0o600:
                os.chmod(name, 0o600, dir_fd=self.fd, follow_symlinks=False)

    def open_file(self, name: str, flags: int) -> int:
        """Open one of our files relative to the directory, never through a link."""
        try:
            return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self.fd)
        except OSError as e:
            raise StoreError(f"{self.path / name}: can't open: {e.strerror}",
                             path=str(self.path), op="open", err=e.errno or errno.EIO) from e

    def lmdb_path(self) -> str:
        """The directory as LMDB should open it: pinned to our fd where /proc allows."""
        p = f"/proc/self/fd/{self.fd}"
        try:
            if os.stat(p).st_ino == os.fstat(self.fd).st_ino:
                return p
        except OSError:
            pass
        return str(self.path)

    # ---- later -----------------------------------------------------------------------
    def _identity(self) -> dict[str, tuple[int, int]]:
        ids = {".": self._key(os.fstat(self.fd)), "store.lock": self._key(os.fstat(self.lock_fd))}
        try:
            ids["data.mdb"] = self._key(os.stat("data.mdb", dir_fd=self.fd,
                                                follow_symlinks=False))
        except FileNotFoundError:
            pass
        return ids

    def remember(self, name: str) -> None:
        """Track ``name`` (a file created after open) in ``problem()``."""
        self._ids[name] = self._key(os.stat(name, dir_fd=self.fd, follow_symlinks=False))

    @staticmethod
    def _key(st: os.stat_result) -> tuple[int, int]:
        return st.st_dev, st.st_ino

    def problem(self) -> tuple[int, str] | None:
        """(errno, what) if the directory is no longer the one we opened and checked."""
        try:
            st = os.fstat(self.fd)
        except OSError as e:
            return e.errno or errno.EIO, f"store directory unusable: {e.strerror}"
        if st.st_nlink == 0:
            return errno.ENOENT, "store directory was deleted"
        if st.st_uid != self.uid or st.st_mode & 0o077:
            return errno.EPERM, (f"store directory ownership or mode changed (uid "
                                 f"{st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})")
        for name, key in self._ids.items():
            where = self.path if name == "." else self.path / name
            try:
                now = os.stat(where, follow_symlinks=False)
            except FileNotFoundError:
                return errno.ENOENT, f"{where} was deleted"
            except OSError as e:
                return e.errno or errno.EIO, f"{where}: {e.strerror}"
            if self._key(now) != key:
                return errno.ENOENT, f"{where} was replaced by another file"
            if name != "." and (now.st_uid != self.uid or now.st_mode & 0o077):
                return errno.EPERM, (f"{where} ownership or mode changed (uid {now.st_uid},"
                                     f" mode {stat.S_IMODE(now.st_mode):o})")
        return None

    def close(self) -> None:
        for fd in (self.lock_fd, self.fd):
            if fd >= 0:
                os.close(fd)  # closing the lock fd releases the flock
        self.lock_fd = self.fd = -1
