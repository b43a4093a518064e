"""LeastTimeProxy over real uvicorn servers: every forwarding rule and failure answer."""

from __future__ import annotations

import contextlib
import gc
import gzip
import socket
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from asgi_leasttime import LeastTimeProxy, Upstream
from tests.servers import UPSTREAM_CLIENT, UpstreamApp, running, running_many, wait_until

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def proxied(
    *apps: UpstreamApp, **options: Any
) -> AsyncIterator[tuple[LeastTimeProxy, httpx.AsyncClient]]:
    """Upstreams and the proxy, each under its own uvicorn; a client pointed at the proxy."""
    async with running_many(*apps) as urls:
        options.setdefault("upstream_client", UPSTREAM_CLIENT)
        proxy = LeastTimeProxy(
            upstreams=[Upstream(url, name=app.name) for url, app in zip(urls, apps, strict=True)],
            **options,
        )
        async with (
            running(proxy, lifespan="on") as proxy_url,
            httpx.AsyncClient(base_url=proxy_url, timeout=10) as client,
        ):
            yield proxy, client


async def echo(client: httpx.AsyncClient, url: str, **kwargs: Any) -> dict[str, Any]:
    response = await client.request(kwargs.pop("method", "GET"), url, **kwargs)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def header_values(info: dict[str, Any], name: str) -> list[str]:
    return [v for n, v in info["headers"] if n == name]


def inflight(proxy: LeastTimeProxy) -> list[int]:
    return [server.inflight for server in proxy.balancer]


async def settled(proxy: LeastTimeProxy) -> list[int]:
    """In-flight counts once the proxy has finished what it was doing (at most 5 s)."""
    with contextlib.suppress(TimeoutError):
        await wait_until(lambda: not any(inflight(proxy)))
    return inflight(proxy)


# -- the request goes upstream unchanged ----------------------------------------------------------


async def test_raw_path_and_query_pass_unchanged() -> None:
    async with proxied(UpstreamApp("a")) as (_, client):
        target = "/a%2Fb/%7Euser/caf%C3%A9?x=1&x=2&empty=&plus=a+b&pct=%26%3D"
        info = await echo(client, target)
    assert info["raw_path"] == "/a%2Fb/%7Euser/caf%C3%A9"
    assert info["query_string"] == "x=1&x=2&empty=&plus=a+b&pct=%26%3D"


async def test_method_and_body_pass_through() -> None:
    async with proxied(UpstreamApp("a")) as (_, client):
        info = await echo(client, "/submit", method="PATCH", content=b"payload bytes")
    assert info["method"] == "PATCH"
    assert info["body"] == "payload bytes"
    assert header_values(info, "content-length") == ["13"]
    assert header_values(info, "transfer-encoding") == []


async def test_chunked_upload_streams_through() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(50):
            yield bytes([i]) * 1000

    async with proxied(UpstreamApp("a")) as (_, client):
        response = await client.post("/r/upload", content=chunks())
    size, _ = response.text.split()
    assert int(size) == 50_000


async def test_no_body_is_attached_when_the_request_has_none() -> None:
    async with proxied(UpstreamApp("a")) as (_, client):
        info = await echo(client, "/plain")
    assert header_values(info, "content-length") == []
    assert header_values(info, "transfer-encoding") == []


async def test_hop_by_hop_request_headers_are_removed() -> None:
    headers = [
        ("connection", "keep-alive, x-private"),
        ("x-private", "only for the proxy"),
        ("keep-alive", "timeout=5"),
        ("te", "trailers"),
        ("proxy-authorization", "Basic abc"),
        ("x-kept", "yes"),
    ]
    async with proxied(UpstreamApp("a")) as (_, client):
        info = await echo(client, "/h", headers=headers)
    names = {n for n, _ in info["headers"]}
    assert not names & {"x-private", "keep-alive", "te", "proxy-authorization", "upgrade"}
    assert header_values(info, "connection") != ["keep-alive, x-private"]
    assert header_values(info, "x-kept") == ["yes"]


