"""One HTTP exchange with an upstream: the request out, the response back, as raw ASGI messages.

Both bodies stream chunk by chunk. The response body is read raw, never decoded: compressed bodies
pass through byte for byte with their ``Content-Encoding`` and ``Content-Length``. While the
exchange runs, a watcher listens for the client leaving and cancels it, and the upstream response
is always closed, however the exchange ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Protocol
from urllib.parse import quote, unquote_to_bytes

import h11
import httpx

from asgi_leasttime._headers import BadRequest, BadResponse, response_headers
from asgi_leasttime._logging import RateLimitedLog
from asgi_leasttime._paths import path_below_root, raw_below
from asgi_leasttime._sweeper import Sweeper
from asgi_leasttime.types import Headers, Receive, Scope, Send

__all__ = [
    "ClientDisconnected",
    "ExchangeResult",
    "HttpxResponse",
    "Opener",
    "UpstreamResponse",
    "forward_http",
    "httpx_opener",
    "send_error",
    "upstream_target",
]

logger = logging.getLogger("asgi_leasttime.forwarding")

FAILURE_LOG_EVERY = 10.0
"""Seconds between two WARNING lines about failed requests to one upstream (and one kind of
failure); the lines in between are counted and the next one says how many."""

_failures = RateLimitedLog(logger, FAILURE_LOG_EVERY)


_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class ClientDisconnected(Exception):
    """The client went away; nobody is left to answer."""


class ExchangeResult:
    """What one HTTP exchange came to: what :func:`forward_http` returns (the exchange itself,
    which fills these in). Not the lease's outcome (:data:`asgi_leasttime.balancer.Outcome`),
    which the proxy records from ``on_response`` and :attr:`failed`."""

    __slots__ = ("failed", "retries", "status", "ttfb")

    ttfb: float | None  # seconds to the response head; None if none came
    status: int | None  # the upstream's status; None if it never answered
    failed: bool  # the upstream never gave an answer that could be forwarded
    retries: int  # sent again after a pooled connection the upstream had closed


def upstream_target(scope: Scope) -> bytes:
    """The request target for the upstream: the raw path below the mount point, and the raw query.

    Bytes as the client sent them, so percent-encoding and repeated query keys survive. Starlette
    keeps the mount prefix (``root_path``) in ``raw_path``; uvicorn's ``--root-path`` does not put
    it there; either way the upstream sees the path below the mount.

    A path with a dot segment (``.`` or ``..``, also percent-encoded or behind a backslash) raises
    :class:`BadRequest`: upstreams resolve them, and ``/base/../secret`` would leave an upstream's
    base path. Browsers and HTTP libraries resolve dot segments before they send, so only crafted
    requests carry them.
    """
    root_path: str = scope.get("root_path", "")
    raw_path: bytes | None = scope.get("raw_path")
    if raw_path is None:
        raw_path = quote(path_below_root(scope), safe="/:@!$&'()*+,;=-._~").encode("ascii")
    elif root_path:
        # The same rule as path_below_root (a segment boundary), on the bytes the client sent.
        raw_path = raw_below(raw_path, root_path.encode("utf-8")) or raw_path
    if not raw_path.startswith(b"/"):
        raw_path = b"/" + raw_path
    if _has_dot_segment(raw_path):
        raise BadRequest("the path has a dot segment")
    query: bytes = scope.get("query_string", b"")
    return raw_path + b"?" + query if query else raw_path


def _has_dot_segment(raw_path: bytes) -> bool:
    # A dot segment follows a separator; without "/." or "%" or "\\" there is none to decode.
    if b"/." not in raw_path and b"%" not in raw_path and b"\\" not in raw_path:
        return False
    path = unquote_to_bytes(raw_path).replace(b"\\", b"/")
    return any(segment in (b".", b"..") for segment in path.split(b"/"))


def _has_body(headers: Headers) -> bool:
    for name, value in headers:
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
        if name == b"transfer-encoding":
            return True
    return False


async def send_error(send: Send, status: int, text: str) -> None:
    """A short plain-text answer of our own (503, 502, 504)."""
    body = text.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class UpstreamResponse(Protocol):
    """What forwarding needs of an upstream's response, whichever client fetched it."""

    status_code: int
    raw_headers: Headers

    async def next_chunk(self) -> tuple[bytes, bool]:
        """The next piece of the body as it arrives, undecoded, and whether more may follow;
        ``(b"", False)`` at the end."""
        ...

    async def aclose(self) -> None: ...


