"""Lease: one request's hold on a server, from the pick to the end of its answer.

Shaped like httpcore's pool, which ties a connection's return to its response stream's close: the
balancer hands out a lease with the server counted in flight, and the request gives it back once,
however it ends. On the way the lease records, once, what the balancer learns from the request:
answered (a status and a time to first byte) or failed (never answered). A lease given back with
neither was abandoned: the client left first, or the request was refused before it was sent.

What the balancer must know at the pick (how many other requests the server had in flight, which
teaches it how much one more delays an answer) is captured here, when the lease is made, so no
caller can pass it wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from asgi_leasttime.balancer import Balancer, Server

__all__ = ["FAILURE_STATUS", "Lease", "Outcome", "OutcomeListener", "is_failure"]

Outcome = Literal["answered", "failed", "abandoned"]

OutcomeListener = Callable[["Lease"], None]
"""Called once per lease, when its outcome is known (``Balancer.register_outcome_listener``)."""

FAILURE_STATUS = 500


def is_failure(status: int | None) -> bool:
    """The one rule of what counts against a server: no answer, or an answer of 500 or more
    (Traefik's passive health check counts the same)."""
    return status is None or status >= FAILURE_STATUS


class Lease:
    """A request in flight on :attr:`server`. Made by :meth:`Balancer.acquire` (a pick) and
    :meth:`Balancer.lease` (a server chosen another way, such as a sticky cookie's).

    Record the outcome with :meth:`answered` or :meth:`failed` (the first call counts, later ones
    are ignored) and give the lease back with :meth:`release`, or use it as a context manager.
    """

    __slots__ = ("_balancer", "_released", "alongside", "outcome", "server")

    def __init__(self, balancer: Balancer, server: Server) -> None:
        self._balancer = balancer
        self.server = server
        self.alongside = server._inflight - 1
        """How many other requests the server had in flight when this one was counted."""
        self.outcome: Outcome | None = None
        self._released = False

    def __repr__(self) -> str:
        return f"<Lease {self.server.name!r} outcome={self.outcome}>"

    def __getattr__(self, attribute: str) -> Any:
        # A lease reads as its server (lease.name, lease.inflight, lease.score), so code written
        # when acquire() returned the Server keeps working.
        return getattr(self.server, attribute)

    def answered(self, status: int, ttfb: float) -> None:
        """The server answered with ``status`` after ``ttfb`` seconds (its response head)."""
        if self.outcome is not None:
            return
        balancer = self._balancer
        if is_failure(status):
            self.outcome = "failed"
            balancer._record_failure(self.server, ttfb)
        else:
            self.outcome = "answered"
            balancer._record_ttfb(self.server, ttfb, self.alongside)
        balancer._tell_listeners(self)

    def failed(self, ttfb: float | None = None) -> None:
        """The server never answered (refused, reset, timed out, or spoke no HTTP)."""
        if self.outcome is not None:
            return
        self.outcome = "failed"
        self._balancer._record_failure(self.server, ttfb)
        self._balancer._tell_listeners(self)

    def release(self) -> None:
        """The request is over, however it ended; idempotent."""
        if self._released:
            return
        self._released = True
        if self.outcome is None:
            self.outcome = "abandoned"
            self._balancer._tell_listeners(self)
        self._balancer._count_out(self.server)

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
