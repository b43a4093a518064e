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
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any
from urllib.parse import quote, unquote_to_bytes

from asgi_leasttime._headers import BadRequest, BadResponse, response_headers
from asgi_leasttime._logging import RateLimitedLog
from asgi_leasttime._paths import path_below_root, raw_below
from asgi_leasttime._sweeper import Sweeper
from asgi_leasttime.errors import NoResponse, RequestRefused, ResponseBroken, UpstreamError
from asgi_leasttime.retry import IDEMPOTENT, Retry, may_send_again
from asgi_leasttime.types import Headers, Message, Opener, Receive, Scope, Send, UpstreamResponse

__all__ = [
    "Again",
    "ClientDisconnected",
    "Exchange",
    "ExchangeResult",
    "forget_upstream",
    "forward_http",
    "send_error",
    "upstream_target",
]

logger = logging.getLogger("asgi_leasttime.forwarding")

FAILURE_LOG_EVERY = 10.0
"""Seconds between two WARNING lines about failed requests to one upstream (and one kind of
failure); the lines in between are counted and the next one says how many."""

_failures = RateLimitedLog(logger, FAILURE_LOG_EVERY)
_FAILURE_KINDS = ("cut off", "timeout", "failed", "unexpected")


def forget_upstream(where: str) -> None:
    """Drop the failure lines counted for an upstream that left the proxy."""
    for kind in _FAILURE_KINDS:
        _failures.forget((where, kind))


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
    retries: int  # attempts after the first


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
    # A dot segment follows a separator; without "/." or "%" or "\\" there is none to decode
    # (checked here, not in the call: one call less on nearly every request).
    if (b"/." in raw_path or b"%" in raw_path or b"\\" in raw_path) and _has_dot_segment(raw_path):
        raise BadRequest("the path has a dot segment")
    query: bytes = scope.get("query_string", b"")
    return raw_path + b"?" + query if query else raw_path


def _has_dot_segment(raw_path: bytes) -> bool:
    path = unquote_to_bytes(raw_path).replace(b"\\", b"/")
    return any(segment in (b".", b"..") for segment in path.split(b"/"))


