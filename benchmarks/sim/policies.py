"""The policies the simulator compares. Ours are the real Balancer; the others are written here.

Every policy has the same four calls, made by the simulator on a virtual clock:
``pick() -> server``, ``answered(server, ttfb)``, ``failed(server, ttfb)``, ``done(server)``.
"""

from __future__ import annotations

import heapq
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


class LeastTimeWithReports(BalancerPolicy):
    """The default mode scoring with the load reports servers put on their answers (ORCA).

    A report (on an answer, or on a probe's) is the server's requests in flight from every
    balancer. Less this balancer's own at the time (the answered request left out), it is what
    the others had there (never below 0). ``Balancer.set_inflight_elsewhere`` adds an estimate
    of the others' count to this balancer's own in-flight count, which stays exact (its sends
    since the report included), in the score ``average * (1 + queueing * (own + others))``.

    What the estimate is (``toward``), for a report of ``others`` aged to ``w`` (1 when fresh,
    0 when stale):

    ``"zero"``
        ``others * w``: ages toward no report (blind).
    ``"prior"`` / ``"server"``
        ``m + (others - m) * w``, ``m`` the mean of the others' counts over every report
        (``"prior"``: all servers; ``"server"``: this server's), an EWMA weighing each report
        ``prior_decay``, times ``prior_scale``: a server not heard from lately is assumed as
        loaded as usual, and one reported idle looks better than that while fresh.
    ``"excess"`` (chosen)
        ``max(0, others - m_server) * w``: only what the others have above their usual on this
        server counts, so a report never makes a server look better than no report.
    ``"deviation"``
        ``max(-1, others - m_server) * w``: above or below the usual while fresh.

    The ageing (``aging``): ``"step"`` holds ``w = 1`` for ``fresh`` seconds then 0;
    ``"linear"`` takes ``w`` down to 0 over ``fresh`` seconds in ``steps`` steps; ``"exp"``:
    ``w = exp(-age / fresh)``, updated every ``fresh / steps`` seconds, 0 below 5 %.
    ``fresh_ttfb`` > 0: ``fresh`` is that many of the server's average TTFB when the report
    came (``fresh`` seconds while it has no average). The estimate is updated at the picks.

    ``probe_every`` > 0: after every ``probe_every`` picks, ``probes`` probes to servers with
    no report for ``probe_after`` seconds (``probe_target="random"``: the first of
    ``probe_draws`` drawn at random; ``"best"``: the server the next pick would choose).
    ``alongside="total"``: the queueing weight learns from the request's own in-flight count plus
    the others' estimate at the pick, instead of its own count only.
    """

    def __init__(
        self,
        names: list[str],
        clock: Callable[[], float],
        rng: random.Random,
        fresh: float = 0.05,
        aging: str = "step",
        steps: int = 4,
        probe_every: int = 0,
        probe_after: float | None = None,
        probe_draws: int = 4,
        probes: int = 1,
        alongside: str = "own",
        toward: str = "zero",
        probe_target: str = "random",
        prior_decay: float = 0.01,
        prior_scale: float = 1.0,
        fresh_ttfb: float = 0.0,
        **options: Any,
    ) -> None:
        super().__init__(names, clock, rng, "leasttime", **options)
        self.clock = clock
        self.rng = random.Random(rng.getrandbits(64))
        self.fresh = fresh
        self.aging = aging
        self.steps = steps
        self.probe_every = probe_every
        self.probe_after = fresh if probe_after is None else probe_after
        self.probe_draws = probe_draws
        self.probes = probes
        self.probe_target = probe_target  # "random" stale servers, or the "best" one if stale
        self.alongside = alongside
        self.toward = toward  # what a report ages toward: "zero" (blind) or "prior"
        self.prior = 0.0  # the others' mean in flight per server, over all reports (EWMA)
        self.prior_decay = prior_decay  # each report's weight in it
        self.prior_scale = prior_scale  # a stale server is assumed to have prior x this
        self.server_prior: dict[str, float] = {}  # toward="server": the same, per server
        self.fresh_ttfb = fresh_ttfb  # > 0: fresh for this many of the server's average TTFB
        self.interval: dict[str, float] = {}  # name -> seconds between ageing steps
        self.heard: dict[str, tuple[float, float]] = {}  # name -> (others in flight, taken at)
        self.due: list[tuple[float, float, str, int]] = []  # (when, taken at, name, step)
        self.picks = 0
        self.names = list(names)

    def add(self, name: str) -> None:
        super().add(name)
        self.names.append(name)

    def _weight(self, step: int) -> float:
        if self.aging == "step":
            return 1.0 if step == 0 else 0.0
        if self.aging == "linear":
            return max(0.0, 1 - step / self.steps)
        weight = math.exp(-step / self.steps)
        return weight if weight >= 0.05 else 0.0

    def _hear(self, name: str, others: float, taken_at: float) -> None:
        if name not in self.by_name:
            return
        last = self.heard.get(name)
        if last is not None and last[1] > taken_at:
            return  # a newer report is already in (a probe's answer overtaken by an answer's)
        self.heard[name] = (others, taken_at)
        if self.toward == "prior":
            self.prior += (others - self.prior) * self.prior_decay
        elif self.toward in ("server", "excess", "deviation"):
            prior = self.server_prior.get(name, others)
            self.server_prior[name] = prior + (others - prior) * self.prior_decay
        self.balancer.set_inflight_elsewhere(name, self._value(name, others, 1.0))
        if others or self.toward != "zero":
            fresh = self.fresh
            if self.fresh_ttfb:
                average = self.by_name[name].average
                fresh = self.fresh_ttfb * average if average else self.fresh
            interval = fresh if self.aging == "step" else fresh / self.steps
            self.interval[name] = interval
            heapq.heappush(self.due, (taken_at + interval, taken_at, name, 1))

    def _value(self, name: str, others: float, weight: float) -> float:
        """What the others have in flight on a server, from a report aged to ``weight``."""
        if self.toward == "zero":
            return others * weight
        if self.toward == "excess":  # only what is above the server's usual, never below
            return max(0.0, others - self.server_prior[name] * self.prior_scale) * weight
        if self.toward == "deviation":  # above or below the usual, while fresh
            return max(-1.0, others - self.server_prior[name] * self.prior_scale) * weight
        # Ages toward the mean: a low report makes a server look better than an unknown one
        # only while it is fresh.
        if self.toward == "prior":
            prior = self.prior * self.prior_scale
        else:
            prior = self.server_prior[name] * self.prior_scale
        return prior + (others - prior) * weight

    def _age(self, now: float) -> None:
        due = self.due
        while due and due[0][0] <= now:
            _, taken_at, name, step = heapq.heappop(due)
            others, last = self.heard[name]
            if last != taken_at:
                continue  # replaced by a newer report
            weight = self._weight(step)
            self.balancer.set_inflight_elsewhere(name, self._value(name, others, weight))
            if weight > 0:
                interval = self.interval[name]
                heapq.heappush(due, (taken_at + (step + 1) * interval, taken_at, name, step + 1))

    def reported(self, name: str, inflight: float) -> None:
        """An answer's report, as it arrives: this balancer still counts the answered request."""
        own = self.by_name[name].inflight - 1
        self._hear(name, max(0.0, inflight - own), self.clock())

    def probed(self, name: str, inflight: float, taken_at: float) -> None:
        """A probe's answer: the count read at ``taken_at``."""
        if name in self.by_name:
            own = self.by_name[name].inflight
            self._hear(name, max(0.0, inflight - own), taken_at)

    def probe(self) -> list[str]:
        """The servers to probe after a pick: one every ``probe_every`` picks (``probes``
        each time)."""
        if not self.probe_every:
            return []
        self.picks += 1
        if self.picks % self.probe_every:
            return []
        cutoff = self.clock() - self.probe_after
        if self.probe_target == "best":
            # The server the next pick would choose, unless what is known of it is fresh.
            scores = self.balancer._scores
            if not scores:
                return []
            name = self.balancer._available[scores.index(min(scores))].name
            last = self.heard.get(name)
            return [name] if last is None or last[1] < cutoff else []
        chosen: list[str] = []
        for _ in range(self.probe_draws):
            name = self.names[int(self.rng.random() * len(self.names))]
            last = self.heard.get(name)
            if (last is None or last[1] < cutoff) and name not in chosen:
                chosen.append(name)
                if len(chosen) == self.probes:
                    break
        return chosen

    def pick(self) -> Lease:
        self._age(self.clock())
        lease = super().pick()
        if self.alongside == "total":
            lease.alongside += round(lease.server.inflight_elsewhere)
        return lease


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

