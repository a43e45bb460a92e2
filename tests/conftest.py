"""Shared pytest configuration (kept minimal; helpers append fixtures here)."""

pytest_plugins = ["tests.remote.fixtures"]
