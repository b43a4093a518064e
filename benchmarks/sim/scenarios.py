"""The scenarios: each one a fault of Traefik's, or a steady state it handles well."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import replace

from .engine import Scenario, ServerModel

Service = Callable[[float, random.Random], float]
MEAN = 0.040  # seconds: the usual server's mean service time


def exponential(mean: float) -> Service:
    return lambda now, rng: rng.expovariate(1 / mean)


def lognormal(mean: float, sigma: float = 0.8) -> Service:
    mu = math.log(mean) - sigma * sigma / 2
    return lambda now, rng: rng.lognormvariate(mu, sigma)


def bimodal(mean: float, slow_share: float = 0.1, slow_factor: float = 10.0) -> Service:
    fast = mean / (1 - slow_share + slow_share * slow_factor)
    return lambda now, rng: rng.expovariate(
        1 / (fast * (slow_factor if rng.random() < slow_share else 1))
    )


def slower(service: Service, factor: float, start: float = 0.0, end: float = math.inf) -> Service:
    return lambda now, rng: service(now, rng) * (factor if start <= now < end else 1.0)


def pool(n: int, workers: int, service: Service) -> list[ServerModel]:
    return [ServerModel(f"s{i}", workers, service) for i in range(n)]


def capacity(servers: list[ServerModel], means: list[float]) -> float:
    return sum(m.workers / mean for m, mean in zip(servers, means, strict=True))


def one_slow(load: float = 0.85) -> Scenario:
    def servers() -> list[ServerModel]:
        models = pool(10, 4, bimodal(MEAN))
        models[9].service = bimodal(MEAN * 5)
        return models

    rate = load * 4 * (9 / MEAN + 1 / (5 * MEAN))
    return Scenario("one server 5x slower", servers, lambda t: rate, 30, steady=True, watch="s9")


def slow_spell(
    load: float, slow: int, start: float, end: float, duration: float, **options: float
) -> Scenario:
    """The last ``slow`` of ten servers 10x slower from ``start`` to ``end``."""

    def servers() -> list[ServerModel]:
        models = pool(10, 4, exponential(MEAN))
        for model in models[10 - slow :]:
            model.service = slower(exponential(MEAN), 10, start, end)
        return models

    rate = load * 40 / MEAN
    which = "one server" if slow == 1 else f"{slow} servers"
    settings = "".join(f", {name} {value:g} s" for name, value in options.items())
    return Scenario(
        f"{which} 10x slower {start:g}-{end:g} s, load {load}{settings}",
        servers,
        lambda t: rate,
        duration,
        watch="s9",
        events={"degrade": start, "recover": end},
        options=dict(options),
    )


def degrade_and_recover(load: float) -> Scenario:
    return slow_spell(load, 1, 20, 40, 60)


def cold_join() -> Scenario:
    def servers() -> list[ServerModel]:
        models = pool(10, 4, exponential(MEAN))
        new = ServerModel("new", 4, slower(exponential(MEAN), 10, 0, 12), joins_at=10)
        return [*models, new]

    rate = 0.7 * 40 / MEAN
    return Scenario(
        "new server joins at 10 s, 10x slow for 2 s",
        servers,
        lambda t: rate,
        20,
        watch="new",
        events={"join": 10},
    )


def sub_millisecond(workers: int) -> Scenario:
    def servers() -> list[ServerModel]:
        models = [ServerModel(f"s{i}", workers, lognormal(0.0003, 0.3)) for i in range(3)]
        return [*models, ServerModel("s3", workers, lognormal(0.0009, 0.3))]

    rate = 0.85 * (3 / 0.0003 + 1 / 0.0009)  # the 1-worker capacity, for both
    return Scenario(
        f"sub-millisecond servers, {workers} worker(s) each",
        servers,
        lambda t: rate,
        4,
        steady=True,
        watch="s3",
    )


def fail_fast() -> Scenario:
    def servers() -> list[ServerModel]:
        models = pool(10, 4, exponential(MEAN))
        models[9].fails = lambda now: 10 <= now < 25
        return models

    rate = 0.7 * 40 / MEAN
    return Scenario(
        "one server fails fast (503) 10-25 s",
        servers,
        lambda t: rate,
        35,
        watch="s9",
        events={"fail": 10, "recover": 25},
    )


def few_workers(load: float) -> Scenario:
    """Six servers of two workers, one 1.5x slower: a request in flight here delays the next
    one often, and a queueing weight learned too low piles requests up behind a server."""

    def servers() -> list[ServerModel]:
        models = pool(6, 2, lognormal(MEAN, 0.6))
        models[5].service = lognormal(MEAN * 1.5, 0.6)
        return models

    rate = load * 2 * (5 / MEAN + 1 / (1.5 * MEAN))
    return Scenario(
        f"six servers of 2 workers, one 1.5x slower, load {load}",
        servers,
        lambda t: rate,
        30,
        steady=True,
        watch="s5",
    )


def cold_join_busy() -> Scenario:
    """A server as fast as the others joins a pool at load 0.85 (a scale-out)."""

    def servers() -> list[ServerModel]:
        return [
            *pool(8, 4, exponential(MEAN)),
            ServerModel("new", 4, exponential(MEAN), joins_at=5),
        ]

    rate = 0.85 * 8 * 4 / MEAN  # 0.76 once the ninth has joined
    return Scenario(
        "new server joins a busy pool at 5 s",
        servers,
        lambda t: rate,
        20,
        steady=True,
        watch="new",
        events={"join": 5},
    )


def flapping(load: float) -> Scenario:
    """One of ten servers fails fast (503 in 0.2 ms) for 2 s out of every 5, all run long."""

    def servers() -> list[ServerModel]:
        models = pool(10, 4, exponential(MEAN))
        models[9].fails = lambda now: now % 5 >= 3
        return models

    rate = load * 40 / MEAN
    return Scenario(
        f"one server fails fast 2 s in every 5, load {load}",
        servers,
        lambda t: rate,
        30,
        steady=True,
    )


def large_pool_one_balancer(n: int = 300) -> Scenario:
    """One balancer over ``n`` servers, 15 % of them 2.5x slower: it owns all the load."""
    slow = set(range(0, n, 20)) | set(range(7, n, 20)) | set(range(13, n, 20))  # 15 %

    def servers() -> list[ServerModel]:
        return [
            ServerModel(f"s{i}", 2, exponential(MEAN * (2.5 if i in slow else 1))) for i in range(n)
        ]

    rate = 0.8 * 2 * ((n - len(slow)) / MEAN + len(slow) / (2.5 * MEAN))
    return Scenario(
        f"one balancer over {n} servers, 15 % of them 2.5x slower",
        servers,
        lambda t: rate,
        8,
        steady=True,
        large_pool=True,
    )


def slow_then_recovered(stale_after: float) -> Scenario:
    """Two servers so slow at load 0.5 that they get no traffic: their share must come back
    soon after they recover, whatever ``stale_after`` is."""
    return slow_spell(0.5, 2, 10, 25, 45, stale_after=stale_after)


SHARE_EVERY = 0.1  # the shared state's default report interval
SHARE_DELAY = 0.005  # its measured p99 propagation on loopback (benchmarks/state.py)


def shared(scenario: Scenario, every: float = SHARE_EVERY) -> Scenario:
    """The scenario with load shared between its balancers through the store."""
    return replace(
        scenario,
        name=f"{scenario.name}, load shared every {every * 1000:g} ms",
        share_every=every,
        share_delay=SHARE_DELAY,
    )


def bursts(balancers: int) -> Scenario:
    base = 0.6 * 40 / MEAN

    def rate(t: float) -> float:  # a quarter-second burst at 2x every second
        return base * (2.0 if (t % 1.0) < 0.25 else 2 / 3)

    return Scenario(
        f"bursts, K = {balancers} balancers",
        lambda: pool(10, 4, lognormal(MEAN)),
        rate,
        30,
        balancers=balancers,
        steady=True,
    )


def large_pool(balancers: int) -> Scenario:
    """200 servers, one in five 3x slower: the default mode samples its picks here."""

    def servers() -> list[ServerModel]:
        return [
            ServerModel(f"s{i}", 2, exponential(MEAN * (3 if i % 5 == 0 else 1)))
            for i in range(200)
        ]

    rate = 0.8 * 2 * (160 / MEAN + 40 / (3 * MEAN))
    return Scenario(
        f"large pool: 200 servers, 40 of them 3x slower, K = {balancers}",
        servers,
        lambda t: rate,
        10,
        balancers=balancers,
        steady=True,
        watch="s0",
        large_pool=True,
    )


def all_scenarios() -> list[Scenario]:
    return [
        one_slow(),
        degrade_and_recover(0.7),
        degrade_and_recover(0.92),
        cold_join(),
        sub_millisecond(1),
        sub_millisecond(64),
        fail_fast(),
        bursts(1),
        bursts(4),
        bursts(8),
        large_pool(1),
        large_pool(8),
        shared(bursts(8)),
        shared(large_pool(8)),
        shared(large_pool(8), every=0.02),
        few_workers(0.75),
        few_workers(0.9),
        cold_join_busy(),
        flapping(0.6),
        large_pool_one_balancer(),
        *(slow_then_recovered(stale_after) for stale_after in (1, 5, 60, 600)),
        *report_scenarios(),
    ]


def sixty_servers(balancers: int, load: float = 0.85) -> Scenario:
    """Sixty servers of two workers at ``load``: the scale-out issue's example (#31)."""
    rate = load * 60 * 2 / MEAN
    return Scenario(
        f"60 servers of 2 workers, load {load}, K = {balancers}",
        lambda: pool(60, 2, exponential(MEAN)),
        lambda t: rate,
        10,
        balancers=balancers,
        steady=True,
    )


def reporting(scenario: Scenario, balancers: int) -> Scenario:
    """The scenario for ``balancers`` balancers, its servers putting their load on every
    answer (ORCA): ``"<scenario>, K = <balancers>, load reports"``."""
    name = scenario.name.removeprefix("one balancer over ")
    name = name.replace(f", K = {scenario.balancers} balancers", "")
    name = name.replace(f", K = {scenario.balancers}", "")
    return replace(
        scenario, name=f"{name}, K = {balancers}, load reports", balancers=balancers, reports=True
    )


REPORTS_K = (1, 8, 32)


def report_scenarios() -> list[Scenario]:
    """Each family for K = 1, 8 and 32 balancers, with load reports on the answers."""
    families = (
        bursts(1),
        few_workers(0.9),
        sixty_servers(1),
        large_pool(1),
        large_pool_one_balancer(),
    )
    return [reporting(family, k) for family in families for k in REPORTS_K]
