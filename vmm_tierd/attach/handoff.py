"""The handoff socket: VMMs that create their guest RAM's uffd themselves send it here.

The message is Firecracker's, exactly: one ``sendmsg`` of a JSON array of
``{"base_host_virt_addr", "size", "offset", "page_size"}`` objects (``page_size_kib``, a
deprecated key that holds bytes, is read when ``page_size`` is missing), with the uffd
as SCM_RIGHTS; the VMM's guest-RAM memfd as a second fd (e2b's extension) is required
here, because RAM that is not a shared memfd can't be evicted from outside the VMM.

The peer is checked with SO_PEERCRED (its uid must be allowed); its pid tells whose
address space the uffd belongs to (pagemap scans, injected PTE zaps for the wp
strategy). The VMM must keep its own copy of the uffd: if the last reference were ours
and this daemon died, the guest would read zeros where pages were evicted. A line
``ok`` or ``error: ...`` answers; the VMM may start its vCPUs on either (Firecracker
does not wait for it).
"""

from __future__ import annotations

import array
import json
import logging
import os
import socket
import stat
import struct
from dataclasses import replace
from pathlib import Path

import trio

from ..engine.engine import Engine
from ..engine.store import PageStore
from ..kernel.api import Kernel, KernelError, MemType, Region
from ..kernel.process import Process
from ..settings import VmSettings
from .guest import ProcessSpace, RemoteGuest
from .vm import VmState, VmTiering

log = logging.getLogger("vmm_tierd.attach")
MAX_MSG = 64 << 10
RECV_TIMEOUT_S = 5.0


class HandoffError(ValueError):
    pass


def parse_message(raw: bytes) -> list[tuple[int, int, int, int]]:
    """(base_host_virt_addr, size, offset, page_size) of every region, validated."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise HandoffError(f"not JSON: {e}") from None
    if not isinstance(doc, list) or not doc:
        raise HandoffError("expected a non-empty JSON array of regions")
    out = []
    for i, r in enumerate(doc):
        if not isinstance(r, dict):
            raise HandoffError(f"region {i}: not an object")
        ps = r.get("page_size", r.get("page_size_kib"))
        vals = (r.get("base_host_virt_addr"), r.get("size"), r.get("offset"), ps)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in vals):
            raise HandoffError(f"region {i}: base_host_virt_addr, size, offset and page_size "
                               f"must be non-negative integers, got {r!r}"[:300])
        addr, size, off, page = (int(v) for v in vals)  # type: ignore[arg-type]
        if page != 4096 or addr % page or size % page or off % page or not size:
            raise HandoffError(f"region {i}: only 4 KiB pages, page aligned and non-empty "
                               f"(got addr 0x{addr:x}, size {size}, offset {off}, "
                               f"page_size {page})")
        out.append((addr, size, off, page))
    out.sort()
    return out


def merge_regions(regions: list[tuple[int, int, int, int]]) -> tuple[int, int, int]:
    """One uffd serves one engine region: the regions must be one contiguous run of the
    VMM's address space and of the memfd (as one mapping of it is)."""
    addr, size, off, _ = regions[0]
    for a, s, o, _ in regions[1:]:
        if a != addr + size or o != off + size:
            raise HandoffError("the regions are not one contiguous mapping of the memfd; "
                               "send one message (and uffd) per mapping")
        size += s
    return addr, size, off


class HandoffVm(VmTiering):
    """A VM whose uffd and memfd came over the socket."""

    def __init__(self, kernel: Kernel, engine: Engine, store: PageStore, proc: Process,
                 region: Region, uffd: int, memfd: int) -> None:
        super().__init__(kernel, engine, store, VmSettings(name=f"handoff-{proc.pid}"),
                         proc=proc)
        self.region = region
        self.uffd = uffd
        self.memfd = memfd

    def plan(self, space: ProcessSpace, tag: str, prev: VmState | None) -> list[RemoteGuest]:
        proc = space.proc
        mine = {_inode(self.uffd): "uffd", _inode(self.memfd): "memfd"}
        theirs = {mine[f.inode]: f.fd for f in proc.fds() if f.inode in mine}
        if "uffd" not in theirs:
            log.warning("%s: the VMM does not keep its own copy of the uffd: if this daemon "
                        "died, its guest would read zeros where pages were evicted",
                        self.spec.name)
        region = replace(self.region, owner_fd=theirs.get("memfd", -1))
        return [RemoteGuest(self.k, space, region, vm=self.spec.name,
                            name=f"{self.spec.name}/ram0", source="handoff",
                            remote_fd=theirs.get("uffd", -1), local_uffd=self.uffd,
                            local_memfd=self.memfd, vmm_keeps_uffd="uffd" in theirs,
                            store_owner=tag)]


