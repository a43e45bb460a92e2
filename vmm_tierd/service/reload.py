"""SIGHUP: read the config again, off the event loop that serves faults.

The loop that serves faults must never wait for a file: a FIFO as config froze the guest
(a blocking read with no writer), and validating a 100,000-region file took 17 s. So the
file is read, parsed and validated in a worker thread under a timeout, with the loader's
own bounds (:mod:`.loader`). Whatever goes wrong (an unreadable or hostile file, a parser
or validator defect, a thread that never returns) comes back as one ConfigError naming
the file; the caller keeps the running settings.

Only one load runs at a time. A load that timed out is abandoned (threads cannot be
killed); until it returns, further reloads fail at once instead of piling up threads.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import trio

from ..settings import Settings
from .config import ConfigError, load_settings, restart_required, with_overrides

RELOAD_TIMEOUT_S = 10.0  # reading + validating; a real config takes milliseconds
MIN_RELOAD_SPACING_S = 0.2  # SIGHUPs closer than this are merged into one reload


class ConfigLoader:
    def __init__(self, path: str, overrides: dict[str, Any],
                 timeout_s: float = RELOAD_TIMEOUT_S, *, need_memory: bool = True) -> None:
        self.path = path
        self.need_memory = need_memory  # False: the file may hold settings only
        self.overrides = overrides
        self.timeout_s = timeout_s
        self._busy = threading.Event()  # set while a worker thread reads

    def _load(self) -> Settings:
        self._busy.set()
        try:
            return with_overrides(load_settings(self.path, need_memory=self.need_memory),
                                  **self.overrides)
        except ConfigError:
            raise
        except Exception as e:  # whatever it was, it is this file's reload that failed
            raise ConfigError([f"{self.path}: cannot load: {type(e).__name__}: {e}"]) from e
        finally:
            self._busy.clear()

    async def load(self) -> Settings:
        """The new settings, or ConfigError (unreadable, invalid, too slow, still busy)."""
        if self._busy.is_set():
            raise ConfigError([f"{self.path}: the previous reload is still reading the file "
                               f"(it took longer than {self.timeout_s:g}s); try again later"])
        try:
            with trio.fail_after(self.timeout_s):
                return await trio.to_thread.run_sync(self._load, abandon_on_cancel=True)
        except trio.TooSlowError:
            raise ConfigError([f"{self.path}: reading and validating took longer than "
                               f"{self.timeout_s:g}s"]) from None


def apply(old: Settings, new: Settings) -> tuple[Settings, list[str]]:
    """The running settings with what a reload may change (tracking.*, daemon.log_level),
    and the keys that changed but need a restart."""
    # VMs given on the command line (attach --pid) are not in the file
    cli_vms = tuple(v for v in old.vms if v.pid is not None
                    and v.name not in {n.name for n in new.vms})
    new = dataclasses.replace(new, vms=new.vms + cli_vms)
    merged = dataclasses.replace(
        old, tracking=new.tracking,
        daemon=dataclasses.replace(old.daemon, log_level=new.daemon.log_level))
    return merged, restart_required(old, new)
