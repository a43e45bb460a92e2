"""Table-driven conformance cases run against every kernel backend and memory type."""
