"""Upstreams come and go, clients never notice: retries on another upstream within a budget, a
refusal taking the upstream out at once, sticky clients following the retry; with real upstream
processes killed, stopped and restarted, and raw sockets that misbehave."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest

from asgi_leasttime import LeastTimeProxy, StickyCookie, Upstream
from asgi_leasttime import _lean as lean
from asgi_leasttime.errors import NoResponse, NotConnected
from asgi_leasttime.metrics import AdminApp
from asgi_leasttime.retry import Retry, RetryBudget, may_send_again, reason_of
from tests import rawserver
from tests.servers import (
    UPSTREAM_CLIENT,
    UpstreamApp,
    free_port,
    running,
    running_in_thread,
    upstream_processes,
    wait_until,
)

pytestmark = pytest.mark.anyio


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


@contextlib.asynccontextmanager
async def proxied(
    *upstreams: Upstream, **options: Any
) -> AsyncIterator[tuple[LeastTimeProxy, httpx.AsyncClient]]:
    options.setdefault("upstream_client", UPSTREAM_CLIENT)
    proxy = LeastTimeProxy(upstreams=list(upstreams), **options)
    async with (
        running(proxy, lifespan="on") as url,
        httpx.AsyncClient(base_url=url, timeout=10) as client,
    ):
        yield proxy, client


# -- the rules and the budget ---------------------------------------------------------------------


def test_the_reasons_name_how_far_the_request_got() -> None:
    assert reason_of(NotConnected("refused")) == "refused"
    assert reason_of(NoResponse("closed", reused=True)) == "reset"
    assert reason_of(NoResponse("closed")) == "no_response"
    assert reason_of(NoResponse("slow", per_try=True)) == "timeout"
    assert reason_of(None) == "status"


def test_a_pooled_connection_closed_under_a_request_with_its_body_read_is_no_licence() -> None:
    closed = NoResponse("closed", reused=True)
    assert may_send_again(closed, "POST", body_unread=True, body_kept=True)
    assert not may_send_again(closed, "POST", body_unread=False, body_kept=True)
    assert may_send_again(closed, "PUT", body_unread=False, body_kept=True)
    assert not may_send_again(closed, "PUT", body_unread=False, body_kept=False)


def test_the_budget_allows_a_share_of_recent_requests_plus_a_floor() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, window=10.0, floor=1.0, clock=clock)
    for _ in range(100):
        budget.count_request()
    # 20 % of 100 requests, plus 1 a second over the one second seen so far.
    assert sum(budget.try_spend() for _ in range(30)) == 21
    assert budget.spent == 9
    clock.now += 10.5  # the requests have left the window; the floor alone remains
    budget.tick()
    allowed = sum(budget.try_spend() for _ in range(30))
    assert 9 <= allowed <= 11


def test_the_budget_window_moves_in_seconds() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.5, window=2.0, floor=0.0, clock=clock)
    for second in range(5):
        clock.now += 1.0
        budget.tick()
        for _ in range(10):
            budget.count_request()
        if second == 0:
            assert budget.try_spend()
    clock.now += 0.5
    # Of the last two seconds' 20 requests, half may be retried.
    assert 9 <= budget.allowed() <= 15


def test_retry_options_are_checked() -> None:
    from asgi_leasttime.options import OptionError

    for options in ({"attempts": 0}, {"retry_on_status": (404,)}, {"per_try_timeout": 0},
                    {"budget_ratio": -1}, {"max_body": -1}):  # fmt: skip
        with pytest.raises(OptionError):
            Retry(**options)
    assert not Retry(attempts=1).enabled


# -- a pool slot and a closed client --------------------------------------------------------------


async def test_a_slot_handed_over_as_the_pool_timeout_fires_is_not_lost() -> None:
    pool = lean._Pool("127.0.0.1", 9, httpx.Limits(max_connections=1))
    pool.active = 1  # the one slot is taken
    waiting = asyncio.create_task(pool._take_slot(0.0))
    await asyncio.sleep(0)  # it waits for a slot; its timeout is due at once
    pool._free_slot()  # the slot is handed over in the very tick the timeout fires
    with pytest.raises(NotConnected):
        await waiting
    assert (pool.active, len(pool.waiting)) == (0, 0)


async def test_closing_the_client_closes_the_connections_still_carrying_an_answer() -> None:
    async with running(UpstreamApp("a")) as url:
        client = lean.LeanClient(timeout=httpx.Timeout(5))
        host, port = url.removeprefix("http://").split(":")
        response = await client.send("GET", host, int(port), b"/", [], None)
        pool = client._pools[(host, int(port), False, None)]
        await client.aclose()
        while (await response.next_chunk())[1]:
            pass
        await response.aclose()
        assert pool.idle == []  # closed, not left idle in a client nobody uses


# -- refusals -------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def one_dead_one_alive() -> AsyncIterator[tuple[LeastTimeProxy, httpx.AsyncClient]]:
    """A proxy over an upstream that was never started and one that answers."""
    async with (
        running(UpstreamApp("alive")) as alive,
        proxied(Upstream(closed_port_url(), name="dead"), Upstream(alive, name="alive")) as found,
    ):
        yield found


async def test_an_upstream_dead_from_the_start_costs_no_client_an_error() -> None:
    async with one_dead_one_alive() as (proxy, client):
        statuses = Counter()
        for index in range(40):
            method = "GET" if index % 2 else "POST"
            answer = await client.request(method, "/", content=b"x" * 100)
            statuses[answer.status_code] += 1
        assert statuses == {200: 40}
        assert "refused" in proxy.balancer["dead"].down_flags
        assert proxy.retry_counts.counts["refused", "retried"] >= 1


async def test_a_refused_upstream_is_tried_again_after_its_wait_and_comes_back() -> None:
    port = free_port()
    async with (
        running(UpstreamApp("other")) as other,
        proxied(
            Upstream(f"http://127.0.0.1:{port}", name="back"), Upstream(other, name="other")
        ) as (proxy, client),
    ):
        for _ in range(4):
            assert (await client.get("/")).status_code == 200
        assert "refused" in proxy.balancer["back"].down_flags
        async with running(UpstreamApp("back"), port=port):
            # Back after RECHECK_FIRST (2 s), by the lifespan's timer: no request needed.
            await wait_until(lambda: proxy.balancer["back"].up, 4.0)
            seen = Counter()
            for _ in range(20):
                seen[(await client.get("/")).headers["x-upstream"]] += 1
            assert seen["back"] >= 1


async def test_every_upstream_dead_gets_every_client_a_quick_502_or_503() -> None:
    upstreams = [Upstream(closed_port_url(), name=f"dead{i}") for i in range(3)]
    async with proxied(*upstreams) as (proxy, client):
        began = time.monotonic()
        statuses = Counter([(await client.get("/")).status_code for _ in range(30)])
        assert set(statuses) <= {502, 503}
        assert time.monotonic() - began < 5
        # Each request tries the upstream whose wait ends first (one may be back already),
        # and its retries stay within the budget: 20 % of the requests plus 3 a second.
        retried = sum(n for (_, outcome), n in proxy.retry_counts.items() if outcome == "retried")
        assert retried <= 0.2 * 30 + 3 * 5


async def test_retries_stay_within_the_budget_when_every_upstream_fails() -> None:
    """Upstreams that take every request and reset it unanswered (no refusal: they stay in the
    picks): the attempts they see are bounded by the budget, not by attempts x requests."""
    seen = 0

    async def takes_and_resets(stream: anyio.abc.SocketStream) -> None:
        nonlocal seen
        await rawserver.read_head(stream)
        seen += 1
        rawserver.reset(stream)

    async with contextlib.AsyncExitStack() as stack:
        urls = [await stack.enter_async_context(rawserver.raw_upstream(takes_and_resets))
                for _ in range(3)]  # fmt: skip
        retry = Retry(budget_ratio=0.2, min_retries_per_second=1.0)
        upstreams = [Upstream(url, name=f"u{i}") for i, url in enumerate(urls)]
        async with proxied(*upstreams, retry=retry) as (proxy, client):
            statuses = Counter([(await client.get("/")).status_code for _ in range(100)])
        assert statuses == {502: 100}
        # 100 requests + 20 % of them + 1 a second of the run (well under 10 s).
        assert 100 < seen <= 100 + 20 + 10
        assert proxy.retry_counts.counts["no_response", "budget"] >= 1


async def test_a_fresh_connection_closed_unanswered_is_not_sent_to_it_twice() -> None:
    seen = 0

    async def takes_and_closes(stream: anyio.abc.SocketStream) -> None:
        nonlocal seen
        await rawserver.read_head(stream)
        seen += 1

    async with (
        rawserver.raw_upstream(takes_and_closes) as url,
        proxied(Upstream(url, name="only")) as (_, client),
    ):
        assert (await client.get("/")).status_code == 502
    assert seen == 1  # no second send to the upstream that may have acted on it


# -- sticky clients -------------------------------------------------------------------------------


async def test_a_sticky_client_of_a_dead_upstream_moves_and_gets_a_fresh_cookie() -> None:
    sticky = StickyCookie(secret_key="k" * 32, name="lb")
    with contextlib.ExitStack() as a_server:
        a_url = a_server.enter_context(running_in_thread(UpstreamApp("a")))
        async with (
            running(UpstreamApp("b")) as b_url,
            proxied(Upstream(a_url, name="a"), Upstream(b_url, name="b"), sticky=sticky) as (
                proxy,
                client,
            ),
        ):
            proxy.set_fenced("b", True)
            first = await client.get("/")
            assert first.headers["x-upstream"] == "a"
            cookie = first.cookies["lb"]
            client.cookies.clear()
            proxy.set_fenced("b", False)
            a_server.close()  # "a" is gone; the client still carries its cookie
            answers = []
            for method in ("GET", "POST", "GET"):
                answer = await client.request(method, "/", headers={"cookie": f"lb={cookie}"})
                answers.append((answer.status_code, answer.headers["x-upstream"]))
                cookie = answer.cookies.get("lb", cookie)
                client.cookies.clear()
            assert answers == [(200, "b")] * 3
            assert cookie != first.cookies["lb"]  # a fresh cookie, naming "b"


# -- real processes killed, stopped, frozen -------------------------------------------------------


async def load(
    client: httpx.AsyncClient, seconds: float, workers: int = 4
) -> Counter[tuple[str, int]]:
    """GET and POST requests from ``workers`` keep-alive clients for ``seconds``; (method,
    status) counted, 599 for a request that got no answer at all."""
    counts: Counter[tuple[str, int]] = Counter()
    deadline = time.monotonic() + seconds

    async def one_worker(index: int) -> None:
        number = 0
        while time.monotonic() < deadline:
            number += 1
            method = "POST" if (index + number) % 2 else "GET"
            try:
                answer = await client.request(method, "/", content=b"payload" * 10)
                counts[method, answer.status_code] += 1
            except httpx.HTTPError:
                counts[method, 599] += 1

    async with anyio.create_task_group() as group:
        for index in range(workers):
            group.start_soon(one_worker, index)
    return counts


def errors(counts: Counter[tuple[str, int]], method: str) -> int:
    return sum(n for (m, status), n in counts.items() if m == method and status != 200)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
async def test_a_rolling_restart_under_load_costs_gets_nothing(how: signal.Signals) -> None:
    """Each upstream in turn killed (or stopped gracefully) and started again while clients send
    GETs and POSTs: no GET fails; a POST fails only if its upstream died holding it."""
    with upstream_processes("a", "b", "c") as processes:
        upstreams = [Upstream(p.url, name=p.name) for p in processes]
        async with proxied(*upstreams) as (_proxy, client):

            async def roll() -> None:
                for process in processes:
                    await anyio.sleep(0.4)
                    process.signal(how)
                    await anyio.to_thread.run_sync(process.wait)
                    await anyio.sleep(0.3)
                    await anyio.to_thread.run_sync(process.start)

            async with anyio.create_task_group() as group:
                group.start_soon(roll)
                counts = await load(client, 3.5)
        # A GET whose answer had started when its upstream died is cut off (599 here): no
        # proxy may send it again. Every other GET is answered.
        assert errors(counts, "GET") - counts["GET", 599] == 0, counts
        assert counts["GET", 599] <= (3 if how == signal.SIGKILL else 0), counts
        # SIGKILL: only the POSTs in flight on the killed process at that instant (its
        # answers take well under a millisecond, so hardly any); SIGTERM: none.
        assert errors(counts, "POST") <= (3 if how == signal.SIGKILL else 0), counts
        assert sum(counts.values()) > 100


async def test_a_frozen_upstream_holds_only_what_it_had_with_a_per_try_timeout() -> None:
    with upstream_processes("frozen", "warm") as (frozen, warm):
        upstreams = [Upstream(frozen.url, name="frozen"), Upstream(warm.url, name="warm")]
        retry = Retry(per_try_timeout=0.3, min_retries_per_second=20)  # budget not under test
        async with proxied(*upstreams, retry=retry) as (proxy, client):
            for _ in range(6):
                assert (await client.get("/")).status_code == 200
            frozen.signal(signal.SIGSTOP)
            try:
                began = time.monotonic()
                statuses: Counter[int] = Counter()

                async def one() -> None:
                    statuses[(await client.get("/")).status_code] += 1

                async with anyio.create_task_group() as group:  # spread over both upstreams
                    for _ in range(10):
                        group.start_soon(one)
                assert statuses == {200: 10}
                assert time.monotonic() - began < 3.0  # a per-try timeout, not the read timeout
            finally:
                frozen.signal(signal.SIGCONT)
        assert proxy.retry_counts.counts["timeout", "retried"] >= 1


# -- seen and counted -----------------------------------------------------------------------------


async def test_retries_are_counted_in_status_and_metrics() -> None:
    async with one_dead_one_alive() as (proxy, client):
        for _ in range(4):
            await client.get("/")
        admin = AdminApp(proxy)
        transport = httpx.ASGITransport(app=admin)
        async with httpx.AsyncClient(transport=transport, base_url="http://admin") as http:
            status = (await http.get("/status")).json()
            metrics = (await http.get("/metrics")).text
    assert status["retries"]["refused"]["retried"] >= 1
    assert "budget" in status
    assert 'asgi_leasttime_retries_total{outcome="retried",reason="refused"' in metrics
    by_name = {u["name"]: u for u in status["upstreams"]}
    assert "refused" in by_name["dead"]["down"]


async def test_without_a_lifespan_a_refused_upstream_comes_back_on_requests() -> None:
    """Served with ``--lifespan off`` no timer runs: the requests bring a refused upstream
    back once its wait is over."""
    from asgi_leasttime import Balancer

    clock = FakeClock()
    async with running(UpstreamApp("alive")) as alive:
        proxy = LeastTimeProxy(
            upstreams=[Upstream(closed_port_url(), name="dead"), Upstream(alive, name="alive")],
            balancer=Balancer(clock=clock, wants_health_check=True),
            upstream_client=UPSTREAM_CLIENT,
        )
        transport = httpx.ASGITransport(app=proxy)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            for _ in range(3):
                assert (await client.get("/")).status_code == 200
            assert "refused" in proxy.balancer["dead"].down_flags
            tried = proxy.retry_counts.counts["refused", "retried"]
            assert (await client.get("/")).status_code == 200
            # Still out: not tried again before its wait is over.
            assert proxy.retry_counts.counts["refused", "retried"] == tried
            clock.now += 2.5  # past the first wait
            assert (await client.get("/")).status_code == 200
            # Back on this request, tried, refused again (and the request retried elsewhere).
            assert proxy.retry_counts.counts["refused", "retried"] == tried + 1
        await proxy.aclose()
