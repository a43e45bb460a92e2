"""The per-page state byte's bits, defined once (the layout is described in ``pages``,
their one owner; ``policy`` reads them for ageing and selection)."""

from __future__ import annotations

KIND = 0x03
RESIDENT = 0x00
EVICTED = 0x01
POISONED = 0x02
BACK = 0x03
ONCE = 0x04  # RESIDENT only: evicted since last known empty
EXPIRED = 0x04  # EVICTED/BACK only
ZERO = 0x08  # EVICTED/BACK only
HOLD_SHIFT = 3  # RESIDENT only: bits 3..7
HOLD_MAX = 0xFF >> HOLD_SHIFT
LEVEL_SHIFT = 4  # EVICTED/BACK only: bits 4..7, half the hold served before (see pages)
LEVEL_MAX = 0xFF >> LEVEL_SHIFT
