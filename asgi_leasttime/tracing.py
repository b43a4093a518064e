"""OpenTelemetry: a client span for every attempt at an upstream (the ``otel`` extra).

Each attempt is a ``CLIENT`` span, a child of whatever span is current (the one
``opentelemetry-instrumentation-asgi`` starts for the incoming request, say), with the stable
HTTP client conventions (``http.request.method``, ``server.address``, ``server.port``,
``url.full``, ``http.response.status_code``, ``error.type``) and the proxy's own
(``leasttime.upstream``; ``leasttime.score``, the upstream's score as the attempt starts, once
it has one; ``leasttime.retry``, 0 for the first attempt). The W3C ``traceparent`` sent
upstream is that span's. The span ends with the attempt's response (or its failure).

It works by wrapping each upstream's opener when the upstream joins the proxy, so without
tracing nothing of it runs, and without the extra nothing of it is imported.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

from asgi_leasttime._extras import need
from asgi_leasttime.errors import UpstreamError
from asgi_leasttime.retry import reason_of
from asgi_leasttime.types import Headers, Opener, UpstreamResponse
from asgi_leasttime.upstream import Upstream

__all__ = ["Tracing"]

_PROPAGATED = frozenset({b"traceparent", b"tracestate", b"baggage"})

# Attempts made so far for the request at hand, in its context: the proxy starts it at 0 for
# each request (Tracing.new_request), since a server may run several in one task.
_attempts: contextvars.ContextVar[int] = contextvars.ContextVar("leasttime_attempts", default=0)


class Tracing:
    """Trace every attempt at an upstream (needs ``opentelemetry-api``: the ``otel`` extra).

    Arguments:
        tracer_provider: where spans go; ``None``: OpenTelemetry's global provider (set by the
            SDK or ``opentelemetry-instrument``; without one, spans cost next to nothing and go
            nowhere).
    """

    def __init__(self, tracer_provider: Any = None) -> None:
        trace = need("opentelemetry.trace", "otel", "tracing")
        from opentelemetry.propagate import extract, inject

        self._trace = trace
        self._inject = inject
        self._extract = extract
        self.tracer = trace.get_tracer("asgi_leasttime", tracer_provider=tracer_provider)

    @staticmethod
    def new_request() -> None:
        """A request begins: its first attempt is attempt 0 (``leasttime.retry``)."""
        _attempts.set(0)

    def wrap(self, opener: Opener, upstream: Upstream, score: Callable[[], float]) -> Opener:
        """``opener`` with a span around each attempt it makes; ``score``: the upstream's
        least-time score when the attempt starts."""
        url = upstream.url
        assert url is not None
        attributes = {
            "server.address": upstream.host,
            "server.port": upstream.port,
            "leasttime.upstream": upstream.name,
        }
        if upstream.address is not None:
            attributes["network.peer.address"] = upstream.address
        base = str(url).rstrip("/")
        tracer, trace, inject, extract = self.tracer, self._trace, self._inject, self._extract

        async def traced(
            method: str, target: bytes, headers: Headers, body: AsyncIterator[bytes] | None
        ) -> UpstreamResponse:
            attempt = _attempts.get()
            _attempts.set(attempt + 1)
            parent = None  # the current span's context
            if not trace.get_current_span().get_span_context().is_valid:
                # No span here (the proxy served bare): the client's traceparent, if it sent one.
                parent = extract(
                    {
                        n.decode("latin-1"): v.decode("latin-1")
                        for n, v in headers
                        if n in _PROPAGATED
                    }
                )
            span = tracer.start_span(
                method,
                context=parent,
                kind=trace.SpanKind.CLIENT,
                attributes={
                    **attributes,
                    "http.request.method": method,
                    "url.full": base + target.decode("latin-1"),
                    "leasttime.retry": attempt,
                },
            )
            now = score()
            if math.isfinite(now):  # a cold upstream has none yet
                span.set_attribute("leasttime.score", now)
            carrier: dict[str, str] = {}
            inject(carrier, context=trace.set_span_in_context(span))
            sent = [(name, value) for name, value in headers if name not in _PROPAGATED]
            sent += [(n.encode("latin-1"), v.encode("latin-1")) for n, v in carrier.items()]
            try:
                response = await opener(method, target, sent, body)
            except BaseException as exc:
                kind = reason_of(exc) if isinstance(exc, UpstreamError) else type(exc).__name__
                span.set_attribute("error.type", kind)
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
                span.end()
                raise
            status = response.status_code
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_attribute("error.type", str(status))
                span.set_status(trace.Status(trace.StatusCode.ERROR))
            return _Traced(response, span)

        return traced


class _Traced:
    """An upstream's response whose span ends when the response does."""

    __slots__ = ("_response", "_span", "raw_headers", "status_code")

    def __init__(self, response: UpstreamResponse, span: Any) -> None:
        self._response = response
        self._span = span
        self.status_code = response.status_code
        self.raw_headers = response.raw_headers

    async def next_chunk(self) -> tuple[bytes, bool]:
        return await self._response.next_chunk()

    async def aclose(self) -> None:
        try:
            await self._response.aclose()
        finally:
            self._span.end()
