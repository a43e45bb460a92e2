"""Serve the MISSING faults of a uffd from a thread of this process (the tests' handler).

The uffd may belong to another process (minivmm's, received over the handoff socket): its
ioctls act on that process's memory, and UFFDIO_COPY reads its source from ours.
"""

from __future__ import annotations

import errno
import os
import select
import threading
import time
from collections.abc import Callable

from vmm_tierd.kernel.api import KernelError, PageFault, UffdEvent
from vmm_tierd.kernel.linux import LinuxKernel

PAGE = 4096
ZERO_PAGE = bytes(PAGE)


class FaultServer:
    """Resolves each MISSING fault with UFFDIO_COPY of ``content(page_address)``
    (default: zeros), and each RWP fault (7.3, sync mode) by un-protecting its page.
    ``stop()`` joins the thread and re-raises what it failed with."""

    def __init__(self, kernel: LinuxKernel, uffd: int,
                 content: Callable[[int], bytes] | None = None, cpu: int | None = None) -> None:
        self.kernel = kernel
        self.cpu = cpu             # pin the serving thread to this CPU
        self.uffd = uffd
        self.content = content or (lambda addr: ZERO_PAGE)
        self.faults: list[PageFault] = []
        self.other_events: list[UffdEvent] = []
        self.eexist = 0
        self.busy_s = 0.0          # time spent serving (read to copy done)
        self.error: BaseException | None = None
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="fault-server", daemon=True)

    def start(self) -> FaultServer:
        self._thread.start()
        return self

    def _run(self) -> None:
        if self.cpu is not None:
            os.sched_setaffinity(0, {self.cpu})   # this thread only
        poller = select.poll()
        poller.register(self.uffd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if self._stop_r in ready:
                    return
                t0 = time.perf_counter()
                for ev in self.kernel.uffd_read(self.uffd):
                    if isinstance(ev, PageFault):
                        self._serve(ev)
                    else:
                        self.other_events.append(ev)
                self.busy_s += time.perf_counter() - t0
        except BaseException as exc:
            self.error = exc

    def _serve(self, ev: PageFault) -> None:
        addr = ev.address & ~(PAGE - 1)
        self.faults.append(ev)
        if ev.rwp:
            self.kernel.uffd_rwprotect(self.uffd, addr, PAGE, 0)   # clear, and wake
            return
        if not ev.missing:
            raise RuntimeError(f"unexpected fault {ev}")
        try:
            self.kernel.uffd_copy(self.uffd, addr, self.content(addr))
        except KernelError as exc:
            if exc.errno != errno.EEXIST:
                raise
            # Already populated (raced by another resolution): just wake the waiter.
            self.eexist += 1
            self.kernel.uffd_wake(self.uffd, addr, PAGE)

    def stop(self) -> None:
        if self._thread.is_alive():
            os.write(self._stop_w, b"x")
            self._thread.join(timeout=30)
        for fd in (self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._stop_r = self._stop_w = -1
        if self.error is not None:
            raise RuntimeError(f"fault server failed: {self.error!r}") from self.error

    def pages(self) -> list[int]:
        """Faulting page addresses, in order."""
        return [f.address & ~(PAGE - 1) for f in self.faults]
