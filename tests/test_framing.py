"""Response and request framing against raw upstreams that misbehave on purpose, on both clients.

Each test is one class of fault found by running the proxy against real servers: bytes after a
complete response, trailers, early answers, bodiless answers with lengths, odd transfer codings,
dot segments, and the bytes each client adds or refuses.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import pytest

from asgi_leasttime import LeastTimeProxy, Upstream
from tests.rawserver import (
    Behaviour,
    Scripted,
    answer_and_reset,
    raw_upstream,
    read_head,
    reset,
    threaded_upstream,
)
from tests.servers import running

pytestmark = pytest.mark.anyio

HELLO = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"
SMUGGLED = b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\nx-smuggled: 1\r\n\r\nSMUGGLE"


@pytest.fixture(params=["lean", "httpx"])
def upstream_client(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextlib.asynccontextmanager
async def behind(
    behaviour: Behaviour, upstream_client: str, *, base: str = "", **options: Any
) -> AsyncIterator[tuple[LeastTimeProxy, httpx.AsyncClient]]:
    """The proxy in front of one raw upstream; a client pointed at the proxy."""
    async with raw_upstream(behaviour) as url:
        proxy = LeastTimeProxy(
            upstreams=[Upstream(url + base, name="raw")], upstream_client=upstream_client, **options
        )
        async with (
            running(proxy, lifespan="on") as proxy_url,
            httpx.AsyncClient(base_url=proxy_url, timeout=10) as client,
        ):
            yield proxy, client


async def raw_exchange(client: httpx.AsyncClient, request: bytes) -> bytes:
    """Send ``request`` as written (no client library normalising it); the whole answer."""
    host, port = str(client.base_url).rstrip("/").removeprefix("http://").split(":")
    answer = b""
    async with await anyio.connect_tcp(host, int(port)) as stream:
        await stream.send(request)
        with anyio.move_on_after(5):
            while b"\r\n\r\n" not in answer:
                try:
                    answer += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
    return answer


def answering(answer: bytes | Callable[[bytes], bytes]) -> Scripted:
    return Scripted(answer if callable(answer) else lambda _: answer)


# -- bytes after a complete response --------------------------------------------------------------


async def test_a_second_response_in_the_same_write_reaches_nobody(upstream_client: str) -> None:
    upstream = answering(HELLO + SMUGGLED)
    async with behind(upstream, upstream_client) as (proxy, client):
        for _ in range(3):
            response = await client.get("/x")
            assert (response.status_code, response.content) == (200, b"hello")
            assert response.headers.get_list("content-length") == ["5"]
            # Another client, on its own connection, after the first:
            async with httpx.AsyncClient(base_url=client.base_url) as other:
                posted = await other.post("/y", content=b"data")
            assert (posted.status_code, posted.content) == (200, b"hello")
            assert "x-smuggled" not in posted.headers
    assert upstream.per_connection() == [1] * len(upstream.requests)  # never reused
    assert proxy.balancer["raw"].failures == 0


async def test_bytes_on_an_idle_pooled_connection_close_it(upstream_client: str) -> None:
    async def speaks_when_idle(stream: Any) -> None:
        await read_head(stream)
        await stream.send(HELLO)
        await anyio.sleep(0.05)
        await stream.send(SMUGGLED)  # unasked, on a connection the proxy keeps for reuse
        await anyio.sleep(5)

    async with behind(speaks_when_idle, upstream_client) as (_, client):
        assert (await client.get("/")).content == b"hello"
        await anyio.sleep(0.2)
        posted = await client.post("/", content=b"data")
        assert (posted.status_code, posted.content) == (200, b"hello")


@pytest.mark.parametrize(
    ("method", "answer"),
    [
        ("HEAD", HELLO),  # a body after an answer to HEAD
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\nhello"),
        ("GET", b'HTTP/1.1 304 Not Modified\r\netag: "e"\r\n\r\nhello'),
    ],
)
async def test_a_body_where_none_can_be_is_never_read_as_the_next_answer(
    upstream_client: str, method: str, answer: bytes
) -> None:
    def answer_for(request: bytes) -> bytes:
        return HELLO if request.startswith(b"POST") else answer

    upstream = answering(answer_for)
    async with behind(upstream, upstream_client) as (proxy, client):
        first = await client.request(method, "/")
        assert first.content == b""
        posted = await client.post("/", content=b"data")
        assert (posted.status_code, posted.content) == (200, b"hello")
        assert proxy.balancer["raw"].failures == 0


# -- trailers -------------------------------------------------------------------------------------


async def test_trailer_fields_never_become_header_fields(upstream_client: str) -> None:
    chunked_with_trailers = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: set-cookie, location\r\n\r\n"
        b"5\r\nhello\r\n0\r\nset-cookie: evil=1\r\nlocation: http://evil.example/\r\n\r\n"
    )
    upstream = answering(chunked_with_trailers)
    async with behind(upstream, upstream_client) as (_, client):
        for _ in range(2):  # the connection stays good for the next request
            response = await client.get("/")
            assert (response.status_code, response.content) == (200, b"hello")
            assert "set-cookie" not in response.headers
            assert "location" not in response.headers
            assert "trailer" not in response.headers
    assert upstream.per_connection() == [2]


# -- an answer before the request body is read ----------------------------------------------------


async def test_an_early_answer_and_a_reset_is_forwarded_not_a_502(upstream_client: str) -> None:
    """The upstream answers 401 after the head and closes without reading 10 MB of body; the
    kernel resets the connection for the unread bytes. As gunicorn does for 401 and 413."""
    if upstream_client == "httpx":
        pytest.xfail(
            "httpcore's anyio streams read only while a read is awaited: the answer is still in "
            "the socket when the write fails, and the failed write closes the socket unread"
        )

    async def refuses_the_body(stream: Any) -> None:
        await read_head(stream)
        await stream.send(
            b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 12\r\nconnection: close\r\n\r\n"
            b"unauthorized"
        )
        reset(stream)  # at once, as a server that closes with the body unread

    async with behind(refuses_the_body, upstream_client) as (proxy, client):
        for _ in range(10):
            response = await client.post("/", content=b"x" * 10_000_000)
            assert (response.status_code, response.content) == (401, b"unauthorized")
        assert proxy.balancer["raw"].failures == 0


async def test_an_early_answer_from_another_process_survives_the_reset(
    upstream_client: str,
) -> None:
    """The same with the upstream outside the proxy's event loop: the reset can meet the proxy's
    next write before its reader has seen the answer."""
    if upstream_client == "httpx":
        pytest.xfail("as above")
    with threaded_upstream(answer_and_reset) as url:
        proxy = LeastTimeProxy(
            upstreams=[Upstream(url, name="raw")], upstream_client=upstream_client
        )
        async with (
            running(proxy, lifespan="on") as proxy_url,
            httpx.AsyncClient(base_url=proxy_url, timeout=10) as client,
        ):
            statuses = [
                (await client.post("/", content=b"x" * 4_000_000)).status_code for _ in range(20)
            ]
        assert statuses == [401] * 20
        assert proxy.balancer["raw"].failures == 0


async def test_an_early_answer_then_a_drained_body_is_forwarded(upstream_client: str) -> None:
    """The upstream answers 413 at once, then reads the body away and keeps the connection."""
    upstream_saw = []

    async def answers_then_drains(stream: Any) -> None:
        head = await read_head(stream)
        await stream.send(b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 3\r\n\r\nbig")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        received = len(head.split(b"\r\n\r\n", 1)[1])
        with anyio.move_on_after(3):
            while received < length:
                received += len(await stream.receive(65536))
        upstream_saw.append(received)

    async with behind(answers_then_drains, upstream_client) as (proxy, client):
        response = await client.post("/", content=b"x" * 5_000_000)
        assert (response.status_code, response.content) == (413, b"big")
        assert proxy.balancer["raw"].failures == 0


# -- bodiless answers, protocol switches and transfer codings -------------------------------------


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
async def test_a_length_on_a_bodiless_answer_does_not_cut_the_connection(
    upstream_client: str, status: bytes
) -> None:
    upstream = answering(b"HTTP/1.1 " + status + b'\r\ncontent-length: 1234\r\netag: "e"\r\n\r\n')
    async with behind(upstream, upstream_client) as (_, client):
        for _ in range(3):
            response = await client.get("/")
            assert response.status_code == int(status[:3])
            assert response.headers["etag"] == '"e"'
            assert response.content == b""
    assert upstream.per_connection() == [3]  # and the upstream connection is kept


@pytest.mark.parametrize(
    "answer",
    [
        # A protocol switch nobody asked for:
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: evil\r\n\r\nraw",
        # A transfer coding the proxy would have to undo:
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        # Both lengths, the smuggler's shape:
        b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
        # Two lengths that disagree:
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!",
    ],
    ids=["101-unasked", "gzip-chunked", "length-and-chunked", "two-lengths"],
)
async def test_an_ambiguous_answer_is_a_502_and_a_failure(
    upstream_client: str, answer: bytes
) -> None:
    upstream = answering(answer)
    async with behind(upstream, upstream_client) as (proxy, client):
        response = await client.get("/")
        assert (response.status_code, response.text) == (502, "bad gateway")
        assert proxy.balancer["raw"].failures == 1


async def test_two_equal_lengths(upstream_client: str) -> None:
    """RFC 9112 6.3 lets a recipient take them as one or refuse them: the lean client refuses
    (llhttp, as nginx), h11 under httpx takes one. Never two lengths to the client."""
    upstream = answering(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhello")
    async with behind(upstream, upstream_client) as (_, client):
        response = await client.get("/")
    if upstream_client == "lean":
        assert (response.status_code, response.text) == (502, "bad gateway")
    else:
        assert (response.status_code, response.content) == (200, b"hello")
        assert response.headers.get_list("content-length") == ["5"]


# -- the request target ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        b"/../secret",
        b"/a/../../secret",
        b"/%2e%2e/secret",
        b"/%2E./secret",
        b"/..%2fsecret",
        b"/a/..%5c..%5csecret",
        b"/./x",
        b"/a/..",
    ],
)
async def test_dot_segments_cannot_leave_the_base_path(upstream_client: str, path: bytes) -> None:
    upstream = answering(HELLO)
    async with behind(upstream, upstream_client, base="/base") as (proxy, client):
        answer = await raw_exchange(
            client, b"GET " + path + b" HTTP/1.1\r\nhost: example\r\nconnection: close\r\n\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert upstream.requests == []
        assert proxy.balancer["raw"].failures == 0


@pytest.mark.parametrize(
    "path",
    [
        b"/a/b.txt",
        b"/.well-known/x",
        b"/a/..b/...",
        b"/%7Bx%7D/%25/a%2Fb",
        b"/a//b",
        b"/x?a=1&a=2&b",
    ],
)
async def test_other_targets_go_byte_for_byte_below_the_base(
    upstream_client: str, path: bytes
) -> None:
    upstream = answering(HELLO)
    async with behind(upstream, upstream_client, base="/base") as (_, client):
        answer = await raw_exchange(
            client, b"GET " + path + b" HTTP/1.1\r\nhost: example\r\nconnection: close\r\n\r\n"
        )
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    [(_, request)] = upstream.requests
    assert request.startswith(b"GET /base" + path + b" HTTP/1.1\r\n")


# -- the same bytes upstream from both clients ----------------------------------------------------


def request_head(upstream: Scripted) -> list[bytes]:
    [(_, request)] = upstream.requests
    head = request.split(b"\r\n\r\n", 1)[0]
    return [line.lower() for line in head.split(b"\r\n")[1:]]


async def test_trailing_whitespace_in_a_value_is_removed_not_refused(upstream_client: str) -> None:
    upstream = answering(HELLO)
    async with behind(upstream, upstream_client) as (_, client):
        answer = await raw_exchange(
            client,
            b"GET / HTTP/1.1\r\nhost: example\r\nx-spaced: value \t\r\nconnection: close\r\n\r\n",
        )
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert b"x-spaced: value" in request_head(upstream)


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
async def test_a_request_without_a_body_gains_no_length(upstream_client: str, method: str) -> None:
    upstream = answering(HELLO)
    async with behind(upstream, upstream_client) as (_, client):
        answer = await raw_exchange(
            client, method.encode() + b" / HTTP/1.1\r\nhost: example\r\nconnection: close\r\n\r\n"
        )
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    head = request_head(upstream)
    assert not [line for line in head if line.startswith((b"content-length", b"transfer-encoding"))]


async def test_characters_outside_rfc_3986_in_the_path(upstream_client: str) -> None:
    """The lean client sends them as they came; httpx percent-encodes them (documented)."""
    upstream = answering(HELLO)
    async with behind(upstream, upstream_client) as (_, client):
        answer = await raw_exchange(
            client, b'GET /a{b}"c HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n'
        )
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    [(_, request)] = upstream.requests
    sent = b'/a{b}"c' if upstream_client == "lean" else b"/a%7Bb%7D%22c"
    assert request.startswith(b"GET " + sent + b" HTTP/1.1\r\n")
