"""cffi build module for gpuwire._files (API mode, out of line): the per-piece loop of the
server's remote file reads (cffi_src/gw_files.h): pread into host memory, or into a
pinned buffer + cuMemcpyHtoDAsync, with the GIL released. libcuda is dlopen'ed at run
time; the module builds and imports without CUDA."""
import os
import sys
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # setuptools runs this file by path
from _cdef import cdef_from_header  # noqa: E402


ffi = FFI()
ffi.cdef(cdef_from_header(HERE / "gw_files.h"))
ffi.set_source(
    "gpuwire._files",
    '#include "gw_files.h"',
    sources=[os.path.relpath(HERE / "gw_files.c")],
    include_dirs=[str(HERE)],
    libraries=["dl"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function"],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
