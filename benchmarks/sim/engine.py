"""The simulation: servers with workers and queues, arrivals, K balancers, one virtual clock."""

from __future__ import annotations

import heapq
import math
import random
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

TICKS = 10  # share is counted per tenth of a second


@dataclass
class ServerModel:
    """A server: ``workers`` serve a FIFO queue (0 workers: a pure delay, no queue).

    ``service(now, rng)`` draws a service time; ``fails(now)`` says whether the server answers
    503 at once (in ``fail_time`` seconds) instead of serving. ``joins_at`` delays its arrival.
    """

    name: str
    workers: int
    service: Callable[[float, random.Random], float]
    fails: Callable[[float], bool] = lambda now: False
    fail_time: float = 0.0002
    joins_at: float = 0.0
    busy: int = 0
    queue: deque[Any] = field(default_factory=deque)
    max_queue: int = 0


@dataclass
class Scenario:
    """What to simulate: servers, arrival rate over time, balancers, duration."""

    name: str
    servers: Callable[[], list[ServerModel]]
    rate: Callable[[float], float]  # arrivals per second at a time
    duration: float
    balancers: int = 1
    steady: bool = False  # compared on p99 against traefik (within 5 %)
    watch: str | None = None  # the server whose share the scenario is about
    events: dict[str, float] = field(default_factory=dict)  # named times (degrade, recover, ...)
    large_pool: bool = False  # also compare the default mode's sampled-pick variants
    # Load shared between the balancers, as the shared state does: every ``share_every`` seconds
    # each balancer reports its requests in flight per server, and ``share_delay`` later every
    # balancer hears the fleet's total (0: blind to each other). Only policies with ``report``
    # and ``hear`` take part.
    share_every: float = 0.0
    share_delay: float = 0.005
    options: dict[str, Any] = field(default_factory=dict)  # for the default mode's Balancer
    # Load reports (ORCA, gRFC A51): each answer carries its server's requests in flight from
    # every balancer (queued or served, the answered one left out), taken as the answer leaves
    # the server; only the balancer that gets the answer sees it. Only policies with
    # ``reported`` take part. Those with ``probe`` too (Prequal-style probes) are asked after
    # every pick which servers to probe (names), whose count is read ``probe_rtt / 2``
    # later and handed to ``probed(name, count, taken_at)`` after ``probe_rtt``.
    reports: bool = False
    probe_rtt: float = 0.001


