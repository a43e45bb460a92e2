# The C parts (ioctl wrappers, guest-memory accessors, workload threads) are
# compiled here, at install time, by cffi in API mode. Nothing compiles at run time.
from setuptools import setup

setup(cffi_modules=["native/build.py:ffibuilder"])
