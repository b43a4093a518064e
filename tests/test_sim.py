"""A smoke run of the balancing simulator (the full run: python -m benchmarks.sim.run)."""

from __future__ import annotations

import random
from dataclasses import replace

from benchmarks.sim.engine import simulate
from benchmarks.sim.policies import (
    LARGE_POOL_POLICIES,
    POLICIES,
    REPORT_POLICIES,
    REPORTS,
    LeastTimeWithReports,
)
from benchmarks.sim.run import metrics_of, share_between
from benchmarks.sim.scenarios import (
    bursts,
    cold_join,
    degrade_and_recover,
    fail_fast,
    large_pool_one_balancer,
    reporting,
    slow_then_recovered,
)


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


def test_one_balancer_scans_a_large_pool_and_floods_no_lucky_server() -> None:
    # 300 servers start cold; each answers its probe, and a few first samples are lucky. A
    # server takes one request at a time until it has SURE_AFTER samples, so the exact scan (the
    # default) no longer piles onto them, and beats best of 4 drawn at random.
    scenario = replace(large_pool_one_balancer(), duration=3.0)
    sampled = LARGE_POOL_POLICIES["default, best of 4"]
    for seed in (1, 2):
        exact = metrics_of(scenario, simulate(scenario, POLICIES["default"], seed))
        best_of_4 = metrics_of(scenario, simulate(scenario, sampled, seed))
        assert exact["p50 ms"] < best_of_4["p50 ms"]
        assert exact["p99 ms"] < best_of_4["p99 ms"]


def test_a_recovered_server_gets_its_share_back_whatever_stale_after() -> None:
    for stale_after in (5, 600):
        scenario = slow_then_recovered(stale_after)
        result = metrics_of(scenario, simulate(scenario, POLICIES["default"], seed=1))
        assert result["recover s"] <= 15


def test_load_reports_change_nothing_for_one_balancer() -> None:
    # Alone, a balancer's own count is the server's: the others' part of a report is 0.
    scenario = replace(reporting(bursts(1), 1), duration=5.0)
    blind = metrics_of(scenario, simulate(scenario, REPORT_POLICIES["default"], seed=1))
    reports = simulate(scenario, REPORT_POLICIES["default + reports"], seed=1)
    assert metrics_of(scenario, reports) == blind


def test_a_load_report_only_adds_what_is_above_the_usual_and_fades() -> None:
    now = [0.0]
    policy = LeastTimeWithReports(["a", "b"], lambda: now[0], random.Random(1), **REPORTS)
    server = policy.by_name["a"]
    answering = policy.balancer.lease(server)  # the request whose answer carries the reports
    for _ in range(50):  # the others usually have 1 request in flight on "a"
        policy.reported("a", 1)
    assert server.inflight_elsewhere == 0
    policy.reported("a", 0)  # fewer than usual: never lower than no report
    assert server.inflight_elsewhere == 0
    policy.reported("a", 6)  # 5 more than usual: counted in full while fresh
    assert 4.5 < server.inflight_elsewhere <= 5
    now[0] = 1.0  # long after: as if never reported
    policy.pick().release()
    assert server.inflight_elsewhere == 0
    answering.release()
