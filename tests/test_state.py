"""The shared state on a real Valkey and a real Redis server: changes reach every process, in
order, and the store's absence, return and hostile messages change nothing else."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest
import redis

from asgi_leasttime import HealthCheck, LeastTimeProxy, PassiveHealthCheck, Upstream
from asgi_leasttime.metrics import AdminApp
from asgi_leasttime.redis_state import RedisState
from asgi_leasttime.state import Change, InProcessState, merge, valid_record
from tests.servers import UpstreamApp, running, running_many, wait_until
from tests.stores import StoreServer, server_binaries, store_server

pytestmark = pytest.mark.anyio

TOKEN = "a-token-of-at-least-16-characters"


@pytest.fixture(params=sorted(server_binaries()) or ["valkey"])
def store(request: pytest.FixtureRequest) -> Iterator[StoreServer]:
    with store_server(request.param) as server:
        yield server


@contextlib.asynccontextmanager
async def fleet(
    store: StoreServer,
    count: int = 2,
    options: Callable[[], dict[str, Any]] = dict,
    upstreams: tuple[UpstreamApp, UpstreamApp] | None = None,
) -> AsyncIterator[tuple[list[LeastTimeProxy], list[httpx.AsyncClient], list[str]]]:
    """``count`` proxies (as if in as many processes) over the same two upstreams and store,
    each made with ``options()`` besides."""
    async with running_many(*(upstreams or (UpstreamApp("a"), UpstreamApp("b")))) as urls:
        proxies = [
            LeastTimeProxy(
                upstreams=[Upstream(urls[0], name="a"), Upstream(urls[1], name="b")],
                state=RedisState(store.url, report_every=0.05),
                **options(),
            )
            for _ in range(count)
        ]
        async with contextlib.AsyncExitStack() as stack:
            clients = []
            for proxy in proxies:
                url = await stack.enter_async_context(running(proxy, lifespan="on"))
                clients.append(
                    await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=10))
                )
            await wait_until(lambda: all(p.state.connected for p in proxies))  # type: ignore[attr-defined]
            yield proxies, clients, urls


async def served(client: httpx.AsyncClient, count: int) -> set[str]:
    return {(await client.get("/")).headers["x-upstream"] for _ in range(count)}


async def test_every_change_reaches_every_process(store: StoreServer) -> None:
    async with fleet(store, 3) as (proxies, clients, _), running(UpstreamApp("c")) as c_url:
        first, *others = proxies
        first.set_status("a", False)
        await wait_until(lambda: not any(p.balancer["a"].up for p in others), 1.0)
        for client in clients:
            assert await served(client, 10) == {"b"}
        first.set_status("a", True)
        first.set_fenced("b", True)
        first.set_weight("a", 4)
        await wait_until(lambda: all(p.balancer["b"].fenced for p in others), 1.0)
        await wait_until(lambda: all(p.balancer["a"].weight == 4 for p in others), 1.0)
        assert all(p.balancer["a"].up for p in proxies)
        first.add_upstream(Upstream(c_url, name="c"))
        await wait_until(lambda: all("c" in p.upstreams for p in others), 1.0)
        first.remove_upstream("b")
        await wait_until(lambda: all("b" not in p.upstreams for p in others), 1.0)
        for client in clients:
            assert await served(client, 20) == {"a", "c"}


async def test_the_admin_api_of_one_process_reaches_the_others(store: StoreServer) -> None:
    async with fleet(store) as (proxies, clients, _):
        transport = httpx.ASGITransport(app=AdminApp(proxies[0], token=TOKEN))
        async with httpx.AsyncClient(transport=transport, base_url="http://admin") as admin:
            auth = {"authorization": f"Bearer {TOKEN}"}
            answer = await admin.post("/upstreams/b", json={"down": True}, headers=auth)
        assert answer.status_code == 200
        assert not proxies[0].balancer["b"].up  # applied before the answer
        await wait_until(lambda: not proxies[1].balancer["b"].up, 1.0)
        assert await served(clients[1], 10) == {"a"}


async def test_a_process_that_starts_later_loads_the_changes(store: StoreServer) -> None:
    async with fleet(store, 1) as (proxies, _, urls):
        proxies[0].set_fenced("a", True)
        await wait_until(lambda: _records(store) == {"a"})
        late = LeastTimeProxy(
            upstreams=[Upstream(urls[0], name="a"), Upstream(urls[1], name="b")],
            state=RedisState(store.url),
        )
        async with running(late, lifespan="on"):
            await wait_until(lambda: late.balancer["a"].fenced, 2.0)


def _records(store: StoreServer) -> set[str]:
    client = redis.Redis(port=store.port)
    return {key.decode() for key in client.hkeys("asgi-leasttime:leasttime:records")}


def _publish(store: StoreServer, payload: Any) -> None:
    client = redis.Redis(port=store.port)
    data = payload if isinstance(payload, bytes) else json.dumps(payload)
    client.publish("asgi-leasttime:leasttime:changes", data)


async def test_late_replayed_and_hostile_messages_change_nothing(
    store: StoreServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with fleet(store) as (proxies, clients, _):
        proxies[0].set_status("a", False)
        await wait_until(lambda: not proxies[1].balancer["a"].up, 1.0)
        version = proxies[1].state.versions["a"]
        for payload in [
            {"name": "a", "record": {"version": version, "down": False}},  # replayed
            {"name": "a", "record": {"version": version - 1, "down": False}},  # late
            b"not json at all",
            b"\xff\xfe",
            {"name": "a"},
            {"name": 7, "record": {"version": 99, "down": False}},
            {"name": "a", "record": {"version": "99", "down": False}},
            {"name": "a", "record": {"version": 99, "down": "no"}},
            {"name": "a", "record": {"version": 99, "weight": float("inf")}},
            {"name": "a", "record": {"version": 99, "weight": -1}},
            {"name": "a", "record": {"version": 99, "url": "ftp://x"}},
            {"name": "a", "record": {"version": 10**9, "down": False}},  # forged, far ahead
            {"name": "z", "record": {"version": 99, "url": "http://10.0.0.1:1", "colour": 1}},
            {"name": "a", "record": {"version": 99, "down": False, "evil": "x" * 100_000}},
            [1, 2, 3],
        ]:
            _publish(store, payload)
        await anyio.sleep(0.3)
        for proxy in proxies:
            assert not proxy.balancer["a"].up
            assert list(proxy.upstreams) == ["a", "b"]
        assert "ignored" in caplog.text
        proxies[1].set_status("a", True)  # the channel still works
        await wait_until(lambda: proxies[0].balancer["a"].up, 1.0)
        for client in clients:
            assert (await client.get("/")).status_code == 200


async def test_the_store_lost_and_found(
    store: StoreServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with fleet(store) as (proxies, clients, _):
        store.kill()
        await wait_until(lambda: not any(p.state.connected for p in proxies), 5.0)  # type: ignore[attr-defined]
        for client in clients:  # every request still answered, on the last known state
            assert await served(client, 10) == {"a", "b"}
        proxies[0].set_status("a", False)  # here at once; the others once the store is back
        assert await served(clients[0], 10) == {"b"}
        assert proxies[1].balancer["a"].up
        outages = caplog.text.count("unreachable")
        assert outages == 2  # once per process, not once per retry
        store.start()
        await wait_until(lambda: not proxies[1].balancer["a"].up, 10.0)
        assert "reached again" in caplog.text
        proxies[1].set_fenced("b", True)
        await wait_until(lambda: proxies[0].balancer["b"].fenced, 1.0)


async def test_a_store_unreachable_at_start(store: StoreServer) -> None:
    store.kill()
    async with running_many(UpstreamApp("a")) as urls:
        proxy = LeastTimeProxy(upstreams=[Upstream(urls[0], name="a")], state=RedisState(store.url))
        async with (
            running(proxy, lifespan="on") as url,
            httpx.AsyncClient(base_url=url, timeout=10) as client,
        ):
            assert (await client.get("/")).status_code == 200  # the configuration serves
            proxy.set_fenced("a", True)
            store.start()
            await wait_until(lambda: proxy.state.connected, 10.0)  # type: ignore[attr-defined]
            await wait_until(lambda: _records(store) == {"a"}, 2.0)  # written once it was back


# -- the records themselves -----------------------------------------------------------------------


def test_merging_changes() -> None:
    record = merge(None, Change("a", down=True), 1)
    record = merge(record, Change("a", weight=2.5), 2)
    assert record == {"version": 2, "down": True, "weight": 2.5}
    assert valid_record(record)
    assert merge(record, Change("a", removed=True), 3)["removed"] is True
    ejected = merge(record, Change("a", passive_down=True, passive_until=1_800_000_000.5), 3)
    assert (ejected["passive_down"], ejected["passive_until"]) == (True, 1_800_000_000.5)
    ended = merge(ejected, Change("a", passive_down=False), 4)
    assert ended["passive_down"] is False
    assert "passive_until" not in ended  # an until goes only with an ejection
    assert valid_record(ejected)
    assert valid_record(ended)
    assert not valid_record({**ejected, "passive_until": -1})


@pytest.mark.parametrize(
    "fields",
    [{"down": "yes"}, {"weight": -1}, {"weight": True}, {"weight": float("nan")},
     {"url": "ftp://x"}, {"url": None}, {"passive_until": 5.0}, {"passive_down": 1.0},
     {"passive_down": True, "passive_until": -1.0},
     {"passive_down": True, "passive_until": float("inf")}, {"explode": True},
     {"removed": True, "down": True}, {}],
)  # fmt: skip
def test_changes_no_upstream_could_take_are_refused(fields: dict[str, Any]) -> None:
    from asgi_leasttime.options import OptionError

    with pytest.raises(OptionError):
        Change("a", **fields)


def test_every_mistake_of_a_change_is_named_at_once() -> None:
    from asgi_leasttime.options import OptionError

    with pytest.raises(OptionError) as caught:
        Change("a", down="yes", weight=-1)
    assert "down" in str(caught.value)
    assert "weight" in str(caught.value)


def test_a_record_after_an_ejection_ended_can_be_taken_whole() -> None:
    """A process that starts late, or after a store reset, reads each record whole: one whose
    passive ejection has ended must still be a change an upstream can take."""

    record = merge(None, Change("a", url="http://127.0.0.1:9", weight=2), 1)
    record = merge(record, Change("a", passive_down=True, passive_until=1_800_000_000.0), 2)
    record = merge(record, Change("a", passive_down=False), 3)
    proxy = LeastTimeProxy(upstreams=["http://127.0.0.1:8"])
    assert proxy.state.apply("a", record)
    assert proxy.balancer["a"].weight == 2


def test_a_new_url_under_a_name_is_taken_whole_and_inherits_no_ejection() -> None:
    from asgi_leasttime.state import changed_since

    old = merge(None, Change("a", url="http://127.0.0.1:9"), 1)
    old = merge(old, Change("a", passive_down=True, passive_until=0), 2)
    new = merge(
        merge(old, Change("a", removed=True), 3),
        Change("a", url="http://127.0.0.1:7", weight=3, fenced=True),
        4,
    )
    assert "passive_down" not in new
    assert changed_since(old, new)["weight"] == 3  # not just the url that differs
    assert changed_since(old, new)["fenced"] is True


async def test_in_process_changes_apply_at_once() -> None:
    proxy = LeastTimeProxy(upstreams=[Upstream("http://127.0.0.1:9", name="a")])
    assert isinstance(proxy.state, InProcessState)
    await proxy.state.submit(Change("a", fenced=True))
    assert proxy.balancer["a"].fenced


# -- one prober per upstream for the whole fleet --------------------------------------------------


async def test_one_process_probes_for_all_and_another_takes_over(store: StoreServer) -> None:
    upstream = UpstreamApp("a")
    async with running(upstream) as url:

        def proxy() -> LeastTimeProxy:
            return LeastTimeProxy(
                upstreams=[Upstream(url, name="a")],
                state=RedisState(store.url),
                health_check=HealthCheck(interval=0.05, timeout=1),
            )

        first, second = proxy(), proxy()
        async with contextlib.AsyncExitStack() as both:
            await both.enter_async_context(running(second, lifespan="on"))
            async with running(first, lifespan="on"):
                await wait_until(lambda: first.state.connected and second.state.connected)  # type: ignore[attr-defined]
                await anyio.sleep(0.2)
                before = len(upstream.probes)
                await anyio.sleep(1.0)
                probes = len(upstream.probes) - before
                assert 10 <= probes <= 30, probes  # one prober, 20 probes a second; two: 40
                upstream.health_status = 500  # the prober sees it, and so does the other
                await wait_until(
                    lambda: not first.balancer["a"].up and not second.balancer["a"].up, 2.0
                )
                assert list(second.balancer["a"].down_flags) == ["active"]
                upstream.health_status = 200
                await wait_until(lambda: first.balancer["a"].up and second.balancer["a"].up, 2.0)
            stopped = len(upstream.probes)  # one proxy gone: whichever probed, probes go on
            await anyio.sleep(0.5)
            assert len(upstream.probes) - stopped >= 5


async def test_a_store_that_restarts_empty_is_followed_again(
    store: StoreServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Its versions start from 1 again: the processes must not ignore them as old."""
    async with fleet(store) as (proxies, _, _urls):
        proxies[0].set_weight("a", 2)
        proxies[0].set_weight("a", 3)
        await wait_until(lambda: proxies[1].balancer["a"].weight == 3, 1.0)
        store.kill()
        store.start()
        await wait_until(lambda: "was reset" in caplog.text, 10.0)
        await wait_until(lambda: all(p.state.connected for p in proxies), 10.0)  # type: ignore[attr-defined]
        proxies[0].set_weight("a", 5)  # version 1 of the new server
        await wait_until(lambda: proxies[1].balancer["a"].weight == 5, 2.0)


