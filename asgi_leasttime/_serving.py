"""uvicorn helpers for the CLI and the demo (uvicorn comes with the ``cli`` extra)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import uvicorn

__all__ = ["QuietServer", "SaidOnce"]


class QuietServer(uvicorn.Server):
    """A uvicorn server that leaves SIGINT and SIGTERM alone.

    uvicorn installs its signal handlers for each server it runs, the last one winning; when one
    process runs several servers, only one of them may own the signals.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class SaidOnce(logging.Filter):
    """Lets a line starting with one of ``prefixes`` through once: a process running two uvicorn
    servers (the proxy and its admin app) says "Started server process" once, not twice."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes
        self.said: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.prefixes):
            return True
        if message in self.said:
            return False
        self.said.add(message)
        return True
