"""The lease: one request's hold on a server, and exactly one outcome for every way out."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest

from asgi_leasttime import Balancer, Lease, LeastTimeProxy, PassiveHealthCheck, Upstream
from asgi_leasttime.lease import is_failure
from tests.rawserver import raw_upstream
from tests.servers import UpstreamApp, free_port, running, wait_until
from tests.test_balancer import FakeClock

# -- the lease on its own -------------------------------------------------------------------------


def leased(*names: str) -> tuple[Balancer, list[Lease]]:
    balancer = Balancer(clock=FakeClock())
    for name in names:
        balancer.add(name)
    seen: list[Lease] = []
    balancer.register_outcome_listener(seen.append)
    return balancer, seen


def test_the_failure_rule() -> None:
    assert [is_failure(s) for s in (None, 200, 304, 404, 499, 500, 503)] == [
        True, False, False, False, False, True, True,
    ]  # fmt: skip


def test_a_lease_captures_what_was_in_flight_at_the_pick() -> None:
    balancer, _ = leased("a")
    first, second = balancer.acquire(), balancer.acquire()
    assert (first.alongside, second.alongside) == (0, 1)
    assert first.server is second.server
    assert balancer["a"].inflight == 2
    second.answered(200, 0.010)  # recorded with alongside=1, whatever is in flight now
    first.release()
    second.release()
    assert balancer["a"].inflight == 0


def test_the_first_outcome_counts_and_release_is_idempotent() -> None:
    balancer, seen = leased("a")
    lease = balancer.acquire()
    lease.answered(503, 0.002)
    lease.answered(200, 0.001)
    lease.failed()
    lease.release()
    lease.release()
    assert (lease.outcome, balancer["a"].failures, balancer["a"].inflight) == ("failed", 1, 0)
    assert seen == [lease]


def test_a_lease_given_back_with_no_outcome_was_abandoned() -> None:
    balancer, seen = leased("a")
    with balancer.acquire() as lease:
        pass
    assert (lease.outcome, balancer["a"].failures, balancer["a"].sample_count) == (
        "abandoned", 0, 0,
    )  # fmt: skip
    assert seen == [lease]


def test_a_sticky_lease_counts_without_a_pick() -> None:
    balancer, seen = leased("a", "b")
    with balancer.lease(balancer["b"]) as lease:
        assert balancer["b"].inflight == 1
        lease.answered(200, 0.003)
    assert (balancer["b"].requests, balancer["b"].sample_count, balancer["b"].inflight) == (1, 1, 0)
    assert [s.outcome for s in seen] == ["answered"]


# -- every way out of the proxy records exactly one outcome ---------------------------------------


@contextlib.asynccontextmanager
async def watched(
    *upstreams: Upstream | str, **options: Any
) -> AsyncIterator[tuple[LeastTimeProxy, httpx.AsyncClient, list[Lease]]]:
    proxy = LeastTimeProxy(upstreams=list(upstreams), **options)
    seen: list[Lease] = []
    proxy.balancer.register_outcome_listener(seen.append)
    async with (
        running(proxy, lifespan="on") as url,
        httpx.AsyncClient(base_url=url, timeout=10) as client,
    ):
        yield proxy, client, seen
        await wait_until(lambda: all(server.inflight == 0 for server in proxy.balancer))


def outcomes(seen: list[Lease]) -> list[str | None]:
    return [lease.outcome for lease in seen]


@pytest.mark.anyio
@pytest.mark.parametrize("upstream_client", ["lean", "httpx"])
@pytest.mark.parametrize(
    ("path", "status", "outcome"),
    [("/", 200, "answered"), ("/r/status?code=503", 503, "failed")],
)
async def test_answered_over_http(
    upstream_client: str, path: str, status: int, outcome: str
) -> None:
    async with (
        running(UpstreamApp("a")) as url,
        watched(Upstream(url, name="a"), upstream_client=upstream_client) as (_, client, seen),
    ):
        assert (await client.get(path)).status_code == status
    assert outcomes(seen) == [outcome]


@pytest.mark.anyio
@pytest.mark.parametrize("upstream_client", ["lean", "httpx"])
async def test_refused_over_http(upstream_client: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with watched(Upstream(dead, name="a"), upstream_client=upstream_client) as (
        _, client, seen,
    ):  # fmt: skip
        assert (await client.get("/")).status_code == 502
    assert outcomes(seen) == ["failed"]


@pytest.mark.anyio
async def test_timed_out_and_ambiguous_answers_fail() -> None:
    async def silent(stream: Any) -> None:
        await anyio.sleep(5)

    async def switches(stream: Any) -> None:
        await stream.receive()
        await stream.send(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n")

    async with raw_upstream(silent) as slow, raw_upstream(switches) as odd:
        upstreams = [Upstream(slow, name="slow"), Upstream(odd, name="odd", fenced=True)]
        timeout = httpx.Timeout(5.0, read=0.2)
        async with watched(*upstreams, timeout=timeout) as (proxy, client, seen):
            assert (await client.get("/")).status_code == 504
            proxy.set_fenced("odd", False)
            proxy.set_status("slow", False)
            assert (await client.get("/")).status_code == 502
    assert [(lease.server.name, lease.outcome) for lease in seen] == [
        ("slow", "failed"), ("odd", "failed"),
    ]  # fmt: skip


@pytest.mark.anyio
async def test_a_client_that_leaves_abandons_and_a_refused_request_too() -> None:
    upstream = UpstreamApp("a", delay=1.0)
    async with running(upstream) as url, watched(Upstream(url, name="a")) as (_, client, seen):
        with anyio.move_on_after(0.2):
            await client.get("/")  # leaves before the answer
        async with await anyio.connect_tcp("127.0.0.1", client.base_url.port or 80) as stream:
            await stream.send(b"GET /../x HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            assert (await stream.receive()).startswith(b"HTTP/1.1 400 ")
        await wait_until(lambda: len(seen) == 2)
    assert outcomes(seen) == ["abandoned", "abandoned"]


class Broken(httpx.AsyncBaseTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise RuntimeError("a fault inside the client library")


@pytest.mark.anyio
async def test_a_fault_in_the_client_library_is_a_502_and_a_failure() -> None:
    async with watched(Upstream("http://127.0.0.1:9", name="a"), transport=Broken()) as (
        _, client, seen,
    ):  # fmt: skip
        assert (await client.get("/")).status_code == 502
    assert outcomes(seen) == ["failed"]


async def raises(scope: Any, receive: Any, send: Any) -> None:
    raise RuntimeError("an in-process upstream with a bug")


async def never_answers(scope: Any, receive: Any, send: Any) -> None:
    return None


@pytest.mark.anyio
async def test_in_process_upstreams() -> None:
    upstreams = [
        Upstream(app=UpstreamApp("a"), name="a"),
        Upstream(app=raises, name="raises", fenced=True),
        Upstream(app=never_answers, name="silent", fenced=True),
    ]
    passive = PassiveHealthCheck(max_failed_attempts=100)
    async with watched(*upstreams, passive_health_check=passive) as (proxy, client, seen):
        assert (await client.get("/")).status_code == 200
        for name in ("raises", "silent"):
            proxy.set_fenced(name, False)
            proxy.set_status("a", False)
            if name == "silent":
                proxy.set_status("raises", False)
            with contextlib.suppress(httpx.HTTPError):
                assert (await client.get("/")).status_code == 502
    assert [(lease.server.name, lease.outcome) for lease in seen] == [
        ("a", "answered"), ("raises", "failed"), ("silent", "failed"),
    ]  # fmt: skip


@pytest.mark.anyio
async def test_websockets_over_http_and_in_process() -> None:
    from websockets.asyncio.client import connect

    async with running(UpstreamApp("a")) as url:
        upstreams = [Upstream(url, name="a"), Upstream(app=UpstreamApp("b"), name="b", fenced=True)]
        async with watched(*upstreams) as (proxy, client, seen):
            ws_url = str(client.base_url).replace("http://", "ws://") + "/ws"
            for name in ("a", "b"):
                async with connect(ws_url) as ws:
                    assert await ws.recv() == f"hello from {name} q="
                proxy.set_fenced("b", False)
                proxy.set_status("a", False)
            await wait_until(lambda: len(seen) == 2)
    assert [(lease.server.name, lease.outcome) for lease in seen] == [
        ("a", "answered"), ("b", "answered"),
    ]  # fmt: skip


@pytest.mark.anyio
async def test_a_refused_websocket_upstream_fails() -> None:
    from websockets.asyncio.client import connect

    dead = f"http://127.0.0.1:{free_port()}"
    async with watched(Upstream(dead, name="a")) as (_, client, seen):
        ws_url = str(client.base_url).replace("http://", "ws://") + "/ws"
        with pytest.raises(Exception):  # noqa: B017, PT011 - the handshake is refused
            async with connect(ws_url):
                pass
        await wait_until(lambda: len(seen) == 1)
    assert outcomes(seen) == ["failed"]


def test_a_lease_is_not_its_server() -> None:
    balancer, _ = leased("a", "b")
    lease = balancer.acquire()
    with pytest.raises(AttributeError):
        lease.name  # type: ignore[attr-defined]  # noqa: B018 - the server's: lease.server.name
    with pytest.raises(AttributeError):
        lease.inflight  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(AttributeError):
        lease.anwsered(200, 0.001)  # type: ignore[attr-defined]  # a typo is an error
    lease.release()
    assert balancer["a"].inflight == balancer["b"].inflight == 0


def test_the_primitives_take_the_server() -> None:
    balancer, seen = leased("a", "b")
    server = balancer.next_server()
    balancer.track(server)
    balancer.record_ttfb(server, 0.004)
    balancer.record_failure(server)
    balancer.release(server)
    assert (server.inflight, server.requests, server.failures, server.sample_count) == (0, 1, 1, 2)
    assert seen == []  # only a lease tells the outcome listeners


def test_the_lease_lives_in_the_balancer_module_and_keeps_its_old_path() -> None:
    import asgi_leasttime
    import asgi_leasttime.balancer
    import asgi_leasttime.lease

    assert asgi_leasttime.lease.Lease is asgi_leasttime.balancer.Lease is asgi_leasttime.Lease
    for name in asgi_leasttime.lease.__all__:
        assert getattr(asgi_leasttime.lease, name) is getattr(asgi_leasttime.balancer, name)
    assert asgi_leasttime.lease.is_failure is is_failure
