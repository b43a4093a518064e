"""Health over real uvicorn upstreams: active probes, passive ejection, runtime changes, nesting."""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest

from asgi_leasttime import (
    Balancer,
    HealthCheck,
    LeastTimeProxy,
    PassiveHealthCheck,
    Upstream,
)
from tests.servers import UPSTREAM_CLIENT, UpstreamApp, running, wait_until
from tests.test_balancer import FakeClock

pytestmark = pytest.mark.anyio

FAST = HealthCheck(path="/health", interval=0.2, timeout=0.3)
# Detection and recovery bound: one interval plus one timeout, and slack for a shared machine.
WITHIN = FAST.interval + FAST.timeout + 1.0


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


class Pool:
    """Upstreams that can be stopped (port closed) and started again on the same port.

    Each server runs as a task of the pool's own task group, so they can stop in any order.
    """

    def __init__(self, task_group: anyio.abc.TaskGroup, apps: list[UpstreamApp]) -> None:
        self.task_group = task_group
        self.apps = {app.name: app for app in apps}
        self.urls: dict[str, str] = {}
        self.stops: dict[str, tuple[anyio.Event, anyio.Event]] = {}

    async def start(self, name: str) -> str:
        port = port_of(self.urls[name]) if name in self.urls else 0
        started, stop, stopped = anyio.Event(), anyio.Event(), anyio.Event()

        async def serve() -> None:
            async with running(self.apps[name], port=port) as url:
                self.urls[name] = url
                started.set()
                await stop.wait()
            stopped.set()

        self.task_group.start_soon(serve)
        await started.wait()
        self.stops[name] = (stop, stopped)
        return self.urls[name]

    async def stop(self, name: str) -> None:
        stop, stopped = self.stops.pop(name)
        stop.set()
        await stopped.wait()

    async def close(self) -> None:
        for name in list(self.stops):
            await self.stop(name)


@contextlib.asynccontextmanager
async def pool_of(*apps: UpstreamApp) -> AsyncIterator[Pool]:
    async with anyio.create_task_group() as tg:
        pool = Pool(tg, list(apps))
        for app in apps:
            await pool.start(app.name)
        try:
            yield pool
        finally:
            await pool.close()


@contextlib.asynccontextmanager
async def healthy_proxy(
    *apps: UpstreamApp, **options: Any
) -> AsyncIterator[tuple[LeastTimeProxy, httpx.AsyncClient, Pool]]:
    async with contextlib.AsyncExitStack() as stack:
        pool = await stack.enter_async_context(pool_of(*apps))
        proxy = LeastTimeProxy(
            upstreams=[Upstream(pool.urls[a.name], name=a.name) for a in apps],
            upstream_client=UPSTREAM_CLIENT,
            **options,
        )
        url = await stack.enter_async_context(running(proxy, lifespan="on"))
        client = await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=10))
        yield proxy, client, pool


def up(proxy: LeastTimeProxy, name: str) -> bool:
    return proxy.balancer[name].up


async def served_by(client: httpx.AsyncClient, count: int) -> Counter[str]:
    served: Counter[str] = Counter()
    for _ in range(count):
        response = await client.get("/")
        served[response.headers.get("x-upstream", str(response.status_code))] += 1
    return served


# -- active checks -------------------------------------------------------------------------------


async def test_stopped_upstream_is_detected_and_comes_back() -> None:
    async with healthy_proxy(UpstreamApp("a"), UpstreamApp("b"), health_check=FAST) as (
        proxy,
        client,
        pool,
    ):
        await pool.stop("a")
        await wait_until(lambda: not up(proxy, "a"), limit=WITHIN)
        assert await served_by(client, 10) == {"b": 10}
        await pool.start("a")
        await wait_until(lambda: up(proxy, "a"), limit=WITHIN)
        assert "a" in await served_by(client, 20)


