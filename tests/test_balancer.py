"""The Balancer's own API and the default mode's fixes of Traefik's faults (fake clock)."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from asgi_leasttime import Balancer, NoAvailableServer, Server, UnknownServer
from asgi_leasttime.balancer import QUEUEING_PRIOR, RECHECK_FIRST, RECHECK_MAX, SURE_AFTER


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def balancer_with(*names: str, clock: FakeClock | None = None, **options: float) -> Balancer:
    balancer = Balancer(clock=clock or FakeClock(), **options)  # type: ignore[arg-type]
    for name in names:
        balancer.add(name)
    return balancer


def answer(balancer: Balancer, speeds: dict[str, float], requests: int) -> Counter[str]:
    served: Counter[str] = Counter()
    for _ in range(requests):
        server = balancer.acquire().server
        balancer.record_ttfb(server, speeds[server.name])
        balancer.release(server)
        served[server.name] += 1
    return served


# -- membership and status ------------------------------------------------------------------------


def test_unknown_names_are_errors() -> None:
    balancer = balancer_with("a")
    with pytest.raises(UnknownServer, match="no server named 'ghost'"):
        balancer.set_status("ghost", up=True)
    with pytest.raises(UnknownServer):
        balancer.remove("ghost")
    with pytest.raises(UnknownServer):
        balancer.set_fenced("ghost", True)
    assert "ghost" not in balancer


def test_duplicate_names_are_refused() -> None:
    balancer = balancer_with("a")
    with pytest.raises(ValueError, match="already"):
        balancer.add("a")


def test_non_positive_weight_is_left_out() -> None:
    balancer = balancer_with()
    assert balancer.add("zero", weight=0) is None
    assert balancer.add("negative", weight=-2) is None
    assert len(balancer) == 0
    assert not balancer.up


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="mode"):
        Balancer(mode="fastest")  # type: ignore[arg-type]


def test_updaters_hear_only_flips() -> None:
    balancer = Balancer(wants_health_check=True)
    heard: list[bool] = []
    balancer.register_status_updater(heard.append)
    balancer.add("a")
    balancer.add("b")
    balancer.set_status("a", up=False)
    balancer.set_status("a", up=False)
    balancer.set_status("b", up=False)
    balancer.set_status("b", up=True)
    balancer.remove("b")
    assert heard == [True, False, True, False]


def test_fenced_servers_still_hold_the_balancer_up() -> None:
    balancer = balancer_with("a")
    balancer.set_fenced("a", True)
    assert balancer.up
    assert not balancer["a"].available
    with pytest.raises(NoAvailableServer):
        balancer.next_server()
    balancer.set_fenced("a", False)
    assert balancer.next_server().name == "a"


def test_removed_server_finishes_its_requests() -> None:
    balancer = balancer_with("a", "b")
    held = [balancer.acquire().server for _ in range(4)]
    removed = balancer.remove("a")
    assert all(balancer.next_server().name == "b" for _ in range(5))
    for server in held:
        balancer.record_ttfb(server, 0.01)
        balancer.release(server)
    assert removed.inflight == 0
    assert balancer["b"].inflight == 0
    assert [s.name for s in balancer] == ["b"]


def test_stats_are_read_only() -> None:
    server = balancer_with("a")["a"]
    with pytest.raises(AttributeError):
        server.inflight = 3  # type: ignore[misc]


def test_requests_and_failures_are_counted() -> None:
    balancer = balancer_with("a")
    server = balancer.acquire().server
    balancer.record_failure(server)
    balancer.release(server)
    balancer.track(server)
    balancer.release(server)
    assert (server.requests, server.failures, server.inflight) == (2, 1, 0)


# -- the default mode's fixes ---------------------------------------------------------------------


def test_sub_millisecond_servers_are_told_apart() -> None:
    speeds = {"a": 0.0003, "b": 0.0009}
    default = answer(balancer_with("a", "b"), speeds, 100)
    traefik = balancer_with("a", "b", mode="traefik")  # type: ignore[arg-type]
    assert default["a"] == 99  # one probe of b, then the faster one
    assert answer(traefik, speeds, 100) == {"a": 51, "b": 49}  # both average 0 ms: EDF order


def test_cold_server_gets_one_probe_until_it_answers() -> None:
    balancer = balancer_with("warm")
    answer(balancer, {"warm": 0.050}, 10)
    balancer.add("cold")
    probe = balancer.acquire().server
    assert probe.name == "cold"
    assert probe.score == math.inf
    assert [balancer.acquire().server.name for _ in range(5)] == ["warm"] * 5
    balancer.record_ttfb(probe, 0.010)
    balancer.release(probe)
    assert balancer.next_server().name == "cold"


def test_traefik_mode_floods_a_cold_server() -> None:
    balancer = balancer_with("warm", mode="traefik")  # type: ignore[arg-type]
    answer(balancer, {"warm": 0.050}, 10)
    balancer.add("cold")
    assert [balancer.acquire().server.name for _ in range(5)] == ["cold"] * 5


def test_all_cold_with_probes_out_spread_by_deadline() -> None:
    balancer = balancer_with("a", "b", "c")
    assert [balancer.acquire().server.name for _ in range(3)] == ["a", "b", "c"]
    # No information anywhere: every pick is an earliest-deadline tie-break, none is flooded.
    assert Counter(balancer.acquire().server.name for _ in range(9)) == {"a": 4, "b": 3, "c": 2}


@pytest.mark.parametrize("stale_after", [1, 5, 60, 600])
def test_a_recovered_server_is_probed_again_and_trusted_whatever_stale_after(
    stale_after: float,
) -> None:
    clock = FakeClock()
    balancer = balancer_with("steady", "flaky", clock=clock, stale_after=stale_after)
    speeds = {"steady": 0.010, "flaky": 0.200}
    answer(balancer, speeds, 50)
    assert answer(balancer, speeds, 20) == {"steady": 20}
    speeds["flaky"] = 0.005  # recovered, but nothing tells the balancer

    # One request every 100 ms: "flaky" gets none, so after RECHECK_FIRST seconds without a
    # sample (or stale_after, if shorter; checked every eighth of that) it is probed.
    wait = min(stale_after, RECHECK_FIRST)
    probed_at = None
    for tick in range(1, 201):
        clock.now += 0.1
        if answer(balancer, speeds, 1)["flaky"]:
            probed_at = tick / 10
            break
    assert probed_at is not None
    assert wait - 0.05 < probed_at <= wait + wait / 8 + 0.1
    # The probe's answer starts its history afresh: the fresh sample decides, and it now wins.
    assert balancer["flaky"].average == pytest.approx(0.005)
    assert balancer["flaky"].sample_count == 1
    assert answer(balancer, speeds, 10) == {"flaky": 10}


def test_a_server_still_slow_is_probed_ever_less_often() -> None:
    clock = FakeClock()
    balancer = balancer_with("steady", "slow", clock=clock, stale_after=600)
    speeds = {"steady": 0.010, "slow": 0.200}
    answer(balancer, speeds, 2 * SURE_AFTER)  # both known; "slow" is then out of favour
    probes = []
    for tick in range(1, 601):  # 60 s at 10 requests a second
        clock.now += 0.1
        if answer(balancer, speeds, 1)["slow"]:
            probes.append(tick / 10)
    gaps = [later - earlier for earlier, later in zip([0.0, *probes], probes, strict=False)]
    # Each probe that leaves it out of favour doubles the wait (checked every quarter second),
    # up to RECHECK_MAX.
    expected = [RECHECK_FIRST, 2 * RECHECK_FIRST, 4 * RECHECK_FIRST] + [RECHECK_MAX] * 5
    assert len(gaps) == len(expected)
    for gap, wait in zip(gaps, expected, strict=True):
        assert wait < gap <= wait + 0.35


def test_a_server_probed_afresh_takes_one_request_at_a_time_until_sure() -> None:
    balancer = balancer_with("known")
    answer(balancer, {"known": 0.050}, SURE_AFTER)
    lucky = balancer.add("lucky")
    assert lucky is not None
    first = balancer.acquire().server
    assert first is lucky
    balancer.record_ttfb(lucky, 0.001)  # one lucky sample, the request still streaming
    # It looks 50 times faster, yet it gets no second request while its first is out.
    assert {balancer.acquire().server.name for _ in range(5)} == {"known"}
    balancer.release(lucky)
    for _ in range(SURE_AFTER - 1):
        assert balancer.acquire().server is lucky
        balancer.record_ttfb(lucky, 0.001)
        balancer.release(lucky)
    # Now sure of it: several at once.
    assert [balancer.acquire().server for _ in range(3)] == [lucky] * 3


def test_traefik_mode_never_retries_a_server_that_was_slow() -> None:
    clock = FakeClock()
    balancer = balancer_with("steady", "flaky", clock=clock, mode="traefik")  # type: ignore[arg-type]
    speeds = {"steady": 0.010, "flaky": 0.200}
    answer(balancer, speeds, 50)
    speeds["flaky"] = 0.005
    clock.now += 3600
    assert answer(balancer, speeds, 100) == {"steady": 100}


def test_failures_count_as_slow() -> None:
    balancer = balancer_with("a", "b")
    speeds = {"a": 0.001, "b": 0.002}
    answer(balancer, speeds, 20)
    failing = balancer["a"]
    balancer.record_failure(failing, ttfb=0.0005)  # a fast 503
    assert failing.average > balancer["b"].average
    assert answer(balancer, speeds, 10) == {"b": 10}


def test_traefik_mode_rewards_fast_failures() -> None:
    balancer = balancer_with("a", mode="traefik")  # type: ignore[arg-type]
    server = balancer["a"]
    balancer.record_failure(server)  # never answered: nothing recorded
    assert server.sample_count == 0
    balancer.record_failure(server, ttfb=0.004)  # a 503 in 4 ms counts as a 4 ms answer
    assert server.average == 4 / 1000


def test_weights_share_traffic_at_equal_speed() -> None:
    balancer = balancer_with()
    balancer.add("heavy", weight=3)
    balancer.add("light", weight=1)
    for server in balancer:
        for _ in range(SURE_AFTER):  # both known
            balancer.record_ttfb(server, 0.010)
    served: Counter[str] = Counter()
    held: list[Server] = []
    for _ in range(40):  # concurrent load: in flight decides, weighted
        server = balancer.acquire().server
        balancer.record_ttfb(server, 0.010)
        held.append(server)
        served[server.name] += 1
    assert served["heavy"] == pytest.approx(30, abs=2)
    for server in held:
        balancer.release(server)


# -- sampled picks in large pools -----------------------------------------------------------------


def large_pool(size: int, **options: object) -> Balancer:
    """``size`` servers answering in 1 ms to 2 ms, s0 the fastest; sampled above 4 servers."""
    balancer = Balancer(clock=FakeClock(), exact_up_to=4, rng=random.Random(7), **options)  # type: ignore[arg-type]
    for i in range(size):
        server = balancer.add(f"s{i}")
        assert server is not None
        for _ in range(SURE_AFTER):
            balancer.record_ttfb(server, 0.001 + i / size / 1000)
    return balancer


def test_a_pool_above_the_limit_compares_a_sample_not_everyone() -> None:
    one_choice = large_pool(10, choices=1)
    picks = Counter(one_choice.next_server().name for _ in range(2000))
    assert len(picks) == 10  # one choice is a uniform draw, whatever the scores
    assert max(picks.values()) < 2 * min(picks.values())

    many = large_pool(10, choices=4)
    picks = Counter(many.next_server().name for _ in range(2000))
    # The best of four draws: the fastest wins whenever drawn (1 - 0.9**4 = 34 % of picks), the
    # slowest only when drawn four times (0.01 %).
    assert 0.28 < picks["s0"] / 2000 < 0.40
    assert picks["s9"] <= 3


def test_a_pool_at_the_limit_is_scanned_whole() -> None:
    balancer = large_pool(4, choices=1)
    assert {balancer.next_server().name for _ in range(100)} == {"s0"}


def test_a_cold_server_in_a_sampled_pool_still_gets_one_probe() -> None:
    balancer = large_pool(20)
    cold = balancer.add("cold")
    assert cold is not None
    picks = [balancer.acquire().server for _ in range(2000)]
    assert sum(server is cold for server in picks) == 1  # scores 0 when drawn, then infinity


def test_traefik_mode_never_samples() -> None:
    balancer = Balancer(mode="traefik", exact_up_to=1, choices=1, rng=random.Random(1))
    for name in ("a", "b", "c"):
        server = balancer.add(name)
        assert server is not None
        balancer.record_ttfb(server, 0.005 if name == "b" else 0.009)
    assert {balancer.next_server().name for _ in range(50)} == {"b"}


def test_choices_must_be_at_least_one() -> None:
    with pytest.raises(ValueError, match="choices"):
        Balancer(choices=0)


# -- how much a request in flight counts ----------------------------------------------------------


def feed(balancer: Balancer, name: str, ttfb_alongside: dict[int, float], rounds: int) -> Server:
    """``rounds`` samples per in-flight count n: TTFB ``ttfb_alongside[n]``, sent with n others."""
    server = balancer[name]
    for _ in range(rounds):
        for alongside, ttfb in ttfb_alongside.items():
            balancer.record_ttfb(server, ttfb, alongside=alongside)
    return server


def test_a_server_that_answers_many_at_once_counts_its_requests_in_flight_less() -> None:
    balancer = balancer_with("parallel", "serial", "silent")
    parallel = feed(balancer, "parallel", {0: 0.010, 1: 0.010, 2: 0.010}, 10)
    serial = feed(balancer, "serial", {0: 0.010, 1: 0.020, 2: 0.030}, 10)
    silent = balancer["silent"]
    for _ in range(30):
        balancer.record_ttfb(silent, 0.010)  # nobody said what was in flight: Traefik's 1
    # No slowdown at all: the floor, 0.5, from 10 samples of each kind, against the prior's 1.
    weight = (0.5 * 10 + QUEUEING_PRIOR) / (10 + QUEUEING_PRIOR)
    assert parallel.queueing == pytest.approx(weight)
    assert serial.queueing == 1.0  # each request alongside adds a whole answer
    assert silent.queueing == 1.0
    for server in (parallel, serial):
        balancer.track(server)
        balancer.track(server)
    assert parallel.score == pytest.approx(0.010 * (1 + weight * 2))
    assert serial.score == pytest.approx(0.020 * (1 + 2))  # its average is 20 ms


def test_the_learned_weight_needs_samples_of_both_kinds_and_follows_the_window() -> None:
    clock = FakeClock()
    balancer = balancer_with("a", clock=clock)
    server = feed(balancer, "a", {1: 0.010}, 20)
    assert server.queueing == 1.0  # nothing sent alone yet: no comparison
    feed(balancer, "a", {0: 0.010}, 5)
    # Learned 0.5 from 5 samples sent alone, against QUEUEING_PRIOR samples' worth of 1.
    assert server.queueing == pytest.approx((0.5 * 5 + QUEUEING_PRIOR) / (5 + QUEUEING_PRIOR))
    feed(balancer, "a", {0: 0.010}, 40)
    assert server.queueing == pytest.approx((0.5 * 20 + QUEUEING_PRIOR) / (20 + QUEUEING_PRIOR))
    clock.now += 10  # past stale_after: the old samples no longer count
    feed(balancer, "a", {0: 0.010, 3: 0.040}, 5)
    assert server.queueing == 1.0  # now three alongside cost three answers


def test_traefik_mode_counts_every_request_in_flight_in_full() -> None:
    balancer = balancer_with("a", mode="traefik")  # type: ignore[arg-type]
    server = feed(balancer, "a", {0: 0.010, 2: 0.010}, 10)
    assert server.queueing == 1.0


# -- status flags, one per source -----------------------------------------------------------------


def test_each_source_clears_only_its_own_flag() -> None:
    clock = FakeClock()
    balancer = balancer_with("a", "b", clock=clock)
    balancer.set_status("a", False)  # manual, by default
    clock.now += 5
    balancer.set_status("a", False, "active")
    balancer.set_status("a", True, "active")  # the probe passes again: still down by hand
    assert (balancer["a"].up, dict(balancer["a"].down_flags)) == (False, {"manual": 1000.0})
    assert {balancer.next_server().name for _ in range(5)} == {"b"}
    balancer.set_status("a", False, "passive")
    balancer.set_status("a", True)  # the manual up leaves the passive ejection standing
    assert dict(balancer["a"].down_flags) == {"passive": 1005.0}
    balancer.set_status("a", True, "passive")
    assert balancer["a"].up
    assert not balancer["a"].down_flags


def test_a_flag_set_twice_keeps_its_first_time() -> None:
    clock = FakeClock()
    balancer = balancer_with("a", clock=clock)
    balancer.set_status("a", False, "parent")
    clock.now += 3
    balancer.set_status("a", False, "parent")
    assert dict(balancer["a"].down_flags) == {"parent": 1000.0}


def test_traefik_mode_keeps_one_status() -> None:
    balancer = Balancer(mode="traefik", clock=FakeClock())
    balancer.add("a")
    balancer.set_status("a", False)
    balancer.set_status("a", True, "active")  # Traefik: the last word wins, whoever says it
    assert balancer["a"].up


def test_an_unknown_source_is_refused() -> None:
    from asgi_leasttime.options import OptionError

    with pytest.raises(OptionError, match="source"):
        balancer_with("a").set_status("a", False, "operator")  # type: ignore[arg-type]


# -- load elsewhere -------------------------------------------------------------------------------


def test_requests_in_flight_elsewhere_weigh_beside_our_own() -> None:
    balancer = balancer_with("a", "b")
    answer(balancer, {"a": 0.010, "b": 0.010}, 20)
    balancer.set_inflight_elsewhere("a", 3)
    assert balancer["a"].inflight_elsewhere == 3
    assert balancer["a"].score > balancer["b"].score
    assert Counter(answer(balancer, {"a": 0.010, "b": 0.010}, 10)) == {"b": 10}
    balancer.set_inflight_elsewhere("a", 0)
    assert balancer["a"].score == pytest.approx(balancer["b"].score)
    with pytest.raises(UnknownServer):
        balancer.set_inflight_elsewhere("c", 1)


def test_a_load_report_adds_the_others_excess_over_their_usual_and_fades() -> None:
    """ORCA reports (benchmarks/RESULTS.md, "Load reports"): the first sets the usual count of
    the other clients and adds nothing; one above the usual makes the server look busier for
    about three of its TTFBs (10 ms here), never less busy than no report would."""
    clock = FakeClock()
    balancer = balancer_with("a", "b", clock=clock)
    answer(balancer, {"a": 0.010, "b": 0.010}, 20)
    a = balancer["a"]
    balancer.track(a)  # the answered request is still counted when its report comes
    balancer.heard_load("a", 2)  # the others have 2 there: their usual, from now on
    assert a.reported == 0
    balancer.heard_load("a", 12)  # 10 more than usual
    balancer.release(a)
    excess = 12 - (2 + 0.01 * 10)
    assert a.reported == pytest.approx(excess)
    assert a.score > balancer["b"].score
    fading = []
    for _ in range(14):  # quarter TTFBs
        clock.now += 0.0025
        balancer.next_server()
        fading.append(a.reported)
    assert fading[0] == pytest.approx(excess * math.exp(-1 / 4))
    assert fading == sorted(fading, reverse=True)
    assert fading[10] > 0
    assert fading[11:] == [0.0, 0.0, 0.0]  # 3 TTFBs on: gone
    assert a.score == pytest.approx(balancer["b"].score)
    balancer.heard_load("a", 0)  # below the usual: never better than no report
    assert a.reported == 0


@pytest.mark.parametrize("value", [-1.0, math.inf, math.nan])
def test_an_absurd_load_report_is_ignored(value: float) -> None:
    balancer = balancer_with("a")
    balancer.heard_load("a", 1)
    balancer.heard_load("a", value)
    balancer.heard_load("ghost", 5)  # an upstream removed meanwhile: nothing
    assert balancer["a"].reported == 0


def test_traefik_mode_ignores_load_reports() -> None:
    balancer = Balancer(mode="traefik")
    balancer.add("a")
    balancer.heard_load("a", 1)
    balancer.heard_load("a", 50)
    assert balancer["a"].reported == 0


def test_traefik_mode_ignores_requests_in_flight_elsewhere() -> None:
    balancer = Balancer(mode="traefik")
    balancer.add("a")
    balancer.set_inflight_elsewhere("a", 3)
    assert balancer["a"].inflight_elsewhere == 0
