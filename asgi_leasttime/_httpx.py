"""The httpx path: an ``httpx.AsyncClient`` seen as an upstream client, its errors mapped once.

A caller's own ``httpx.AsyncClient`` (or ``upstream_client="httpx"``) sends through here. httpx's
exceptions say which library raised; the forwarding and retry rules read the proxy's own
(:mod:`asgi_leasttime.errors`), so they are translated at this one boundary, as httpx translates
httpcore's: :func:`upstream_error`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import h11
import httpx

from asgi_leasttime.errors import (
    NoResponse,
    NotConnected,
    RequestNotSent,
    RequestRefused,
    ResponseBroken,
    UpstreamError,
)
from asgi_leasttime.types import Headers, Opener, UpstreamResponse

__all__ = ["HttpxResponse", "httpx_opener", "upstream_error"]


def upstream_error(exc: httpx.HTTPError, *, answering: bool) -> UpstreamError | RequestRefused:
    """The proxy's error for one of httpx's: ``answering`` once the response head was in (a
    failure then breaks an answer that had started)."""
    if isinstance(exc, httpx.LocalProtocolError | httpx.UnsupportedProtocol):
        return RequestRefused(str(exc))
    timed_out = isinstance(exc, httpx.TimeoutException)
    message = str(exc) or type(exc).__name__
    if answering:
        return ResponseBroken(message, timed_out=timed_out)
    if isinstance(exc, httpx.PoolTimeout):
        return NotConnected(message, timed_out=True, pool_full=True)
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return NotConnected(message, timed_out=timed_out)
    if isinstance(exc, httpx.WriteError | httpx.WriteTimeout):
        return RequestNotSent(message, timed_out=timed_out)
    if isinstance(exc, httpx.RemoteProtocolError) and "without sending" not in message:
        return ResponseBroken(message)  # bytes came, and they were not HTTP
    # httpx does not say whether the connection was reused: taken as fresh, so only a request
    # that may be sent twice is retried after it.
    return NoResponse(message, timed_out=timed_out)


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
        except httpx.HTTPError as exc:
            raise upstream_error(exc, answering=True) from exc

    async def aclose(self) -> None:
        _close_if_bytes_follow(self._response)
        with contextlib.suppress(httpx.HTTPError):  # closing what broke: nothing to report
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
            raise RequestRefused(f"bad request target: {exc}") from None
        request = httpx.Request(method, request_url, headers=headers, content=body)
        if body is None and b"content-length" not in (name for name, _ in headers):
            # httpx adds "Content-Length: 0" to a POST, PUT or PATCH without a body: the
            # upstream sees the request as the client sent it.
            request.headers.pop("content-length", None)
        try:
            return HttpxResponse(await client().send(request, stream=True))
        except httpx.HTTPError as exc:
            raise upstream_error(exc, answering=False) from exc

    return open_upstream
