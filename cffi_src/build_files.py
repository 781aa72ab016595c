"""cffi build module for gpuwire._files (API mode, out of line): the per-piece loop of the
server's remote file reads (cffi_src/gw_files.h): pread into host memory, or into a
pinned buffer + cuMemcpyHtoDAsync, with the GIL released. libcuda is dlopen'ed at run
time; the module builds and imports without CUDA."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # setuptools runs this file by path
from _cdef import libc_only_ffi  # noqa: E402

ffi = libc_only_ffi("_files", "gw_files", libraries=["dl"])

if __name__ == "__main__":
    ffi.compile(verbose=True)