async def test_repeated_request_headers_stay_apart() -> None:
    async with proxied(UpstreamApp("a")) as (_, client):
        info = await echo(client, "/h", headers=[("x-multi", "one"), ("x-multi", "two")])
    assert header_values(info, "x-multi") == ["one", "two"]


async def test_host_passes_through_by_default() -> None:
    async with proxied(UpstreamApp("a")) as (_, client):
        info = await echo(client, "/h", headers={"host": "shop.example"})
    assert header_values(info, "host") == ["shop.example"]
    assert header_values(info, "x-forwarded-host") == ["shop.example"]


async def test_host_is_the_upstreams_when_not_passed() -> None:
    async with proxied(UpstreamApp("a"), pass_host_header=False) as (proxy, client):
        info = await echo(client, "/h", headers={"host": "shop.example"})
        upstream_url = proxy.upstreams["a"].url
    assert upstream_url is not None
    assert header_values(info, "host") == [upstream_url.netloc.decode()]
    assert header_values(info, "x-forwarded-host") == ["shop.example"]


async def test_forged_forwarded_headers_from_untrusted_clients_are_replaced() -> None:
    forged = {
        "x-forwarded-for": "6.6.6.6",
        "x-forwarded-proto": "https",
        "x-forwarded-host": "evil.example",
        "x-real-ip": "6.6.6.6",
    }
    async with proxied(UpstreamApp("a")) as (_, client):
        info = await echo(client, "/h", headers=forged)
    assert header_values(info, "x-forwarded-for") == ["127.0.0.1"]
    assert header_values(info, "x-forwarded-proto") == ["http"]
    assert header_values(info, "x-forwarded-host") != ["evil.example"]
    assert header_values(info, "x-real-ip") == []


async def test_forwarded_headers_from_trusted_proxies_are_kept_and_appended() -> None:
    forwarded = {
        "x-forwarded-for": "203.0.113.7, 10.0.0.2",
        "x-forwarded-proto": "https",
        "x-forwarded-host": "shop.example",
    }
    async with proxied(UpstreamApp("a"), trusted_proxies=["127.0.0.0/8"]) as (_, client):
        info = await echo(client, "/h", headers=forwarded)
    assert header_values(info, "x-forwarded-for") == ["203.0.113.7, 10.0.0.2, 127.0.0.1"]
    assert header_values(info, "x-forwarded-proto") == ["https"]
    assert header_values(info, "x-forwarded-host") == ["shop.example"]


# -- the response comes back unchanged ------------------------------------------------------------


async def test_duplicate_response_headers_stay_apart() -> None:
    async with proxied(UpstreamApp("a")) as (_, client):
        response = await client.get("/r/cookies?user=alice")
    assert response.headers.get_list("set-cookie") == [
        "session=alice; Path=/",
        "theme=dark; Path=/",
    ]


async def test_hop_by_hop_response_headers_are_removed() -> None:
    async with proxied(UpstreamApp("a")) as (_, client):
        response = await client.get("/r/hop")
    assert "x-private" not in response.headers
    assert "keep-alive" not in response.headers
    assert response.headers["x-public"] == "kept"


async def test_compressed_bodies_pass_byte_for_byte() -> None:
    expected = gzip.compress(b"compressed " * 1000, mtime=0)
    async with (
        proxied(UpstreamApp("a")) as (_, client),
        client.stream("GET", "/r/gzip") as response,
    ):
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
    assert response.headers["content-encoding"] == "gzip"
    assert response.headers["content-length"] == str(len(expected))
    assert raw == expected


async def test_upstream_never_compresses_for_a_client_that_did_not_ask() -> None:
    async with proxied(UpstreamApp("a")) as (_, client):
        info = await echo(client, "/h", headers={"accept-encoding": "identity"})
    assert header_values(info, "accept-encoding") == ["identity"]


