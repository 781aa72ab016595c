"""The ready line of a server process started by another (``--ready-stdout``): the parent reads
the port from the child's stdout pipe and nothing after it."""
from __future__ import annotations

import os
import sys
from typing import Any


def announce(stream: Any, text: str) -> None:
    """Write ``text`` and a newline to ``stream`` and flush it. When ``stream`` is this process's
    stdout, fd 1 then points at stderr: the parent reads only that line from the pipe, so
    anything written to stdout later (UCX's log goes there, from C) would fill the pipe and
    block this process in the middle of serving; on stderr it reaches the parent's console."""
    stream.write(f"{text}\n")
    stream.flush()
    if stream is sys.stdout:
        try:
            os.dup2(2, 1)
        except OSError:   # (no stderr: keep stdout)
            pass
