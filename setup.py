"""Build hook for the cffi extensions (API mode, out of line); metadata lives in pyproject.toml."""
from setuptools import setup

setup(cffi_modules=["cffi_src/build_ucx.py:ffi", "cffi_src/build_rpc.py:ffi", "cffi_src/build_pinned.py:ffi",
                     "cffi_src/build_files.py:ffi"])