@pytest.mark.parametrize("code", [204, 304])
async def test_no_body_statuses(code: int) -> None:
    async with proxied(UpstreamApp("a")) as (_, client):
        response = await client.get(f"/r/status?code={code}")
    assert response.status_code == code
    assert response.content == b""


async def test_head_has_no_body() -> None:
    async with proxied(UpstreamApp("a")) as (_, client):
        response = await client.head("/anything")
    assert response.status_code == 200
    assert response.content == b""
    assert int(response.headers["content-length"]) > 0


async def test_cookies_set_for_one_client_never_reach_another() -> None:
    async with proxied(UpstreamApp("a")) as (proxy, client):
        await client.get("/r/cookies?user=alice")
        client.cookies.clear()
        response = await client.get("/r/cookies?user=bob")
        assert len(proxy.client.cookies.jar) == 0
    assert response.text == ""  # bob's request carried no cookie at all


async def test_response_streams_chunk_by_chunk() -> None:
    async with (
        proxied(UpstreamApp("a")) as (_, client),
        client.stream("GET", "/r/stream?chunks=3&size=5&pause=0.3") as response,
    ):
        chunks = response.aiter_raw()
        with anyio.fail_after(0.25 + 0.2):  # the first chunk long before the last
            first = await chunks.__anext__()
        rest = b"".join([chunk async for chunk in chunks])
    assert first == b"xxxxx"
    assert len(first + rest) == 15


# -- mounting -------------------------------------------------------------------------------------


async def test_mounted_in_starlette_strips_the_prefix() -> None:
    async with running(UpstreamApp("a")) as upstream_url:
        proxy = LeastTimeProxy(upstreams=[upstream_url])
        app = Starlette(routes=[Mount("/api", app=proxy)], lifespan=proxy.lifespan)
        async with (
            running(app, lifespan="on") as url,
            httpx.AsyncClient(base_url=url) as client,
        ):
            info = await echo(client, "/api/users/%2F1?x=1&x=2")
    assert info["raw_path"] == "/users/%2F1"
    assert info["query_string"] == "x=1&x=2"


async def test_mounted_in_fastapi_strips_the_prefix() -> None:
    fastapi = pytest.importorskip("fastapi")
    async with running(UpstreamApp("a")) as upstream_url:
        proxy = LeastTimeProxy(upstreams=[upstream_url])
        app = fastapi.FastAPI(lifespan=proxy.lifespan)
        app.mount("/svc", proxy)
        async with running(app, lifespan="on") as url, httpx.AsyncClient(base_url=url) as client:
            info = await echo(client, "/svc/items/7")
    assert info["raw_path"] == "/items/7"


async def test_upstream_base_path_is_prefixed() -> None:
    async with running(UpstreamApp("a")) as upstream_url:
        proxy = LeastTimeProxy(upstreams=[upstream_url + "/base/"])
        async with running(proxy) as url, httpx.AsyncClient(base_url=url) as client:
            info = await echo(client, "/x?y=1")
            await proxy.aclose()
    assert info["raw_path"] == "/base/x"


async def test_works_lazily_without_lifespan_and_closes_only_its_own_client() -> None:
    async with running(UpstreamApp("a")) as upstream_url:
        own = httpx.AsyncClient()
        proxy = LeastTimeProxy(upstreams=[upstream_url], client=own)
        async with running(proxy, lifespan="off") as url, httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/")).status_code == 200
        await proxy.aclose()
        assert not own.is_closed
        await own.aclose()


# -- failures -------------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_no_available_server_is_503() -> None:
    async with proxied(UpstreamApp("a")) as (proxy, client):
        proxy.set_status("a", up=False)
        response = await client.get("/")
    assert response.status_code == 503
    assert response.text == "no available server"


async def test_connection_refused_is_502_and_counts_as_a_failure() -> None:
    proxy = LeastTimeProxy(upstreams=[f"http://127.0.0.1:{closed_port()}"])
    async with running(proxy) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.get("/")
        await proxy.aclose()
    assert response.status_code == 502
    (server,) = proxy.balancer
    assert (server.failures, server.inflight) == (1, 0)