# Sends the request (method, target, headers, body or None) to one upstream and returns once
# the response headers are in. Made once per upstream. Raises httpx's exception classes,
# whichever client is underneath.
Opener = Callable[[str, bytes, Headers, AsyncIterator[bytes] | None], Awaitable[UpstreamResponse]]


class HttpxResponse:
    """An ``httpx.Response`` seen as an :class:`UpstreamResponse`."""

    __slots__ = ("_chunks", "_response", "raw_headers", "status_code")

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._chunks: AsyncIterator[bytes] | None = None
        self.status_code = response.status_code
        self.raw_headers = response.headers.raw

    async def next_chunk(self) -> tuple[bytes, bool]:
        """httpx does not say which piece is the last: each may have more after it."""
        if self._chunks is None:
            # The raw stream, not aiter_raw(): that closes the response as soon as the body
            # ends, before aclose() can look at what followed it.
            self._chunks = aiter(self._response.stream)  # type: ignore[arg-type]
        try:
            return await anext(self._chunks), True
        except StopAsyncIteration:
            return b"", False

    async def aclose(self) -> None:
        _close_if_bytes_follow(self._response)
        await self._response.aclose()


def _close_if_bytes_follow(response: httpx.Response) -> None:
    """httpcore starts a connection's next exchange with the bytes that followed this response
    still buffered in h11 (a second response in the same write, a body after a 204 or a HEAD
    answer), and would read them as the next request's answer. Marking h11's side failed makes
    httpcore close the connection instead of pooling it. A client whose transport is not
    httpcore's has nothing to mark."""
    stream = getattr(getattr(response.stream, "_stream", None), "_httpcore_stream", None)
    connection = getattr(getattr(stream, "_stream", None), "_connection", None)
    state = getattr(connection, "_h11_state", None)
    if (
        isinstance(state, h11.Connection)
        and state.their_state is h11.DONE
        and state.trailing_data[0]
    ):
        state.send_failed()


def httpx_opener(
    client: Callable[[], httpx.AsyncClient], url: Callable[[bytes], httpx.URL]
) -> Opener:
    """Send with the ``httpx.AsyncClient`` that ``client()`` gives (made on first use) to the
    URL ``url(target)`` gives."""

    async def open_upstream(
        method: str, target: bytes, headers: Headers, body: AsyncIterator[bytes] | None
    ) -> UpstreamResponse:
        # Not client.build_request(): that would merge the client's default headers
        # (Accept-Encoding among them: upstreams would compress for clients that never asked).
        try:
            request_url = url(target)
        except (httpx.InvalidURL, UnicodeError) as exc:
            # Bytes in the path that httpx refuses: the client's request, answered 400.
            raise httpx.LocalProtocolError(f"bad request target: {exc}") from None
        request = httpx.Request(method, request_url, headers=headers, content=body)
        if body is None and b"content-length" not in (name for name, _ in headers):
            # httpx adds "Content-Length: 0" to a POST, PUT or PATCH without a body: the
            # upstream sees the request as the client sent it.
            request.headers.pop("content-length", None)
        return HttpxResponse(await client().send(request, stream=True))

    return open_upstream


# How long an exchange runs before a watcher starts listening for the client leaving. Most
# answers are complete sooner and then no watcher task is made at all (one made, run once and
# cancelled costs about 10 us here, as much as the rest of the forwarding logic); a client that
# leaves is noticed up to 1.5 times this later.
WATCH_AFTER = 0.02

_per_thread = threading.local()


def _watchlist() -> Sweeper[_Exchange]:
    """The exchanges in flight on this thread's event loop, checked every half WATCH_AFTER on
    the clock their ``sent_at`` is read from."""
    try:
        watchlist: Sweeper[_Exchange] = _per_thread.watchlist
    except AttributeError:
        watchlist = _per_thread.watchlist = Sweeper(
            WATCH_AFTER / 2, _Exchange.watch_if_due, clock=time.perf_counter
        )
    return watchlist


