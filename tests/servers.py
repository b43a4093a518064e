"""Real uvicorn servers on 127.0.0.1 for the tests, and the upstream app they serve."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import parse_qs

import anyio
import uvicorn

Scope = dict[str, Any]

# Which upstream client the proxies under test use; make test runs the forwarding tests with both.
UPSTREAM_CLIENT = os.environ.get("ASGI_LEASTTIME_TEST_CLIENT", "lean")


async def wait_until(condition: Callable[[], bool], limit: float = 5.0) -> None:
    """Poll another component's state until ``condition()`` holds; fail after ``limit`` s."""
    with anyio.fail_after(limit):
        while not condition():  # noqa: ASYNC110 - the state has no event to wait on
            await anyio.sleep(0.005)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[Any], limit: float = 20) -> None:
    """Until something listens on ``port``; fails if ``process`` exits first or after ``limit``."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{process.args!r} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port} after {limit} s")


def serve(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """``asgi-leasttime serve ARGS`` on a free port, with ``env`` added to the environment;
    returns the process and the port once it listens."""
    port = free_port()
    command = [sys.executable, "-m", "asgi_leasttime.cli", "serve", *args, "--port", str(port)]
    process = subprocess.Popen(command, env={**os.environ, **(env or {})})
    wait_for_port(port, process)
    return process, port


@contextlib.contextmanager
def process_on_port(
    command: list[str], port: int, *, env: dict[str, str] | None = None, cwd: Any = None
) -> Iterator[str]:
    """``command`` run until it listens on ``port``; yields its URL; stopped with SIGTERM (then
    SIGKILL) at the end."""
    process = subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_port(port, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process)


def stop_process(
    process: subprocess.Popen[Any], sent: int = signal.SIGTERM, limit: float = 15
) -> None:
    """Stop ``process`` with ``sent``, and SIGKILL if it has not ended within ``limit`` s."""
    if process.poll() is not None:
        return
    process.send_signal(sent)
    try:
        process.wait(limit)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


@contextlib.asynccontextmanager
async def running(app: Any, port: int = 0, **options: Any) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a loopback port (ephemeral by default); yields its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    port = sock.getsockname()[1]
    options.setdefault("lifespan", "off")
    options.setdefault("log_level", "warning")
    options.setdefault("timeout_graceful_shutdown", 2)
    # uvicorn trusts X-Forwarded-For from 127.0.0.1 by default and rewrites scope["client"]:
    # the tests' clients are all on 127.0.0.1, and the proxy's own header rules are under test.
    options.setdefault("proxy_headers", False)
    server = uvicorn.Server(uvicorn.Config(app, **options))
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        await wait_until(lambda: server.started)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
    # Like a process that exits: connections still open after the graceful shutdown die with it
    # (in a shared event loop they would otherwise keep serving).
    for connection in list(server.server_state.connections):
        connection.transport.abort()  # type: ignore[attr-defined]
    sock.close()


class UpstreamProcess:
    """An :class:`UpstreamApp` under uvicorn in a process of its own, on a port that stays its
    own across restarts: what a test kills, stops gracefully, freezes and starts again."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "uvicorn", "tests.upstream_process:app", "--port",
                   str(self.port), "--log-level", "warning", "--no-access-log"]  # fmt: skip
        env = {**os.environ, "UPSTREAM_NAME": self.name}
        self.process = subprocess.Popen(command, env=env)
        wait_for_port(self.port, self.process)

    def signal(self, number: int) -> None:
        assert self.process is not None
        self.process.send_signal(number)

    def wait(self, limit: float = 10.0) -> None:
        """Until the process has exited (after a SIGKILL or SIGTERM)."""
        assert self.process is not None
        self.process.wait(limit)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@contextlib.contextmanager
def upstream_processes(*names: str) -> Iterator[list[UpstreamProcess]]:
    """Upstream processes, started, and killed at the end whatever happened."""
    processes = [UpstreamProcess(name) for name in names]
    try:
        for process in processes:
            process.start()
        yield processes
    finally:
        for process in processes:
            process.stop()


@contextlib.asynccontextmanager
async def running_many(*apps: Any) -> AsyncIterator[list[str]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(running(app)) for app in apps]


