"""UpstreamStatus: a read-only snapshot of one upstream, for the status API and metrics."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from asgi_leasttime.balancer import Server
from asgi_leasttime.upstream import Upstream

__all__ = ["UpstreamStatus"]


@dataclass(frozen=True)
class UpstreamStatus:
    """One upstream as the proxy sees it right now. Times are in seconds."""

    name: str
    url: str | None
    up: bool
    down: dict[str, float]
    """Each source that says the upstream is down, with how many seconds it has said so."""
    fenced: bool
    weight: float
    average_ttfb: float
    inflight: int
    score: float
    requests: int
    failures: int
    origin: str = "config"
    """Where the upstream came from: ``config`` (the proxy's options or the file), ``api``
    (added while running, here or by a process sharing the state) or ``dns`` (an address
    its name resolved to)."""
    since: float = 0.0
    """When it joined the proxy (seconds since the epoch)."""
    address: str | None = None
    """The IP address it is reached at, when one is set (a DNS upstream's)."""

    def as_json(self) -> dict[str, Any]:
        """As ``/status`` shows it (JSON has no infinity: a cold upstream's score, while its
        first probe is out, is ``None``)."""
        document = dataclasses.asdict(self)
        if not math.isfinite(self.score):
            document["score"] = None
        return document

    def with_figures(self, figures: dict[str, float]) -> UpstreamStatus:
        """This snapshot with the figures of several processes (:func:`~asgi_leasttime.state.
        fleet_totals`) in place of its own, and the least-time score made from them:
        ``average_ttfb * (1 + inflight) / weight``."""
        inflight, ttfb = int(figures["inflight"]), figures["average_ttfb"]
        return dataclasses.replace(
            self,
            average_ttfb=ttfb,
            inflight=inflight,
            requests=int(figures["requests"]),
            failures=int(figures["failures"]),
            score=ttfb * (1 + inflight) / self.weight if self.weight > 0 else math.inf,
        )

    @classmethod
    def of(
        cls,
        upstream: Upstream,
        server: Server,
        now: float,
        origin: str = "config",
        since: float = 0.0,
    ) -> UpstreamStatus:
        """The snapshot of an upstream and its balancer server at ``now`` (balancer clock);
        ``origin`` and ``since``: where and when it joined."""
        return cls(
            name=upstream.name,
            url=str(upstream.url) if upstream.url is not None else None,
            up=server.up,
            down={source: now - since for source, since in server.down_flags.items()},
            fenced=server.fenced,
            weight=server.weight,
            average_ttfb=server.average,
            inflight=server.inflight,
            score=server.score,
            requests=server.requests,
            failures=server.failures,
            origin=origin,
            since=since,
            address=upstream.address,
        )
