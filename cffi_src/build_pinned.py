"""cffi build module for gpuwire._pinned (API mode, out of line): the pinned-region
registry of the client (cffi_src/gw_pinned.h): interval lookup of kernel parameter
values, the compare-mode diff and mlock. No dependencies beyond libc."""
import os
import sys
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # setuptools runs this file by path
from _cdef import cdef_from_header  # noqa: E402


ffi = FFI()
ffi.cdef(cdef_from_header(HERE / "gw_pinned.h", keep_values=True))
ffi.set_source(
    "gpuwire._pinned",
    '#include "gw_pinned.h"',
    sources=[os.path.relpath(HERE / "gw_pinned.c")],
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function"],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
