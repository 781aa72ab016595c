"""A dependency-free progress bar on stderr (quiet when stderr is not a terminal
unless forced)."""
from __future__ import annotations

import os
import sys
import time


class Progress:
    def __init__(self, total: int, label: str = "", enabled: bool | None = None, width: int = 30):
        self.total = max(int(total), 1)
        self.label = label
        self.n = 0
        self.width = width
        self.t0 = time.monotonic()
        if enabled is None:
            enabled = sys.stderr.isatty() or os.environ.get("GPUWIRE_PROGRESS") == "1"
        self.enabled = enabled
        self._last = 0.0

    def update(self, k: int = 1, note: str = "") -> None:
        self.n = min(self.total, self.n + k)
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and self.n < self.total:
            return
        self._last = now
        frac = self.n / self.total
        fill = int(frac * self.width)
        el = now - self.t0
        eta = (el / frac - el) if frac > 0 else 0.0
        sys.stderr.write(f"\r{self.label} [{'#' * fill}{'.' * (self.width - fill)}] "
                         f"{self.n}/{self.total} {el:5.1f}s eta {eta:5.1f}s {note[:30]:30}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()
