"""Traefik's own leasttime_test.go, ported case by case against Balancer(mode="traefik").

The HTTP part of each case is simulated: a "request" picks and counts in flight, records a TTFB,
and releases. The same cases run again over HTTP in the proxy's tests. Where the reference gives
the exact split that Traefik's algorithm produces, the exact split is asserted.
"""

from __future__ import annotations

from collections import Counter

import anyio
import pytest

from asgi_leasttime import Balancer, NoAvailableServer, Server

pytestmark = pytest.mark.anyio


def traefik(*servers: str | tuple[str, float], wants_health_check: bool = False) -> Balancer:
    balancer = Balancer(mode="traefik", wants_health_check=wants_health_check)
    for server in servers:
        name, weight = (server, 1) if isinstance(server, str) else server
        balancer.add(name, weight=weight)
    return balancer


def serve(balancer: Balancer, ttfb: float = 0.0) -> str:
    """One simulated request: pick, count in flight, answer after ``ttfb`` seconds, release."""
    server = balancer.acquire().server
    balancer.record_ttfb(server, ttfb)
    balancer.release(server)
    return server.name


def split(balancer: Balancer, requests: int, ttfb: float = 0.0) -> Counter[str]:
    return Counter(serve(balancer, ttfb) for _ in range(requests))


def picks(balancer: Balancer, count: int) -> Counter[str]:
    return Counter(balancer.next_server().name for _ in range(count))


def fill(balancer: Balancer, name: str, ms: float, samples: int = 100) -> Server:
    server = balancer[name]
    for _ in range(samples):
        balancer.record_ttfb(server, ms / 1000)
    return server


def test_01_two_servers_share_requests() -> None:
    assert split(traefik("first", "second"), 10) == {"first": 6, "second": 4}


def test_02_no_servers() -> None:
    with pytest.raises(NoAvailableServer, match="no available server"):
        traefik().next_server()


def test_03_all_servers_down() -> None:
    balancer = traefik("first", "second")
    balancer.set_status("first", up=False)
    balancer.set_status("second", up=False)
    with pytest.raises(NoAvailableServer):
        balancer.next_server()


def test_04_server_down_gets_nothing() -> None:
    balancer = traefik("first", "second")
    balancer.set_status("second", up=False)
    assert split(balancer, 3) == {"first": 3}


def test_05_server_back_up_is_used_again() -> None:
    balancer = traefik("first", "second")
    balancer.set_status("second", up=False)
    assert split(balancer, 3) == {"first": 3}
    balancer.set_status("second", up=True)
    assert split(balancer, 20) == {"first": 11, "second": 9}


def test_06_zero_weights_are_dropped() -> None:
    balancer = traefik(("first", 0), ("second", 0))
    assert len(balancer) == 0
    with pytest.raises(NoAvailableServer):
        balancer.next_server()


def test_07_zero_weight_server_gets_nothing() -> None:
    balancer = traefik(("first", 1), ("second", 0))
    assert split(balancer, 3) == {"first": 3}


def test_08_status_propagates_from_child_balancers() -> None:
    top = traefik("A", "B", wants_health_check=True)
    children = {
        "A": traefik("first", "second", wants_health_check=True),
        "B": traefik("third", "fourth", wants_health_check=True),
    }
    for name, child in children.items():
        child.register_status_updater(lambda up, name=name: top.set_status(name, up))  # type: ignore[misc]

    children["A"].set_status("first", up=False)
    assert top["A"].up  # "second" still holds child A up
    children["A"].set_status("second", up=False)
    assert not top["A"].up

    served: Counter[str] = Counter()
    for _ in range(4):
        child = children[top.acquire().server.name]
        served[serve(child)] += 1
    assert served["first"] == 0
    assert served["second"] == 0
    assert served["third"] + served["fourth"] == 4


def test_09_fenced_server_gets_no_picks() -> None:
    balancer = Balancer(mode="traefik")
    balancer.add("first")
    balancer.add("second", fenced=True)
    assert split(balancer, 3) == {"first": 3}


