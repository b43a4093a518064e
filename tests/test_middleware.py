"""The middleware form, in real FastAPI and Starlette apps under uvicorn: what it selects goes
upstream, everything else (routes, docs, WebSockets, lifespan) stays the app's."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, WebSocket
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from websockets.asyncio.client import connect

from asgi_leasttime import HealthCheck, LeastTimeMiddleware, LeastTimeProxy, Upstream
from asgi_leasttime.options import OptionError
from tests.servers import UpstreamApp, running, running_many, wait_until

pytestmark = pytest.mark.anyio


def fastapi_app(events: list[str]) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        events.append("app startup")
        yield
        events.append("app shutdown")

    app = FastAPI(lifespan=lifespan)

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"from": "app"}

    @app.websocket("/ws")
    async def own_socket(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hello from the app")
        await websocket.close()

    return app


@contextlib.asynccontextmanager
async def upstreams_ab() -> AsyncIterator[tuple[list[str], list[UpstreamApp]]]:
    apps = [UpstreamApp("a"), UpstreamApp("b")]
    async with running_many(*apps) as urls:
        yield urls, apps


async def test_fastapi_add_middleware_sends_only_api_upstream() -> None:
    events: list[str] = []
    async with upstreams_ab() as (urls, upstreams):
        app = fastapi_app(events)
        app.add_middleware(
            LeastTimeMiddleware,
            upstreams=urls,
            paths=["/api"],
            health_check=HealthCheck(interval=0.1, timeout=1),
        )
        async with (
            running(app, lifespan="on") as url,
            httpx.AsyncClient(base_url=url) as client,
        ):
            assert events == ["app startup"]
            # The proxy's lifespan ran too: its health checks probe both upstreams.
            await wait_until(lambda: all(u.probes for u in upstreams), 2.0)

            served = Counter()
            for _ in range(20):
                answer = await client.get("/api/users/7?x=1")
                assert answer.status_code == 200
                assert answer.json()["path"] == "/users/7"  # the prefix stripped, as Mount does
                assert answer.json()["query_string"] == "x=1"
                served[answer.headers["x-upstream"]] += 1
            assert set(served) == {"a", "b"}
            assert (await client.get("/api")).json()["path"] == "/"

            # The app's own routes, docs and schema are the app's.
            assert (await client.get("/hello")).json() == {"from": "app"}
            docs = await client.get("/docs")
            assert docs.status_code == 200
            assert "swagger" in docs.text.lower()
            assert "x-upstream" not in docs.headers
            assert (await client.get("/openapi.json")).json()["paths"].keys() == {"/hello"}
            assert "x-upstream" not in (await client.get("/apiary")).headers  # not under /api

            ws_url = url.replace("http", "ws")
            async with connect(ws_url + "/ws") as ws:
                assert await ws.recv() == "hello from the app"
            async with connect(ws_url + "/api/chat?room=1") as ws:
                greeting = await ws.recv()
                assert greeting in ("hello from a q=room=1", "hello from b q=room=1")
                await ws.send("ping")
                assert await ws.recv() == "echo:ping"
            requests_before = sum(u.requests for u in upstreams)
        assert events == ["app startup", "app shutdown"]
        assert sum(u.requests for u in upstreams) == requests_before


async def test_starlette_wrapped_by_hand_with_hosts_and_a_kept_prefix() -> None:
    async def own(request: Any) -> PlainTextResponse:
        return PlainTextResponse("app")

    async with upstreams_ab() as (urls, _):
        inner = Starlette(routes=[Route("/{path:path}", own)])
        app = LeastTimeMiddleware(
            inner,
            upstreams=urls,
            hosts=["*.api.example.org", "API.example.com"],
            strip_prefix=False,
        )
        async with running(app, lifespan="on") as url, httpx.AsyncClient(base_url=url) as client:

            async def reached(host: str, path: str = "/v1/x") -> str:
                answer = await client.get(path, headers={"host": host})
                return answer.headers.get("x-upstream", answer.text)

            assert await reached("eu.api.example.org") in ("a", "b")
            assert await reached("api.example.com:8443") in ("a", "b")  # port and case ignored
            assert await reached("api.example.org") == "app"  # the wildcard needs a label
            assert await reached("example.com") == "app"
            answer = await client.get("/v1/x", headers={"host": "eu.api.example.org"})
            assert answer.json()["path"] == "/v1/x"  # nothing stripped without paths


async def test_paths_hosts_and_a_predicate_must_all_match() -> None:
    async def own(request: Any) -> PlainTextResponse:
        return PlainTextResponse("app")

    async with upstreams_ab() as (urls, _):
        app = LeastTimeMiddleware(
            Starlette(routes=[Route("/{path:path}", own, methods=["GET", "DELETE"])]),
            upstreams=urls,
            paths=["/api/"],
            hosts=["shop.example.org"],
            when=lambda scope: scope["method"] != "DELETE",
        )
        async with running(app) as url, httpx.AsyncClient(base_url=url) as client:
            shop = {"host": "shop.example.org"}
            assert "x-upstream" in (await client.get("/api/a", headers=shop)).headers
            assert (await client.delete("/api/a", headers=shop)).text == "app"
            assert (await client.get("/api/a", headers={"host": "other.org"})).text == "app"
            assert (await client.get("/other", headers=shop)).text == "app"


async def test_two_middlewares_two_groups_each_its_own_proxy() -> None:
    events: list[str] = []
    async with running_many(UpstreamApp("a"), UpstreamApp("b")) as (a, b):
        app = fastapi_app(events)
        app.add_middleware(LeastTimeMiddleware, upstreams=[a], paths=["/api"])
        app.add_middleware(LeastTimeMiddleware, upstreams=[b], paths=["/v2/search"])
        async with running(app, lifespan="on") as url, httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/api/x")).headers["x-upstream"] == "a"
            answer = await client.get("/v2/search/q")
            assert answer.headers["x-upstream"] == "b"
            assert answer.json()["path"] == "/q"
            assert (await client.get("/hello")).json() == {"from": "app"}
        names = []
        stack: Any = app.middleware_stack
        while stack is not None:
            if isinstance(stack, LeastTimeMiddleware):
                names.append(stack.proxy.name)
            stack = getattr(stack, "app", None)
        assert sorted(names) == ["leasttime-api", "leasttime-v2-search"]


async def test_no_upstream_answers_503_unless_the_app_is_the_fallback() -> None:
    async def own(request: Any) -> PlainTextResponse:
        return PlainTextResponse("app answered")

    for fallback, expected in ((False, 503), (True, 200)):
        proxy = LeastTimeProxy(upstreams=[Upstream("http://127.0.0.1:9", name="a")])
        proxy.set_status("a", False)
        app = LeastTimeMiddleware(
            Starlette(routes=[Route("/{path:path}", own)]),
            proxy=proxy,
            paths=["/api"],
            fallback=fallback,
        )
        async with running(app) as url, httpx.AsyncClient(base_url=url) as client:
            answer = await client.get("/api/x")
            assert answer.status_code == expected
            if fallback:
                assert answer.text == "app answered"


async def test_a_proxy_given_keeps_one_lifespan_when_the_app_names_it_too() -> None:
    upstream = UpstreamApp("a")
    async with running(upstream) as upstream_url:
        proxy = LeastTimeProxy(
            upstreams=[upstream_url], health_check=HealthCheck(interval=0.2, timeout=1)
        )
        app = FastAPI(lifespan=proxy.lifespan)  # the mounted habit, kept by mistake
        app.add_middleware(LeastTimeMiddleware, proxy=proxy, paths=["/api"])
        async with running(app, lifespan="on") as url, httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/api/x")).headers["x-upstream"] == "a"
            await wait_until(lambda: len(upstream.probes) >= 3, 2.0)
            first, third = upstream.probes[0], upstream.probes[2]
            assert third - first > 0.3  # one prober at 0.2 s, not two


def test_a_middleware_that_selects_nothing_is_refused() -> None:
    with pytest.raises(OptionError, match="paths, hosts or when"):
        LeastTimeMiddleware(Starlette(), upstreams=["http://127.0.0.1:9"])
    with pytest.raises(OptionError, match="paths"):
        LeastTimeMiddleware(Starlette(), upstreams=["http://127.0.0.1:9"], paths="/api")
    with pytest.raises(OptionError, match="start with"):
        LeastTimeMiddleware(Starlette(), upstreams=["http://127.0.0.1:9"], paths=["api"])
    with pytest.raises(OptionError, match="either"):
        LeastTimeMiddleware(Starlette(), paths=["/api"])
    proxy = LeastTimeProxy(upstreams=["http://127.0.0.1:9"])
    with pytest.raises(OptionError, match="sticky"):
        LeastTimeMiddleware(Starlette(), proxy=proxy, paths=["/api"], sticky=None)


async def test_the_proxy_refuses_to_be_added_as_a_middleware() -> None:
    """``add_middleware(LeastTimeProxy, ...)`` used to send the app's every request upstream."""
    app = FastAPI()
    app.add_middleware(LeastTimeProxy, upstreams=["http://127.0.0.1:9"])
    with pytest.raises(TypeError, match="LeastTimeMiddleware"):
        app.build_middleware_stack()


