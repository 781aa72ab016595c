"""Loads the UCX libraries and the cffi engine, and checks they agree.

Order matters: the UCX shared libraries are loaded first (from the `libucx`
wheel through ``libucx.load_library()``, which honours
RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY, or from GPUWIRE_UCX_LIBDIR), so the
engine's NEEDED libucp.so.0 binds to them and not to whatever the system
loader would find first. Then ``ucp_get_version`` is compared with the UCX API
version the engine was compiled against.
"""
from __future__ import annotations

import ctypes
import os

from .. import settings

settings.register(
    "ucx_libdir", "", str,
    "Directory holding another libucp/libuct/libucs (e.g. a system UCX built with verbs "
    "for RDMA); loaded instead of the libucx wheel's. Empty: the wheel's (or the system's "
    "when RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY=true).", layer="transport")

_LIBS = ["libucs.so", "libucs_signal.so", "libuct.so", "libucp.so"]


class UCXLibraryError(ImportError):
    """The UCX library found at run time cannot serve this build of gpuwire."""


def _load_from_dir(libdir: str) -> list:
    handles = []
    for name in _LIBS:
        path = None
        for cand in (name + ".0", name):
            p = os.path.join(libdir, cand)
            if os.path.exists(p):
                path = p
                break
        if path is None:
            if name == "libucs_signal.so":
                continue
            raise UCXLibraryError(f"GPUWIRE_UCX_LIBDIR={libdir!r}: {name}(.0) not found there")
        handles.append(ctypes.CDLL(path, ctypes.RTLD_GLOBAL))
    return handles


def _preload() -> str:
    libdir = settings.get("ucx_libdir")
    if libdir:
        _load_from_dir(libdir)
        return f"GPUWIRE_UCX_LIBDIR={libdir}"
    try:
        import libucx
    except ImportError:
        return "system loader (libucx wheel not installed)"
    libucx.load_library()
    return "libucx wheel" + (" (system preferred)" if os.getenv(
        "RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY", "false").lower() != "false" else "")


_source = _preload()
try:
    from .. import _ucx  # noqa: E402
except ImportError as e:  # pragma: no cover - depends on the install
    raise UCXLibraryError(
        f"gpuwire's UCX engine (gpuwire._ucx) failed to load: {e}. Reinstall gpuwire "
        "(`pip install -e .`) so the extension is built, and check that libucx-cu13 is "
        "installed or GPUWIRE_UCX_LIBDIR points at a UCX lib dir.") from e

ffi = _ucx.ffi
lib = _ucx.lib


def built_version() -> tuple[int, int]:
    v = lib.gw_built_api_version()
    return (v >> 16, v & 0xFFFF)


def runtime_version() -> tuple[int, int, int]:
    a = ffi.new("unsigned[3]")
    lib.gw_runtime_version(a, a + 1, a + 2)
    return (a[0], a[1], a[2])


def library_path() -> str:
    buf = ffi.new("char[4096]")
    if lib.gw_lib_path(buf, 4096) != 0:
        return "?"
    return ffi.string(buf).decode()


def check_version() -> None:
    bmaj, bmin = built_version()
    rmaj, rmin, rrel = runtime_version()
    if rmaj != bmaj or rmin < bmin:
        raise UCXLibraryError(
            f"gpuwire was built against UCX {bmaj}.{bmin} but libucp {rmaj}.{rmin}.{rrel} "
            f"was loaded from {library_path()} (via {_source}). UCX is backward compatible "
            f"only within major {bmaj} and from {bmaj}.{bmin} on: install libucx-cu13>={bmaj}.{bmin}, "
            "or point GPUWIRE_UCX_LIBDIR at a newer UCX, or rebuild gpuwire against this one.")


check_version()
load_source = _source
