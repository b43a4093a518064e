"""Security: no open proxy, no forged addresses, no shared cookies, no smuggling, no admin leak."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from asgi_leasttime import LeastTimeProxy, Upstream
from asgi_leasttime.metrics import AdminApp
from tests.servers import UPSTREAM_CLIENT, UpstreamApp, running
from tests.test_proxy import proxied

pytestmark = pytest.mark.anyio


async def exchange(port: int, request: bytes, limit: float = 5) -> bytes:
    """Send raw bytes to the proxy; everything it answers until it closes or goes quiet."""
    answer = b""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(request)
        with anyio.move_on_after(limit):
            while True:
                try:
                    answer += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
                if answer.count(b"HTTP/1.1 ") and b"\r\n\r\n" in answer and b'"upstream"' in answer:
                    break
    return answer


def port_of(client: httpx.AsyncClient) -> int:
    return int(str(client.base_url).rstrip("/").rsplit(":", 1)[1])


@pytest.mark.parametrize("http", ["httptools", "h11"])
async def test_absolute_form_targets_never_leave_the_configured_upstreams(http: str) -> None:
    upstream = UpstreamApp("a")
    async with running(upstream) as upstream_url:
        proxy = LeastTimeProxy(
            upstreams=[Upstream(upstream_url, name="a")], upstream_client=UPSTREAM_CLIENT
        )
        async with running(proxy, http=http) as url:
            port = int(url.rsplit(":", 1)[1])
            answer = await exchange(
                port, b"GET http://evil.example/steal HTTP/1.1\r\nhost: evil.example\r\n\r\n"
            )
            await proxy.aclose()
    assert b"x-upstream: a" in answer  # answered by the configured upstream, nowhere else
    assert upstream.requests == 1


async def test_odd_host_headers_still_go_to_a_configured_upstream() -> None:
    upstream = UpstreamApp("a")
    async with proxied(upstream) as (_, client):
        for host in ("evil.example", "evil.example:22", "127.0.0.1:1", "[::1]:80", "a" * 300):
            response = await client.get("/", headers={"host": host})
            assert response.headers["x-upstream"] == "a"
    assert upstream.requests == 5


async def test_admin_is_not_reachable_through_the_proxied_path() -> None:
    upstream = UpstreamApp("a")
    async with running(upstream) as upstream_url:
        proxy = LeastTimeProxy(
            upstreams=[Upstream(upstream_url, name="a")], upstream_client=UPSTREAM_CLIENT
        )
        app = Starlette(
            routes=[Mount("/_ops", app=AdminApp(proxy)), Mount("/api", app=proxy)],
            lifespan=proxy.lifespan,
        )
        async with running(app, lifespan="on") as url, httpx.AsyncClient(base_url=url) as client:
            through_proxy = await client.get("/api/_ops/metrics")
            through_proxy_status = await client.get("/api/status")
            direct = await client.get("/_ops/status")
    assert through_proxy.headers["x-upstream"] == "a"
    assert through_proxy.json()["path"] == "/_ops/metrics"
    assert through_proxy_status.headers["x-upstream"] == "a"
    assert direct.json()["service"] == "leasttime"


@pytest.mark.parametrize(
    "request_bytes",
    [
        # Content-Length and Transfer-Encoding together, a second request hidden in the body.
        b"POST / HTTP/1.1\r\nhost: lb\r\ncontent-length: 44\r\ntransfer-encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: lb\r\n\r\n",
        # Two different Content-Lengths.
        b"POST / HTTP/1.1\r\nhost: lb\r\ncontent-length: 4\r\ncontent-length: 40\r\n\r\n"
        b"abcdGET /smuggled HTTP/1.1\r\nhost: lb\r\n\r\n",
        # A Transfer-Encoding the server does not know.
        b"POST / HTTP/1.1\r\nhost: lb\r\ntransfer-encoding: gzip, chunked\r\n\r\n"
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: lb\r\n\r\n",
    ],
)
@pytest.mark.parametrize("http", ["httptools", "h11"])
async def test_request_smuggling_shapes_are_refused_or_forwarded_safely(
    request_bytes: bytes, http: str
) -> None:
    """The server in front either refuses the shape or parses it one way; the upstream must then
    see exactly the requests and bodies the front parsed, re-framed, never the raw bytes."""
    upstream = UpstreamApp("a")
    parsed: list[tuple[str, bytearray]] = []  # what the front server made of the bytes

    async with running(upstream) as upstream_url:
        proxy = LeastTimeProxy(
            upstreams=[Upstream(upstream_url, name="a")], upstream_client=UPSTREAM_CLIENT
        )

        async def front(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await proxy(scope, receive, send)
                return
            body = bytearray()
            parsed.append((scope["path"], body))

            async def recording_receive() -> dict[str, Any]:
                message: dict[str, Any] = await receive()
                if message["type"] == "http.request":
                    body.extend(message.get("body", b""))
                return message

            await proxy(scope, recording_receive, send)

        async with running(front, http=http) as url:
            answer = await exchange(int(url.rsplit(":", 1)[1]), request_bytes, limit=2)
            await proxy.aclose()
    assert not answer.startswith(b"HTTP/1.1 500")
    assert upstream.requests == len(upstream.seen) <= len(parsed)
    assert upstream.seen == [(path, bytes(body)) for path, body in parsed][: len(upstream.seen)]


async def test_two_host_headers_are_a_bad_request_not_an_upstream_failure() -> None:
    upstream = UpstreamApp("a")
    async with proxied(upstream) as (proxy, client):
        answer = await exchange(
            port_of(client), b"GET / HTTP/1.1\r\nhost: one.example\r\nhost: two.example\r\n\r\n"
        )
        server = proxy.balancer["a"]
    assert answer.startswith(b"HTTP/1.1 400")
    assert b"more than one Host header" in answer
    assert (upstream.requests, server.failures, server.inflight) == (0, 0, 0)


@pytest.mark.parametrize("upstream_client", ["lean", "httpx"])
async def test_a_path_the_http_client_refuses_is_a_bad_request_not_an_upstream_failure(
    upstream_client: Any,
) -> None:
    # uvicorn refuses such a path itself; an app in front of the proxy, or another server,
    # may hand it over in the scope.
    upstream = UpstreamApp("a")
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async with running(upstream) as upstream_url:
        proxy = LeastTimeProxy(
            upstreams=[Upstream(upstream_url, name="a")], upstream_client=upstream_client
        )
        async with proxy.lifespan():
            scope = {
                "type": "http",
                "method": "GET",
                "scheme": "http",
                "path": "/caf\u00e9",
                "raw_path": b"/caf\xc3\xa9",
                "query_string": b"",
                "headers": [(b"host", b"x")],
                "client": ("127.0.0.1", 5000),
            }
            await proxy(scope, receive, send)
        server = proxy.balancer["a"]
    assert sent[0]["status"] == 400
    if upstream_client == "httpx":  # httpx takes only ASCII in a path: refused before sending
        assert sent[1]["body"] == b"bad request"
    else:  # the lean client sends the bytes as they came; the upstream (uvicorn) refuses them
        assert sent[1]["body"] == b"Invalid HTTP request received."
    assert upstream.requests == 0
    assert (server.failures, server.inflight) == (0, 0)


async def test_content_length_with_transfer_encoding_is_reframed() -> None:
    """h11 accepts both headers and reads the chunked body (httptools refuses the request)."""
    upstream = UpstreamApp("a")
    async with running(upstream) as upstream_url:
        proxy = LeastTimeProxy(
            upstreams=[Upstream(upstream_url, name="a")], upstream_client=UPSTREAM_CLIENT
        )
        async with running(proxy, http="h11") as url:
            head = b"POST /x HTTP/1.1\r\nhost: lb\r\ncontent-length: 3\r\n"
            body = b"transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            answer = await exchange(int(url.rsplit(":", 1)[1]), head + body)
            await proxy.aclose()
    assert answer.startswith(b"HTTP/1.1 200")
    assert upstream.seen == [("/x", b"hello")]
