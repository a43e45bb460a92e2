"""One VM tiered from beside it: find its process and guest RAM, attach (or take over
what a dead daemon left), run one engine region per RAM mapping, and end with it.

The store keeps, per VM, which uffd fd the VMM holds for us (``vm/NAME`` metadata) and
the records of its pages, owned by the VMM's identity (pid and start time), not by this
daemon: they outlive a daemon crash for the next one to take over, and never serve a VM
they did not come from (a VMM restarted under the same name has another start time, a
reused pid too).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from ..engine.engine import Engine
from ..engine.runner import RegionRunner
from ..engine.store import PageStore
from ..kernel.api import Kernel, KernelError, Owner, Region
from ..kernel.process import Process
from ..kernel.remote import RemoteSpace
from ..settings import VmSettings
from .discover import find_guest_ram
from .guest import ProcessSpace, RemoteGuest

log = logging.getLogger("vmm_tierd.attach")


def owner_tag(owner: Owner) -> str:
    return f"vm:{owner.pid}:{owner.start_time}"


def vm_owner_alive(kernel: Kernel) -> Callable[[str], bool]:
    """A store ``keep_owner`` predicate: keep records of VMMs that still run."""
    def keep(tag: str) -> bool:
        parts = tag.split(":")
        if len(parts) != 3 or parts[0] != "vm":
            return False
        try:
            pid, start = int(parts[1]), int(parts[2])
            p = kernel.open_process(pid)
        except (ValueError, KernelError, NotImplementedError):
            return False
        try:
            return p.owner == Owner(pid, start) and p.alive()
        finally:
            p.close()
    return keep


def read_pid(spec: VmSettings) -> int:
    if spec.pid is not None:
        return spec.pid
    assert spec.pid_file is not None
    try:
        text = spec.pid_file.read_text().strip()
    except OSError as e:
        raise LookupError(f"vm {spec.name}: can't read pid file {spec.pid_file}: "
                          f"{e.strerror}") from None
    if not text.isdigit():
        raise LookupError(f"vm {spec.name}: pid file {spec.pid_file} holds {text[:40]!r}, "
                          "not a pid")
    return int(text)


def holds_uffd(proc: Process, fd: int) -> bool:
    """Does the VMM still hold a uffd (set up by UFFDIO_API) at ``fd``?"""
    try:
        return (any(f.fd == fd and f.is_uffd for f in proc.fds())
                and proc.uffd_features(fd) is not None)
    except KernelError:
        return False


@dataclass
class VmState:
    """What the store remembers of an attached VM (JSON under ``vm/NAME``)."""

    owner: str
    regions: list[dict[str, object]] = field(default_factory=list)

    def dump(self) -> bytes:
        return json.dumps({"owner": self.owner, "regions": self.regions}).encode()

    @classmethod
    def load(cls, raw: bytes | None) -> VmState | None:
        if raw is None:
            return None
        try:
            d = json.loads(raw)
            return cls(str(d["owner"]), list(d["regions"]))
        except (ValueError, KeyError, TypeError):
            return None


class VmTiering:
    """One VM. ``plan`` decides its regions and where each one's uffd comes from:
    discovery of its RAM (``[[vm]]``, attach), the handoff message, or the store's
    record of a VM a dead daemon was tiering (resume)."""

    def __init__(self, kernel: Kernel, engine: Engine, store: PageStore, spec: VmSettings,
                 *, proc: Process | None = None) -> None:
        self.k = kernel
        self.engine = engine
        self.store = store
        self.spec = spec
        self.proc = proc
        self.remote: RemoteSpace | None = None
        self.runners: list[RegionRunner] = []
        self.exited = False

    @property
    def meta_key(self) -> str:
        return f"vm/{self.spec.name}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Attach, report started, then run until the VMM exits or the engine stops."""
        spec = self.spec
        proc = self.proc = self.proc or self.k.open_process(read_pid(spec))
        try:
            remote = self.remote = RemoteSpace(proc, thread=spec.inject_thread)
            space = ProcessSpace(proc, remote)
            tag = owner_tag(proc.owner)
            prev = VmState.load(self.store.get_meta(self.meta_key))
            if prev is not None and prev.owner != tag:
                prev = None  # another VM under this name: its records are dead
            state = VmState(tag)
            try:
                for guest in self.plan(space, tag, prev):
                    self.runners.append(await self.engine.add(guest))
                    state.regions.append({**guest.ram.to_dict(), "name": guest.name,
                                          "remote_fd": guest.remote_fd})
                    self.store.put_meta(self.meta_key, state.dump())
            except BaseException:
                for r in self.runners:
                    r.request_stop()
                raise
            log.info("vm %s: pid %d attached, %d region(s) of guest RAM", spec.name,
                     proc.pid, len(self.runners))
            task_status.started()
            await self._until_done(proc)
        finally:
            await self._finish(proc)

    def plan(self, space: ProcessSpace, tag: str, prev: VmState | None) -> list[RemoteGuest]:
        """Discover the VMM's guest RAM; take over the uffds a dead daemon left."""
        before = {} if prev is None else {(r.get("addr"), r.get("length")): r
                                          for r in prev.regions}
        out = []
        for i, ram in enumerate(find_guest_ram(space.proc, self.spec.memfd,
                                               self.k.page_size)):
            region = ram.region(self.k.page_size, space.proc.owner)
            out.append(self._guest(space, region, f"{self.spec.name}/ram{i}",
                                   before.get((region.addr, region.length)), tag))
        return out

    def _guest(self, space: ProcessSpace, region: Region, name: str,
               prev: dict[str, object] | None, tag: str) -> RemoteGuest:
        proc = space.proc
        fd = prev.get("remote_fd") if prev else None
        takeover = False
        if isinstance(fd, int) and fd >= 0:
            takeover = holds_uffd(proc, fd)
            if not takeover:
                log.warning("%s: the VMM no longer holds uffd fd %d; attaching afresh "
                            "(pages evicted before are lost if any)", name, fd)
        return RemoteGuest(self.k, space, region, vm=self.spec.name, name=name,
                           source="takeover" if takeover else "inject",
                           remote_fd=fd if takeover and isinstance(fd, int) else -1,
                           store_owner=tag)

    async def _until_done(self, proc: Process) -> None:
        async with trio.open_nursery() as n:
            async def exited() -> None:
                await trio.lowlevel.wait_readable(proc.pidfd)
                self.exited = True
                log.info("vm %s: pid %d exited; dropping its records", self.spec.name,
                         proc.pid)
                for r in self.runners:
                    r.vanish()

            async def ended() -> None:
                for r in self.runners:
                    await r.done.wait()
                n.cancel_scope.cancel()

            n.start_soon(exited)
            n.start_soon(ended)

    async def _finish(self, proc: Process) -> None:
        with trio.CancelScope(shield=True):
            graceful = all(r.graceful for r in self.runners) and self.runners
            if self.remote is not None and proc.alive():
                try:
                    await trio.to_thread.run_sync(self.remote.release)
                except KernelError as e:
                    log.error("vm %s: releasing the scratch page in the VMM: %s",
                              self.spec.name, e)
            if self.exited or graceful:
                try:
                    self.store.delete_meta(self.meta_key)
                except Exception as e:  # reclaimed at the next start
                    log.error("vm %s: deleting its store entry: %s", self.spec.name, e)
            proc.close()


