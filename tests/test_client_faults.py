"""Clients that misbehave, many times over: nothing in flight, no upstream connection, no memory
left behind.

``CLIENT_FAULTS`` sets the count per case (100 in the suite; run ``CLIENT_FAULTS=1000 pytest
tests/test_client_faults.py`` for the full figure).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.abc
import pytest

from tests.servers import UpstreamApp, wait_until
from tests.test_proxy import proxied

pytestmark = pytest.mark.anyio

COUNT = int(os.environ.get("CLIENT_FAULTS", "100"))


def established_to(port: int) -> int:
    """TCP connections in ESTABLISHED state whose local port is ``port`` (the upstream's side)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                count += 1
    return count


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def connect(port: int) -> anyio.abc.SocketStream:
    return await anyio.connect_tcp("127.0.0.1", port)


async def leave_before_headers(port: int) -> None:
    async with await connect(port) as stream:
        await stream.send(b"GET /?delay=0.05 HTTP/1.1\r\nhost: lb\r\n\r\n")
        await anyio.sleep(0.005)


async def leave_mid_upload(port: int) -> None:
    async with await connect(port) as stream:
        head = b"POST /r/upload HTTP/1.1\r\nhost: lb\r\ncontent-length: 100000\r\n\r\n"
        await stream.send(head + b"u" * 1000)
        await anyio.sleep(0.002)


async def leave_mid_download(port: int) -> None:
    async with await connect(port) as stream:
        await stream.send(
            b"GET /r/stream?chunks=100000&size=16384&pause=0.001 HTTP/1.1\r\nhost: lb\r\n\r\n"
        )
        received = 0
        while received < 20_000:
            received += len(await stream.receive())


async def upload_slowly(port: int) -> None:
    async with await connect(port) as stream:
        await stream.send(b"POST /r/upload HTTP/1.1\r\nhost: lb\r\ncontent-length: 1000\r\n\r\n")
        for _ in range(10):
            await anyio.sleep(0.002)
            await stream.send(b"s" * 100)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.split(b"\r\n\r\n", 1)[1]:
            answer += await stream.receive()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
        assert answer.split(b"\r\n\r\n", 1)[1].startswith(b"1000 ")


@pytest.mark.parametrize(
    "fault", [leave_before_headers, leave_mid_upload, leave_mid_download, upload_slowly]
)
async def test_client_faults_leave_nothing_behind(
    fault: Callable[[int], Awaitable[None]],
) -> None:
    upstream = UpstreamApp("a")
    async with proxied(upstream) as (proxy, client):
        assert (await client.get("/")).status_code == 200
        upstream_url = proxy.upstreams["a"].url
        assert upstream_url is not None
        assert upstream_url.port is not None
        upstream_port = upstream_url.port
        proxy_port = int(str(client.base_url).rstrip("/").rsplit(":", 1)[1])
        baseline = established_to(upstream_port)
        for _ in range(20):  # warm up: allocator and caches settle before RSS is read
            await fault(proxy_port)
        rss_before = rss_mib()
        for _ in range(COUNT):
            await fault(proxy_port)
        await wait_until(lambda: proxy.balancer["a"].inflight == 0, limit=10)
        await wait_until(lambda: upstream.streaming == 0, limit=10)
        await wait_until(lambda: established_to(upstream_port) <= baseline + 1, limit=10)
        rss_after = rss_mib()
        statuses = [(await client.get("/")).status_code for _ in range(20)]
    assert statuses == [200] * 20
    assert rss_after - rss_before < 10, f"RSS grew from {rss_before:.1f} to {rss_after:.1f} MiB"