@pytest.mark.parametrize(
    ("fault", "bad", "good"),
    [("health_status", 500, 200), ("health_delay", 5.0, 0.0)],  # 500, or hanging past timeout
)
async def test_an_unhealthy_probe_marks_down_and_a_healthy_one_back(
    fault: str, bad: float, good: float
) -> None:
    a = UpstreamApp("a")
    async with healthy_proxy(a, UpstreamApp("b"), health_check=FAST) as (proxy, _, _pool):
        setattr(a, fault, bad)
        await wait_until(lambda: not up(proxy, "a"), limit=WITHIN)
        setattr(a, fault, good)
        # A hanging probe still out when the upstream recovers takes its timeout to fail first.
        await wait_until(lambda: up(proxy, "a"), limit=WITHIN + FAST.timeout)


async def test_503_only_when_none_is_up() -> None:
    a, b = UpstreamApp("a"), UpstreamApp("b")
    async with healthy_proxy(a, b, health_check=FAST) as (proxy, client, _pool):
        a.health_status = 503
        await wait_until(lambda: not up(proxy, "a"), limit=WITHIN)
        assert (await client.get("/")).status_code == 200
        b.health_status = 503
        await wait_until(lambda: not up(proxy, "b"), limit=WITHIN)
        response = await client.get("/")
        assert (response.status_code, response.text) == (503, "no available server")
        b.health_status = 200
        await wait_until(lambda: up(proxy, "b"), limit=WITHIN)
        assert (await client.get("/")).status_code == 200


async def test_probes_of_different_upstreams_run_concurrently() -> None:
    apps = [UpstreamApp(name) for name in "abc"]
    for app in apps:
        app.health_delay = 0.4
    check = HealthCheck(interval=30, timeout=2)
    async with healthy_proxy(*apps, health_check=check) as (_proxy, _client, _pool):
        await wait_until(lambda: all(app.probes for app in apps))
    first_probes = [app.probes[0] for app in apps]
    assert max(first_probes) - min(first_probes) < 0.3  # not 0.4 s apart, one after another


async def test_flaps_are_logged_once_per_change(caplog: pytest.LogCaptureFixture) -> None:
    a = UpstreamApp("a")
    caplog.set_level(logging.INFO, logger="asgi_leasttime")
    async with healthy_proxy(a, UpstreamApp("b"), health_check=FAST) as (proxy, _, _pool):
        a.health_status = 500
        await wait_until(lambda: not up(proxy, "a"), limit=WITHIN)
        probes = len(a.probes)
        await wait_until(lambda: len(a.probes) >= probes + 3, limit=5)  # still down, re-probed
        a.health_status = 200
        await wait_until(lambda: up(proxy, "a"), limit=WITHIN)
    messages = [r.getMessage() for r in caplog.records if "'a'" in r.getMessage()]
    assert [m.split(" (")[0] for m in messages] == [
        "upstream 'a' is down",
        "upstream 'a' is up again",
    ]


async def test_probe_options_reach_the_upstream() -> None:
    seen: list[dict[bytes, bytes]] = []

    async def health_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append({b"path": scope["raw_path"], **dict(scope["headers"])})
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    check = HealthCheck(
        path="/ready", hostname="svc.internal", headers={"x-probe": "1"}, status=204, interval=30
    )
    async with running(health_app) as url:
        proxy = LeastTimeProxy(upstreams=[url + "/base"], health_check=check)
        async with proxy.lifespan():
            await wait_until(lambda: bool(seen))
            assert proxy.balancer[url + "/base"].up
    assert seen[0][b"path"] == b"/base/ready"
    assert seen[0][b"host"] == b"svc.internal"
    assert seen[0][b"x-probe"] == b"1"


def test_health_check_urls_and_statuses() -> None:
    check = HealthCheck(path="/h", scheme="https", port=8443)
    assert (
        str(check.url_for(httpx.URL("http://10.0.0.1:8000/api/"))) == "https://10.0.0.1:8443/api/h"
    )
    assert HealthCheck().is_healthy(302)
    assert not HealthCheck().is_healthy(404)
    assert HealthCheck(status=204).is_healthy(204)
    assert not HealthCheck(status=204).is_healthy(200)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"path": "health"}, "path"),
        ({"interval": 0}, "interval"),
        ({"timeout": -1}, "timeout"),
        ({"unhealthy_interval": float("nan")}, "unhealthy_interval"),
        ({"status": 42}, "status"),
        ({"scheme": "ftp"}, "scheme"),
        ({"port": 70000}, "port"),
    ],
)
def test_bad_health_check_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HealthCheck(**options)


