"""uvicorn helpers for the CLI and the demo (uvicorn comes with the ``cli`` extra)."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import signal
from collections.abc import Callable, Iterator
from socket import socket
from typing import Any

import uvicorn
from uvicorn.supervisors.multiprocess import Multiprocess

__all__ = ["QuietServer", "ReloadingSupervisor", "SaidOnce", "uvicorn_lines"]

logger = logging.getLogger("asgi_leasttime.reload")


class QuietServer(uvicorn.Server):
    """A uvicorn server that leaves SIGINT and SIGTERM alone.

    uvicorn installs its signal handlers for each server it runs, the last one winning; when one
    process runs several servers, only one of them may own the signals.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def uvicorn_lines() -> logging.Logger:
    """uvicorn's own logger (``uvicorn.error``: its start, its stop, its errors)."""
    import uvicorn.server

    return uvicorn.server.logger


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


class ReloadingSupervisor(Multiprocess):
    """uvicorn's supervisor of ``--workers N``, but SIGHUP reloads the file in place.

    uvicorn's own answer to SIGHUP replaces every worker, which loses what each has learned of
    the upstreams (averages, in-flight counts) and can cut its keep-alive connections. Here
    ``on_hangup`` is called once, in the supervisor (it checks the file, logging a refusal
    once, and applies it to what the supervisor runs); if it returns true, every worker that has
    started is sent SIGHUP and applies the file itself. A worker still starting may have read
    the file before the change: it is sent SIGHUP once it has started.
    """

    def __init__(
        self, config: uvicorn.Config, sockets: list[socket], on_hangup: Callable[[], bool]
    ) -> None:
        start: Any = super().__init__
        if "target" in inspect.signature(Multiprocess.__init__).parameters:  # older uvicorn
            start(config, target=uvicorn.Server(config).run, sockets=sockets)
        else:
            start(config, sockets=sockets)
        self.on_hangup = on_hangup
        self.owed: set[int] = set()  # workers to signal once they have started

    def handle_hup(self) -> None:
        """Check the file once; if good, tell each worker to apply it."""
        if not self.on_hangup():
            return
        logger.info("Received SIGHUP: each worker applies the file in place")
        for process in self.processes:
            # A worker that has not finished starting may not handle SIGHUP yet (the default
            # action ends the process).
            # (Older uvicorn cannot tell started from alive.)
            started = getattr(process, "is_ready", process.is_alive)
            if process.pid is not None and started(timeout=2):
                os.kill(process.pid, signal.SIGHUP)
            elif process.pid is not None:
                logger.info("worker [%s] is still starting: told once it has", process.pid)
                self.owed.add(process.pid)

    def keep_subprocess_alive(self) -> None:
        """uvicorn's round (every half second), and the reloads owed to workers now started."""
        super().keep_subprocess_alive()
        if not self.owed:
            return
        for process in self.processes:
            if process.pid in self.owed and process.is_alive(timeout=1):
                ready = getattr(process, "is_ready", None)
                if ready is None or ready(timeout=1):
                    self.owed.discard(process.pid)
                    os.kill(process.pid, signal.SIGHUP)
        self.owed &= {process.pid for process in self.processes if process.pid is not None}
