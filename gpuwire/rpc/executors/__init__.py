"""Executors behind ``gpuwire serve``: ``cpu`` (host RAM, Python kernels) and ``gpu``
(the CUDA driver through cuda.bindings; imported only when asked for)."""
from __future__ import annotations

from typing import Any

from .base import CudaCallError, Executor, ExecutorSession, MemoryMap

__all__ = ["make_executor", "CudaCallError", "Executor", "ExecutorSession", "MemoryMap", "register_kernel"]


def make_executor(kind: str, **kw: Any) -> Executor:
    if kind == "cpu":
        from .cpu import CPUExecutor
        return CPUExecutor(**{k: v for k, v in kw.items() if k in ("mem_bytes",)})
    if kind == "gpu":
        from .gpu import GPUExecutor
        return GPUExecutor(**{k: v for k, v in kw.items() if k in ("devices",)})
    raise ValueError(f"unknown executor {kind!r} (cpu or gpu)")


def register_kernel(name, fn, param_types):
    """Register a Python kernel with the CPU executor (see executors.cpu.register_kernel)."""
    from .cpu import register_kernel as _r
    return _r(name, fn, param_types)