async def test_upstream_timeout_is_504() -> None:
    timeout = httpx.Timeout(5.0, read=0.2)
    async with proxied(UpstreamApp("a", delay=1.0), timeout=timeout) as (proxy, client):
        response = await client.get("/")
        assert response.status_code == 504
        assert await settled(proxy) == [0]


async def test_upstream_dying_mid_body_cuts_the_response_off() -> None:
    async with proxied(UpstreamApp("a")) as (proxy, client):
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get("/r/die")
        assert await settled(proxy) == [0]
        assert (await client.get("/")).status_code == 200


async def test_upstream_silent_after_headers_cuts_off_at_the_read_timeout() -> None:
    timeout = httpx.Timeout(5.0, read=0.3)
    async with proxied(UpstreamApp("a"), timeout=timeout) as (proxy, client):
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get("/r/hang")
        assert await settled(proxy) == [0]


async def test_5xx_answers_pass_through_and_count_as_failures() -> None:
    app = UpstreamApp("a")
    app.fail_with = 503
    async with proxied(app) as (proxy, client):
        response = await client.get("/")
    assert response.status_code == 503
    assert response.text == "failing"
    assert proxy.balancer["a"].failures == 1


# -- the client leaving ---------------------------------------------------------------------------


async def test_client_leaving_mid_download_releases_everything() -> None:
    app = UpstreamApp("a")
    async with proxied(app) as (proxy, client):
        for _ in range(20):
            async with client.stream("GET", "/r/stream?chunks=1000&size=65536&pause=0.001") as r:
                await r.aiter_raw().__anext__()
        assert await settled(proxy) == [0]
        await wait_until(lambda: app.streaming == 0)  # upstream connections closed too
        responses = [await client.get("/") for _ in range(10)]
    assert [r.status_code for r in responses] == [200] * 10


async def test_client_leaving_before_headers_cancels_the_upstream_request() -> None:
    app = UpstreamApp("a", delay=0.5)
    async with proxied(app) as (proxy, client):
        with anyio.move_on_after(0.1):
            await client.get("/")
        assert inflight(proxy) == [1]
        assert await settled(proxy) == [0]


async def test_client_leaving_mid_upload_releases_everything() -> None:
    async def slow_body() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        await anyio.sleep(10)
        yield b"never"

    async with proxied(UpstreamApp("a")) as (proxy, client):
        with anyio.move_on_after(0.2):
            await client.post("/r/upload", content=slow_body())
        assert await settled(proxy) == [0]
        assert (await client.get("/")).status_code == 200


# -- balancing over HTTP --------------------------------------------------------------------------


async def test_two_real_servers_both_serve() -> None:
    async with proxied(UpstreamApp("a"), UpstreamApp("b")) as (_, client):
        responses = [await client.get("/") for _ in range(10)]
    assert all(r.status_code == 200 for r in responses)
    assert {r.headers["x-upstream"] for r in responses} == {"a", "b"}


async def test_fast_server_gets_most_requests() -> None:
    async with proxied(UpstreamApp("fast", delay=0.010), UpstreamApp("slow", delay=0.100)) as (
        _,
        client,
    ):
        responses = [await client.get("/") for _ in range(20)]
    fast = sum(r.headers["x-upstream"] == "fast" for r in responses)
    assert fast > 14  # > 70%


async def test_inflight_is_one_during_a_request_and_zero_after() -> None:
    async with proxied(UpstreamApp("a", delay=0.3)) as (proxy, client):
        assert inflight(proxy) == [0]
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.get, "/")
            await wait_until(lambda: inflight(proxy) == [1])
        assert inflight(proxy) == [0]


async def test_ttfb_of_a_50ms_server() -> None:
    async with proxied(UpstreamApp("a", delay=0.050)) as (proxy, client):
        for _ in range(5):
            await client.get("/")
        assert proxy.balancer["a"].average == pytest.approx(0.050, abs=0.005)


