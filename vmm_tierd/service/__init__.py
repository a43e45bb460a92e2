"""Everything operators touch: config, metrics, systemd, the run loop."""
