"""UpstreamStatus: a read-only snapshot of one upstream, for the status API and metrics."""

from __future__ import annotations

from dataclasses import dataclass

from asgi_leasttime.balancer import Server
from asgi_leasttime.upstream import Upstream

__all__ = ["UpstreamStatus"]


@dataclass(frozen=True)
class UpstreamStatus:
    """One upstream as the proxy sees it right now. Times are in seconds."""

    name: str
    url: str | None
    up: bool
    fenced: bool
    weight: float
    average_ttfb: float
    inflight: int
    score: float
    requests: int
    failures: int

    @classmethod
    def of(cls, upstream: Upstream, server: Server) -> UpstreamStatus:
        """The snapshot of an upstream and its balancer server."""
        return cls(
            name=upstream.name,
            url=str(upstream.url) if upstream.url is not None else None,
            up=server.up,
            fenced=server.fenced,
            weight=server.weight,
            average_ttfb=server.average,
            inflight=server.inflight,
            score=server.score,
            requests=server.requests,
            failures=server.failures,
        )
