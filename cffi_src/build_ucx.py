"""cffi build module for gpuwire._ucx (API mode, out of line).

One module per C header, as pyca/cryptography's _cffi_src does: this one binds
cffi_src/gw_ucx.h, the UCX engine. It compiles against the headers of the
`libucx` wheel found in the build environment and links with an rpath to the
wheel's lib dir next to the installed package ($ORIGIN/../libucx/lib); at import
gpuwire preloads the libraries through `libucx.load_library()` and checks the
runtime version (gpuwire/transport/_lib.py).
"""
import os
import sys
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # setuptools runs this file by path
from _cdef import cdef_from_header  # noqa: E402


def _ucx_prefix():
    override = os.environ.get("GPUWIRE_UCX_BUILD_PREFIX")
    if override:
        return pathlib.Path(override)
    import libucx  # the libucx-cu13 wheel (a build requirement)

    return pathlib.Path(libucx.__file__).resolve().parent


prefix = _ucx_prefix()
ffi = FFI()
# UCX status codes the Python layer maps to exceptions (values come from ucs/type/status.h)
_UCS_CODES = """
static const int UCS_OK;
static const int UCS_INPROGRESS;
static const int UCS_ERR_TIMED_OUT;
static const int UCS_ERR_CANCELED;
static const int UCS_ERR_UNREACHABLE;
static const int UCS_ERR_REJECTED;
static const int UCS_ERR_CONNECTION_RESET;
static const int UCS_ERR_ENDPOINT_TIMEOUT;
static const int UCS_ERR_NOT_CONNECTED;
static const int UCS_ERR_BUSY;
static const int UCS_ERR_INVALID_ADDR;
static const int UCS_ERR_INVALID_PARAM;
static const int UCS_ERR_NO_MEMORY;
static const int UCS_ERR_IO_ERROR;
static const int UCS_ERR_EXCEEDS_LIMIT;
static const int UCS_ERR_BUFFER_TOO_SMALL;
static const int UCS_ERR_NO_RESOURCE;
static const int UCS_ERR_NO_DEVICE;
static const int UCS_ERR_UNSUPPORTED;
"""

ffi.cdef(cdef_from_header(HERE / "gw_ucx.h") + _UCS_CODES)
ffi.set_source(
    "gpuwire._ucx",
    '#include <ucp/api/ucp.h>\n#include "gw_ucx.h"',
    sources=[os.path.relpath(HERE / "gw_ucx.c")],
    include_dirs=[str(HERE), str(prefix / "include")],
    library_dirs=[str(prefix / "lib")],
    libraries=["ucp", "uct", "ucs", "dl", "pthread"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function"],
    extra_link_args=["-Wl,-rpath,$ORIGIN/../libucx/lib", "-Wl,--disable-new-dtags"],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