async def test_one_status_and_one_scrape_see_every_process(store: StoreServer) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    async with fleet(store) as (proxies, clients, _):
        for client, count in zip(clients, (6, 4), strict=True):
            for _ in range(count):
                assert (await client.get("/")).status_code == 200
        await anyio.sleep(0.3)  # a few report periods
        transport = httpx.ASGITransport(app=AdminApp(proxies[1]))
        async with httpx.AsyncClient(transport=transport, base_url="http://admin") as admin:
            status = (await admin.get("/status")).json()
            metrics = (await admin.get("/metrics")).text
    assert status["processes"] == 2
    assert sum(u["fleet"]["requests"] for u in status["upstreams"]) == 10
    assert sum(u["requests"] for u in status["upstreams"]) == 4  # this process's own
    found = {
        (sample.name, sample.labels.get("server")): sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
    }
    assert found["asgi_leasttime_fleet_processes", None] == 2
    assert (
        found["asgi_leasttime_fleet_server_requests", "a"]
        + found["asgi_leasttime_fleet_server_requests", "b"]
        == 10
    )


# -- passive ejections ----------------------------------------------------------------------------


async def eject_through(client: httpx.AsyncClient, proxy: LeastTimeProxy) -> None:
    """Send requests until ``a`` (answering 502) is ejected by this process's passive check."""
    for _ in range(20):
        await client.get("/")
        if "passive" in proxy.balancer["a"].down_flags:
            return
    raise AssertionError("never ejected")


