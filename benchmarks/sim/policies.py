"""The policies the simulator compares. Ours are the real Balancer; the others are written here.

Every policy has the same four calls, made by the simulator on a virtual clock:
``pick() -> server``, ``answered(server, ttfb)``, ``failed(server, ttfb)``, ``done(server)``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

from asgi_leasttime import Balancer, Lease
from asgi_leasttime.balancer import EXACT_UP_TO


class BalancerPolicy:
    """asgi-leasttime's Balancer, in ``mode`` ("leasttime" or "traefik")."""

    def __init__(
        self,
        names: list[str],
        clock: Callable[[], float],
        rng: random.Random,
        mode: str,
        **options: Any,
    ):
        # The balancer's own random draws (sampled picks in large pools) come from the run's seed.
        own_rng = random.Random(rng.getrandbits(64))
        self.balancer = Balancer(mode=mode, clock=clock, rng=own_rng, **options)  # type: ignore[arg-type]
        for name in names:
            self.balancer.add(name)
        self.by_name = {s.name: s for s in self.balancer}

    def add(self, name: str) -> None:
        added = self.balancer.add(name)
        assert added is not None
        self.by_name[name] = added

    def report(self) -> dict[str, float]:
        """Requests in flight per server, as the proxy reports them to the shared state."""
        return {s.name: s.inflight for s in self.balancer}

    def hear(self, elsewhere: dict[str, float]) -> None:
        """What the rest of the fleet has in flight, as the shared state tells it."""
        for name, inflight in elsewhere.items():
            if name in self.balancer:
                self.balancer.set_inflight_elsewhere(name, inflight)

    def pick(self) -> Lease:
        """A lease, as the proxy takes one."""
        return self.balancer.acquire()

    def name_of(self, picked: Lease) -> str:
        return picked.server.name

    def answered(self, picked: Lease, ttfb: float) -> None:
        picked.answered(200, ttfb)

    def failed(self, picked: Lease, ttfb: float) -> None:
        picked.answered(500, ttfb)  # the simulated failures answer, fast

    def done(self, picked: Lease) -> None:
        picked.release()


class _Counted:
    __slots__ = ("cost", "inflight", "last", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.inflight = 0
        self.cost = 0.0  # peak EWMA of latency, seconds
        self.last = 0.0  # when cost was last updated


class RoundRobin:
    """Each server in turn. Options meant for the Balancer (``stale_after``) are ignored."""

    def __init__(
        self, names: list[str], clock: Callable[[], float], rng: random.Random, **_: Any
    ) -> None:
        self.servers = [_Counted(n) for n in names]
        self.next = 0

    def add(self, name: str) -> None:
        self.servers.append(_Counted(name))

    def pick(self) -> _Counted:
        server = self.servers[self.next % len(self.servers)]
        self.next += 1
        server.inflight += 1
        return server

    def name_of(self, server: _Counted) -> str:
        return server.name

    def answered(self, server: _Counted, ttfb: float) -> None:
        pass

    def failed(self, server: _Counted, ttfb: float) -> None:
        pass

    def done(self, server: _Counted) -> None:
        server.inflight -= 1


class P2CLeastRequest(RoundRobin):
    """Power of two choices: two servers at random, the one with fewer requests in flight."""

    def __init__(
        self, names: list[str], clock: Callable[[], float], rng: random.Random, **_: Any
    ) -> None:
        super().__init__(names, clock, rng)
        self.rng = rng

    def cost_of(self, server: _Counted) -> float:
        return float(server.inflight)

    def pick(self) -> _Counted:
        a, b = self.rng.sample(self.servers, 2)
        server = a if self.cost_of(a) <= self.cost_of(b) else b
        server.inflight += 1
        return server


class P2CPeakEwma(P2CLeastRequest):
    """Finagle's and Linkerd's P2C with peak-EWMA latency: cost = EWMA x (in flight + 1).

    The EWMA decays over ``decay`` seconds (10 s) and jumps straight to any sample above it (peak
    sensitive). A server with no sample yet costs ``penalty`` per request in flight, as Finagle's
    does, so that a new server is tried without being flooded.
    """

    def __init__(
        self,
        names: list[str],
        clock: Callable[[], float],
        rng: random.Random,
        decay: float = 10.0,
        penalty: float = 1.0,
        **_: Any,
    ) -> None:
        super().__init__(names, clock, rng)
        self.clock = clock
        self.decay = decay
        self.penalty = penalty

    def cost_of(self, server: _Counted) -> float:
        if server.cost == 0.0 and server.inflight:
            return self.penalty * server.inflight
        # The decay is applied when a sample arrives, as Finagle does on each observation.
        return server.cost * (server.inflight + 1)

    def answered(self, server: _Counted, ttfb: float) -> None:
        now = self.clock()
        if ttfb > server.cost:
            server.cost = ttfb
        else:
            weight = math.exp(-(now - server.last) / self.decay)
            server.cost = server.cost * weight + ttfb * (1 - weight)
        server.last = now

    def failed(self, server: _Counted, ttfb: float) -> None:
        self.answered(server, max(ttfb, self.penalty))  # a failure is counted as slow


Factory = Callable[..., Any]
"""``factory(names, clock, rng, **scenario.options) -> policy``."""

POLICIES: dict[str, Factory] = {
    "default": lambda n, c, r, **o: BalancerPolicy(n, c, r, "leasttime", **o),
    "traefik": lambda n, c, r, **o: BalancerPolicy(n, c, r, "traefik"),
    "round-robin": RoundRobin,
    "p2c-least-request": P2CLeastRequest,
    "p2c-peak-ewma": P2CPeakEwma,
}

# Compared in the large pools: the sampled pick (above EXACT_UP_TO servers) against the scan.
LARGE_POOL_POLICIES: dict[str, Factory] = {
    "default, exact scan": lambda n, c, r, **o: BalancerPolicy(
        n, c, r, "leasttime", **{**o, "exact_up_to": math.inf}
    ),
    **{
        f"default, best of {k}": (
            lambda n, c, r, k=k, **o: BalancerPolicy(
                n, c, r, "leasttime", **{**o, "exact_up_to": EXACT_UP_TO, "choices": k}
            )
        )
        for k in (2, 4, 8)
    },
}
