"""A smoke run of the balancing simulator (the full run: python -m benchmarks.sim.run)."""

from __future__ import annotations

from dataclasses import replace

from benchmarks.sim.engine import simulate
from benchmarks.sim.policies import LARGE_POOL_POLICIES, POLICIES
from benchmarks.sim.run import metrics_of, share_between
from benchmarks.sim.scenarios import cold_join, degrade_and_recover, fail_fast, large_pool


def test_a_cold_slow_server_gets_one_probe_not_a_flood() -> None:
    scenario = replace(cold_join(), duration=12.0)
    default = metrics_of(scenario, simulate(scenario, POLICIES["default"], seed=1))
    traefik = metrics_of(scenario, simulate(scenario, POLICIES["traefik"], seed=1))
    assert default["sent before 1st answer"] <= 2
    assert traefik["sent before 1st answer"] > 10


def test_a_recovered_server_gets_its_share_back() -> None:
    scenario = degrade_and_recover(0.7)
    default = simulate(scenario, POLICIES["default"], seed=1)
    traefik = simulate(scenario, POLICIES["traefik"], seed=1)
    fair = 1 / 10
    assert share_between(default, "s9", 50, 60) >= fair / 2
    assert share_between(traefik, "s9", 50, 60) < fair / 10


def test_a_fast_failing_server_loses_its_share_within_a_second() -> None:
    scenario = replace(fail_fast(), duration=14.0, events={"fail": 10, "recover": 14})
    default = metrics_of(scenario, simulate(scenario, POLICIES["default"], seed=1))
    assert default["fail react s"] <= 1.0


def test_a_large_pool_sampled_does_not_pile_onto_lucky_servers() -> None:
    # 200 servers start cold; each answers its probe once, and with an exact scan the few whose
    # one sample was lucky take request after request. Best of 4 at random does not.
    scenario = replace(large_pool(1), duration=3.0)
    exact = LARGE_POOL_POLICIES["default, exact scan"]
    for seed in (1, 2, 3):
        sampled_queue = metrics_of(scenario, simulate(scenario, POLICIES["default"], seed))
        exact_queue = metrics_of(scenario, simulate(scenario, exact, seed))
        assert sampled_queue["max queue"] <= 15
        assert exact_queue["max queue"] > 2 * sampled_queue["max queue"]