# Compared in the scenarios with load reports (``Scenario.reports``): the rule chosen in
# benchmarks/RESULTS.md ("Load reports (ORCA) in the simulator"), without and with probes.
REPORTS = {"toward": "excess", "aging": "exp", "fresh_ttfb": 1.0, "prior_decay": 0.01}
PROBES = {"probe_every": 4, "probe_draws": 8, "probe_after": 0.02}


class LeastTimeHearingLoad(BalancerPolicy):
    """The default mode with its own reading of load reports (``Balancer.heard_load``): what
    ships, beside the model of the rule it was chosen from (``LeastTimeWithReports``)."""

    def __init__(self, names: list[str], clock: Callable[[], float], rng: random.Random,
                 **options: Any) -> None:  # fmt: skip
        super().__init__(names, clock, rng, "leasttime", **options)

    def reported(self, name: str, inflight: float) -> None:
        """An answer's report, as it arrives: the balancer still counts the answered request."""
        if name in self.balancer:
            self.balancer.heard_load(name, inflight)


REPORT_POLICIES: dict[str, Factory] = {
    "default": POLICIES["default"],
    "default + reports": lambda n, c, r, **o: LeastTimeWithReports(n, c, r, **{**o, **REPORTS}),
    "default + reports + probes": lambda n, c, r, **o: LeastTimeWithReports(
        n, c, r, **{**o, **REPORTS, **PROBES}
    ),
    "default + Balancer.heard_load": LeastTimeHearingLoad,
}
