"""Clients that leave: a thousand of them mid-response, and nothing is left behind."""

from __future__ import annotations

import pytest

from tests.servers import wait_until
from tests.test_proxy import UpstreamApp, inflight, proxied, settled

pytestmark = pytest.mark.anyio

DISCONNECTS = 1000


async def test_a_thousand_clients_leaving_mid_response() -> None:
    upstreams = UpstreamApp("a"), UpstreamApp("b")
    async with proxied(*upstreams) as (proxy, client):
        for _ in range(DISCONNECTS):
            # Endless unless abandoned: 100,000 chunks, 1 ms apart.
            async with client.stream("GET", "/r/stream?chunks=100000&size=16384&pause=0.001") as r:
                async for _chunk in r.aiter_raw():
                    break  # leave after the first chunk: httpx closes the connection
        assert await settled(proxy) == [0, 0]
        # The proxy closed its upstream connections too: every upstream stream has ended.
        await wait_until(lambda: all(app.streaming == 0 for app in upstreams))
        responses = [await client.get("/") for _ in range(100)]
        assert [r.status_code for r in responses] == [200] * 100
        assert inflight(proxy) == [0, 0]
        served = sum(server.requests for server in proxy.balancer)
    assert served == DISCONNECTS + 100
