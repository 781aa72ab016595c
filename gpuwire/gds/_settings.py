"""Settings of the gds layer (GPUWIRE_GDS_*); see docs/gds.md."""
from __future__ import annotations

from .. import settings

BACKENDS = ("auto", "kvikio", "posix", "host")


def _backend(text: str) -> str:
    v = str(text).strip().lower()
    if v not in BACKENDS:
        raise ValueError(f"must be one of {', '.join(BACKENDS)}")
    return v


def _nonneg_int(text) -> int:
    v = int(text)
    if v < 0:
        raise ValueError("must be >= 0")
    return v


def _pos_int(text) -> int:
    v = int(text)
    if v <= 0:
        raise ValueError("must be > 0")
    return v


settings.register(
    "gds_backend", "auto", _backend,
    "file-read backend: auto|kvikio|posix|host (auto: kvikio if it and a GPU work, "
    "else posix pread + H2D copy if a GPU works, else host memory)",
    layer="gds",
)
settings.register(
    "gds_threads", 8, _nonneg_int,
    "kvikio thread-pool size (applied through kvikio.defaults); 0 leaves kvikio's own "
    "(KVIKIO_NTHREADS)",
    layer="gds",
)
settings.register(
    "gds_task_size", 4 << 20, _nonneg_int,
    "kvikio task size in bytes (one pread splits into tasks of this size); 0 leaves "
    "kvikio's own (KVIKIO_TASK_SIZE)",
    layer="gds",
)
settings.register(
    "gds_staging_bytes", 8 << 20, _pos_int,
    "size of each of the two pinned staging buffers per thread of the posix+h2d backend",
    layer="gds",
)
settings.register(
    "gds_prefetch", 2, _nonneg_int,
    "DataLoader default: batches read ahead of the consumer",
    layer="gds",
)
settings.register(
    "gds_max_open_files", 256, _pos_int,
    "open file handles a reader caches (least recently used ones not in use are closed)",
    layer="gds",
)
settings.register(
    "gds_remote_async", True, bool,
    "server: run remote file reads on worker threads of the session (gds_threads of them) "
    "so its other calls go on; on the GPU ordered on the call's stream by a device-side "
    "wait on a host flag (cuStreamWaitValue32). 0: the call synchronizes its stream and "
    "reads before the session's next call",
    layer="gds",
)
settings.register(
    "gds_c_plan", True, bool,
    "server: plan remote reads in C (gw_ft_plan: request list parsed, paths looked up in a "
    "table of validated paths, files opened and checked, ranges and destinations checked, "
    "tasks split, GIL released); 0: the Python planner (A/B)",
    layer="gds",
)


def _direct(text: str) -> str:
    v = str(text).strip().lower()
    v = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off"}.get(v, v)
    if v not in ("auto", "on", "off"):
        raise ValueError(f"gds_direct must be auto, on or off, not {text!r}")
    return v


settings.register(
    "gds_direct", "auto", _direct,
    "kvikio backend (compat mode): Direct I/O (O_DIRECT, kvikio's auto_direct_io_read) for "
    "reads of at least 1 MiB; auto: only for a batch whose ranges are mostly not in the "
    "page cache (mincore), so cold reads skip the page cache and warm ones still hit it; "
    "on: always; off: never",
    layer="gds",
)
