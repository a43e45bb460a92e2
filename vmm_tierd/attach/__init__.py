"""Tiering another process's memory: a VMM beside the daemon (attach, handoff)."""
