"""The VMs a daemon tiers from beside them, over their lives: each ``[[vm]]`` (or
``attach --pid``), the VMs the store remembers from a daemon that died, and those that
arrive on the handoff socket.

- A VM given by ``pid`` is attached once; when its process exits its records go.
- A VM given by ``pid_file`` (libvirt's /run/libvirt/qemu/NAME.pid) is attached whenever
  the file names a live process, and again after the VMM restarts.
- A VM the store remembers whose VMM still runs (it came by handoff, or its config entry
  is gone) is taken over: its evicted pages are only in the store.
When nothing is left to tier (no VM can come back, no region of our own, no handoff
socket), the daemon stops by itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ..attach.discover import DiscoveryError
from ..attach.handoff import HandoffError, HandoffServer
from ..attach.vm import ResumedVm, VmTiering, owner_tag, read_pid, remembered_vms
from ..engine.engine import Engine
from ..engine.store import PageStore
from ..kernel.api import Kernel, KernelError
from ..ratelimit import RateLimitedLog
from ..settings import Settings, VmSettings

log = logging.getLogger("vmm_tierd")
PID_FILE_POLL_S = 1.0
ATTACH_ERRORS = (KernelError, DiscoveryError, LookupError, HandoffError, OSError,
                 RuntimeError, ValueError)


@dataclass(frozen=True, slots=True)
class VmStats:
    name: str
    pid: int
    inject_stops: int
    inject_calls: int
    inject_pause_total_s: float
    inject_pause_max_s: float
    inject_pause_last_s: float


class VmSupervisor:
    def __init__(self, kernel: Kernel, engine: Engine, store: PageStore, settings: Settings,
                 *, on_idle: Callable[[bool], None]) -> None:
        self.k = kernel
        self.engine = engine
        self.store = store
        self.settings = settings
        self.on_idle = on_idle  # nothing left to tier (True: some VM could not be attached)
        self.log = RateLimitedLog(log, burst=3, interval_s=300)
        self.attached: dict[str, VmTiering] = {}
        self.failed: dict[str, str] = {}  # vm name -> why it could not be attached
        self.handoff: HandoffServer | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Attach every VM that runs now, report started, then follow them."""
        async with trio.open_nursery() as n:
            names = {v.name for v in self.settings.vms}
            for name, state in remembered_vms(self.store):
                if name not in names:
                    await self._resume(n, name, state.owner)
            for v in self.settings.vms:
                if v.pid is not None:
                    await self._attach_once(n, v)
                else:
                    await n.start(self._follow_pid_file, v)
            sock = self.settings.daemon.handoff_socket
            if sock is not None:
                self.handoff = HandoffServer(self.k, self.engine, self.store, sock,
                                             self.settings.daemon.handoff_uids)
                await n.start(self.handoff.serve)
            task_status.started()
            n.start_soon(self._idle_watch)

    def stats(self) -> list[VmStats]:
        out = []
        vms = list(self.attached.values()) + (self.handoff.vms if self.handoff else [])
        for vm in vms:
            if vm.proc is None or vm.exited or vm.remote is None:
                continue
            st = vm.remote.stats
            out.append(VmStats(vm.spec.name, vm.proc.pid, st.stops, st.calls, st.total_s,
                               st.max_s, st.last_s))
        return out

    @property
    def lasting(self) -> bool:
        """Could more guest memory arrive later (so idling is not the end)?"""
        s = self.settings
        return bool(s.regions or s.daemon.handoff_socket is not None
                    or any(v.pid_file is not None for v in s.vms))

    async def _idle_watch(self) -> None:
        while True:
            await trio.sleep(PID_FILE_POLL_S)
            if not self.lasting and not self.engine.runners and not self.engine.stopping:
                log.info("no VM left to tier: stopping")
                self.on_idle(bool(self.failed))
                return

    async def _resume(self, n: trio.Nursery, name: str, owner: str) -> None:
        pid = int(owner.split(":")[1]) if owner.count(":") == 2 else 0
        try:
            proc = self.k.open_process(pid)
            if owner_tag(proc.owner) != owner:
                proc.close()
                return  # another process now: the store reclaimed its records at open
            vm = ResumedVm(self.k, self.engine, self.store, VmSettings(name=name, pid=pid),
                           proc=proc)
            await n.start(vm.run)
            self.attached[name] = vm
            log.info("vm %s: taken over from the store (pid %d)", name, pid)
        except ATTACH_ERRORS as e:
            log.error("vm %s: could not take it over: %s", name, e)

    async def _attach_once(self, n: trio.Nursery, v: VmSettings) -> bool:
        vm = VmTiering(self.k, self.engine, self.store, v)
        try:
            await n.start(vm.run)
        except ATTACH_ERRORS as e:
            self.failed[v.name] = str(e)
            self.log.error(("attach", v.name), "vm %s: cannot attach: %s", v.name, e)
            return False
        self.failed.pop(v.name, None)
        self.attached[v.name] = vm
        return True

    async def _follow_pid_file(self, v: VmSettings, *,
                               task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                               ) -> None:
        """Attach whenever the pid file names a live process we are not tiering yet; a
        failed attach is retried only for another pid (the same VMM fails the same way)."""
        tried = 0
        started = False
        async with trio.open_nursery() as n:
            while not self.engine.stopping:
                try:
                    pid = read_pid(v)
                except LookupError:
                    pid = 0
                vm = self.attached.get(v.name)
                busy = vm is not None and not vm.exited and vm.runners and any(
                    not r.done.is_set() for r in vm.runners)
                if pid and pid != tried and not busy:
                    tried = pid
                    await self._attach_once(n, v)
                if not started:
                    task_status.started()
                    started = True
                await trio.sleep(PID_FILE_POLL_S)
