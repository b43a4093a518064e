"""A lean HTTP/1.1 upstream client: asyncio protocols, httptools' parser, one pool per origin.

What a proxy needs and nothing more: raw headers in, raw headers out, both bodies streamed with
flow control, keep-alive reuse, explicit timeouts. No cookies, no redirects, no decoding, no
request or response objects beyond two small classes. Errors are the proxy's own
(:mod:`asgi_leasttime.errors`), which say how far the request got and whether its connection was
reused from the pool; the httpx path maps httpx's to the same.

Framing is never ambiguous: bytes after a complete response close the connection (never reused,
never read as another answer), trailer fields are dropped (they never join the header section), and
an upstream that answers before it has read the whole request body has its answer returned
(RFC 9112 section 9.6).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import select
import socket
import ssl
from collections.abc import AsyncIterator
from typing import Any

import httptools
import httpx

from asgi_leasttime._sweeper import Sweeper
from asgi_leasttime.client import DEFAULT_LIMITS
from asgi_leasttime.errors import (
    NoResponse,
    NotConnected,
    RequestNotSent,
    ResponseBroken,
    UpstreamError,
)
from asgi_leasttime.retry import IDEMPOTENT
from asgi_leasttime.tls import UpstreamTLS
from asgi_leasttime.types import Headers

__all__ = ["LeanClient", "LeanResponse"]


HIGH_WATER = 4 * 65536  # buffered response bytes before reading from the upstream pauses


_FRAMING = (b"content-length", b"transfer-encoding")  # 14 and 17 bytes long


class _ExtraResponse(Exception):
    """A second response began on a connection whose one request was already answered."""


class _Connection(asyncio.Protocol):
    """One upstream connection and the response being read on it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.error: UpstreamError | None = None
        self.reused = False  # taken from the pool's idle connections for this request
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.fresh = True  # over TLS: no answer read on it yet, its session not yet kept
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: Headers = []
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False  # reading, until HIGH_WATER bytes wait to be taken
        self.head_done = False
        self.written = False  # a byte of this request went out
        self.received = False  # a byte of this request's answer came
        self.complete = False
        self.head_only = False
        self.framed = False  # a Content-Length or Transfer-Encoding header came
        self.ends_at_close = False  # neither length nor chunks: the body ends at close
        self.keep_alive = False
        self.request_unfinished = False  # the body was cut short: the upstream answered first
        self.wakeup: asyncio.Future[None] | None = None
        self.waiting_since = 0.0

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.complete:
            # Bytes on a connection whose response is complete (or idle in the pool) belong to
            # no request: whatever they are, the connection cannot be trusted with another.
            self.close()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError as exc:
            if self.complete:  # _ExtraResponse, or garbage after the end: the answer stands
                self.close()
                return
            message = f"invalid response from upstream: {exc}"
            self._fail(ResponseBroken(message, reused=self.reused))
            if self.transport is not None:
                self.transport.close()

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and not self.complete:
            self._read_what_is_left()
        self.closed = True
        if self.ends_at_close and exc is None:
            self.complete = True
            self._wake()
        if not self.complete:
            if self.received:
                message = "upstream closed the connection mid-response"
                self._fail(ResponseBroken(message, reused=self.reused))
            else:
                message = "upstream closed the connection without a response"
                self._fail(NoResponse(message, reused=self.reused))
        self.can_write.set()
        self._wake()

    async def until_closed(self) -> None:
        """Until connection_lost has run (the transport is closing already)."""
        while not self.closed:
            await self.wait(None)

    def _read_what_is_left(self) -> None:
        """Read the answer an upstream sent before it reset the connection.

        An upstream that answers early (a 401 or 413 before the request body is read) and
        closes with the body unread resets the connection. A write that meets the reset closes
        the transport before its reader has seen the answer, which is still in the socket: the
        socket is open until this callback returns, so read it from a duplicate of it.
        """
        transport = self.transport
        if transport is None or transport.get_extra_info("ssl_object") is not None:
            return  # over TLS the socket holds records only the closed TLS layer could read
        sock = transport.get_extra_info("socket")
        if sock is None:
            return
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(sock.fileno())) as dup:
            dup.setblocking(False)
            for _ in range(64):  # the answer, not a whole body: the connection is gone
                data = dup.recv(65536)
                if not data:
                    break
                self.data_received(data)

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    # -- httptools callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.head_done:
            raise _ExtraResponse  # stops the parser; data_received closes the connection

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            return  # a trailer field (httptools reports them here): never a header (RFC 9110 6.5.1)
        self.headers.append((name, value))
        if len(name) in (14, 17) and name.lower() in _FRAMING:
            self.framed = True

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.headers = []  # an interim response (100 Continue): the real one follows
            self.framed = False
            return
        self.status = status
        self.head_done = True
        if status >= 300:
            self.can_write.set()  # a writer waiting to send more body looks at this answer
        if self.head_only:
            self.complete = True  # a response to HEAD has no body, whatever it announces
        elif status not in (204, 304):
            self.ends_at_close = not self.framed
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return  # a body after an answer to HEAD: the connection is not reused anyway
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status:
            # Only valid now: once the callback returns, the parser moves on to the next message.
            self.keep_alive = self.parser.should_keep_alive()
            self.complete = True
            self._wake()

    # -- waiting ----------------------------------------------------------------------------------

    def _fail(self, exc: UpstreamError) -> None:
        if self.error is None:
            self.error = exc
        self._wake()

    def _wake(self) -> None:
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    async def wait(self, deadlines: Sweeper[_Connection] | None) -> None:
        """Until something arrives (head, body, end or error); ``deadlines`` (None: no read
        timeout) fails the wait when nothing came for the read timeout."""
        loop = asyncio.get_running_loop()
        wakeup = self.wakeup = loop.create_future()
        if deadlines is not None:
            self.waiting_since = loop.time()
            deadlines.add(self, loop)
        try:
            await wakeup
        finally:
            self.wakeup = None
            if deadlines is not None:
                deadlines.discard(self)

    async def write(self, data: bytes, seconds: float | None) -> None:
        if not self.write_nowait(data):
            await self.drained(seconds)

    def write_nowait(self, data: bytes) -> bool:
        """Hand ``data`` to the transport; whether it takes more now (else await drained)."""
        if self.closed or self.transport is None or self.transport.is_closing():
            raise self._unwritten()
        self.transport.write(data)
        self.written = True
        return self.can_write.is_set()

    def _unwritten(self) -> UpstreamError:
        """The error for a write that found the connection closed: before any byte of the
        request went out, nothing was sent (a fresh connection closed at once is as good as
        refused); after, what the close said."""
        message = "upstream closed the connection before the request was written"
        if not self.written:
            if self.reused:
                return RequestNotSent(message, reused=True)
            return NotConnected(message)
        return self.error or RequestNotSent("upstream connection closed", reused=self.reused)

    async def drained(self, seconds: float | None) -> None:
        """Until the upstream has read enough of what was written (flow control)."""
        try:
            async with asyncio.timeout(seconds):
                await self.can_write.wait()
        except TimeoutError:
            message = "upstream did not read for the write timeout"
            raise RequestNotSent(message, reused=self.reused, timed_out=True) from None

    def take_body(self) -> bytes:
        data = b"".join(self.chunks) if len(self.chunks) > 1 else self.chunks.popleft()
        self.chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()
        return data

    def reusable(self) -> bool:
        return (
            self.complete
            and not self.closed
            and not self.head_only
            and not self.request_unfinished
            and not self.paused  # reading stopped for a body nobody took
            and self.error is None
            and self.keep_alive
        )

    def answered_early(self) -> bool:
        """Whether to stop sending the request body: a final answer is in and either refuses
        the request (3xx and up) or the upstream has closed. An early 2xx on an open connection
        may come from a server that streams its answer while it reads: it gets the whole body."""
        return self.head_done and (self.status >= 300 or self.closed)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def peer_closed(self) -> bool:
        """Whether an idle connection has something to read: the upstream's close (or bytes
        nobody asked for), already in the socket though the event loop has not read it yet.
        One ``select`` call, as httpcore asks of every connection it reuses."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock.fileno()], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)


def _read_deadlines(read_timeout: float | None) -> Sweeper[_Connection] | None:
    """Checks of waiting connections, every tenth of the read timeout (5 ms to 1 s)."""
    if read_timeout is None:
        return None

    def time_out_if_due(connection: _Connection, now: float) -> bool:
        wakeup = connection.wakeup
        if wakeup is None or wakeup.done():
            return True
        if now - connection.waiting_since < read_timeout:
            return False
        message = "upstream sent nothing for the read timeout"
        kind = ResponseBroken if connection.received else NoResponse
        wakeup.set_exception(kind(message, reused=connection.reused, timed_out=True))
        return True

    return Sweeper(min(max(read_timeout / 10, 0.005), 1.0), time_out_if_due)


class _ResumingContext:
    """The proxy's SSL context as one upstream's connections see it: a new connection offers
    the TLS session last kept from another, so the upstream may resume it instead of a full
    handshake.

    asyncio (and uvloop) take no session for a new connection; they call ``wrap_bio`` on the
    context they are given, and this one passes the session there. Kept per upstream (host,
    port and server name): a session is only ever offered to the server that issued it.
    """

    __slots__ = ("context", "session")

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.session: ssl.SSLSession | None = None

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        """What asyncio calls to start a connection's TLS, with the kept session offered."""
        return self.context.wrap_bio(
            incoming, outgoing, server_side, server_hostname, session or self.session
        )

    def keep(self, ssl_object: Any) -> None:
        """Keep a connection's session for the next connection. Called once the connection
        has read an answer: a TLS 1.3 server sends its resumption ticket after the handshake."""
        session = getattr(ssl_object, "session", None)
        if session is not None:
            self.session = session