async def test_traefik_mode_ttfb_in_milliseconds() -> None:
    async with proxied(UpstreamApp("a", delay=0.050), mode="traefik") as (proxy, client):
        for _ in range(5):
            await client.get("/")
        assert proxy.balancer["a"].average == pytest.approx(0.050, abs=0.005)


async def test_weighted_servers_over_http() -> None:
    async with running_many(UpstreamApp("heavy", 0.05), UpstreamApp("light", 0.05)) as urls:
        proxy = LeastTimeProxy(
            upstreams=[Upstream(urls[0], name="heavy", weight=3), Upstream(urls[1], name="light")],
            mode="traefik",
        )
        async with running(proxy) as url, httpx.AsyncClient(base_url=url) as client:
            for _ in range(2):
                await client.get("/")
            served = [(await client.get("/")).headers["x-upstream"] for _ in range(10)]
            await proxy.aclose()
    assert served == ["heavy"] * 10


# -- in-process upstreams -------------------------------------------------------------------------


async def test_balancer_of_balancers_propagates_status() -> None:
    apps = [UpstreamApp(name) for name in ("first", "second", "third", "fourth")]
    async with running_many(*apps) as urls:
        child_a = LeastTimeProxy(
            upstreams=[Upstream(urls[0], name="first"), Upstream(urls[1], name="second")]
        )
        child_b = LeastTimeProxy(
            upstreams=[Upstream(urls[2], name="third"), Upstream(urls[3], name="fourth")]
        )
        top = LeastTimeProxy(
            upstreams=[Upstream(app=child_a, name="A"), Upstream(app=child_b, name="B")]
        )
        async with running(top) as url, httpx.AsyncClient(base_url=url) as client:
            child_a.set_status("first", up=False)
            child_a.set_status("second", up=False)
            assert not top.balancer["A"].up
            served = [(await client.get("/")).headers["x-upstream"] for _ in range(4)]
            child_a.set_status("second", up=True)
            assert top.balancer["A"].up
            for proxy in (child_a, child_b, top):
                await proxy.aclose()
    assert set(served) <= {"third", "fourth"}
    assert len(served) == 4


# -- WebSocket ------------------------------------------------------------------------------------


async def test_websocket_round_trip() -> None:
    from websockets.asyncio.client import connect

    async with proxied(UpstreamApp("a")) as (proxy, client):
        ws_url = str(client.base_url).replace("http://", "ws://") + "/ws?room=7"
        async with connect(ws_url, subprotocols=["chat.v1", "chat.v2"]) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "chat.v2"
            assert await ws.recv() == "hello from a q=room=7"
            assert proxy.balancer["a"].inflight == 1
            await ws.send("ping")
            assert await ws.recv() == "echo:ping"
            await ws.send(b"\x01\x02\x03")
            assert await ws.recv() == b"\x03\x02\x01"
            await ws.send("close:4001")
            with pytest.raises(Exception) as closed:  # noqa: PT011
                await ws.recv()
        assert "4001" in str(closed.value)
        assert await settled(proxy) == [0]


def test_upstream_validation() -> None:
    with pytest.raises(ValueError, match="http"):
        Upstream("ftp://x")
    with pytest.raises(ValueError, match="either"):
        Upstream()
    with pytest.raises(ValueError, match="name"):
        Upstream(app=object())


async def test_a_library_proxy_leaves_the_collector_alone_unless_told_to_freeze() -> None:
    gc.unfreeze()
    try:
        async with LeastTimeProxy(upstreams=["http://127.0.0.1:9"]).lifespan():
            assert gc.get_freeze_count() == 0
        async with LeastTimeProxy(upstreams=["http://127.0.0.1:9"], freeze_gc=True).lifespan():
            assert gc.get_freeze_count() > 1000  # the modules, the app, the test run
    finally:
        gc.unfreeze()  # the other tests' objects stay collectable
