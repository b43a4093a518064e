"""The proxies a benchmark compares, as uvicorn app factories.

Each reads its upstream URLs from ``BENCH_UPSTREAMS`` (comma-separated) and is run by
``uvicorn --factory benchmarks.apps:NAME``. Peers that forward to one base URL only (asgiproxy,
fastapi-proxy-lib) get the first upstream; the minimal proxies rotate over all of them.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

Scope = dict[str, Any]


def upstreams() -> list[str]:
    return os.environ["BENCH_UPSTREAMS"].split(",")


def ours() -> Any:
    from asgi_leasttime import LeastTimeProxy

    return LeastTimeProxy(upstreams=upstreams())


def ours_with_access_log(format: str = "text") -> Any:
    """asgi-leasttime with its access log on (the caller sets up where the lines go)."""
    from asgi_leasttime import LeastTimeProxy
    from asgi_leasttime.access_log import AccessLog

    proxy = LeastTimeProxy(upstreams=upstreams())
    proxy.observe_requests(AccessLog(format))  # type: ignore[arg-type]
    return proxy


def ours_with_state() -> Any:
    """asgi-leasttime with its state on the Redis or Valkey server at ``BENCH_STATE_URL``."""
    from asgi_leasttime import LeastTimeProxy
    from asgi_leasttime.redis_state import RedisState

    return LeastTimeProxy(upstreams=upstreams(), state=RedisState(os.environ["BENCH_STATE_URL"]))


def ours_on_httpx() -> Any:
    """asgi-leasttime forwarding through an httpx.AsyncClient (the caller's-client path)."""
    from asgi_leasttime import LeastTimeProxy

    return LeastTimeProxy(upstreams=upstreams(), upstream_client="httpx")


def ours_on_httpx_aiohttp() -> Any:
    """Candidate transport: httpx-aiohttp's AiohttpTransport under our client, with a session
    that stores no cookies and adds no headers."""
    import aiohttp
    from httpx_aiohttp import AiohttpTransport

    from asgi_leasttime import LeastTimeProxy

    def session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4),
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent"),
            auto_decompress=False,
        )

    return LeastTimeProxy(upstreams=upstreams(), transport=AiohttpTransport(client=session))


def minimal_httpx() -> Any:
    """The least a raw-ASGI proxy on one shared httpx client does: the httpx baseline."""
    import httpx

    client = httpx.AsyncClient(timeout=60)
    targets = itertools.cycle(upstreams())

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        url = next(targets) + scope["raw_path"].decode()
        request = client.build_request(scope["method"], url)
        response = await client.send(request, stream=True)
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": response.headers.raw,
            }
        )
        async for chunk in response.aiter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        await response.aclose()

    return app


def minimal_lean() -> Any:
    """The least a raw-ASGI proxy on asgi-leasttime's lean client does: the floor under ours
    (no balancing, no header rules, no disconnect watching, no error answers)."""
    import httpx

    from asgi_leasttime._lean import LeanClient

    client = LeanClient(timeout=httpx.Timeout(60))
    targets = itertools.cycle(
        [(url.host, url.port or 80, url.netloc) for url in map(httpx.URL, upstreams())]
    )

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        host, port, netloc = next(targets)
        response = await client.send(
            scope["method"], host, port, scope["raw_path"], [(b"host", netloc)], None
        )
        head = [(name.lower(), value) for name, value in response.raw_headers]
        await send({"type": "http.response.start", "status": response.status_code, "headers": head})
        more = True
        while more:
            chunk, more = await response.next_chunk()
            await send({"type": "http.response.body", "body": chunk, "more_body": more})
        await response.aclose()

    return app


def minimal_aiohttp() -> Any:
    """The least a raw-ASGI proxy on an aiohttp session does: the fastest Python baseline."""
    import aiohttp

    session: list[aiohttp.ClientSession] = []
    targets = itertools.cycle(upstreams())

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if not session:
            connector = aiohttp.TCPConnector(limit=0)
            session.append(aiohttp.ClientSession(connector=connector, auto_decompress=False))
        url = next(targets) + scope["raw_path"].decode()
        async with session[0].request(scope["method"], url) as response:
            headers = [(name.lower(), value) for name, value in response.raw_headers]
            await send(
                {"type": "http.response.start", "status": response.status, "headers": headers}
            )
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

    return app


def asgiproxy_app() -> Any:
    from asgiproxy.config import BaseURLProxyConfigMixin, ProxyConfig
    from asgiproxy.context import ProxyContext
    from asgiproxy.simple_proxy import make_simple_proxy_app

    config = type(
        "Config", (BaseURLProxyConfigMixin, ProxyConfig), {"upstream_base_url": upstreams()[0]}
    )()
    return make_simple_proxy_app(ProxyContext(config))


def fastapi_proxy_lib_app() -> Any:
    from fastapi_proxy_lib.fastapi.app import reverse_http_app

    return reverse_http_app(base_url=upstreams()[0] + "/")


def answer_ok() -> Any:
    """No proxy at all: an ASGI app that answers ``ok`` itself, the floor under any Python proxy
    (what uvicorn alone costs per request)."""
    return upstream()


def upstream() -> Any:
    """An upstream answering ``ok`` after ``BENCH_DELAY`` seconds (0 by default)."""
    import asyncio

    delay = float(os.environ.get("BENCH_DELAY", "0"))
    name = os.environ.get("BENCH_NAME", "upstream").encode()

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if delay:
            await asyncio.sleep(delay)
        headers = [(b"content-length", b"2"), (b"x-upstream", name)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    return app
