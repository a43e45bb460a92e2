"""The running daemon: kernel + store + engine + metrics + sd_notify + signals."""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from ..kernel import open_kernel
from ..ratelimit import RateLimitedLog
from ..settings import Settings
from . import reload as reloading
from .access import explain_open_failure
from .config import ConfigError, parse_listen
from .metrics import Metrics, MetricsServer, StateCollector
from .sdnotify import Notifier
from .startup import take_sighup
from .units import fmt_duration, fmt_size

log = logging.getLogger("vmm_tierd")
cycle_log = logging.getLogger("vmm_tierd.cycle")
STOP_GRACE_S = 5.0  # beyond shutdown_deadline, before we cancel the engine outright
VERIFY_TIMEOUT_S = 300.0  # --verify: reading back every page of every region


class Service:
    def __init__(self, settings: Settings, *, config_path: str | None,
                 overrides: dict[str, Any], seconds: float | None = None,
                 verify: bool = False, notifier: Notifier | None = None,
                 config_needs_memory: bool = True) -> None:
        self.settings = settings
        self.config_path = config_path
        self.overrides = overrides
        self.seconds = seconds
        self.verify = verify
        self.notifier = notifier or Notifier()
        self.engine: Any = None
        self.vms: Any = None
        self.store: Any = None
        self.metrics: Metrics | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stopping = False
        self._stop_event: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self._reload_wanted = False
        self._reload_event: trio.Event | None = None
        self._loader = (reloading.ConfigLoader(config_path, overrides,
                                               need_memory=config_needs_memory)
                        if config_path else None)
        self._hup_log = RateLimitedLog(log, burst=3, interval_s=60)
        self.exit_code = 0

    # ---- entry
    def run(self) -> int:
        try:
            return trio.run(self._main)
        except KeyboardInterrupt:  # Ctrl-C before the signal handlers were installed
            log.warning("interrupted during start-up")
            return 130
        finally:
            self.notifier.close()
            # The exit status is decided. Python's finalisation resets the handlers it
            # installed to SIG_DFL (but leaves SIG_IGN alone), so a late SIGHUP would end
            # the process by signal instead of with this status.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)

    async def _main(self) -> int:
        self._token = trio.lowlevel.current_trio_token()
        self._stop_event = trio.Event()
        s = self.settings
        backend = "linux" if s.daemon.backend == "auto" else s.daemon.backend
        try:
            kernel = open_kernel(backend)
        except OSError as e:
            log.error("%s", explain_open_failure(backend, e))
            return 1
        try:
            return await self._with_kernel(kernel)
        finally:
            kernel.close()

    async def _with_kernel(self, kernel: Any) -> int:
        from ..engine.engine import Engine
        from ..engine.store import PageStore

        s = self.settings
        caps = kernel.capabilities()
        if caps.strategy is None:
            log.error("%s backend (%s): %s", caps.backend, caps.release, caps.reason)
            return 1
        from ..attach.vm import vm_owner_alive

        try:
            # Records of a VMM that still runs outlive the daemon that evicted them (its
            # uffd waits in the VMM for this one to take over); every other one's go.
            store = PageStore(s.store.path, map_size=s.store.map_size_bytes,
                              zstd_level=s.store.zstd_level, sync=s.store.sync,
                              keep_cache=s.store.page_cache == "keep",
                              keep_owner=vm_owner_alive(kernel))
        except Exception as e:  # StoreError names the path and the reason
            log.error("store: %s", e)
            return 1
        self.store = store
        try:
            registry = CollectorRegistry()
            metrics = Metrics(registry, [r.name for r in s.regions], on_cycle=self._cycle_seen)
            self.metrics = metrics
            try:
                engine = Engine(kernel, s, store=store, observer=metrics, guest_side=kernel)
            except (ValueError, RuntimeError) as e:
                log.error("%s", e)
                return 1
            self.engine = engine
            registry.register(StateCollector(
                region_stats=self._region_stats,
                store_stats=lambda: store.stats(cache=True), store_health=store.health,
                interval=lambda: self.settings.tracking.interval_s, capabilities=caps,
                strategy=engine.strategy.value, store_reclaimed=getattr(store, "reclaimed", 0),
                vm_stats=lambda: self.vms.stats() if self.vms is not None else []))
            try:
                server = self._start_metrics(registry, metrics)
            except OSError as e:
                log.error("cannot serve metrics on %s: %s", s.daemon.metrics_listen, e)
                return 1
            log.info("%s backend, kernel %s, strategy %s (%s)", caps.backend, caps.release,
                     engine.strategy.value, caps.reason)
            for note in getattr(store, "notes", []):  # what opening the store found
                log.info("store: %s", note)
            try:
                await self._serve(engine)
            finally:
                if server is not None:
                    server.close()
        finally:
            store.close()
        return self.exit_code

    def _start_metrics(self, registry: CollectorRegistry,
                       metrics: Metrics) -> MetricsServer | None:
        listen = parse_listen(self.settings.daemon.metrics_listen)
        if listen is None:
            print("vmm-tierd: metrics off", file=sys.stderr, flush=True)
            return None
        server = MetricsServer(registry, *listen,
                               on_drop=lambda reason: metrics.http_dropped.labels(reason).inc())
        print(f"vmm-tierd: metrics at {server.url}", file=sys.stderr, flush=True)
        return server

    # ---- the trio part
    async def _serve(self, engine: Any) -> None:
        self._reload_event = trio.Event()
        try:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM,
                                           signal.SIGHUP) as sigs:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    scope = nursery.cancel_scope
                    nursery.start_soon(self._signals, sigs, scope)
                    nursery.start_soon(self._stop_guard, scope)
                    await nursery.start(self._run_engine, engine, scope)
                    if self.settings.vms or self.settings.daemon.handoff_socket is not None \
                            or self.store.meta_keys("vm/"):
                        await nursery.start(self._run_vms, engine)
                    self.notifier.ready(self._status_text())
                    log.info("ready: %d region(s) registered and serving",
                             len(engine.runners))
                    if take_sighup():  # held by startup.hold_sighup before the loop ran
                        self._reload_wanted = True
                    if self._reload_wanted and not self._stopping:
                        log.info("SIGHUP during start-up: reloading now that the daemon "
                                 "is ready")
                    nursery.start_soon(self._reloader)
                    if self.notifier.watchdog_s:
                        nursery.start_soon(self._watchdog, self.notifier.watchdog_s)
                    if self.seconds is not None:
                        nursery.start_soon(self._timer, self.seconds)
        except Exception as e:  # an ExceptionGroup from the nursery, too
            log.error("engine failed: %s", e, exc_info=e)
            self.exit_code = 1
        self._hup_log.flush()
        log.info("stopped")

    async def _run_vms(self, engine: Any,
                       task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        from .vms import VmSupervisor

        sup = VmSupervisor(engine.kernel, engine, self.store, self.settings,
                           on_idle=self._idle)
        self.vms = sup
        async with trio.open_nursery() as n:
            try:
                await n.start(sup.run)
            except Exception as e:  # the handoff socket can't be bound, ...
                log.error("tiering VMs failed: %s", e)
                self.exit_code = 1
                self.stop("could not start tiering VMs")
            task_status.started()

    def _idle(self, failed: bool) -> None:
        if failed:
            self.exit_code = 1  # the VM asked for could not be tiered (logged why)
        self.stop("nothing left to tier")

    async def _run_engine(self, engine: Any, scope: trio.CancelScope,
                          task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await engine.run(task_status=task_status)
            if not self._stopping:
                log.error("engine returned without being asked to stop")
                self.exit_code = 1
            elif not getattr(engine, "graceful", True):
                self.exit_code = 1  # the engine logged which region missed the deadline
        finally:
            scope.cancel()  # the helpers (signals, watchdog, timer, guard) end with it

    async def _signals(self, sigs: Any, scope: trio.CancelScope) -> None:
        async for signum in sigs:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                self.request_reload()
            elif not self._stopping:
                self.stop(name)
            else:
                log.warning("%s again: stopping now; guest memory in this process is lost, "
                            "store records are reclaimed at the next start", name)
                self.exit_code = 1
                scope.cancel()

    def request_reload(self) -> None:
        """SIGHUP: one reload soon. Requests while one is pending or running merge into
        one more; before ready they wait for it; while stopping they are ignored."""
        if self._stopping:
            self._hup_log.info("hup-stopping", "SIGHUP while stopping: ignored")
            return
        self._reload_wanted = True
        if self._reload_event is not None:
            self._reload_event.set()

    async def _reloader(self) -> None:
        assert self._reload_event is not None
        while True:
            if not self._reload_wanted:
                await self._reload_event.wait()
            self._reload_event = trio.Event()
            self._reload_wanted = False
            if self._stopping:
                continue
            await self.reload()
            await trio.sleep(reloading.MIN_RELOAD_SPACING_S)  # a burst becomes one more

    async def _timer(self, seconds: float) -> None:
        await trio.sleep(seconds)
        self.stop(f"--seconds {seconds:g} elapsed")

    async def _watchdog(self, period: float) -> None:
        while True:
            self.notifier.watchdog()
            await trio.sleep(period)

    async def _stop_guard(self, scope: trio.CancelScope) -> None:
        assert self._stop_event is not None
        await self._stop_event.wait()
        deadline = self.settings.daemon.shutdown_deadline_s + STOP_GRACE_S
        await trio.sleep(deadline)
        log.error("engine did not stop within %s; cancelling (store records are reclaimed at "
                  "the next start)", fmt_duration(deadline))
        self.exit_code = 1
        scope.cancel()

    def stop(self, why: str) -> None:
        if self._stopping:
            return
        self._stopping = True
        deadline = self.settings.daemon.shutdown_deadline_s
        log.info("stopping (%s): bringing evicted pages back, deadline %s", why,
                 fmt_duration(deadline))
        self.notifier.notify("STOPPING=1",
                             f"EXTEND_TIMEOUT_USEC={int((deadline + STOP_GRACE_S) * 1e6)}")
        if self.verify and self._nursery is not None and self.engine is not None:
            self._nursery.start_soon(self._verify_then_stop)
        else:
            self._stop_engine()

    def _stop_engine(self) -> None:
        if self.engine is not None:
            self.engine.request_stop()
        if self._stop_event is not None:
            self._stop_event.set()

    async def _verify_then_stop(self) -> None:
        """--verify: stop each built-in workload and read back every page it wrote, while
        faults are still served; then the ordinary stop."""
        try:
            for runner in getattr(self.engine, "runners", []):
                guest = runner.guest
                workload = getattr(guest, "workload", None)  # the built-in demo's only
                if workload is None:
                    continue
                await guest.stop()
                report = None
                with trio.move_on_after(VERIFY_TIMEOUT_S):
                    report = await trio.to_thread.run_sync(workload.verify,
                                                           abandon_on_cancel=True)
                name = runner.name
                if report is None:
                    log.error("verify %s: not finished within %s", name,
                              fmt_duration(VERIFY_TIMEOUT_S))
                    self.exit_code = 1
                    continue
                ok = report.lost_writes == 0 and report.corrupt_pages == 0
                (log.info if ok else log.error)(
                    "verify %s: %d pages: lost_writes %d, corrupt %d, poisoned %d: %s",
                    name, report.pages, report.lost_writes, report.corrupt_pages,
                    report.poisoned_pages, "ok" if ok else f"FAILED (pages {report.bad[:10]})")
                if not ok:
                    self.exit_code = 1
        finally:
            self._stop_engine()

    async def reload(self) -> None:
        if self._loader is None:
            self._hup_log.warning("hup-default", "SIGHUP: running the embedded default (no "
                                  "--config); nothing to reload")
            return
        self.notifier.reloading()
        try:
            new = await self._loader.load()
        except ConfigError as e:
            for line in e.errors[:20]:
                log.error("reload: %s", line)
            if len(e.errors) > 20:
                log.error("reload: ... and %d more errors", len(e.errors) - 20)
            log.error("reload failed; keeping the running settings")
            if self.metrics is not None:
                self.metrics.reload_failures.inc()
        else:
            old = self.settings
            self.settings, restart = reloading.apply(old, new)
            for key in restart:
                log.warning("reload: %s changed: requires restart (ignored until then)", key)
            if self.engine is not None:
                self.engine.update_tracking(new.tracking)
            logging.getLogger().setLevel(new.daemon.log_level.upper())
            if self.metrics is not None:
                self.metrics.reloads.inc()
            log.info("reloaded %s: interval %s -> %s", self.config_path,
                     fmt_duration(old.tracking.interval_s),
                     fmt_duration(new.tracking.interval_s))
        self.notifier.ready(self._status_text())

    def _region_stats(self) -> list[Any]:
        """For scrapes (HTTP thread): snapshot on the trio thread, which owns the engine's
        counters, so resident + evicted always add up."""
        try:
            return list(trio.from_thread.run_sync(self.engine.region_stats,
                                                  trio_token=self._token))
        except (trio.RunFinishedError, RuntimeError):  # not running (yet, or any more)
            return list(self.engine.region_stats())

    # ---- per-cycle report
    def _cycle_seen(self, region: str, total_s: float) -> None:
        """Observer.cycle hook; may run on any thread, so hop to the trio thread."""
        if self._token is None:
            return
        try:
            self._token.run_sync_soon(self._report, region)
        except trio.RunFinishedError:
            pass

    def _report(self, region: str) -> None:
        if self.engine is None:
            return
        stats = {r.name: r for r in self.engine.region_stats()}
        r = stats.get(region)
        if r is None:
            return
        st = self.store.stats()
        cycle_log.info(
            "%s: ws %s  cold %s  evicted %s  resident %s  faults %d  store %d rec, %s on disk",
            r.name, fmt_size(r.working_set_bytes), fmt_size(r.cold_bytes),
            fmt_size(r.evicted_bytes), fmt_size(r.resident_bytes), sum(r.faults.values()),
            st.records, fmt_size(st.disk_bytes))
        self.notifier.status(self._status_text(list(stats.values())))

    def _status_text(self, stats: list[Any] | None = None) -> str:
        if self.engine is None:
            return "starting"
        stats = self.engine.region_stats() if stats is None else stats
        ws = sum(r.working_set_bytes for r in stats)
        guest = sum(r.guest_bytes for r in stats)
        ev = sum(r.evicted_bytes for r in stats)
        return (f"working set {fmt_size(ws)} of {fmt_size(guest)}, evicted {fmt_size(ev)}, "
                f"interval {fmt_duration(self.settings.tracking.interval_s)}")
