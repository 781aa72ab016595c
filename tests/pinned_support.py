"""Shared by the pinned-region tests (test_pinned*.py): the loopback server with the pinned
test kernels registered, the kernel module, and result checks."""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from gpuwire.rpc.kernels import pinned as PK
from test_rpc_support import EXECUTORS, start_server

F32 = np.float32


@pytest.fixture(scope="module", params=EXECUTORS)
def server(request):
    """A real `gpuwire serve` (CPU executor in CI, the GPU executor where there is a GPU) with the
    CPU versions of the pinned test kernels registered."""
    srv = start_server(request.param, extra=["--cpu-kernels", "gpuwire.rpc.kernels.pinned"])
    srv.kind = request.param
    yield srv
    srv.stop()


@pytest.fixture(autouse=False)
def mirrored():
    """Sessions opened under it mirror host_alloc memory (rpc_hostmap=off): the mirror tests are
    about the mirrors, which a same-host session would not use (test_hostmap.py covers that)."""
    from gpuwire import settings
    import gpuwire.rpc.client  # noqa: F401 (registers the rpc settings)
    with settings.override(rpc_hostmap="off"):
        yield


@pytest.fixture()
def mod(s):
    return s.load_module(PK.PTX)


def check(actual, expected):
    """Same values and same bytes (crc32 of both)."""
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=actual.dtype)
    assert actual.shape == expected.shape
    assert zlib.crc32(actual.tobytes()) == zlib.crc32(expected.tobytes()), \
        f"checksum differs: first mismatch at {np.flatnonzero(actual != expected)[:5]}"
    np.testing.assert_array_equal(actual, expected)


def f32(s, n):
    """n float32 of pinned memory (cuMemHostAlloc through the session)."""
    return s.host_alloc(n * 4).view(F32)


def addr(a):
    return int(a.ctypes.data)
