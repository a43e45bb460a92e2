"""Shared pytest configuration (kept minimal; helpers append fixtures here)."""