# -- passive checks ------------------------------------------------------------------------------


async def test_passive_check_ejects_a_failing_upstream_and_returns_it_after_the_window() -> None:
    clock = FakeClock()
    a = UpstreamApp("a")
    a.fail_with = 500
    passive = PassiveHealthCheck(failure_window=10, max_failed_attempts=2)
    balancer = Balancer(clock=clock, wants_health_check=True)
    async with healthy_proxy(
        a, UpstreamApp("b"), passive_health_check=passive, balancer=balancer
    ) as (proxy, client, _pool):
        proxy.set_fenced("b", True)  # only "a" can be picked until it is ejected
        statuses = [(await client.get("/")).status_code for _ in range(3)]
        assert statuses == [500, 500, 503]  # ejected after max_failed_attempts
        assert not up(proxy, "a")
        proxy.set_fenced("b", False)
        assert await served_by(client, 5) == {"b": 5}
        clock.now += 9.9
        assert await served_by(client, 3) == {"b": 3}
        a.fail_with = None
        clock.now += 0.2
        await wait_until(lambda: up(proxy, "a"))  # the check's own timer, no request needed


async def test_passive_check_counts_unreachable_upstreams() -> None:
    passive = PassiveHealthCheck(max_failed_attempts=1)
    async with healthy_proxy(UpstreamApp("a"), UpstreamApp("b"), passive_health_check=passive) as (
        proxy,
        client,
        pool,
    ):
        await pool.stop("a")
        statuses = [(await client.get("/")).status_code for _ in range(6)]
        assert statuses.count(502) <= 1
        assert not up(proxy, "a")
        assert proxy.balancer["a"].failures >= 1


async def test_a_success_clears_the_failure_count() -> None:
    clock = FakeClock()
    balancer = Balancer(clock=clock, wants_health_check=True)
    passive = PassiveHealthCheck(max_failed_attempts=2).start(balancer)
    balancer.add("a")
    server = balancer["a"]
    passive.record(server, failed=True)
    passive.record(server, failed=False)
    passive.record(server, failed=True)
    assert server.up
    passive.record(server, failed=True)
    assert not server.up


async def test_failures_outside_the_window_do_not_add_up() -> None:
    clock = FakeClock()
    balancer = Balancer(clock=clock, wants_health_check=True)
    passive = PassiveHealthCheck(failure_window=10, max_failed_attempts=2).start(balancer)
    balancer.add("a")
    passive.record(balancer["a"], failed=True)
    clock.now += 11
    passive.record(balancer["a"], failed=True)
    assert balancer["a"].up


def test_with_an_active_check_the_window_alone_does_not_bring_it_back() -> None:
    clock = FakeClock()
    balancer = Balancer(clock=clock, wants_health_check=True)
    # What LeastTimeProxy asks for when it has a HealthCheck too.
    passive = PassiveHealthCheck(failure_window=10).start(balancer, active_recovery=True)
    balancer.add("a")
    passive.record(balancer["a"], failed=True)
    clock.now += 60
    passive.restore_due()
    assert not balancer["a"].up


async def test_with_an_active_check_the_active_check_brings_it_back() -> None:
    a = UpstreamApp("a")
    a.fail_with, a.health_status = 500, 500
    passive = PassiveHealthCheck(failure_window=0.2, max_failed_attempts=1)
    check = HealthCheck(interval=0.3, timeout=0.3, unhealthy_interval=0.5)
    async with healthy_proxy(
        a, UpstreamApp("b"), passive_health_check=passive, health_check=check
    ) as (proxy, client, _pool):
        await wait_until(lambda: not up(proxy, "a"))
        await anyio.sleep(0.3)  # past the failure window
        for _ in range(3):
            assert (await client.get("/")).headers["x-upstream"] == "b"
        assert not up(proxy, "a")
        a.fail_with, a.health_status = None, 200
        await wait_until(lambda: up(proxy, "a"), limit=check.unhealthy_interval + 1.0)