class _Pool:
    """Connections to one origin: idle ones reused newest first, at most ``limit`` at once.

    An idle connection is not reused after ``keepalive_expiry`` seconds: upstreams close idle
    connections on their own schedule (uvicorn after 5 s), and one closing just as a request is
    written would fail that request.
    """

    def __init__(
        self,
        host: str,
        port: int,
        limits: httpx.Limits,
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
        name: str | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.name = name or host  # the Host a request without one is sent with
        # Sessions are kept per pool, so one is only offered to the server that issued it.
        self.tls = _ResumingContext(tls) if tls is not None else None
        self.resumed = 0  # new connections whose TLS session was resumed, not made afresh
        self.server_name = (server_name or host) if tls is not None else None
        # The port in a Host header the lean client writes: none when it is the scheme's own.
        self.shown_port = None if port == (80 if tls is None else 443) else port
        self.idle: list[tuple[float, _Connection]] = []  # (idle since, connection)
        self.limit = limits.max_connections or 512
        self.idle_limit = limits.max_keepalive_connections
        self.keepalive_expiry = limits.keepalive_expiry or 0.0
        self.active = 0
        self.waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self.retired = False  # connections close as they come back (the client or upstream gone)
        self.left = False  # retired because its upstream left the proxy (LeanClient.retire)

    async def _take_slot(self, seconds: float | None) -> None:
        if self.active < self.limit and not self.waiting:
            self.active += 1
            return
        slot = asyncio.get_running_loop().create_future()
        self.waiting.append(slot)
        try:
            async with asyncio.timeout(seconds):
                await slot  # resolved by _free_slot, which hands its slot over
        except TimeoutError:
            if slot.done() and not slot.cancelled():
                self._free_slot()  # handed over in the very tick the wait ran out: pass it on
            message = "no free upstream connection for the pool timeout"
            raise NotConnected(message, timed_out=True, pool_full=True) from None
        except BaseException:
            if slot.done() and not slot.cancelled():
                self._free_slot()  # handed over just as the wait ended: pass it on
            raise
        finally:
            if slot in self.waiting:
                self.waiting.remove(slot)

    def _free_slot(self) -> None:
        while self.waiting:
            slot = self.waiting.popleft()
            if not slot.done():
                slot.set_result(None)
                return
        self.active -= 1

    def take_idle(self, unsafe: bool = False) -> _Connection | None:
        """An idle connection still fresh, if one is there and a slot is free right now: the
        usual case, with nothing to await. ``unsafe``: for a request that could not be sent
        again once its body is read (see :meth:`_fresh_idle`)."""
        if not self.idle or self.active >= self.limit or self.waiting:
            return None
        self.active += 1
        connection = self._fresh_idle(asyncio.get_running_loop(), unsafe)
        if connection is None:
            self._free_slot()
        return connection

    def _fresh_idle(
        self, loop: asyncio.AbstractEventLoop, unsafe: bool = False
    ) -> _Connection | None:
        fresh_since = loop.time() - self.keepalive_expiry
        while self.idle:
            idle_since, connection = self.idle.pop()
            # For an unsafe request, also ask the socket whether the upstream closed it in the
            # time the event loop has not yet seen (a process just killed or stopping): that
            # request would be lost, where a safe one is simply sent again.
            usable = not connection.closed and idle_since > fresh_since
            if usable and not (unsafe and connection.peer_closed()):
                connection._reset()
                connection.reused = True
                return connection
            connection.close()
        return None

    async def connect(self, limits: httpx.Timeout, unsafe: bool = False) -> _Connection:
        """An idle connection still fresh, or a new one."""
        await self._take_slot(limits.pool)
        loop = asyncio.get_running_loop()
        connection = self._fresh_idle(loop, unsafe)
        if connection is not None:
            return connection
        try:
            async with asyncio.timeout(limits.connect):
                _, connection = await loop.create_connection(
                    _Connection,
                    self.host,
                    self.port,
                    ssl=self.tls,  # type: ignore[arg-type]  # it quacks like an SSLContext
                    server_hostname=self.server_name,
                )
        except TimeoutError:
            self._free_slot()
            message = f"connecting to {self.host}:{self.port} timed out"
            raise NotConnected(message, timed_out=True) from None
        except OSError as exc:  # ssl.SSLError among them: a certificate refused, say
            self._free_slot()
            raise NotConnected(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        except BaseException:  # cancelled while connecting: the client left
            self._free_slot()
            raise
        if self.tls is not None and connection.transport is not None:
            ssl_object = connection.transport.get_extra_info("ssl_object")
            if ssl_object is not None and ssl_object.session_reused:
                self.resumed += 1
        return connection

    def give_back(self, connection: _Connection) -> None:
        if self.tls is not None and connection.fresh and connection.complete:
            # Once per connection, after an answer: TLS 1.3 tickets come after the handshake.
            connection.fresh = False
            if connection.transport is not None:
                self.tls.keep(connection.transport.get_extra_info("ssl_object"))
        idle_room = self.idle_limit is None or len(self.idle) < self.idle_limit
        if idle_room and not self.retired and connection.reusable():
            self.idle.append((asyncio.get_running_loop().time(), connection))
        else:
            connection.close()
        self._free_slot()

    def close(self) -> None:
        for _, connection in self.idle:
            connection.close()
        self.idle.clear()


def _request_head(
    method: str, target: bytes, headers: Headers, host: str, port: int | None, chunked: bool
) -> bytes:
    """The request line and headers; ``port`` is ``None`` when it is the scheme's default."""
    lines = [method.encode("ascii") + b" " + target + b" HTTP/1.1"]
    has_host = False
    for name, value in headers:
        lines.append(name + b": " + value)
        has_host = has_host or name == b"host"
    if not has_host:
        authority = host if port is None else f"{host}:{port}"  # as httpx and browsers write it
        lines.append(b"host: " + authority.encode("ascii"))
    if chunked:
        lines.append(b"transfer-encoding: chunked")
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


class LeanResponse:
    """The upstream's answer: status, raw headers, and the body to stream."""

    __slots__ = ("_connection", "_deadlines", "_ended", "_pool", "raw_headers", "status_code")

    def __init__(
        self, pool: _Pool, connection: _Connection, deadlines: Sweeper[_Connection] | None
    ) -> None:
        self._pool = pool
        self._connection: _Connection | None = connection
        self._deadlines = deadlines
        self._ended = False  # next_chunk reached the end: only then is the connection reused
        self.status_code = connection.status
        self.raw_headers = connection.headers

    async def next_chunk(self) -> tuple[bytes, bool]:
        """The next piece of the body as it arrives, undecoded, and whether more may follow;
        ``(b"", False)`` at the end."""
        connection = self._connection
        assert connection is not None
        while True:
            if connection.chunks:
                more = not connection.complete
                self._ended = not more
                return connection.take_body(), more
            if connection.complete:
                self._ended = True
                return b"", False
            if connection.error is not None:
                raise connection.error
            await connection.wait(self._deadlines)

    async def aclose(self) -> None:
        """Give the connection back (kept alive when the response was read to its end)."""
        if self._connection is not None:
            connection, self._connection = self._connection, None
            if not self._ended:
                connection.close()
            self._pool.give_back(connection)


class LeanClient:
    """The proxy's fast upstream client. ``send`` returns once the response headers are in."""

    def __init__(
        self,
        *,
        timeout: httpx.Timeout,
        limits: httpx.Limits = DEFAULT_LIMITS,
        tls: UpstreamTLS | None = None,
    ) -> None:
        self.timeout = timeout
        self.limits = limits
        self.tls = tls if tls is not None else UpstreamTLS()  # for https (asyncio's own TLS)
        self._pools: dict[tuple[str, int, bool, str | None], _Pool] = {}
        self._deadlines = _read_deadlines(timeout.read)

    async def send(
        self,
        method: str,
        host: str,
        port: int,
        target: bytes,
        headers: Headers,
        body: AsyncIterator[bytes] | None,
        https: bool = False,
        address: str | None = None,
    ) -> LeanResponse:
        """Send one request (over TLS if ``https``, to ``address`` if given, else to ``host``
        resolved); raises the proxy's :mod:`~asgi_leasttime.errors` for what goes wrong."""
        pool = self.pool(host, port, https, address)
        return await self.send_to(pool, method, target, headers, body)

    def pool(self, host: str, port: int, https: bool = False, address: str | None = None) -> _Pool:
        """The connections to one origin, made on first use. The proxy's openers keep theirs
        (:meth:`send_to`): one lookup less on every request; a pool retired since (the client
        closed, the upstream removed) is not to be used again."""
        pool = self._pools.get((host, port, https, address))
        if pool is None:
            context = self.tls.context if https else None
            server_name = self.tls.server_name or host  # the name, not the address it has
            pool = _Pool(address or host, port, self.limits, context, server_name, host)
            self._pools[(host, port, https, address)] = pool
        return pool

    async def send_to(
        self,
        pool: _Pool,
        method: str,
        target: bytes,
        headers: Headers,
        body: AsyncIterator[bytes] | None,
    ) -> LeanResponse:
        """:meth:`send` on a pool in hand."""
        host = pool.name
        unsafe = body is not None and method not in IDEMPOTENT
        connection = pool.take_idle(unsafe) or await pool.connect(self.timeout, unsafe)
        shown_port = pool.shown_port
        try:
            connection.head_only = method == "HEAD"
            if body is None:
                head = _request_head(method, target, headers, host, shown_port, chunked=False)
                # connection.write() spelt out: no coroutine when the socket takes the head.
                if not connection.write_nowait(head):
                    await connection.drained(self.timeout.write)
            else:
                try:
                    await self._write_with_body(
                        connection, method, target, headers, host, shown_port, body
                    )
                except RequestNotSent as exc:
                    if exc.timed_out:
                        raise
                    await connection.until_closed()  # it reads what the upstream sent last
                    if not connection.head_done:
                        raise
                    # The upstream answered and closed without reading the rest (many do for
                    # 401 or 413): its answer is the one to forward (RFC 9112 section 9.6).
                    connection.request_unfinished = True
            while not connection.head_done:
                if connection.error is not None:
                    raise connection.error
                await connection.wait(self._deadlines)
        except BaseException as exc:
            connection.close()
            pool.give_back(connection)
            if connection.reused and isinstance(exc, NoResponse | RequestNotSent):
                # A pooled connection the upstream had closed: its other idle ones are likely
                # closed too (a restart), and a retry must get a fresh one.
                pool.close()
            raise
        return LeanResponse(pool, connection, self._deadlines)

    async def _write_with_body(
        self,
        connection: _Connection,
        method: str,
        target: bytes,
        headers: Headers,
        host: str,
        port: int | None,
        body: AsyncIterator[bytes],
    ) -> None:
        # Chunked unless the client gave a length (the proxy forwards Content-Length as it came).
        chunked = not any(name == b"content-length" for name, _ in headers)
        seconds = self.timeout.write
        await connection.write(_request_head(method, target, headers, host, port, chunked), seconds)
        async with contextlib.aclosing(body):  # type: ignore[type-var]
            async for chunk in body:
                if connection.answered_early():
                    connection.request_unfinished = True
                    return
                if chunked:
                    await connection.write(b"%x\r\n%b\r\n" % (len(chunk), chunk), seconds)
                else:
                    await connection.write(chunk, seconds)
        if chunked:
            await connection.write(b"0\r\n\r\n", seconds)

    def retime(self, timeout: httpx.Timeout) -> None:
        """Use ``timeout`` from the next request on (a reloaded file); the requests in flight
        keep the read deadlines they started with."""
        self.timeout = timeout
        self._deadlines = _read_deadlines(timeout.read)

    def close_idle(
        self, host: str, port: int, https: bool = False, address: str | None = None
    ) -> None:
        """Close an origin's idle connections (its upstream was fenced: it drains)."""
        pool = self._pools.get((host, port, https, address))
        if pool is not None:
            pool.close()

    def retire(self, host: str, port: int, https: bool = False, address: str | None = None) -> None:
        """Close an origin's idle connections and forget its pool (its upstream left the
        proxy); the connections still in use close when their responses end."""
        pool = self._pools.pop((host, port, https, address), None)
        if pool is not None:
            pool.left = True
            pool.retired = True
            pool.close()

    async def aclose(self) -> None:
        """Close every pooled connection; those still carrying a response close when it
        ends."""
        for pool in self._pools.values():
            pool.retired = True
            pool.close()
        self._pools.clear()
