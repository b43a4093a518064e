"""One HTTP exchange with an upstream: the request out, the response back, as raw ASGI messages.

Both bodies stream chunk by chunk. The response body is read raw (``aiter_raw``): compressed bodies
pass through byte for byte with their ``Content-Encoding`` and ``Content-Length``. While the
exchange runs, a watcher listens for the client leaving and cancels it, and the upstream response
is always closed, under a shield, however the exchange ends.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx

from asgi_leasttime.headers import Headers, response_headers

__all__ = ["ClientDisconnected", "Outcome", "forward_http", "send_error", "upstream_target"]

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
        from urllib.parse import quote

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


async def forward_http(
    client: httpx.AsyncClient,
    url: httpx.URL,
    scope: Scope,
    receive: Receive,
    send: Send,
    headers: Headers,
    *,
    extra_response_headers: Headers | None = None,
    on_response: Callable[[Outcome], None] | None = None,
) -> Outcome:
    """Forward one request to ``url`` and stream the answer back to the client.

    ``on_response`` is called as soon as the upstream's response headers arrive (with the TTFB
    and status), so a long body does not delay the balancer's information. Errors become answers:
    connection failures 502, timeouts 504; after the response started, a failure cuts the
    response off. A client that leaves cancels the exchange.
    """
    outcome = Outcome()
    body_read = anyio.Event()
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

    # Not client.build_request(): that would merge the client's default headers (Accept-Encoding
    # among them, which would make upstreams compress for clients that never asked).
    request = httpx.Request(
        scope["method"], url, headers=headers, content=request_body() if has_body else None
    )
    started = False

    async def send_to_client(message: Message) -> None:
        try:
            await send(message)
        except OSError as exc:  # ASGI 2.4 servers raise once the client is gone
            raise ClientDisconnected from exc

    async def exchange() -> None:
        nonlocal started
        retry = not has_body and request.method in _IDEMPOTENT
        while True:
            sent_at = time.perf_counter()
            try:
                response = await client.send(request, stream=True)
            except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
                # A pooled keep-alive connection the upstream had just closed: once, afresh.
                if retry:
                    retry = False
                    outcome.retries += 1
                    logger.debug("retrying %s %s after %r", request.method, url, exc)
                    continue
                raise
            break
        outcome.ttfb = time.perf_counter() - sent_at
        outcome.status = response.status_code
        if on_response is not None:
            on_response(outcome)
        try:
            response_head = response_headers(response.headers.raw)
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
            with anyio.CancelScope(shield=True):
                await response.aclose()

    async def watch_for_disconnect(cancel_scope: anyio.CancelScope) -> None:
        await body_read.wait()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                cancel_scope.cancel()
                return

    async def exchange_or_answer() -> None:
        try:
            await exchange()
        except ClientDisconnected:
            logger.debug("client left during %s %s", request.method, url)
        except httpx.LocalProtocolError as exc:
            # The request could not be written as it is: the client's doing, not the upstream's.
            logger.info("request to %s refused by the HTTP client: %r", url, exc)
            if not started:
                await _answer(send, 400, "bad request")
        except httpx.TransportError as exc:  # timeouts included
            outcome.failed = outcome.status is None
            timed_out = isinstance(exc, httpx.TimeoutException)
            if started:
                logger.warning("upstream %s failed mid-response (%r): cut off", url, exc)
            elif timed_out:
                logger.warning("upstream %s timed out: %r", url, exc)
                await _answer(send, 504, "gateway timeout")
            else:
                logger.warning("upstream %s failed: %r", url, exc)
                await _answer(send, 502, "bad gateway")
        except Exception:
            # A fault in the client library (h11 raising past httpcore's error mapping, for one).
            # Answer like any upstream failure rather than let a 500 out, and say it loudly.
            logger.exception("forwarding %s %s failed unexpectedly", request.method, url)
            if not started:
                await _answer(send, 502, "bad gateway")

    # Errors are handled inside the task group: escaping it, they would come out grouped.
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_for_disconnect, tg.cancel_scope)
        try:
            await exchange_or_answer()
        finally:
            tg.cancel_scope.cancel()
    return outcome


async def _answer(send: Send, status: int, text: str) -> None:
    with contextlib.suppress(OSError):  # the client left too
        await send_error(send, status, text)