def _inode(fd: int) -> int:
    return os.fstat(fd).st_ino


class HandoffServer:
    def __init__(self, kernel: Kernel, engine: Engine, store: PageStore, path: Path,
                 allowed_uids: tuple[int, ...]) -> None:
        self.k = kernel
        self.engine = engine
        self.store = store
        self.path = path
        self.allowed = set(allowed_uids) | {os.geteuid()}
        self.vms: list[HandoffVm] = []

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._clear_stale()
            await sock.bind(str(self.path))
            # Anyone may connect; SO_PEERCRED decides who is heard.
            os.chmod(self.path, 0o666)
            sock.listen(16)
            log.info("handoff socket at %s (uids %s)", self.path, sorted(self.allowed))
            task_status.started()
            async with trio.open_nursery() as n:
                while True:
                    conn, _ = await sock.accept()
                    n.start_soon(self._handle, conn, n)
        finally:
            sock.close()
            try:
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    os.unlink(self.path)
            except OSError:
                pass

    def _clear_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise HandoffError(f"handoff socket {self.path}: exists and is not a socket; "
                               "remove it or choose another daemon.handoff_socket")
        os.unlink(self.path)  # left by an earlier instance (the lock is the store's)

    async def _handle(self, conn: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        fds: list[int] = []
        with conn:
            try:
                pid, uid, _ = struct.unpack("3i", conn.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
                if uid not in self.allowed:
                    raise HandoffError(f"peer pid {pid} uid {uid} is not allowed "
                                       f"(daemon.handoff_uids)")
                with trio.fail_after(RECV_TIMEOUT_S):
                    raw, fds = await _recv_with_fds(conn)
                vm = self._vm(pid, raw, fds)
                fds = []  # the VM owns them now
                await nursery.start(vm.run)
                self.vms.append(vm)
                await conn.send(b"ok\n")
            except (HandoffError, KernelError, LookupError, OSError, trio.TooSlowError) as e:
                log.error("handoff %s: refused: %s", self.path, e)
                try:
                    await conn.send(f"error: {e}\n".encode()[:4096])
                except OSError:
                    pass
            finally:
                for fd in fds:
                    os.close(fd)

    def _vm(self, pid: int, raw: bytes, fds: list[int]) -> HandoffVm:
        if len(fds) < 2:
            raise HandoffError(f"pid {pid} sent {len(fds)} fd(s): the uffd and the guest-RAM "
                               "memfd are needed (RAM that is not a shared memfd can't be "
                               "evicted from outside the VMM)")
        addr, size, off = merge_regions(parse_message(raw))
        proc = self.k.open_process(pid)
        try:
            mapping = next((m for m in proc.maps() if m.start <= addr and addr + size <= m.end),
                           None)
            if (mapping is None or not mapping.shared
                    or mapping.inode != _inode(fds[1])
                    or mapping.offset + (addr - mapping.start) != off):
                raise HandoffError(f"pid {pid}: [0x{addr:x}, 0x{addr + size:x}) is not a "
                                   "shared mapping of the memfd it sent at that offset")
            region = Region(addr=addr, length=size, memtype=MemType.MEMFD, offset=off,
                            owner=proc.owner)
            return HandoffVm(self.k, self.engine, self.store, proc, region, fds[0], fds[1])
        except BaseException:
            proc.close()
            raise


async def _recv_with_fds(conn: trio.socket.SocketType) -> tuple[bytes, list[int]]:
    """One message and the fds that came with it (Firecracker sends both at once); more
    bytes up to a parseable JSON document if the peer sent it in pieces."""
    fds: list[int] = []
    data = b""
    cmsg_space = socket.CMSG_SPACE(4 * array.array("i").itemsize)
    while True:
        msg, anc, _flags, _ = await conn.recvmsg(MAX_MSG, cmsg_space)
        for level, typ, payload in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(payload[: len(payload) - len(payload) % a.itemsize])
                fds.extend(a)
        if not msg:
            break
        data += msg
        try:
            json.loads(data)
            break
        except ValueError:
            if len(data) > MAX_MSG:
                raise HandoffError("message too long") from None
    return data, fds