async def test_the_proxy_starts_before_the_app_and_stops_after_it() -> None:
    """The app's own start-up and shutdown may send requests upstream."""
    seen: list[tuple[str, bool]] = []
    proxy = LeastTimeProxy(upstreams=["http://127.0.0.1:9"])

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        seen.append(("startup", proxy.running))
        yield
        seen.append(("shutdown", proxy.running))

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(LeastTimeMiddleware, proxy=proxy, paths=["/api"])
    async with running(app, lifespan="on"):
        pass
    assert seen == [("startup", True), ("shutdown", True)]
    assert not proxy.running


async def test_behind_a_server_root_path_the_prefix_is_still_stripped() -> None:
    """uvicorn's --root-path puts the root in the path but not in raw_path."""
    async with upstreams_ab() as (urls, _):
        app = LeastTimeMiddleware(Starlette(), upstreams=urls, paths=["/api"])
        async with (
            running(app, root_path="/svc") as url,
            httpx.AsyncClient(base_url=url) as client,
        ):
            answer = await client.get("/api/users/%7E7")
            assert answer.json()["raw_path"] == "/users/%7E7"


async def test_the_app_s_word_that_shutdown_is_over_waits_for_the_proxy_s_shutdown() -> None:
    """Servers end the lifespan once the app says its shutdown is complete (hypercorn cancels
    its task, uvicorn closes its loop): the proxy's shutdown, after the app's, is over first."""
    proxy = LeastTimeProxy(upstreams=["http://127.0.0.1:9"])
    app = LeastTimeMiddleware(Starlette(), proxy=proxy, paths=["/api"])
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    told: list[tuple[str, bool]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        told.append((message["type"], proxy.running))

    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    assert told == [("lifespan.startup.complete", True), ("lifespan.shutdown.complete", False)]
