"""cffi build module for gpuwire._rpc (API mode, out of line): the RPC layer's C hot
paths (cffi_src/gw_rpc.h): the client's batch encoder, the server's frame decoder and
its dispatch loop for hot calls. No dependencies beyond libc: the CUDA driver is
reached through function pointers the GPU executor passes in."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # setuptools runs this file by path
from _cdef import libc_only_ffi  # noqa: E402

ffi = libc_only_ffi("_rpc", "gw_rpc", keep_values=True)

if __name__ == "__main__":
    ffi.compile(verbose=True)
