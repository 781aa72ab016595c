"""cffi build module for gpuwire._rpc (API mode, out of line): the RPC layer's C hot
paths (cffi_src/gw_rpc.h): the client's batch encoder, the server's frame decoder and
its dispatch loop for hot calls. No dependencies beyond libc: the CUDA driver is
reached through function pointers the GPU executor passes in."""
import os
import sys
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # setuptools runs this file by path
from _cdef import cdef_from_header  # noqa: E402


ffi = FFI()
ffi.cdef(cdef_from_header(HERE / "gw_rpc.h", keep_values=True))
ffi.set_source(
    "gpuwire._rpc",
    '#include "gw_rpc.h"',
    sources=[os.path.relpath(HERE / "gw_rpc.c")],
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function"],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
