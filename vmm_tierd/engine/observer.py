"""What the engine reports as it goes. The service's metrics implement this.

Only counts and latencies that happen on a path are pushed here; anything derived
(resident bytes, working set, store size, ratios) is read at scrape time from
``Engine.region_stats()`` and ``PageStore.stats()`` by collectors.
"""

from __future__ import annotations

from typing import Protocol


class Observer(Protocol):
    def fault_served(self, region: str, kind: str, latency_s: float) -> None:
        """kind: "store" (copied back), "zero", "staging" (moved back), "wake", "rwp",
        "poison"."""

    def evicted(self, region: str, pages: int, guest_bytes: int) -> None: ...
    def refault(self, region: str, pages: int) -> None: ...
    def prefetched(self, region: str, pages: int) -> None:
        """Pages brought back with a faulting one (fault-around), without a fault."""
    def poisoned(self, region: str, pages: int) -> None: ...
    def discarded(self, region: str, pages: int, dropped: int) -> None:
        """The guest discarded ``pages`` (REMOVE/UNMAP); ``dropped`` of them were evicted
        or poisoned and are new memory now. Counted, never logged per event."""
    def error(self, op: str, errno: int) -> None: ...
    def cycle(self, region: str, phase_seconds: dict[str, float], total_s: float) -> None: ...


class NullObserver:
    def fault_served(self, region: str, kind: str, latency_s: float) -> None:
        pass

    def evicted(self, region: str, pages: int, guest_bytes: int) -> None:
        pass

    def refault(self, region: str, pages: int) -> None:
        pass

    def prefetched(self, region: str, pages: int) -> None:
        pass

    def poisoned(self, region: str, pages: int) -> None:
        pass

    def discarded(self, region: str, pages: int, dropped: int) -> None:
        pass

    def error(self, op: str, errno: int) -> None:
        pass

    def cycle(self, region: str, phase_seconds: dict[str, float], total_s: float) -> None:
        pass