# -- runtime changes -----------------------------------------------------------------------------


async def test_removing_an_upstream_with_50_requests_in_flight_loses_none() -> None:
    slow = UpstreamApp("slow", delay=0.5)
    async with healthy_proxy(slow, UpstreamApp("b")) as (proxy, client, _pool):
        proxy.set_fenced("b", True)  # every new request goes to "slow"
        results: list[httpx.Response] = []

        async def request() -> None:
            results.append(await client.get("/"))

        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(request)
            await wait_until(lambda: proxy.balancer["slow"].inflight == 50)
            removed = proxy.balancer["slow"]
            proxy.remove_upstream("slow")
            proxy.set_fenced("b", False)
        assert [r.status_code for r in results] == [200] * 50
        assert {r.headers["x-upstream"] for r in results} == {"slow"}
        assert removed.inflight == 0
        assert await served_by(client, 5) == {"b": 5}


async def test_add_fence_and_reweigh_while_traffic_flows() -> None:
    async with healthy_proxy(UpstreamApp("a")) as (proxy, client, _pool):
        await served_by(client, 5)
        kept = proxy.balancer["a"]
        async with running(UpstreamApp("c")) as url:
            proxy.add_upstream(Upstream(url, name="c", weight=3))
            assert "c" in await served_by(client, 10)
            proxy.set_weight("c", 1)
            assert proxy.balancer["c"].weight == 1
            proxy.set_fenced("c", True)
            assert await served_by(client, 5) == {"a": 5}
            assert proxy.balancer["a"] is kept  # untouched upstreams keep their statistics
            assert kept.requests >= 10


async def test_the_status_api_lists_every_upstream() -> None:
    async with healthy_proxy(UpstreamApp("a"), UpstreamApp("b")) as (proxy, client, _pool):
        await served_by(client, 4)
        proxy.set_status("b", up=False)
        status = {s.name: s for s in proxy.upstream_status()}
    assert list(status) == ["a", "b"]
    assert status["b"].up is False
    assert status["a"].requests + status["b"].requests == 4
    assert status["a"].average_ttfb > 0
    assert status["a"].inflight == 0
    assert status["a"].url is not None
    assert status["a"].url.startswith("http://127.0.0.1:")


# -- nesting ---------------------------------------------------------------------------------------


async def test_nested_balancers_follow_their_upstreams_health_over_http() -> None:
    apps = [UpstreamApp(name) for name in ("first", "second", "third", "fourth")]
    async with contextlib.AsyncExitStack() as stack:
        pool = await stack.enter_async_context(pool_of(*apps))

        def child(*names: str) -> LeastTimeProxy:
            upstreams = [Upstream(pool.urls[n], name=n) for n in names]
            return LeastTimeProxy(upstreams=upstreams, health_check=FAST)

        top = LeastTimeProxy(
            upstreams=[
                Upstream(app=child("first", "second"), name="A"),
                Upstream(app=child("third", "fourth"), name="B"),
            ]
        )
        url = await stack.enter_async_context(running(top, lifespan="on"))
        client = await stack.enter_async_context(httpx.AsyncClient(base_url=url))
        await pool.stop("first")
        await pool.stop("second")
        await wait_until(lambda: not top.balancer["A"].up, limit=WITHIN)
        served = await served_by(client, 4)
        assert served["first"] == served["second"] == 0
        assert served["third"] + served["fourth"] == 4
        await pool.start("second")
        await wait_until(lambda: top.balancer["A"].up, limit=WITHIN)


