"""WebSocket forwarding: the upstream handshake first, then messages both ways until one closes.

The upstream side uses the ``websockets`` library (the ``websocket`` extra; uvicorn's ``standard``
extra installs it too): well kept, asyncio-native, and it does its framing in C. A ``wss``
upstream is reached with the proxy's :class:`~asgi_leasttime.tls.UpstreamTLS` (its CA bundle,
client certificate and server name, as for http), and the client's ``Host`` reaches the
upstream when the proxy passes host headers (Traefik's ``passHostHeader``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import httpx

from asgi_leasttime._extras import MissingExtra, need
from asgi_leasttime._logging import RateLimitedLog
from asgi_leasttime.balancer import Lease
from asgi_leasttime.tls import UpstreamTLS
from asgi_leasttime.types import Headers, Receive, Scope, Send

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

__all__ = ["forward_websocket"]

logger = logging.getLogger("asgi_leasttime.websocket")

# A refused handshake is logged at most once per 10 s per upstream (and counted in between).
_refusals = RateLimitedLog(logger, 10.0)

MAX_MESSAGE_SIZE = 16 * 1024 * 1024
"""Largest message accepted from an upstream: uvicorn's own default for its clients."""

# Set by the websocket library itself for the upstream handshake.
_HANDSHAKE_HEADERS = frozenset(
    {
        b"host",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
        b"sec-websocket-accept",
    }
)

# Close codes that are never sent on the wire (RFC 6455 section 7.4.1).
_RESERVED_CODES = frozenset({1005, 1006, 1015})


async def forward_websocket(
    url: httpx.URL,
    scope: Scope,
    receive: Receive,
    send: Send,
    headers: Headers,
    lease: Lease,
    *,
    tls: UpstreamTLS | None = None,
    pass_host_header: bool = True,
    address: str | None = None,
) -> None:
    """Open the upstream WebSocket, accept the client's with the same subprotocol, relay.

    ``headers`` are those for the upstream (:class:`~asgi_leasttime._headers.RequestHeaders`);
    with ``pass_host_header`` the ``Host`` among them is the handshake's, otherwise the
    upstream's own is. A ``wss`` upstream is reached with ``tls`` (its context and server
    name), or with the system's CA store without one. ``address``: where to connect, the URL's
    host staying the handshake's ``Host`` and the TLS name.

    The handshake is the request the ``lease`` records: answered with 101 once the upstream
    accepts (its time to first byte is the handshake's), with the status it refused with, or
    failed when no handshake came back."""
    try:
        need("websockets", "websocket", "WebSocket forwarding")
    except MissingExtra as exc:
        logger.error("%s", exc)  # one line, no traceback; the client's socket is closed
        await send({"type": "websocket.close", "code": 1011})
        return
    from websockets.asyncio.client import connect
    from websockets.exceptions import (
        ConnectionClosed,
        InvalidHandshake,
        InvalidStatus,
        InvalidURI,
    )

    message = await receive()
    if message["type"] != "websocket.connect":
        return
    secure = url.scheme == "https"
    ws_url = str(url.copy_with(scheme="wss" if secure else "ws"))
    subprotocols = scope.get("subprotocols") or None
    options: dict[str, Any] = {}
    if address is not None:  # a DNS upstream: this address, under the URL's name
        options["host"] = address
    if secure and tls is not None:
        options["ssl"] = tls.context
        if tls.server_name is not None:
            options["server_hostname"] = tls.server_name
    if pass_host_header:
        host = next((v for n, v in headers if n == b"host"), None)
        if host is not None:
            options["create_connection"] = _with_host(host.decode("latin-1"))
    sent_at = time.perf_counter()
    try:
        upstream = await connect(
            ws_url,
            additional_headers=[
                (n.decode("latin-1"), v.decode("latin-1"))
                for n, v in headers
                if n not in _HANDSHAKE_HEADERS
            ],
            subprotocols=subprotocols,
            compression=None,
            max_size=MAX_MESSAGE_SIZE,
            open_timeout=10,
            **options,
        )
    except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
        _refusals.warning((url.host, url.port), "WebSocket upstream %s refused: %r", ws_url, exc)
        if isinstance(exc, InvalidStatus):
            lease.answered(exc.response.status_code, time.perf_counter() - sent_at)
        else:
            lease.failed()
        await send({"type": "websocket.close", "code": 1011})
        return
    lease.answered(101, time.perf_counter() - sent_at)

    async def client_to_upstream(cancel: anyio.CancelScope) -> None:
        try:
            while True:
                message = await receive()
                if message["type"] == "websocket.receive":
                    text = message.get("text")
                    await upstream.send(text if text is not None else message.get("bytes") or b"")
                elif message["type"] == "websocket.disconnect":
                    code = message.get("code", 1000)
                    reason = message.get("reason") or ""
                    await upstream.close(1000 if code in _RESERVED_CODES else code, reason)
                    cancel.cancel()
                    return
        except ConnectionClosed:
            pass  # the upstream closed first: the other direction tells the client

    async def upstream_to_client(cancel: anyio.CancelScope) -> None:
        try:
            async for data in upstream:
                if isinstance(data, str):
                    await send({"type": "websocket.send", "text": data})
                else:
                    await send({"type": "websocket.send", "bytes": data})
        except ConnectionClosed:
            pass
        code = upstream.close_code
        if code is None or code in _RESERVED_CODES:
            code = 1000 if code == 1005 else 1011  # no status given, or closed abnormally
        await _close_client(send, code, upstream.close_reason or "")
        cancel.cancel()

    try:
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
        async with anyio.create_task_group() as tg:
            tg.start_soon(client_to_upstream, tg.cancel_scope)
            tg.start_soon(upstream_to_client, tg.cancel_scope)
    finally:
        with anyio.CancelScope(shield=True):
            await upstream.close()


def _with_host(host: str) -> Any:
    """A connection class for ``connect(create_connection=...)`` whose handshake sends ``Host:
    host`` instead of the one websockets makes from the URL (``additional_headers`` would add a
    second ``Host``, not replace it)."""
    return functools.partial(_connection_class(), host=host)


@functools.cache
def _connection_class() -> Callable[..., ClientConnection]:
    """Made on first use: websockets is an optional dependency."""
    from websockets.asyncio.client import ClientConnection
    from websockets.http11 import Request

    class PassedHostConnection(ClientConnection):
        def __init__(self, *args: Any, host: str, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            make_request = self.protocol.connect

            def connect() -> Request:
                request = make_request()
                del request.headers["Host"]
                request.headers["Host"] = host
                return request

            self.protocol.connect = connect  # type: ignore[method-assign]

    return PassedHostConnection


async def _close_client(send: Send, code: int, reason: str) -> None:
    message: dict[str, Any] = {"type": "websocket.close", "code": code, "reason": reason}
    with contextlib.suppress(OSError, RuntimeError):  # the client is gone or already closed
        await send(message)