def test_10_all_fenced() -> None:
    balancer = Balancer(mode="traefik")
    balancer.add("first", fenced=True)
    balancer.add("second", fenced=True)
    with pytest.raises(NoAvailableServer):
        balancer.next_server()


def test_11_status_updater_needs_health_checks() -> None:
    with pytest.raises(RuntimeError, match="health check not enabled"):
        traefik("first").register_status_updater(lambda up: None)


def sticky_route(balancer: Balancer, cookie: str | None) -> tuple[str, str | None]:
    """Traefik's sticky path: a cookie naming an up server wins (fenced or not), without a pick
    and without a new cookie; otherwise a pick and a Set-Cookie naming the picked server."""
    if cookie is not None and cookie in balancer and balancer[cookie].up:
        return cookie, None
    name = serve(balancer)
    return name, name


def test_12_sticky_cookie_keeps_the_server() -> None:
    balancer = traefik("first", "second")
    served, cookie = sticky_route(balancer, None)
    assert cookie == served
    assert sticky_route(balancer, cookie) == (served, None)


def test_13_sticky_falls_back_when_the_server_goes_down() -> None:
    balancer = traefik("first", "second")
    sticky, cookie = sticky_route(balancer, None)
    balancer.set_status(sticky, up=False)
    fallback, new_cookie = sticky_route(balancer, cookie)
    assert fallback != sticky
    assert new_cookie == fallback
    assert sticky_route(balancer, new_cookie) == (fallback, None)
    balancer.set_status(sticky, up=True)
    assert sticky_route(balancer, new_cookie) == (fallback, None)


def test_14_sticky_reaches_a_fenced_server() -> None:
    balancer = traefik("first", "second")
    sticky, cookie = sticky_route(balancer, None)
    balancer.set_fenced(sticky, True)
    assert sticky_route(balancer, cookie) == (sticky, None)
    other, _ = sticky_route(balancer, None)
    assert other != sticky


def test_15_ring_buffer_average() -> None:
    balancer = traefik("s")
    server = balancer["s"]
    assert server.average == 0
    balancer.record_ttfb(server, 0.010)
    assert server.average == 10 / 1000
    balancer.record_ttfb(server, 0.020)
    balancer.record_ttfb(server, 0.030)
    assert server.average == 20 / 1000


def test_16_ring_buffer_wraparound() -> None:
    balancer = traefik("s")
    server = fill(balancer, "s", 10)
    assert server.average == 10.0 / 1000
    fill(balancer, "s", 20, samples=1)
    assert server.average == 10.1 / 1000
    fill(balancer, "s", 30, samples=10)
    assert server.average == 12.1 / 1000


def test_17_average_of_the_last_hundred() -> None:
    balancer = traefik("s")
    server = balancer["s"]
    for ms in range(1, 151):
        balancer.record_ttfb(server, ms / 1000)
    assert server.sample_count == 100
    assert server.average == 100.5 / 1000


def test_17b_samples_are_truncated_to_whole_milliseconds() -> None:
    balancer = traefik("s")
    server = balancer["s"]
    balancer.record_ttfb(server, 0.029)  # 28.999999999999996 ms as a float product
    balancer.record_ttfb(server, 0.0009999)
    assert server.average == 14.5 / 1000


def test_18_inflight_during_a_request() -> None:
    balancer = traefik("s")
    server = balancer["s"]
    assert server.inflight == 0
    assert balancer.acquire().server is server
    assert server.inflight == 1
    balancer.release(server)
    assert server.inflight == 0


async def test_19_concurrent_sample_updates() -> None:
    balancer = traefik("s")
    server = balancer["s"]

    async def update() -> None:
        for _ in range(20):
            balancer.record_ttfb(server, 0.010)
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(update)
    assert server.sample_count == 100
    assert server.average == 10 / 1000


async def test_20_concurrent_inflight_counting() -> None:
    balancer = traefik("s")
    server = balancer["s"]
    highest = 0

    async def request() -> None:
        nonlocal highest
        balancer.track(server)
        highest = max(highest, server.inflight)
        await anyio.lowlevel.checkpoint()
        balancer.release(server)

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(request)
    assert server.inflight == 0
    assert highest > 1


