"""RequestRecord: what one proxied request came to, for whoever observes the proxy's requests.

The proxy fills a record only while something observes it (the admin app's metrics, the access
log): with no observer, no record is made and the request path is what it was. Observers are
told once the request is over, in the request's task; one that raises is logged, never the
client's problem.
"""

from __future__ import annotations

from typing import Protocol

from asgi_leasttime.types import Message, Scope

__all__ = ["Attempt", "RequestObserver", "RequestRecord"]

Attempt = tuple[str, str, str]
"""A failed attempt: the upstream's name, why it failed (``refused``, ``reset``,
``no_response``, ``timeout``, ``status``) and what came of it (``retried``, or why not:
``attempts``, ``budget``, ``no_upstream``)."""


class RequestRecord:
    """One request, as its observers see it once it is over. Times are in seconds."""

    __slots__ = (
        "address",
        "attempts",
        "bytes_sent",
        "client",
        "duration",
        "failed_attempts",
        "http_version",
        "method",
        "path",
        "protocol",
        "query",
        "scope",
        "started",
        "status",
        "sticky",
        "ttfb",
        "upstream",
        "upstream_status",
    )

    def __init__(self, scope: Scope, started: float, protocol: str = "http") -> None:
        self.scope = scope
        """The request's ASGI scope (its headers among them)."""
        self.started = started
        """When it arrived (``time.time()``)."""
        self.protocol = protocol
        """``http`` or ``websocket``."""
        self.method: str = scope.get("method", "GET")
        self.path: str = scope.get("path", "")
        self.query: bytes = scope.get("query_string", b"")
        self.http_version: str = scope.get("http_version", "1.1")
        self.client: str | None = None
        """The client's address, after the trusted-proxy rule (``trusted_proxies``)."""
        self.status = 499
        """The status sent to the client (499, NGINX's "client closed request": none)."""
        self.bytes_sent = 0
        """Bytes of response body sent to the client."""
        self.duration = 0.0
        """From arrival to the end of the response."""
        self.upstream: str | None = None
        """The upstream that answered last (or was tried last); ``None`` if none was picked."""
        self.address: str | None = None
        """Where that upstream was reached (``host:port``, or the address of a DNS upstream)."""
        self.upstream_status: int | None = None
        """The status the upstream answered with; ``None`` when it gave none."""
        self.ttfb: float | None = None
        """The upstream's time to its response head."""
        self.attempts = 0
        """Attempts made (1 without retries; 0 when no upstream was tried)."""
        self.failed_attempts: list[Attempt] = []
        """Each attempt that failed, in order."""
        self.sticky: str | None = None
        """With sticky sessions: ``kept`` (the cookie's upstream answered), ``new`` (no
        cookie) or ``moved`` (a cookie whose upstream could not take it)."""

    def saw(self, message: Message) -> None:
        """What a message sent to the client tells: the status, the bytes of the body."""
        kind = message["type"]
        if kind == "http.response.body":
            self.bytes_sent += len(message.get("body", b""))
        elif kind == "http.response.start" or kind == "websocket.http.response.start":
            self.status = message["status"]
        elif kind == "websocket.send":
            self.bytes_sent += len(message.get("bytes") or message.get("text", "").encode())
        elif kind == "websocket.accept":
            self.status = 101
        elif kind == "websocket.close" and self.status == 499:
            self.status = 403  # the handshake refused, as uvicorn answers it


class RequestObserver(Protocol):
    """What the proxy tells of every request it answers (see
    :meth:`~asgi_leasttime.LeastTimeProxy.observe_requests`)."""

    def finished(self, record: RequestRecord) -> None:
        """One request is over."""