class UpstreamApp:
    """A raw ASGI upstream whose routes each show one thing a proxy can get wrong.

    Every response carries ``x-upstream: <name>``. ``delay`` (seconds) is added before each
    answer's headers; ``fail_with`` answers every request with that status.
    """

    def __init__(self, name: str, delay: float = 0.0) -> None:
        self.name = name
        self.delay = delay
        self.fail_with: int | None = None
        self.requests = 0
        self.streaming = 0  # streams in progress: one the proxy abandoned must end here too
        self.health_status = 200  # what /health answers
        self.health_delay = 0.0  # how long /health takes to answer
        self.probes: list[float] = []  # when each /health probe arrived (monotonic)
        self.seen: list[tuple[str, bytes]] = []  # (path, body) of each echoed request

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            await self.websocket(scope, receive, send)
            return
        assert scope["type"] == "http"
        if scope["path"] == "/health":
            self.probes.append(time.monotonic())
            await anyio.sleep(self.health_delay)
            await self.respond(send, self.health_status, b"health")
            return
        self.requests += 1
        query = parse_qs(scope["query_string"].decode())
        path = scope["path"]
        delay = float(query.get("delay", [self.delay])[0])
        if delay:
            await anyio.sleep(delay)
        if self.fail_with is not None:
            await self.respond(send, self.fail_with, b"failing")
            return
        route = path.rsplit("/", 1)[-1] if path.startswith("/r/") else "echo"
        await getattr(self, "route_" + route.replace("-", "_"), self.route_echo)(
            scope, receive, send, query
        )

    async def respond(
        self,
        send: Any,
        status: int,
        body: bytes,
        headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
    ) -> None:
        head = [(b"x-upstream", self.name.encode()), *headers]
        if status not in (204, 304):
            head.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send(
            {"type": "http.response.body", "body": body if status not in (204, 304) else b""}
        )

    async def read_body(self, receive: Any) -> bytes:
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                return b"".join(chunks)

    async def route_echo(self, scope: Scope, receive: Any, send: Any, query: Any) -> None:
        body = await self.read_body(receive)
        self.seen.append((scope["path"], body))
        info = {
            "upstream": self.name,
            "method": scope["method"],
            "path": scope["path"],
            "raw_path": scope["raw_path"].decode("latin-1"),
            "query_string": scope["query_string"].decode("latin-1"),
            "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in scope["headers"]],
            "body": body.decode("latin-1"),
        }
        await self.respond(
            send, 200, json.dumps(info).encode(), [(b"content-type", b"application/json")]
        )

    async def route_upload(self, scope: Scope, receive: Any, send: Any, query: Any) -> None:
        digest, size = hashlib.sha256(), 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            digest.update(chunk)
            size += len(chunk)
            if not message.get("more_body"):
                break
        await self.respond(send, 200, f"{size} {digest.hexdigest()}".encode())

    async def route_status(self, scope: Scope, receive: Any, send: Any, query: Any) -> None:
        await self.respond(send, int(query["code"][0]), b"status body")

    async def route_cookies(self, scope: Scope, receive: Any, send: Any, query: Any) -> None:
        cookie = dict(scope["headers"]).get(b"cookie", b"")
        await self.respond(
            send,
            200,
            cookie,
            [
                (b"set-cookie", b"session=" + query["user"][0].encode() + b"; Path=/"),
                (b"set-cookie", b"theme=dark; Path=/"),
            ],
        )

    async def route_gzip(self, scope: Scope, receive: Any, send: Any, query: Any) -> None:
        body = gzip.compress(b"compressed " * 1000, mtime=0)
        await self.respond(send, 200, body, [(b"content-encoding", b"gzip")])

    async def route_hop(self, scope: Scope, receive: Any, send: Any, query: Any) -> None:
        await self.respond(
            send,
            200,
            b"hop",
            [
                (b"connection", b"x-private"),
                (b"x-private", b"secret"),
                (b"keep-alive", b"timeout=5"),
                (b"x-public", b"kept"),
            ],
        )

    async def route_stream(self, scope: Scope, receive: Any, send: Any, query: Any) -> None:
        chunks = int(query.get("chunks", ["10"])[0])
        size = int(query.get("size", ["1024"])[0])
        pause = float(query.get("pause", ["0"])[0])
        head = [(b"x-upstream", self.name.encode())]
        chunk = b"x" * size

        async def stream(cancel: anyio.CancelScope) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": head})
            for _ in range(chunks):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if pause:
                    await anyio.sleep(pause)
            await send({"type": "http.response.body", "body": b""})
            cancel.cancel()

        async def stop_when_the_proxy_leaves(cancel: anyio.CancelScope) -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            cancel.cancel()

        self.streaming += 1
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(stream, tg.cancel_scope)
                tg.start_soon(stop_when_the_proxy_leaves, tg.cancel_scope)
        finally:
            self.streaming -= 1

    async def route_die(self, scope: Scope, receive: Any, send: Any, query: Any) -> None:
        head = [(b"content-length", b"1000")]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": b"x" * 100, "more_body": True})
        raise RuntimeError("upstream dies mid-body (on purpose)")

    async def route_hang(self, scope: Scope, receive: Any, send: Any, query: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        await anyio.sleep(30)

    async def websocket(self, scope: Scope, receive: Any, send: Any) -> None:
        await receive()  # websocket.connect
        subprotocols = scope.get("subprotocols") or []
        await send(
            {"type": "websocket.accept", "subprotocol": subprotocols[-1] if subprotocols else None}
        )
        query = scope["query_string"].decode()
        await send({"type": "websocket.send", "text": f"hello from {self.name} q={query}"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is not None and text.startswith("close:"):
                await send({"type": "websocket.close", "code": int(text[6:]), "reason": "asked"})
                return
            if text is not None:
                await send({"type": "websocket.send", "text": "echo:" + text})
            else:
                await send({"type": "websocket.send", "bytes": message["bytes"][::-1]})


@contextlib.contextmanager
def running_in_thread(
    app: Any, port: int = 0, host: str = "127.0.0.1", **options: Any
) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread of its own, for synchronous tests (hypothesis);
    ``host``: another loopback address (127.0.0.2, ...) for several servers on one port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    options.setdefault("log_level", "warning")
    options.setdefault("proxy_headers", False)
    server = uvicorn.Server(uvicorn.Config(app, **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start in 5 s")
        time.sleep(0.005)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
