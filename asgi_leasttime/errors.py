"""What went wrong between the proxy and an upstream, in the proxy's own words.

Each upstream client raises these, never its library's: the lean client raises them itself, the
httpx path maps httpx's exceptions to them once, at one boundary (as httpx maps httpcore's). They
say how far the request got, which is what decides whether it may be sent again (see
:mod:`asgi_leasttime.retry`), and whether the connection came from the pool (a pooled keep-alive
connection the upstream had just closed fails without the upstream having seen anything).

=====================  ===============================================  ==================
error                  how far the request got                          answered
=====================  ===============================================  ==================
:class:`NotConnected`  nowhere: refused, unreachable, connect timeout,  502 (504 timed out)
                       TLS handshake refused, no free pooled connection
:class:`RequestNotSent` connected, the request not (fully) written      502 (504 timed out)
:class:`NoResponse`    written, not one byte of an answer               502 (504 timed out)
:class:`ResponseBroken` an answer started, then broke or made no sense  502, or cut off
=====================  ===============================================  ==================
"""

from __future__ import annotations

__all__ = [
    "NoResponse",
    "NotConnected",
    "RequestNotSent",
    "RequestRefused",
    "ResponseBroken",
    "UpstreamError",
]


class UpstreamError(Exception):
    """Something went wrong with an upstream before or while it answered.

    Attributes:
        reused: the request went out on a pooled connection used before.
        timed_out: a timeout ended the wait (answered 504 rather than 502).
    """

    def __init__(self, message: str, *, reused: bool = False, timed_out: bool = False) -> None:
        super().__init__(message)
        self.reused = reused
        self.timed_out = timed_out

    @property
    def status(self) -> int:
        """What the client is answered when this error stands: 504 for a timeout, else 502."""
        return 504 if self.timed_out else 502


class NotConnected(UpstreamError):
    """No connection: refused, unreachable, timed out, a TLS handshake refused, or no free
    pooled connection within the pool timeout (``pool_full``). Nothing was sent."""

    def __init__(self, message: str, *, timed_out: bool = False, pool_full: bool = False) -> None:
        super().__init__(message, timed_out=timed_out)
        self.pool_full = pool_full


class RequestNotSent(UpstreamError):
    """Connected, but the request could not be written whole (the connection closed, or the
    upstream stopped reading for the write timeout)."""


class NoResponse(UpstreamError):
    """The request was written and not one byte of an answer came: the connection closed or
    was reset, or the read timeout passed (``timed_out``), or the retry policy's per-try
    timeout (``per_try``)."""

    def __init__(
        self, message: str, *, reused: bool = False, timed_out: bool = False, per_try: bool = False
    ) -> None:
        super().__init__(message, reused=reused, timed_out=timed_out or per_try)
        self.per_try = per_try


class ResponseBroken(UpstreamError):
    """An answer had started (at least one byte of it) and then broke off, or was not HTTP."""


class RequestRefused(Exception):
    """The request cannot be written as it stands (bytes in its target an HTTP client refuses,
    say): the client's doing, answered 400; the upstream is not to blame."""
