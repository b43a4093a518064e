"""Upstreams that misbehave on purpose, written on raw sockets: what no well-behaved server does."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import struct
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import anyio
import anyio.abc

Behaviour = Callable[[anyio.abc.SocketStream], Awaitable[None]]

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-upstream: raw\r\n\r\nok"


async def read_head(stream: anyio.abc.SocketStream) -> bytes:
    """Read one request head (and ignore any body: these upstreams serve GETs)."""
    data = b""
    with anyio.fail_after(5):
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive(65536)
            data += chunk
    return data


def reset(stream: anyio.abc.SocketStream) -> None:
    """Close with a TCP reset (RST), not a polite FIN."""
    raw: socket.socket = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@contextlib.asynccontextmanager
async def raw_upstream(behaviour: Behaviour) -> AsyncIterator[str]:
    """Serve ``behaviour`` for every connection on an ephemeral loopback port."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.EndOfStream, OSError):
                await behaviour(stream)

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            tg.cancel_scope.cancel()


async def reset_before_headers(stream: anyio.abc.SocketStream) -> None:
    await read_head(stream)
    reset(stream)


async def reset_mid_body(stream: anyio.abc.SocketStream) -> None:
    await read_head(stream)
    await stream.send(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"x" * 1000)
    reset(stream)


async def silent_after_headers(stream: anyio.abc.SocketStream) -> None:
    await read_head(stream)
    await stream.send(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
    await anyio.sleep(30)


async def slow_drip(stream: anyio.abc.SocketStream) -> None:
    await read_head(stream)
    await stream.send(b"HTTP/1.1 200 OK\r\ncontent-length: 20\r\n\r\n")
    for _ in range(20):
        await anyio.sleep(0.02)
        await stream.send(b"d")


async def closes_keepalive_early(stream: anyio.abc.SocketStream) -> None:
    """Answers one request announcing keep-alive, then closes the connection anyway."""
    await read_head(stream)
    await stream.send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: keep-alive\r\n\r\nok")


async def storm_of_503(stream: anyio.abc.SocketStream) -> None:
    while True:
        await read_head(stream)
        await stream.send(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy")


async def healthy(stream: anyio.abc.SocketStream) -> None:
    while True:
        await read_head(stream)
        await stream.send(OK)


async def read_request(
    stream: anyio.abc.SocketStream, buffered: bytes = b""
) -> tuple[bytes, bytes]:
    """Read one whole request (head and a Content-Length or chunked body); returns the request
    and the bytes read past it."""
    data = buffered
    with anyio.fail_after(5):
        while b"\r\n\r\n" not in data:
            data += await stream.receive(65536)
        head, _, rest = data.partition(b"\r\n\r\n")
        fields = [line.split(b":", 1) for line in head.split(b"\r\n")[1:]]
        names = {name.strip().lower(): value.strip().lower() for name, value in fields}
        if names.get(b"transfer-encoding") == b"chunked":
            while b"0\r\n\r\n" not in rest:
                rest += await stream.receive(65536)
            body, _, rest = rest.partition(b"0\r\n\r\n")
            body += b"0\r\n\r\n"
        else:
            length = int(names.get(b"content-length", b"0"))
            while len(rest) < length:
                rest += await stream.receive(65536)
            body, rest = rest[:length], rest[length:]
    return head + b"\r\n\r\n" + body, rest


class Scripted:
    """A raw upstream that answers each request on a connection with ``answer(request)``
    (bytes, written in one send) and records every request with its connection's number."""

    def __init__(self, answer: Callable[[bytes], bytes], *, close_after: bool = False) -> None:
        self.answer = answer
        self.close_after = close_after
        self.requests: list[tuple[int, bytes]] = []  # (connection number, request bytes)
        self.connections = 0

    async def __call__(self, stream: anyio.abc.SocketStream) -> None:
        self.connections += 1
        number, rest = self.connections, b""
        while True:
            request, rest = await read_request(stream, rest)
            self.requests.append((number, request))
            await stream.send(self.answer(request))
            if self.close_after:
                return

    def per_connection(self) -> list[int]:
        """How many requests each connection carried."""
        counts: dict[int, int] = {}
        for number, _ in self.requests:
            counts[number] = counts.get(number, 0) + 1
        return list(counts.values())


@contextlib.contextmanager
def threaded_upstream(handle: Callable[[socket.socket], None]) -> Iterator[str]:
    """Serve ``handle`` for every connection from threads with blocking sockets, outside the
    test's event loop: how a WSGI server on its own process answers, timing included."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.settimeout(5)
            with contextlib.suppress(OSError):
                handle(self.request)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def answer_and_reset(sock: socket.socket) -> None:
    """Answer 401 once the head is in and close with the body unread, which resets the
    connection: what gunicorn's sync workers do for an early answer."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    sock.sendall(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 12\r\n\r\nunauthorized")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
