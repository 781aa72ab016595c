"""cffi build module for gpuwire._pinned (API mode, out of line): the pinned-region
registry of the client (cffi_src/gw_pinned.h): interval lookup of kernel parameter
values, the compare-mode diff and mlock. No dependencies beyond libc."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # setuptools runs this file by path
from _cdef import libc_only_ffi  # noqa: E402

ffi = libc_only_ffi("_pinned", "gw_pinned", keep_values=True)

if __name__ == "__main__":
    ffi.compile(verbose=True)