async def test_a_probe_that_raises_stops_no_other_upstreams_checks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A fault inside one probe (an OverflowError from a socket call, say) counts that upstream
    as down and is logged; every other upstream's checks go on."""
    probes: Counter[str] = Counter()

    def handler(request: httpx.Request) -> httpx.Response:
        probes[request.url.host] += 1
        if request.url.host == "10.0.0.1":
            raise OverflowError("port must be 0-65535")
        return httpx.Response(200)

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    proxy = LeastTimeProxy(
        upstreams=[Upstream("http://10.0.0.1", name="odd"), Upstream("http://10.0.0.2", name="ok")],
        client=client,
        health_check=HealthCheck(interval=0.01),
    )
    async with proxy.lifespan():
        await wait_until(lambda: probes["10.0.0.1"] >= 3 and probes["10.0.0.2"] >= 3)
        assert not proxy.balancer["odd"].up
        assert proxy.balancer["ok"].up
    await client.aclose()
    assert "health probe of http://10.0.0.1/health failed unexpectedly" in caplog.text


async def test_removing_an_upstream_removes_everything_kept_for_it() -> None:
    """Its checks stop, a nested proxy's checks and status reports stop too, and its sticky
    cookies get a fresh pick; another upstream added under the same name starts afresh."""
    from asgi_leasttime import StickyCookie

    a, inner = UpstreamApp("a"), UpstreamApp("inner")
    async with running(a) as a_url, running(inner) as inner_url:
        check = HealthCheck(interval=0.02)
        child = LeastTimeProxy(upstreams=[Upstream(inner_url, name="inner")], health_check=check)
        parent = LeastTimeProxy(
            upstreams=[Upstream(a_url, name="a"), Upstream(app=child, name="child", fenced=True)],
            health_check=check,
            sticky=StickyCookie(secret_key="k"),
        )
        async with (
            running(parent, lifespan="on") as url,
            httpx.AsyncClient(base_url=url, timeout=10) as client,
        ):
            await wait_until(lambda: len(a.probes) >= 2 and len(inner.probes) >= 2)
            cookie = (await client.get("/")).headers["set-cookie"].split(";")[0]
            parent.remove_upstream("a")
            parent.remove_upstream("child")
            probes = len(a.probes), len(inner.probes)
            child.set_status("inner", False)  # once raised UnknownServer in the parent
            child.set_status("inner", True)
            await anyio.sleep(0.2)
            assert (len(a.probes), len(inner.probes)) == probes  # every check stopped
            parent.add_upstream(Upstream(a_url, name="a"))  # the same name, afresh
            response = await client.get("/", headers={"cookie": cookie})
            assert response.headers["x-upstream"] == "a"
            assert parent.balancer["a"].requests == 1
            await wait_until(lambda: len(a.probes) > probes[0])  # checked again


async def test_a_probe_never_undoes_a_manual_down() -> None:
    async with healthy_proxy(
        UpstreamApp("a"), UpstreamApp("b"), health_check=HealthCheck(interval=0.02)
    ) as (proxy, client, _pool):
        proxy.set_status("a", False)
        await anyio.sleep(0.2)  # about ten passing probes of "a"
        assert not up(proxy, "a")
        assert await served_by(client, 10) == {"b": 10}
        [status] = [s for s in proxy.upstream_status() if s.name == "a"]
        assert list(status.down) == ["manual"]
        assert status.down["manual"] >= 0.2
        proxy.set_status("a", True)
        assert up(proxy, "a")


async def test_a_passive_ejection_ends_with_the_next_passing_probe() -> None:
    """With an active check, the passive check leaves the return to it: the upstream answers
    500 to requests (ejected by the passive check) while its health probe passes."""
    a = UpstreamApp("a")
    a.fail_with = 500
    passive = PassiveHealthCheck(failure_window=60, max_failed_attempts=1)
    check = HealthCheck(interval=0.2, timeout=0.5)
    async with healthy_proxy(
        a, UpstreamApp("b"), passive_health_check=passive, health_check=check
    ) as (proxy, client, _pool):
        proxy.set_fenced("b", True)
        assert (await client.get("/")).status_code == 500
        assert list(proxy.balancer["a"].down_flags) == ["passive"]
        a.fail_with = None
        await wait_until(lambda: up(proxy, "a"), limit=1.0)  # the next probe, not 60 s