@dataclass
class Result:
    """What one run saw."""

    latencies: list[float]
    sent_at: list[float]  # when each of ``latencies`` was sent, in the same order
    share: dict[str, dict[int, int]]  # server -> tick (0.1 s) -> requests sent
    per_tick: dict[int, int]  # tick (0.1 s) -> requests sent
    before_first_answer: dict[str, int]  # server -> requests sent before its first answer
    max_queue: int
    failures: int


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def simulate(scenario: Scenario, policy_factory: Callable[..., Any], seed: int) -> Result:
    """Run one scenario with one policy; every policy sees the same arrivals and service times."""
    arrivals_rng = random.Random(seed)
    service_rng = random.Random(seed * 7919 + 1)
    policy_rng = random.Random(seed * 104729 + 2)
    now = 0.0

    def clock() -> float:
        return now

    models = scenario.servers()
    by_name = {m.name: m for m in models}
    present = [m.name for m in models if m.joins_at <= 0]
    balancers = [
        policy_factory(list(present), clock, policy_rng, **scenario.options)
        for _ in range(scenario.balancers)
    ]
    joins = sorted((m.joins_at, m.name) for m in models if m.joins_at > 0)

    events: list[tuple[float, int, str, Any]] = []
    sequence = 0

    def schedule(at: float, kind: str, payload: Any) -> None:
        nonlocal sequence
        sequence += 1
        heapq.heappush(events, (at, sequence, kind, payload))

    latencies: list[float] = []
    sent_at: list[float] = []
    share: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    per_tick: dict[int, int] = defaultdict(int)
    answered: set[str] = set()
    before_first_answer: dict[str, int] = defaultdict(int)
    failures = 0

    def start(model: ServerModel, request: list[Any]) -> None:
        model.busy += 1
        schedule(now + model.service(now, service_rng), "done", request)

    # Arrivals: a Poisson process whose rate may change over time (thinning).
    peak_rate = max(scenario.rate(t / 10) for t in range(int(scenario.duration * 10) + 1))
    t = 0.0
    while True:
        t += arrivals_rng.expovariate(peak_rate)
        if t >= scenario.duration:
            break
        if arrivals_rng.random() * peak_rate <= scenario.rate(t):
            schedule(t, "arrive", arrivals_rng.randrange(scenario.balancers))
    for at, name in joins:
        schedule(at, "join", name)
    sharing = scenario.share_every > 0 and hasattr(balancers[0], "report")
    if sharing:
        schedule(scenario.share_every, "report", None)
    reporting = scenario.reports and hasattr(balancers[0], "reported")
    probing = reporting and hasattr(balancers[0], "probe")

    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            balancer = balancers[payload]
            server = balancer.pick()
            name = balancer.name_of(server)
            model = by_name[name]
            tick = int(now * TICKS)
            share[name][tick] += 1
            per_tick[tick] += 1
            if name not in answered:
                before_first_answer[name] += 1
            if probing:
                for target in balancer.probe():
                    schedule(now + scenario.probe_rtt / 2, "probe", (balancer, target))
            request = [now, balancer, server, model, False]
            if model.fails(now):
                request[4] = True
                schedule(now + model.fail_time, "done", request)
            elif model.workers == 0 or model.busy < model.workers:
                start(model, request)
            else:
                model.queue.append(request)
                model.max_queue = max(model.max_queue, len(model.queue))
        elif kind == "done":
            arrived, balancer, server, model, fast_failure = payload
            ttfb = now - arrived
            answered.add(model.name)
            if reporting:
                # What the server has in flight once this answer leaves: the request answered
                # is no longer counted (a fast failure never held a worker nor a queue place).
                left = model.busy + len(model.queue) - (0 if fast_failure else 1)
                balancer.reported(model.name, left)
            if fast_failure:
                failures += 1
                balancer.failed(server, ttfb)
            else:
                latencies.append(ttfb)
                sent_at.append(arrived)
                balancer.answered(server, ttfb)
                model.busy -= 1
                if model.queue:
                    start(model, model.queue.popleft())
            balancer.done(server)
        elif kind == "probe":
            balancer, target = payload
            count = by_name[target].busy + len(by_name[target].queue)
            schedule(now + scenario.probe_rtt / 2, "probed", (balancer, target, count))
        elif kind == "probed":
            balancer, target, count = payload
            balancer.probed(target, count, now - scenario.probe_rtt / 2)
        elif kind == "join":
            for balancer in balancers:
                balancer.add(payload)
        elif kind == "report":
            reports = [balancer.report() for balancer in balancers]
            total: dict[str, float] = defaultdict(float)
            for report in reports:
                for name, inflight in report.items():
                    total[name] += inflight
            schedule(now + scenario.share_delay, "heard", (reports, dict(total)))
            if now + scenario.share_every < scenario.duration:
                schedule(now + scenario.share_every, "report", None)
        elif kind == "heard":
            reports, total = payload
            for balancer, own in zip(balancers, reports, strict=True):
                balancer.hear({name: n - own.get(name, 0) for name, n in total.items()})
    return Result(
        latencies=latencies,
        sent_at=sent_at,
        share={k: dict(v) for k, v in share.items()},
        per_tick=dict(per_tick),
        before_first_answer=dict(before_first_answer),
        max_queue=max(m.max_queue for m in models),
        failures=failures,
    )
