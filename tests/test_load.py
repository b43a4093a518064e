"""A reduced load run (the full one is benchmarks/load.py): 2,000 requests, 64 at a time."""

from __future__ import annotations

import anyio
import httpx
import pytest

from tests.servers import UpstreamApp, wait_until
from tests.test_proxy import proxied

pytestmark = pytest.mark.anyio

REQUESTS, CONCURRENCY = 2_000, 64


async def test_load_through_three_upstreams_one_slow() -> None:
    upstreams = UpstreamApp("fast-1"), UpstreamApp("fast-2"), UpstreamApp("slow", delay=0.05)
    statuses: list[int] = []
    async with proxied(*upstreams) as (proxy, client):
        base_url = client.base_url
        remaining = REQUESTS

        async def worker() -> None:
            nonlocal remaining
            # One connection per worker: httpx's shared pool is slow at 64 connections.
            async with httpx.AsyncClient(base_url=base_url, timeout=30) as own:
                while remaining > 0:
                    remaining -= 1
                    try:
                        statuses.append((await own.get("/")).status_code)
                    except httpx.HTTPError:
                        statuses.append(0)

        with anyio.fail_after(240):
            async with anyio.create_task_group() as tg:
                for _ in range(CONCURRENCY):
                    tg.start_soon(worker)
        await wait_until(lambda: all(server.inflight == 0 for server in proxy.balancer))
        served = {server.name: server.requests for server in proxy.balancer}
    assert len(statuses) == REQUESTS
    assert statuses.count(200) == REQUESTS
    assert sum(served.values()) == REQUESTS
    assert all(count > 0 for count in served.values())
