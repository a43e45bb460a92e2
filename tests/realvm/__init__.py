"""A real QEMU running a real Linux guest with memfd RAM, as a test rig (see guest.py)."""