@pytest.mark.parametrize("shared", [True, False])
async def test_a_passive_ejection_is_shared_when_asked(store: StoreServer, shared: bool) -> None:
    failing = UpstreamApp("a")
    failing.fail_with = 502

    def options() -> dict[str, Any]:
        return {"passive_health_check": PassiveHealthCheck(failure_window=2.0, shared=shared)}

    async with fleet(store, 3, options, (failing, UpstreamApp("b"))) as (proxies, clients, _):
        await eject_through(clients[0], proxies[0])
        others = proxies[1:]
        if not shared:
            await anyio.sleep(0.3)
            assert all(p.balancer["a"].up for p in others)
            return
        await wait_until(lambda: not any(p.balancer["a"].up for p in others), 1.0)
        assert all(list(p.balancer["a"].down_flags) == ["passive"] for p in others)
        for client in clients:
            assert await served(client, 10) == {"b"}
        failing.fail_with = None  # every process takes it back when the window is over
        await anyio.sleep(2.0)
        for client in clients:  # (a window's end is seen on the request path)
            await client.get("/")
        assert all(p.balancer["a"].up for p in proxies)


async def test_with_probes_a_passive_ejection_ends_when_one_passes_everywhere(
    store: StoreServer,
) -> None:
    """Whichever process holds the probe lease, each one that holds the upstream down probes it
    itself until a probe passes: its ejection does not wait for a shared flag that never moves."""
    failing = UpstreamApp("a")
    failing.fail_with = 500  # its traffic fails; its health answers 200

    def options() -> dict[str, Any]:
        return {
            "passive_health_check": PassiveHealthCheck(failure_window=30.0),
            "health_check": HealthCheck(interval=0.2, timeout=1),
        }

    async with fleet(store, 3, options, (failing, UpstreamApp("b"))) as (proxies, clients, _):
        for proxy, client in zip(proxies, clients, strict=True):
            await eject_through(client, proxy)
        # Every process's own ejection ends with its own passing probe, not after 30 s.
        await wait_until(lambda: all(p.balancer["a"].up for p in proxies), 2.0)


