"""The admin app: /metrics parsed with prometheus-client's own parser, and /status as JSON."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from asgi_leasttime import LeastTimeProxy, Upstream
from asgi_leasttime.metrics import AdminApp
from tests.servers import UpstreamApp, running, running_many

pytestmark = pytest.mark.anyio


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_and_status() -> None:
    failing = UpstreamApp("b")
    failing.fail_with = 503
    async with running_many(UpstreamApp("a"), failing) as urls:
        proxy = LeastTimeProxy(
            upstreams=[Upstream(urls[0], name="a"), Upstream(urls[1], name="b")], name="shop"
        )
        admin = AdminApp(proxy)
        async with (
            running(proxy) as url,
            httpx.AsyncClient(base_url=url) as client,
            httpx.AsyncClient(transport=httpx.ASGITransport(app=admin), base_url="http://a") as ops,
        ):
            for _ in range(6):
                await client.get("/")
            proxy.set_status("b", up=False)
            metrics = await ops.get("/metrics")
            status = await ops.get("/status")
            missing = await ops.get("/nothing")
            await proxy.aclose()
    assert metrics.status_code == 200
    found = samples(metrics.text)
    ok = found[
        (
            "asgi_leasttime_service_requests_total",
            frozenset(
                {"code": "200", "method": "GET", "protocol": "http", "service": "shop"}.items()
            ),
        )
    ]
    failed = found.get(
        (
            "asgi_leasttime_service_requests_total",
            frozenset(
                {"code": "503", "method": "GET", "protocol": "http", "service": "shop"}.items()
            ),
        ),
        0,
    )
    assert ok + failed == 6
    assert failed >= 1
    up = {
        dict(labels)["url"]: value
        for (name, labels), value in found.items()
        if name == "asgi_leasttime_service_server_up"
    }
    assert up == {urls[0]: 1.0, urls[1]: 0.0}
    assert (
        found[
            (
                "asgi_leasttime_server_inflight_requests",
                frozenset({"service": "shop", "server": "a"}.items()),
            )
        ]
        == 0
    )
    assert (
        found[
            (
                "asgi_leasttime_server_average_ttfb_seconds",
                frozenset({"service": "shop", "server": "a"}.items()),
            )
        ]
        > 0
    )
    assert any(
        name == "asgi_leasttime_service_request_duration_seconds_bucket" for name, _ in found
    )
    down = {
        (dict(labels)["server"], dict(labels)["source"])
        for (name, labels), _ in found.items()
        if name == "asgi_leasttime_server_down_seconds"
    }
    assert down == {("b", "manual")}
    joined = {
        (dict(labels)["server"], dict(labels)["origin"]): value
        for (name, labels), value in found.items()
        if name == "asgi_leasttime_server_joined_timestamp_seconds"
    }
    assert set(joined) == {("a", "config"), ("b", "config")}
    assert all(abs(value - time.time()) < 60 for value in joined.values())
    document = json.loads(status.text)
    assert document["service"] == "shop"
    assert [u["name"] for u in document["upstreams"]] == ["a", "b"]
    assert document["upstreams"][1]["up"] is False
    assert list(document["upstreams"][1]["down"]) == ["manual"]
    assert document["upstreams"][0]["down"] == {}
    assert document["upstreams"][0]["origin"] == "config"
    assert document["upstreams"][0]["address"] is None
    assert missing.status_code == 404


async def test_metrics_without_prometheus_client_say_how(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    proxy = LeastTimeProxy(upstreams=["http://127.0.0.1:9"])
    admin = AdminApp(proxy)
    transport = httpx.ASGITransport(app=admin)
    async with httpx.AsyncClient(transport=transport, base_url="http://a") as ops:
        response = await ops.get("/metrics")
    assert response.status_code == 501
    assert "asgi-leasttime[metrics]" in response.text
