"""The lean upstream client on its own: reuse, limits, framing, timeouts."""

from __future__ import annotations

import anyio
import httpx
import pytest

from asgi_leasttime import _lean as lean
from asgi_leasttime._lean import LeanClient
from asgi_leasttime.errors import NoResponse, NotConnected, ResponseBroken
from tests import rawserver
from tests.rawserver import raw_upstream
from tests.servers import UpstreamApp, running

pytestmark = pytest.mark.anyio


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


async def read_body(response: lean.LeanResponse) -> bytes:
    """The whole body; every piece but the last says more may follow."""
    pieces = []
    while True:
        chunk, more = await response.next_chunk()
        pieces.append(chunk)
        if not more:
            return b"".join(pieces)


async def get(client: LeanClient, url: str, target: bytes = b"/") -> tuple[int, bytes]:
    response = await client.send("GET", *host_port(url), target, [(b"host", b"t")], None)
    try:
        return response.status_code, await read_body(response)
    finally:
        await response.aclose()


async def test_keep_alive_connections_are_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    made = 0
    original = lean._Connection.__init__

    def counting(self: lean._Connection) -> None:
        nonlocal made
        made += 1
        original(self)

    monkeypatch.setattr(lean._Connection, "__init__", counting)
    async with running(UpstreamApp("a")) as url:
        client = LeanClient(timeout=httpx.Timeout(5))
        results = [await get(client, url) for _ in range(10)]
        await client.aclose()
    assert {status for status, _ in results} == {200}
    assert made == 1


async def test_the_pool_limit_queues_and_times_out() -> None:
    async with running(UpstreamApp("a", delay=0.3)) as url:
        client = LeanClient(
            timeout=httpx.Timeout(5, pool=0.1), limits=httpx.Limits(max_connections=1)
        )
        outcomes: list[object] = []

        async def one() -> None:
            try:
                outcomes.append((await get(client, url))[0])
            except NotConnected as exc:
                outcomes.append((type(exc), exc.pool_full, exc.timed_out))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one)
            tg.start_soon(one)
        assert sorted(map(str, outcomes)) == sorted(map(str, [200, (NotConnected, True, True)]))
        # The slot came back: the next request goes through.
        assert (await get(client, url))[0] == 200
        await client.aclose()


async def test_a_body_that_ends_with_the_connection() -> None:
    async def close_delimited(stream: anyio.abc.SocketStream) -> None:
        await rawserver.read_head(stream)
        await stream.send(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end")

    async with raw_upstream(close_delimited) as url:
        client = LeanClient(timeout=httpx.Timeout(5))
        assert await get(client, url) == (200, b"until the end")
        await client.aclose()


async def test_a_read_timeout_while_waiting_for_headers() -> None:
    async with running(UpstreamApp("a", delay=1.0)) as url:
        client = LeanClient(timeout=httpx.Timeout(5, read=0.1))
        with pytest.raises(NoResponse) as caught:
            await get(client, url)
        assert caught.value.timed_out
        assert not caught.value.reused
        await client.aclose()


async def test_connection_refused_is_never_connected() -> None:
    async with running(UpstreamApp("a")) as url:
        pass  # the port is closed now
    client = LeanClient(timeout=httpx.Timeout(5))
    with pytest.raises(NotConnected) as caught:
        await get(client, url)
    assert not caught.value.timed_out
    assert not caught.value.pool_full
    await client.aclose()


async def test_the_last_piece_of_a_body_says_nothing_more_follows() -> None:
    async def two_pieces(stream: anyio.abc.SocketStream) -> None:
        await rawserver.read_head(stream)
        await stream.send(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nfirst")
        await anyio.sleep(0.05)
        await stream.send(b"-last")

    async with raw_upstream(two_pieces) as url:
        client = LeanClient(timeout=httpx.Timeout(5))
        response = await client.send("GET", *host_port(url), b"/", [], None)
        # The proxy sends the last piece as the response's last message instead of an empty one.
        assert await response.next_chunk() == (b"first", True)
        assert await response.next_chunk() == (b"-last", False)
        await response.aclose()
        await client.aclose()


async def test_a_read_timeout_mid_body() -> None:
    async def stalls(stream: anyio.abc.SocketStream) -> None:
        await rawserver.read_head(stream)
        await stream.send(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nfirst")
        await anyio.sleep(2)

    async with raw_upstream(stalls) as url:
        client = LeanClient(timeout=httpx.Timeout(5, read=0.1))
        response = await client.send("GET", *host_port(url), b"/", [], None)
        assert await response.next_chunk() == (b"first", True)
        with anyio.fail_after(1):  # checked every tenth of the read timeout
            with pytest.raises(ResponseBroken) as caught:
                await response.next_chunk()
            assert caught.value.timed_out
        await response.aclose()
        await client.aclose()


async def test_no_read_timeout_means_no_deadline_checks() -> None:
    async with running(UpstreamApp("a", delay=0.05)) as url:
        client = LeanClient(timeout=httpx.Timeout(5, read=None))
        assert client._deadlines is None
        assert (await get(client, url))[0] == 200
        await client.aclose()


async def test_idle_connections_kept_are_capped_by_max_keepalive_connections() -> None:
    async with running(UpstreamApp("a", delay=0.1)) as url:
        limits = httpx.Limits(max_connections=10, max_keepalive_connections=1)
        client = LeanClient(timeout=httpx.Timeout(5), limits=limits)
        async with anyio.create_task_group() as tg:
            for _ in range(4):  # four at once: four connections
                tg.start_soon(get, client, url)
        [pool] = client._pools.values()
        assert (len(pool.idle), pool.active) == (1, 0)
        await client.aclose()