async def test_21_concurrent_requests_spread_by_inflight() -> None:
    balancer = traefik("first", "second")
    fill(balancer, "first", 10)
    fill(balancer, "second", 10)
    held = [balancer.acquire().server for _ in range(5)]
    release = anyio.Event()
    served: Counter[str] = Counter()

    async def request() -> None:
        server = balancer.acquire().server
        served[server.name] += 1
        await release.wait()
        balancer.record_ttfb(server, 0.010)
        balancer.release(server)

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(request)
        await anyio.wait_all_tasks_blocked()
        for server in held:
            balancer.release(server)
        release.set()
    assert sum(served.values()) == 50
    assert served["first"] == pytest.approx(25, abs=5)
    assert served["second"] == pytest.approx(25, abs=5)
    assert balancer["first"].inflight == balancer["second"].inflight == 0


def test_22_average_of_a_50ms_server() -> None:
    balancer = traefik("s")
    split(balancer, 5, ttfb=0.050)
    assert balancer["s"].average == pytest.approx(0.050, abs=0.005)


def test_23_fresh_server_average_is_zero() -> None:
    server = traefik("s")["s"]
    assert server.average == 0
    assert server.sample_count == 0


def test_24_weight_wins_at_equal_speed() -> None:
    balancer = traefik(("heavy", 3), ("light", 1))
    assert split(balancer, 2, ttfb=0.050) == {"heavy": 1, "light": 1}
    assert split(balancer, 10, ttfb=0.050) == {"heavy": 10}


def test_25_inflight_steers_picks_away() -> None:
    balancer = traefik("server1", "server2")
    fill(balancer, "server1", 10)
    fill(balancer, "server2", 10)
    for _ in range(5):
        balancer.track(balancer["server1"])
    assert Counter(balancer.acquire().server.name for _ in range(5)) == {"server2": 5}


def test_26_cold_server_joins_and_takes_over() -> None:
    balancer = traefik("warm")
    assert split(balancer, 10, ttfb=0.050) == {"warm": 10}
    balancer.add("cold")
    speeds = {"warm": 0.050, "cold": 0.010}
    first = split_by_speed(balancer, 20, speeds)
    assert first["cold"] > 10
    second = split_by_speed(balancer, 20, speeds)
    assert second["cold"] > second["warm"]
    assert first == second == {"cold": 20}


def split_by_speed(balancer: Balancer, requests: int, ttfb: dict[str, float]) -> Counter[str]:
    served: Counter[str] = Counter()
    for _ in range(requests):
        server = balancer.acquire().server
        balancer.record_ttfb(server, ttfb[server.name])
        balancer.release(server)
        served[server.name] += 1
    return served


def test_27_fast_server_takes_almost_everything() -> None:
    balancer = traefik("fast", "slow")
    served = split_by_speed(balancer, 50, {"fast": 0.020, "slow": 0.100})
    assert served["fast"] > 48
    assert served == {"fast": 49, "slow": 1}


def test_28_equal_servers_share_then_the_slowed_one_loses() -> None:
    balancer = traefik("server1", "server2")
    fill(balancer, "server1", 5)
    fill(balancer, "server2", 5)
    assert picks(balancer, 50) == {"server1": 26, "server2": 24}
    fill(balancer, "server1", 50)
    after = picks(balancer, 60)
    assert after["server2"] > 35
    assert after["server1"] < 25
    assert after == {"server2": 60}


def test_29_three_equal_servers() -> None:
    balancer = traefik("a", "b", "c")
    for name in "abc":
        fill(balancer, name, 5)
    assert picks(balancer, 90) == {"a": 31, "b": 30, "c": 29}


def test_30_weight_and_speed_balance_out() -> None:
    balancer = traefik(("heavy", 3), ("light", 1))
    fill(balancer, "heavy", 15)
    fill(balancer, "light", 5)
    assert balancer["heavy"].score == balancer["light"].score
    assert picks(balancer, 80) == {"heavy": 61, "light": 19}
