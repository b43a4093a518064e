"""uvicorn helpers for the CLI and the demo (uvicorn comes with the ``cli`` extra)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import uvicorn

__all__ = ["QuietServer"]


class QuietServer(uvicorn.Server):
    """A uvicorn server that leaves SIGINT and SIGTERM alone.

    uvicorn installs its signal handlers for each server it runs, the last one winning; when one
    process runs several servers, only one of them may own the signals.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
