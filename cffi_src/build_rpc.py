"""cffi build module for gpuwire._rpc (API mode, out of line): the RPC layer's C hot
paths (cffi_src/gw_rpc.h): the client's batch encoder, the server's frame decoder and
its dispatch loop for hot calls. No dependencies beyond libc: the CUDA driver is
reached through function pointers the GPU executor passes in."""
import os
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent


def _cdef_from_header(path):
    out = []
    for line in path.read_text().splitlines():
        s = line.strip()
        if s.startswith("#"):
            if s.startswith("#define GW_"):
                parts = s.split()
                name = parts[1]
                if not name.endswith("_H") and len(parts) >= 3:
                    # integer literals keep their value (array sizes need it)
                    out.append(f"#define {name} {parts[2]}")
            continue
        out.append(line)
    return "\n".join(out)


ffi = FFI()
ffi.cdef(_cdef_from_header(HERE / "gw_rpc.h"))
ffi.set_source(
    "gpuwire._rpc",
    '#include "gw_rpc.h"',
    sources=[os.path.relpath(HERE / "gw_rpc.c")],
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function"],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
