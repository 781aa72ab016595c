"""The pinned-mirroring kernels (gw_pinned_kernels.cu / .ptx) for the CPU executor.

Importing this module registers Python versions of every kernel in the PTX with the
CPU executor (``gpuwire serve --executor cpu --cpu-kernels gpuwire.rpc.kernels.pinned``),
so the same PTX runs on both executors. ``PTX`` / ``SOURCE`` are the shipped files."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from ..executors.cpu import register_kernel

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "gw_pinned_kernels.cu"
PTX = HERE / "gw_pinned_kernels.ptx"

DESC = struct.Struct("<QQfi")          # struct PinDesc { const float* in; float* out; float scale; int n; }


def _scale(k, x, out, a, n):
    k.array(out, np.float32, n)[:] = np.float32(a) * k.array(x, np.float32, n) + np.float32(1.0)


def _add(k, x, y, out, n):
    k.array(out, np.float32, n)[:] = k.array(x, np.float32, n) + k.array(y, np.float32, n)


def _inc(k, data, v, n):
    d = k.array(data, np.int32, n)
    d += np.int32(v)


def _struct(k, desc):
    x, out, scale, n = DESC.unpack(desc)
    k.array(out, np.float32, n)[:] = np.float32(scale) * k.array(x, np.float32, n)


def _span(k, begin, end, out):
    n = (end - begin) // 4
    if n > 0:
        k.array(out, np.float32, n)[:] = np.float32(2.0) * k.array(begin, np.float32, n)


def _key(k, key, out):
    k.array(out, np.uint64, 1)[0] = key


def _sum(k, x, out, n):
    k.array(out, np.float32, 1)[0] = np.float32(k.array(x, np.float32, n).sum(dtype=np.float64))


def _touch(k, x, out):
    k.array(out, np.float32, 1)[0] = k.array(x, np.float32, 1)[0]


register_kernel("pin_scale", _scale, ("ptr", "ptr", "f32", "i32"))
register_kernel("pin_add", _add, ("ptr", "ptr", "ptr", "i32"))
register_kernel("pin_inc", _inc, ("ptr", "i32", "i32"))
register_kernel("pin_struct", _struct, ("s24",))
register_kernel("pin_span", _span, ("ptr", "ptr", "ptr"))
register_kernel("pin_key", _key, ("u64", "ptr"))
register_kernel("pin_sum", _sum, ("ptr", "ptr", "i32"))
register_kernel("pin_touch", _touch, ("ptr", "ptr"))