def forward_http(
    open_upstream: Opener,
    target: bytes,
    where: str,
    scope: Scope,
    receive: Receive,
    send: Send,
    headers: Headers,
    *,
    extra_response_headers: Headers | None = None,
    on_response: Callable[[int, float], None] | None = None,
) -> Coroutine[Any, Any, ExchangeResult]:
    """Forward one request to ``target`` upstream (``where`` names the upstream in logs) and
    stream the answer back.

    ``on_response(status, ttfb)`` is called as soon as the upstream's response headers arrive, so
    a long body does not delay the balancer's information; ``ExchangeResult.failed`` says the
    upstream never gave an answer that could be forwarded. Errors become answers:
    connection failures 502, timeouts 504; after the response started, a failure cuts the
    response off. A client that leaves cancels the exchange.
    """
    exchange = _Exchange(
        open_upstream, where, scope, receive, send, headers, extra_response_headers, on_response
    )
    return exchange.run(target)  # the coroutine itself, awaited by the caller: one frame less


class _Exchange(ExchangeResult):
    """One request on its way: the upstream call, the answer streamed back, and the watcher
    that cancels it all when the client leaves. What it learns is its own :class:`ExchangeResult`
    (one object less a request)."""

    __slots__ = (
        "body_read",
        "client_gone",
        "extra_response_headers",
        "finished",
        "has_body",
        "headers",
        "method",
        "on_response",
        "open_upstream",
        "receive",
        "send",
        "sent_at",
        "started",
        "task",
        "watch_when_read",
        "watcher",
        "where",
    )

    def __init__(
        self,
        open_upstream: Opener,
        where: str,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: Headers,
        extra_response_headers: Headers | None,
        on_response: Callable[[int, float], None] | None,
    ) -> None:
        self.open_upstream = open_upstream
        self.where = where
        self.method: str = scope["method"]
        self.receive = receive
        self.send = send
        self.headers = headers
        self.extra_response_headers = extra_response_headers
        self.on_response = on_response
        self.ttfb: float | None = None
        self.status: int | None = None
        self.failed = False
        self.retries = 0
        self.has_body = _has_body(scope["headers"])
        self.body_read = not self.has_body
        self.started = False  # the response to the client
        self.finished = False
        self.client_gone = False
        self.watch_when_read = False
        self.watcher: asyncio.Task[None] | None = None
        self.task: asyncio.Task[Any] | None = None
        # When the request was last sent (perf_counter): its TTFB starts here, and so does
        # the wait before the watcher (a retry, sent at once after a failed try, restarts it).
        self.sent_at = 0.0

    async def run(self, target: bytes) -> ExchangeResult:
        # The exchange, its errors answered and the client's leaving handled, in one coroutine:
        # each frame between uvicorn and the upstream costs on every resumption.
        task = self.task = asyncio.current_task()
        assert task is not None
        watchlist = _watchlist()
        watchlist.add(self, task.get_loop())
        method, where, send = self.method, self.where, self.send
        try:
            try:
                self.sent_at = time.perf_counter()
                body = self._request_body() if self.has_body else None
                try:
                    response = await self.open_upstream(method, target, self.headers, body)
                except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
                    response = await self._send_again(target, exc)
                self.ttfb = ttfb = time.perf_counter() - self.sent_at
                try:
                    try:
                        head = response_headers(response.raw_headers, response.status_code)
                    except BadResponse as exc:
                        raise httpx.RemoteProtocolError(str(exc)) from None  # 502, a failure
                    self.status = status = response.status_code
                    if self.on_response is not None:
                        self.on_response(status, ttfb)
                    if self.extra_response_headers:
                        head.extend(self.extra_response_headers)
                    message = {"type": "http.response.start", "status": status, "headers": head}
                    more = True
                    while True:
                        try:
                            await send(message)
                        except OSError as exc:  # ASGI 2.4 servers raise once the client is gone
                            raise ClientDisconnected from exc
                        self.started = True
                        if not more:
                            break
                        chunk, more = await response.next_chunk()
                        while not chunk and more:  # the last piece ends it: one message less
                            chunk, more = await response.next_chunk()
                        message = {"type": "http.response.body", "body": chunk, "more_body": more}
                finally:
                    # Not shielded: a cancellation (the client leaving) has already been
                    # delivered by the time this runs, and asyncio.shield would cost a task per
                    # request.
                    await response.aclose()
            except ClientDisconnected:
                logger.debug("client left during %s %s", method, where)
            except httpx.LocalProtocolError as exc:
                # The request could not be written as it is: the client's doing, not the
                # upstream's.
                logger.info("request to %s refused by the HTTP client: %r", where, exc)
                if not self.started:
                    await _answer(send, 400, "bad request")
            except httpx.TransportError as exc:  # timeouts included
                self.failed = self.status is None
                # Rate-limited per upstream: a dead one behind a busy proxy fails every request.
                if self.started:
                    _failures.warning(
                        (where, "cut off"),
                        "upstream %s failed mid-response (%r): cut off",
                        where,
                        exc,
                    )
                elif isinstance(exc, httpx.TimeoutException):
                    _failures.warning((where, "timeout"), "upstream %s timed out: %r", where, exc)
                    await _answer(send, 504, "gateway timeout")
                else:
                    _failures.warning((where, "failed"), "upstream %s failed: %r", where, exc)
                    await _answer(send, 502, "bad gateway")
            except Exception:
                # A fault in the client library (h11 raising past httpcore's error mapping, for
                # one). Answer like any upstream failure rather than let a 500 out, and say it
                # loudly.
                _failures.error(
                    (where, "unexpected"),
                    "forwarding %s %s failed unexpectedly",
                    method,
                    where,
                    exc_info=True,
                )
                self.failed = self.status is None
                if not self.started:
                    await _answer(send, 502, "bad gateway")
        except asyncio.CancelledError:
            if not self.client_gone or task.uncancel() > 0:
                raise  # cancelled from outside (shutdown): not ours to swallow
            logger.debug("client left during %s %s", method, where)
        finally:
            self.finished = True
            watchlist.discard(self)
            if self.watcher is not None:
                self.watcher.cancel()
        return self

    # -- the client leaving -----------------------------------------------------------------

    def watch_if_due(self, now: float) -> bool:
        """Start the watcher once the exchange has run WATCH_AFTER; true when done with."""
        if self.finished:
            return True
        if now - self.sent_at < WATCH_AFTER:
            return False
        self._start_watching()
        return True

    def _start_watching(self) -> None:
        if not self.body_read:
            # receive() is the request body's until it is all read; a client that leaves
            # mid-upload is seen there.
            self.watch_when_read = True
            return
        assert self.task is not None
        # A plain asyncio task and a done-callback, not an anyio task group: the group cost a
        # quarter of the proxy's CPU per request (uvicorn is asyncio).
        self.watcher = self.task.get_loop().create_task(self._wait_for_disconnect())
        self.watcher.add_done_callback(self._on_watch_done)

    async def _wait_for_disconnect(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass

    def _on_watch_done(self, watcher: asyncio.Task[None]) -> None:
        if not self.finished and not watcher.cancelled() and watcher.exception() is None:
            self.client_gone = True
            assert self.task is not None
            self.task.cancel()

    async def _request_body(self) -> AsyncIterator[bytes]:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                break
        self.body_read = True
        if self.watch_when_read:
            self._start_watching()

    # -- the exchange ---------------------------------------------------------------------------

    async def _send_again(self, target: bytes, error: Exception) -> UpstreamResponse:
        """Once more, afresh, after the first try failed on what looks like a pooled
        keep-alive connection the upstream had just closed; only a request without a body
        that may be sent twice. Otherwise ``error`` stands."""
        method = self.method
        if self.has_body or method not in _IDEMPOTENT:
            raise error
        self.retries += 1
        logger.debug("retrying %s %s after %r", method, self.where, error)
        self.sent_at = time.perf_counter()
        return await self.open_upstream(method, target, self.headers, None)


async def _answer(send: Send, status: int, text: str) -> None:
    with contextlib.suppress(OSError):  # the client left too
        await send_error(send, status, text)
