"""One owner per upstream, one funnel per change: the faults that lived at the seams between the
proxy, the balancer, the state store, the health checks and the admin API, each reproduced."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest

from asgi_leasttime import (
    Balancer,
    LeastTimeProxy,
    PassiveHealthCheck,
    StickyCookie,
    Upstream,
)
from asgi_leasttime.metrics import AdminApp
from asgi_leasttime.options import OptionError
from asgi_leasttime.redis_state import RedisState
from asgi_leasttime.state import Change, InProcessState, StateStore
from tests.servers import UpstreamApp, running, running_many, wait_until

pytestmark = pytest.mark.anyio

TOKEN = "a-token-of-at-least-16-characters"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def proxy_of(*names: str, **options: Any) -> LeastTimeProxy:
    upstreams = [Upstream(f"http://127.0.0.1:{9000 + i}", name=n) for i, n in enumerate(names)]
    return LeastTimeProxy(upstreams=upstreams, **options)


def admin_client(proxy: LeastTimeProxy) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=AdminApp(proxy, token=TOKEN))
    return httpx.AsyncClient(transport=transport, base_url="http://admin")


# -- one funnel per change ------------------------------------------------------------------------


async def test_a_put_with_weight_0_is_left_out_not_a_500() -> None:
    proxy = proxy_of("a")
    async with admin_client(proxy) as admin:
        answer = await admin.put(
            "/upstreams/b", json={"url": "http://127.0.0.1:9009", "weight": 0}, headers=AUTH
        )
        assert answer.status_code == 200, answer.text
        assert "left_out" in answer.json()
        assert "b" in proxy.upstreams
        assert "b" not in proxy.balancer
        # The same rule through every door: a weight brings it in, 0 takes it out again.
        answer = await admin.post("/upstreams/b", json={"weight": 2}, headers=AUTH)
        assert answer.json()["weight"] == 2
        proxy.set_weight("b", 0)
        assert "b" not in proxy.balancer
        proxy.set_weight("b", 1)
        assert proxy.balancer["b"].up


async def test_a_post_changing_several_fields_applies_all_or_nothing() -> None:
    proxy = proxy_of("a", "b")
    async with admin_client(proxy) as admin:
        answer = await admin.post("/upstreams/a", json={"down": True, "weight": -1}, headers=AUTH)
        assert answer.status_code == 400
        assert "weight" in answer.json()["error"]
        assert proxy.balancer["a"].up  # "down" was not applied before "weight" was refused
        answer = await admin.post("/upstreams/a", json={"down": True, "weight": 3}, headers=AUTH)
        assert answer.status_code == 200
        assert not proxy.balancer["a"].up
        assert proxy.balancer["a"].weight == 3


async def test_a_put_without_a_url_is_a_400() -> None:
    proxy = proxy_of("a")
    async with admin_client(proxy) as admin:
        answer = await admin.put("/upstreams/b", json={"weight": 2}, headers=AUTH)
        assert answer.status_code == 400
        assert "url" in answer.json()["error"]


def test_the_set_methods_refuse_in_the_words_of_the_one_rule() -> None:
    proxy = proxy_of("a")
    with pytest.raises(OptionError, match="weight") as by_method:
        proxy.set_weight("a", -1)
    with pytest.raises(OptionError, match="weight") as by_change:
        Change("a", weight=float("inf"))
    assert str(by_method.value) == str(by_change.value)
    with pytest.raises(KeyError):
        proxy.set_status("nobody", False)


# -- one owner per upstream -----------------------------------------------------------------------


def test_a_balancer_given_with_servers_is_refused_at_once() -> None:
    balancer = Balancer()
    balancer.add("stranger")
    with pytest.raises(OptionError, match="balancer"):
        proxy_of("a", balancer=balancer)


async def test_a_server_put_in_the_balancer_by_hand_is_a_503_not_a_500() -> None:
    proxy = proxy_of("a")
    proxy.set_status("a", False)
    proxy.balancer.add("stranger")
    transport = httpx.ASGITransport(app=proxy)
    async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
        answer = await client.get("/")
    assert answer.status_code == 503
    assert proxy.balancer["stranger"].inflight == 0


async def test_removing_an_upstream_leaves_nothing_behind() -> None:
    """Every holder of an upstream's facts forgets it: the set, the balancer, the sticky ids, the
    passive check's counts and ejections, the health watcher, the lean pool's idle sockets; a
    name added again starts afresh."""
    from asgi_leasttime.health import HealthCheck

    a, b = UpstreamApp("a"), UpstreamApp("b")
    a.fail_with = 500
    async with running_many(a, b) as urls:
        proxy = LeastTimeProxy(
            upstreams=[Upstream(urls[0], name="a"), Upstream(urls[1], name="b")],
            sticky=StickyCookie(secret_key="k" * 32),
            passive_health_check=PassiveHealthCheck(max_failed_attempts=3),
            health_check=HealthCheck(interval=60),
        )
        async with (
            running(proxy, lifespan="on") as url,
            httpx.AsyncClient(base_url=url, timeout=10) as client,
        ):
            proxy.set_fenced("b", True)
            assert (await client.get("/")).status_code == 500  # one failure counted for "a"
            passive = proxy.passive
            assert passive is not None
            assert "a" in passive._failures
            member = proxy.members["a"]
            watcher = member.watcher
            assert watcher is not None
            assert proxy._lean is not None
            pool_key = ("127.0.0.1", proxy.upstreams["a"].port, False, None)
            assert proxy._lean._pools[pool_key].idle  # the connection kept alive
            idle = [connection for _, connection in proxy._lean._pools[pool_key].idle]

            proxy.remove_upstream("a")

            assert "a" not in proxy.members
            assert "a" not in proxy.balancer
            assert member.sticky_id not in proxy.members.by_sticky_id
            assert "a" not in passive._failures
            assert "a" not in passive._ejected
            assert watcher.cancel_called
            assert pool_key not in proxy._lean._pools
            assert all(connection.closed for connection in idle)

            proxy.add_upstream(Upstream(urls[0], name="a"))  # the same name, afresh
            assert "a" not in passive._failures
            assert proxy.balancer["a"].requests == 0


# -- records from the store -----------------------------------------------------------------------


def test_a_record_read_after_a_local_change_does_not_undo_it() -> None:
    proxy = proxy_of("a", "b")
    state = proxy.state
    assert state.apply("a", {"version": 1, "down": False})
    proxy.set_status("a", False)  # here, after that record; not yet back from the store
    # Another process changed the weight; its record still carries the down flag it knew.
    assert state.apply("a", {"version": 2, "down": False, "weight": 3})
    assert not proxy.balancer["a"].up
    assert proxy.balancer["a"].weight == 3


def test_a_stale_active_down_does_not_end_a_passive_ejection() -> None:
    from asgi_leasttime.health import HealthCheck

    proxy = proxy_of(
        "a",
        "b",
        health_check=HealthCheck(),
        passive_health_check=PassiveHealthCheck(shared=True),
    )
    state = proxy.state
    assert state.apply("a", {"version": 1, "active_down": False})
    passive = proxy.passive
    assert passive is not None
    passive.record(proxy.balancer["a"], failed=True)  # ejected, until a probe passes
    assert "passive" in proxy.balancer["a"].down_flags
    assert state.apply("a", {"version": 2, "active_down": False, "fenced": False})
    assert "passive" in proxy.balancer["a"].down_flags  # no probe passed


def test_a_record_is_counted_only_once_applied_so_a_failed_one_is_tried_again() -> None:
    proxy = proxy_of("a")
    state = proxy.state
    apply = proxy.members.apply
    refusals = [OptionError("weight", "refused once")]

    def flaky(change: Change) -> None:
        if refusals:
            raise refusals.pop()
        apply(change)

    proxy.members.apply = flaky  # type: ignore[method-assign]
    assert not state.apply("a", {"version": 1, "weight": 2})
    assert state.versions.get("a") is None
    assert state.apply("a", {"version": 1, "weight": 2})  # the next load tries it again
    assert proxy.balancer["a"].weight == 2


def test_a_record_for_an_upstream_not_held_here_is_passed_over() -> None:
    proxy = proxy_of("a")
    assert proxy.state.apply("elsewhere", {"version": 1, "down": True})
    assert "elsewhere" not in proxy.members


# -- option objects stay options ------------------------------------------------------------------


async def test_one_set_of_options_serves_two_proxies_without_crossing() -> None:
    """Two middlewares of one app given the same option objects: each proxy keeps its own
    sticky ids, passive counts and store."""
    sticky = StickyCookie(secret_key="k" * 32)
    passive = PassiveHealthCheck(max_failed_attempts=1)
    store = InProcessState()
    first = proxy_of("a", name="first", sticky=sticky, passive_health_check=passive, state=store)
    second = proxy_of("b", name="second", sticky=sticky, passive_health_check=passive, state=store)
    assert sticky.name is None  # the options are as they were given
    assert first.sticky is not None
    assert second.sticky is not None
    assert (first.sticky.name, second.sticky.name) == ("first", "second")
    assert first.passive is not second.passive
    assert first.state is not store
    assert first.state is not second.state
    assert first.state.host is first.members
    assert second.state.host is second.members
    first.set_status("a", False)
    assert "a" not in second.members


def test_a_redis_store_given_twice_makes_two_connections() -> None:
    options = RedisState("redis://127.0.0.1:1/0")
    first, second = proxy_of("a", state=options), proxy_of("a", state=options)
    assert isinstance(first.state, RedisState)
    assert isinstance(second.state, RedisState)
    assert first.state._client is not second.state._client
    assert options.host is None


def test_a_store_given_to_no_proxy_says_so() -> None:
    with pytest.raises(RuntimeError, match="attached"):
        StateStore().report_probe("a", True, "probe")


# -- the background loops -------------------------------------------------------------------------


async def test_a_nested_proxy_with_only_a_passive_check_comes_back_on_its_own() -> None:
    """Once every upstream of the child is ejected, the parent marks it down and sends it
    nothing: the child's ejections must end on the child's own timer, not on a request."""
    failing = UpstreamApp("a")
    failing.fail_with = 500
    async with running(failing) as url:
        child = LeastTimeProxy(
            upstreams=[Upstream(url, name="a")],
            passive_health_check=PassiveHealthCheck(failure_window=0.3, max_failed_attempts=1),
            name="child",
        )
        parent = LeastTimeProxy(upstreams=[Upstream(app=child, name="child")], name="parent")
        async with (
            running(parent, lifespan="on") as parent_url,
            httpx.AsyncClient(base_url=parent_url, timeout=10) as client,
        ):
            assert (await client.get("/")).status_code == 500
            assert not parent.balancer["child"].up
            assert (await client.get("/")).status_code == 503
            failing.fail_with = None
            await wait_until(lambda: parent.balancer["child"].up, 3.0)
            assert (await client.get("/")).status_code == 200


async def test_an_idle_proxys_status_shows_no_ejection_that_has_ended() -> None:
    proxy = proxy_of("a", "b", passive_health_check=PassiveHealthCheck(failure_window=0.2))
    async with proxy.lifespan():
        assert proxy.passive is not None
        proxy.passive.record(proxy.balancer["a"], failed=True)
        assert "passive" in proxy.upstream_status()[0].down
        await wait_until(lambda: not proxy.upstream_status()[0].down, 2.0)


async def test_a_loop_that_fails_is_logged_and_started_again(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asgi_leasttime._tasks

    monkeypatch.setattr(asgi_leasttime._tasks, "RESTART_AFTER", 0.01)
    proxy = proxy_of("a", passive_health_check=PassiveHealthCheck())
    passive = proxy.passive
    assert passive is not None
    runs = 0
    run = passive.run

    async def fails_twice() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise RuntimeError("a fault of ours")
        await run()

    passive.run = fails_twice  # type: ignore[method-assign]
    async with proxy.lifespan():
        await wait_until(lambda: runs >= 3, 2.0)
    assert caplog.text.count("stopped on an unexpected error; restarting it") == 2


# -- the lifespan ---------------------------------------------------------------------------------


async def test_the_lifespan_counts_its_users_and_stops_when_the_last_leaves() -> None:
    proxy = proxy_of("a")
    second_in, first_out, second_out = anyio.Event(), anyio.Event(), anyio.Event()
    seen: list[bool] = []

    async def second() -> None:
        async with proxy.lifespan():
            second_in.set()
            await first_out.wait()
            seen.append(proxy.running and proxy._task_group is not None)
        second_out.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            async with proxy.lifespan():
                group.start_soon(second)
                await second_in.wait()
                first_out.set()
            # The first user has left: the proxy ran on until the second did.
            assert second_out.is_set()
    assert seen == [True]
    assert not proxy.running


class _FailingStore(InProcessState):
    @contextlib.asynccontextmanager
    async def running(self, task_group: Any) -> AsyncIterator[None]:
        raise ConnectionError("the store refused us")
        yield  # pragma: no cover


async def test_a_failed_startup_is_reported_as_lifespan_startup_failed() -> None:
    proxy = proxy_of("a", state=_FailingStore())
    messages = [{"type": "lifespan.startup"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with pytest.raises(ConnectionError):
        await proxy({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert sent[0]["type"] == "lifespan.startup.failed"
    assert "the store refused us" in sent[0]["message"]


def test_passive_options_are_frozen() -> None:
    passive = PassiveHealthCheck()
    with pytest.raises(AttributeError):
        passive.failure_window = 3  # type: ignore[misc]
    assert time.time() > 0


def test_the_upstream_objects_given_stay_as_given() -> None:
    given = Upstream("http://127.0.0.1:9001", name="a")
    first = LeastTimeProxy(upstreams=[given])
    second = LeastTimeProxy(upstreams=[given])
    first.set_weight("a", 5)
    first.set_fenced("a", True)
    assert (given.weight, given.fenced) == (1, False)
    assert second.upstreams["a"].weight == 1


class _SlowToStop(InProcessState):
    def __init__(self) -> None:
        super().__init__()
        self.release = anyio.Event()
        self.stopping = anyio.Event()
        self.starts = 0

    def attached(self, host: Any) -> _SlowToStop:
        self.host = host  # one object, to watch it from the test
        return self

    @contextlib.asynccontextmanager
    async def running(self, task_group: Any) -> AsyncIterator[None]:
        self.starts += 1
        try:
            yield
        finally:
            self.stopping.set()
            await self.release.wait()


async def test_a_user_entering_while_the_last_one_tears_down_waits_and_starts_afresh() -> None:
    store = _SlowToStop()
    proxy = proxy_of("a", state=store)
    inside = anyio.Event()

    async def first() -> None:
        async with proxy.lifespan():
            pass  # leaves at once; the store's teardown then waits for ``release``

    async def second() -> None:
        async with proxy.lifespan():
            inside.set()
            assert proxy.running
            assert proxy._task_group is not None

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(first)
            await store.stopping.wait()
            store.stopping = anyio.Event()
            group.start_soon(second)
            await anyio.sleep(0.05)
            assert not inside.is_set()  # it waits for the teardown
            store.release.set()
    assert inside.is_set()
    assert store.starts == 2
    assert not proxy.running


async def test_a_late_attempt_on_a_removed_upstream_does_not_bring_its_pool_back() -> None:
    """Its opener keeps the pool it had (retired: the connection closes as it comes back)
    rather than registering a new one nobody would close."""
    from asgi_leasttime import LeastTimeProxy, Upstream

    proxy = LeastTimeProxy(upstreams=[Upstream("http://127.0.0.1:9", name="a")])
    assert proxy._lean is not None
    opener = proxy.members["a"].opener
    proxy.remove_upstream("a")
    assert not proxy._lean._pools
    with contextlib.suppress(Exception):
        await opener("GET", b"/", [], None)  # refused: nothing listens there
    assert not proxy._lean._pools
