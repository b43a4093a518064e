"""One HTTP exchange with an upstream: the request out, the response back, as raw ASGI messages.

Both bodies stream chunk by chunk. The response body is read raw (``aiter_raw``): compressed bodies
pass through byte for byte with their ``Content-Encoding`` and ``Content-Length``. While the
exchange runs, a watcher listens for the client leaving and cancels it, and the upstream response
is always closed, under a shield, however the exchange ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol
from urllib.parse import quote

import httpx

from asgi_leasttime.headers import Headers, response_headers

__all__ = [
    "ClientDisconnected",
    "HttpxResponse",
    "Opener",
    "Outcome",
    "UpstreamResponse",
    "forward_http",
    "httpx_opener",
    "send_error",
    "upstream_target",
]

logger = logging.getLogger("asgi_leasttime")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class ClientDisconnected(Exception):
    """The client went away; nobody is left to answer."""


class Outcome:
    """What the balancer learns from one exchange. Filled in by :func:`forward_http`."""

    __slots__ = ("failed", "retries", "status", "ttfb")

    def __init__(self) -> None:
        self.ttfb: float | None = None
        self.status: int | None = None
        self.failed = False
        self.retries = 0


def upstream_target(scope: Scope) -> bytes:
    """The request target for the upstream: the raw path below the mount point, and the raw query.

    Bytes as the client sent them, so percent-encoding and repeated query keys survive. Starlette
    keeps the mount prefix (``root_path``) in ``raw_path``; uvicorn's ``--root-path`` does not put
    it there; either way the upstream sees the path below the mount.
    """
    root_path: str = scope.get("root_path", "")
    raw_path: bytes | None = scope.get("raw_path")
    if raw_path is None:
        path: str = scope["path"]
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :]
        raw_path = quote(path, safe="/:@!$&'()*+,;=-._~").encode("ascii")
    elif root_path:
        prefix = root_path.encode("utf-8")
        if raw_path.startswith(prefix):
            raw_path = raw_path[len(prefix) :]
    if not raw_path.startswith(b"/"):
        raw_path = b"/" + raw_path
    query: bytes = scope.get("query_string", b"")
    return raw_path + b"?" + query if query else raw_path


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

    def aiter_raw(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


# Sends the request (method, headers, body or None) and returns once response headers are in.
# Raises httpx's exception classes, whichever client is underneath.
Opener = Callable[[str, Headers, AsyncIterator[bytes] | None], Awaitable[UpstreamResponse]]


class HttpxResponse:
    """An ``httpx.Response`` seen as an :class:`UpstreamResponse`."""

    __slots__ = ("_response", "raw_headers", "status_code")

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status_code = response.status_code
        self.raw_headers = response.headers.raw

    def aiter_raw(self) -> AsyncIterator[bytes]:
        return self._response.aiter_raw()

    async def aclose(self) -> None:
        await self._response.aclose()


def httpx_opener(client: httpx.AsyncClient, url: httpx.URL) -> Opener:
    """Send with an ``httpx.AsyncClient`` to ``url``."""

    async def open_upstream(
        method: str, headers: Headers, body: AsyncIterator[bytes] | None
    ) -> UpstreamResponse:
        # Not client.build_request(): that would merge the client's default headers
        # (Accept-Encoding among them: upstreams would compress for clients that never asked).
        request = httpx.Request(method, url, headers=headers, content=body)
        return HttpxResponse(await client.send(request, stream=True))

    return open_upstream


async def forward_http(
    open_upstream: Opener,
    where: str,
    scope: Scope,
    receive: Receive,
    send: Send,
    headers: Headers,
    *,
    extra_response_headers: Headers | None = None,
    on_response: Callable[[Outcome], None] | None = None,
) -> Outcome:
    """Forward one request upstream (``where`` names it in logs) and stream the answer back.

    ``on_response`` is called as soon as the upstream's response headers arrive (with the TTFB
    and status), so a long body does not delay the balancer's information. Errors become answers:
    connection failures 502, timeouts 504; after the response started, a failure cuts the
    response off. A client that leaves cancels the exchange.
    """
    outcome = Outcome()
    body_read = asyncio.Event()
    has_body = _has_body(scope["headers"])
    if not has_body:
        body_read.set()

    async def request_body() -> AsyncIterator[bytes]:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                break
        body_read.set()

    method: str = scope["method"]
    started = False

    async def send_to_client(message: Message) -> None:
        try:
            await send(message)
        except OSError as exc:  # ASGI 2.4 servers raise once the client is gone
            raise ClientDisconnected from exc

    async def exchange() -> None:
        nonlocal started
        retry = not has_body and method in _IDEMPOTENT
        while True:
            sent_at = time.perf_counter()
            try:
                response = await open_upstream(
                    method, headers, request_body() if has_body else None
                )
            except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
                # A pooled keep-alive connection the upstream had just closed: once, afresh.
                if retry:
                    retry = False
                    outcome.retries += 1
                    logger.debug("retrying %s %s after %r", method, where, exc)
                    continue
                raise
            break
        outcome.ttfb = time.perf_counter() - sent_at
        outcome.status = response.status_code
        if on_response is not None:
            on_response(outcome)
        try:
            response_head = response_headers(response.raw_headers)
            if extra_response_headers:
                response_head.extend(extra_response_headers)
            await send_to_client(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": response_head,
                }
            )
            started = True
            async for chunk in response.aiter_raw():
                if chunk:
                    await send_to_client(
                        {"type": "http.response.body", "body": chunk, "more_body": True}
                    )
            await send_to_client({"type": "http.response.body", "body": b""})
        finally:
            # Not shielded: a cancellation (the client leaving) has already been delivered by
            # the time this runs, and asyncio.shield would cost a task per request.
            await response.aclose()

    async def wait_for_disconnect() -> None:
        await body_read.wait()
        while (await receive())["type"] != "http.disconnect":
            pass

    async def exchange_or_answer() -> None:
        try:
            await exchange()
        except ClientDisconnected:
            logger.debug("client left during %s %s", method, where)
        except httpx.LocalProtocolError as exc:
            # The request could not be written as it is: the client's doing, not the upstream's.
            logger.info("request to %s refused by the HTTP client: %r", where, exc)
            if not started:
                await _answer(send, 400, "bad request")
        except httpx.TransportError as exc:  # timeouts included
            outcome.failed = outcome.status is None
            timed_out = isinstance(exc, httpx.TimeoutException)
            if started:
                logger.warning("upstream %s failed mid-response (%r): cut off", where, exc)
            elif timed_out:
                logger.warning("upstream %s timed out: %r", where, exc)
                await _answer(send, 504, "gateway timeout")
            else:
                logger.warning("upstream %s failed: %r", where, exc)
                await _answer(send, 502, "bad gateway")
        except Exception:
            # A fault in the client library (h11 raising past httpcore's error mapping, for one).
            # Answer like any upstream failure rather than let a 500 out, and say it loudly.
            logger.exception("forwarding %s %s failed unexpectedly", method, where)
            if not started:
                await _answer(send, 502, "bad gateway")

    # The client leaving cancels this task. A plain asyncio task and a done-callback, not an anyio
    # task group: the group cost a quarter of the proxy's CPU per request (uvicorn is asyncio).
    this_task = asyncio.current_task()
    assert this_task is not None
    client_gone = finished = False

    def on_watch_done(watcher: asyncio.Task[None]) -> None:
        nonlocal client_gone
        if not finished and not watcher.cancelled() and watcher.exception() is None:
            client_gone = True
            this_task.cancel()

    watcher = asyncio.get_running_loop().create_task(wait_for_disconnect())
    watcher.add_done_callback(on_watch_done)
    try:
        await exchange_or_answer()
    except asyncio.CancelledError:
        if not client_gone or this_task.uncancel() > 0:
            raise  # cancelled from outside (shutdown): not ours to swallow
        logger.debug("client left during %s %s", method, where)
    finally:
        finished = True
        watcher.cancel()
    return outcome


async def _answer(send: Send, status: int, text: str) -> None:
    with contextlib.suppress(OSError):  # the client left too
        await send_error(send, status, text)