class ResumedVm(VmTiering):
    """A VM only the store remembers (it came by handoff, no config names it): take each
    region's uffd and memfd back by the VMM's fd numbers recorded then."""

    def plan(self, space: ProcessSpace, tag: str, prev: VmState | None) -> list[RemoteGuest]:
        if prev is None:
            raise LookupError(f"vm {self.spec.name}: nothing to resume (no record of it, or "
                              "its process is another one now)")
        out = []
        for r in prev.regions:
            fd = r.get("remote_fd")
            region = Region.from_dict(r)
            if not isinstance(fd, int) or not holds_uffd(space.proc, fd) or region.owner_fd < 0:
                raise LookupError(f"vm {self.spec.name}: the VMM no longer holds the uffd it "
                                  f"handed over (fd {fd})")
            out.append(RemoteGuest(self.k, space, region, vm=self.spec.name,
                                   name=str(r.get("name")), source="takeover", remote_fd=fd,
                                   store_owner=tag))
        return out


def remembered_vms(store: PageStore) -> list[tuple[str, VmState]]:
    """Every VM the store has a record of (name, state)."""
    out = []
    for key in store.meta_keys("vm/"):
        st = VmState.load(store.get_meta(key))
        if st is not None:
            out.append((key[len("vm/"):], st))
    return out