async def test_a_shared_ejection_with_probes_ends_in_every_process(store: StoreServer) -> None:
    failing = UpstreamApp("a")
    failing.fail_with = 500

    def options() -> dict[str, Any]:
        return {
            "passive_health_check": PassiveHealthCheck(failure_window=30.0, shared=True),
            "health_check": HealthCheck(interval=0.3, timeout=1),
        }

    async with fleet(store, 3, options, (failing, UpstreamApp("b"))) as (proxies, clients, _):
        failing.health_status = 500  # held down by the active check too, until it passes
        await wait_until(lambda: not proxies[0].balancer["a"].up, 2.0)
        failing.health_status = 200
        await eject_through(clients[0], proxies[0])
        failing.fail_with = None
        await wait_until(lambda: all(p.balancer["a"].up for p in proxies), 2.0)


async def test_a_loop_that_turns_its_cancellation_into_an_error_does_not_hold_up_the_shutdown(
    store: StoreServer,
) -> None:
    """A cancellation that arrives inside a redis-py command can come out as a connection
    error, and a loop that takes it for an outage goes on: a CI run hung at shutdown on one. The
    loops live in the proxy's task group, whose cancellation is delivered again at the loop's
    next wait, and each stops at the store's stopping flag."""
    import asyncio

    options = RedisState(store.url, report_every=0.05)
    proxy = LeastTimeProxy(upstreams=["http://127.0.0.1:9"], state=options)
    state = proxy.state
    assert isinstance(state, RedisState)
    assert state is not options
    turned = 0

    async def stubborn() -> None:
        nonlocal turned
        while True:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                turned += 1
                raise ConnectionError("what redis-py makes of a cancellation") from None

    state._report = stubborn  # type: ignore[method-assign]
    with anyio.fail_after(10):
        async with proxy.lifespan():
            await wait_until(lambda: state.connected)
    assert turned >= 1
