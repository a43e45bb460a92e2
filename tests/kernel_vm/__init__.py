"""Run a pytest selection inside a real Linux >= 7.3 guest (Debian's kernel) under QEMU/TCG.

``python -m tests.kernel_vm [options] [-- pytest args]``; see ``__main__.py``.
"""
