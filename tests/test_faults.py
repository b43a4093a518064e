"""Upstream faults: each gets its answer, in-flight returns to 0, and the pool still works after."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from asgi_leasttime import LeastTimeProxy, PassiveHealthCheck, Upstream
from tests import rawserver
from tests.rawserver import Behaviour, raw_upstream
from tests.servers import UPSTREAM_CLIENT, running, wait_until

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def faulty(
    behaviour: Behaviour, **options: Any
) -> AsyncIterator[tuple[LeastTimeProxy, httpx.AsyncClient]]:
    """The proxy in front of one misbehaving upstream and one healthy one (fenced, so the
    faulty one takes the traffic until a test unfences it)."""
    async with (
        raw_upstream(behaviour) as bad,
        raw_upstream(rawserver.healthy) as good,
    ):
        proxy = LeastTimeProxy(
            upstreams=[Upstream(bad, name="bad"), Upstream(good, name="good", fenced=True)],
            upstream_client=UPSTREAM_CLIENT,
            **options,
        )
        async with (
            running(proxy, lifespan="on") as url,
            httpx.AsyncClient(base_url=url, timeout=10) as client,
        ):
            yield proxy, client


async def still_healthy(proxy: LeastTimeProxy, client: httpx.AsyncClient) -> None:
    """In-flight back to 0 everywhere, and a burst of normal requests succeeds."""
    await wait_until(lambda: all(s.inflight == 0 for s in proxy.balancer))
    proxy.set_fenced("good", False)
    proxy.set_status("bad", up=False)
    statuses = [(await client.get("/")).status_code for _ in range(20)]
    assert statuses == [200] * 20


async def test_reset_before_headers_is_502() -> None:
    async with faulty(rawserver.reset_before_headers) as (proxy, client):
        response = await client.get("/")
        assert (response.status_code, response.text) == (502, "bad gateway")
        assert proxy.balancer["bad"].failures == 1
        await still_healthy(proxy, client)


async def test_reset_mid_body_cuts_the_response_off() -> None:
    async with faulty(rawserver.reset_mid_body) as (proxy, client):
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get("/")
        await still_healthy(proxy, client)


async def test_silence_after_headers_is_cut_off_at_the_read_timeout() -> None:
    timeout = httpx.Timeout(5.0, read=0.3)
    async with faulty(rawserver.silent_after_headers, timeout=timeout) as (proxy, client):
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get("/")
        await still_healthy(proxy, client)


async def test_slow_drip_streams_through_whole() -> None:
    async with faulty(rawserver.slow_drip) as (proxy, client):
        response = await client.get("/")
        assert (response.status_code, response.content) == (200, b"d" * 20)
        await still_healthy(proxy, client)


async def test_keepalive_closed_early_by_the_upstream_loses_nothing() -> None:
    async with faulty(rawserver.closes_keepalive_early) as (proxy, client):
        statuses = [(await client.get("/")).status_code for _ in range(50)]
        assert statuses == [200] * 50
        await still_healthy(proxy, client)


async def test_a_storm_of_503_is_passed_on_and_ejects_with_a_passive_check() -> None:
    passive = PassiveHealthCheck(max_failed_attempts=5)
    async with faulty(rawserver.storm_of_503, passive_health_check=passive) as (proxy, client):
        statuses = [(await client.get("/")).status_code for _ in range(8)]
        assert statuses[:5] == [503] * 5  # passed on as they are
        assert statuses[5:] == [503] * 3  # then ours: nothing else is available
        assert (await client.get("/")).text == "no available server"
        assert not proxy.balancer["bad"].up
        await still_healthy(proxy, client)