def _has_body(scope: Scope) -> bool | None:
    """Whether the request has a body, as its framing says; ``None`` when the first message must
    tell: an HTTP/2 or HTTP/3 request without a ``Content-Length`` may have one (its frames end
    it), where an HTTP/1 request without ``Content-Length`` or ``Transfer-Encoding`` has none."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
        if name == b"transfer-encoding":
            return True
    return None if scope.get("http_version") in _FRAMED_BODIES else False


_FRAMED_BODIES = frozenset({"2", "3"})


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


# How long an exchange runs before a watcher starts listening for the client leaving. Most
# answers are complete sooner and then no watcher task is made at all (one made, run once and
# cancelled costs about 10 us here, as much as the rest of the forwarding logic); a client that
# leaves is noticed up to 1.5 times this later.
WATCH_AFTER = 0.02

_per_thread = threading.local()


def _watchlist() -> Sweeper[Exchange]:
    """The exchanges in flight on this thread's event loop, checked every half WATCH_AFTER on
    the clock their ``sent_at`` is read from."""
    try:
        watchlist: Sweeper[Exchange] = _per_thread.watchlist
    except AttributeError:
        watchlist = _per_thread.watchlist = Sweeper(
            WATCH_AFTER / 2, Exchange.watch_if_due, clock=time.perf_counter
        )
    return watchlist


Again = Callable[["Exchange", UpstreamError | None], bool]
"""Called when an attempt failed before the client's answer started and the request may be
sent again (``error``, or ``None`` for an upstream status the retry policy lists): the caller
counts the failure, and either aims the exchange at another upstream (:meth:`Exchange.aim`) and
returns true, or returns false and the failure stands."""


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
    again: Again | None = None,
    retry: Retry | None = None,
) -> Coroutine[Any, Any, ExchangeResult]:
    """Forward one request to ``target`` upstream (``where`` names the upstream in logs) and
    stream the answer back.

    ``on_response(status, ttfb)`` is called as soon as the upstream's response headers arrive, so
    a long body does not delay the balancer's information; ``ExchangeResult.failed`` says the
    upstream never gave an answer that could be forwarded. Errors become answers:
    connection failures 502, timeouts 504; after the response started, a failure cuts the
    response off. A client that leaves cancels the exchange. With ``again`` and ``retry``, an
    attempt that failed in a way :func:`~asgi_leasttime.retry.may_send_again` allows is handed
    to ``again``, which may aim the exchange at another upstream.
    """
    exchange = Exchange(
        open_upstream,
        where,
        scope,
        receive,
        send,
        headers,
        extra_response_headers,
        on_response,
        again=again,
        retry=retry,
    )
    return exchange.run(target)  # the coroutine itself, awaited by the caller: one frame less


class Exchange(ExchangeResult):
    """One request on its way: the upstream call (tried again elsewhere where the rules allow),
    the answer streamed back, and the watcher that cancels it all when the client leaves. What it
    learns is its own :class:`ExchangeResult` (one object less a request)."""

    __slots__ = (
        "again",
        "body_read",
        "body_size",
        "client_gone",
        "extra_response_headers",
        "finished",
        "has_body",
        "headers",
        "kept",
        "lease",
        "method",
        "on_response",
        "open_upstream",
        "pass_server_header",
        "per_try",
        "policy",
        "receive",
        "retry_statuses",
        "send",
        "sent_at",
        "started",
        "task",
        "tried",  # set by ``again``; unset until then
        "watch_when_read",
        "watcher",
        "where",
    )

    tried: tuple[str, ...]
    """The caller's, set by ``again`` at the first retry: the upstreams tried before."""

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
        pass_server_header: bool = False,
        lease: Any = None,
        again: Again | None = None,
        retry: Retry | None = None,
    ) -> None:
        self.open_upstream = open_upstream
        self.where = where
        self.pass_server_header = pass_server_header  # the upstream's Date and Server pass
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
        self.lease = lease  # the caller's, for ``again``: the exchange never touches it
        # ``again`` is told of every failed attempt (a refusal is news even without retries);
        # ``retry`` says what to keep so that the request can be sent again.
        self.again = again
        self.policy = retry
        # None: not known before the first message (see _look_for_body); a body until then.
        self.has_body: bool | None = _has_body(scope)
        has_body = self.has_body is not False
        self.body_read = not has_body
        self.body_size = 0  # bytes of the request body taken from the client so far
        if retry is not None:  # the proxy passes None for retries off
            self.kept: list[bytes] | None = [] if has_body else None  # the body, to resend
            self.retry_statuses = retry.retry_on_status
            self.per_try = retry.per_try_timeout
        else:
            self.kept = None
            self.retry_statuses = ()
            self.per_try = None
        self.started = False  # the response to the client
        self.finished = False
        self.client_gone = False
        self.watch_when_read = False
        self.watcher: asyncio.Task[None] | None = None
        self.task: asyncio.Task[Any] | None = None
        # When the request was last sent (perf_counter): its TTFB starts here, and so does
        # the wait before the watcher (a retry, sent at once after a failed try, restarts it).
        self.sent_at = 0.0

    def aim(
        self,
        open_upstream: Opener,
        where: str,
        on_response: Callable[[int, float], None] | None,
        extra_response_headers: Headers | None,
    ) -> None:
        """Send the next attempt to another upstream (``again`` calls this)."""
        self.open_upstream = open_upstream
        self.where = where
        self.on_response = on_response
        self.extra_response_headers = extra_response_headers

    async def run(self, target: bytes) -> ExchangeResult:
        # The exchange, its errors answered and the client's leaving handled, in one coroutine:
        # each frame between uvicorn and the upstream costs on every resumption.
        task = self.task = asyncio.current_task()
        assert task is not None
        watchlist = _watchlist()
        watchlist.add(self, task.get_loop())
        method, send = self.method, self.send
        try:
            try:
                if self.has_body is None:
                    await self._look_for_body()
                self.sent_at = time.perf_counter()
                body = self._request_body() if self.has_body else None
                try:
                    if self.per_try is None:
                        response = await self.open_upstream(method, target, self.headers, body)
                    else:
                        response = await self._open(target, body)
                except UpstreamError as exc:
                    response = await self._another_attempt(target, exc)
                else:
                    if self.retry_statuses and response.status_code in self.retry_statuses:
                        response = await self._another_attempt(target, None, response)
                self.ttfb = ttfb = time.perf_counter() - self.sent_at
                try:
                    try:
                        head = response_headers(
                            response.raw_headers, response.status_code, self.pass_server_header
                        )
                    except BadResponse as exc:
                        raise ResponseBroken(str(exc)) from None  # 502, a failure
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
                logger.debug("client left during %s %s", method, self.where)
            except RequestRefused as exc:
                # The request could not be written as it is: the client's doing, not the
                # upstream's.
                logger.info("request to %s refused by the HTTP client: %r", self.where, exc)
                if not self.started:
                    await _answer(send, 400, "bad request")
            except UpstreamError as exc:  # timeouts included
                await self._failed(exc)
            except Exception:
                # A fault in the client library (h11 raising past httpcore's error mapping, for
                # one). Answer like any upstream failure rather than let a 500 out, and say it
                # loudly.
                where = self.where
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
            logger.debug("client left during %s %s", method, self.where)
        finally:
            self.finished = True
            watchlist.discard(self)
            if self.watcher is not None:
                self.watcher.cancel()
        return self

    async def _failed(self, exc: UpstreamError) -> None:
        """The request failed for good: the client is answered (or its answer cut off)."""
        self.failed = self.status is None
        where = self.where
        # Rate-limited per upstream: a dead one behind a busy proxy fails every request.
        if self.started:
            _failures.warning(
                (where, "cut off"), "upstream %s failed mid-response (%r): cut off", where, exc
            )
        elif exc.timed_out:
            _failures.warning((where, "timeout"), "upstream %s timed out: %r", where, exc)
            await _answer(self.send, 504, "gateway timeout")
        else:
            _failures.warning((where, "failed"), "upstream %s failed: %r", where, exc)
            await _answer(self.send, 502, "bad gateway")

    # -- attempts -------------------------------------------------------------------------------

    async def _another_attempt(
        self, target: bytes, error: UpstreamError | None, response: UpstreamResponse | None = None
    ) -> UpstreamResponse:
        """Attempts after the first, while the rules and the caller allow: the last error, or
        the last answer (a status the policy lists), stands when they do not."""
        method = self.method
        while True:
            if response is not None:  # a status the policy lists: this attempt's answer
                self._answer_seen(response)
                if not (method in IDEMPOTENT and self._body_kept()):
                    return response
            elif not may_send_again(
                error,  # type: ignore[arg-type]
                method,
                body_unread=self.body_size == 0,
                body_kept=self._body_kept(),
            ):
                raise error  # type: ignore[misc]
            try:
                again = self.again is not None and self.again(self, error)
            except BaseException:
                if response is not None:
                    await response.aclose()  # its connection goes back to its pool
                raise
            if not again:
                if response is not None:
                    return response
                raise error  # type: ignore[misc]
            if response is not None:
                await response.aclose()
            self.retries += 1
            logger.debug("trying %s again on %s after %r", method, self.where, error or response)
            self.sent_at = time.perf_counter()
            body = self._body_again() if self.has_body else None
            error = response = None
            try:
                response = await self._open(target, body)
            except UpstreamError as exc:
                error = exc
                continue
            if not (self.retry_statuses and response.status_code in self.retry_statuses):
                return response

    def _answer_seen(self, response: UpstreamResponse) -> None:
        """An attempt's answer that will not be forwarded still teaches the balancer."""
        if self.on_response is not None:
            self.on_response(response.status_code, time.perf_counter() - self.sent_at)

    async def _open(self, target: bytes, body: AsyncIterator[bytes] | None) -> UpstreamResponse:
        per_try = self.per_try
        opening = self.open_upstream(self.method, target, self.headers, body)
        if per_try is None or self.method not in IDEMPOTENT:
            return await opening
        try:
            async with asyncio.timeout(per_try):
                return await opening
        except TimeoutError:
            message = f"no answer within the per-try timeout ({per_try:g} s)"
            raise NoResponse(message, per_try=True) from None

    def _body_kept(self) -> bool:
        return not self.has_body or self.kept is not None

    async def _body_again(self) -> AsyncIterator[bytes]:
        """The request body once more: what was kept, then the rest from the client."""
        for chunk in list(self.kept or ()):
            yield chunk
        if not self.body_read:
            async for chunk in self._request_body():
                yield chunk

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

    async def _look_for_body(self) -> None:
        """An HTTP/2 or HTTP/3 request without a ``Content-Length``: its first message says
        whether a body follows (and is read again by :meth:`_request_body`)."""
        message = await self.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        if message.get("body") or message.get("more_body"):
            self.has_body = True
            receive, read_ahead = self.receive, [message]

            async def receive_again() -> Message:  # that first message, then the client's
                return read_ahead.pop() if read_ahead else await receive()

            self.receive = receive_again
            return
        self.has_body = False
        self.kept = None
        self.body_read = True
        if self.watch_when_read:
            self._start_watching()

    async def _request_body(self) -> AsyncIterator[bytes]:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk = message.get("body", b"")
            more = message.get("more_body", False)
            if not more:
                # All of it is in hand before the last piece goes out: a consumer that stops
                # there (a write that failed) must not leave a retry reading a body that ended.
                self.body_read = True
                if self.watch_when_read:
                    self._start_watching()
            if chunk:
                self.body_size += len(chunk)
                kept = self.kept
                if kept is not None:
                    # Kept while it is small enough to send again (the retry policy's limit).
                    policy = self.policy
                    if policy is not None and self.body_size <= policy.max_body:
                        kept.append(chunk)
                    else:
                        self.kept = None
                yield chunk
            if not more:
                break


async def _answer(send: Send, status: int, text: str) -> None:
    with contextlib.suppress(OSError):  # the client left too
        await send_error(send, status, text)
