"""The admin app's write API: a token, JSON in and out, every change through the state store."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator

import httpx
import pytest

from asgi_leasttime import LeastTimeProxy, Upstream
from asgi_leasttime.metrics import AdminApp
from asgi_leasttime.options import OptionError
from tests.servers import UpstreamApp, running, running_many

pytestmark = pytest.mark.anyio

TOKEN = "a-token-of-at-least-16-characters"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@contextlib.asynccontextmanager
async def admin_of(
    *apps: UpstreamApp, token: str | None = TOKEN
) -> AsyncIterator[tuple[LeastTimeProxy, httpx.AsyncClient, httpx.AsyncClient, list[str]]]:
    """A proxy over real upstreams, a client for it and one for its admin app."""
    async with running_many(*apps) as urls:
        proxy = LeastTimeProxy(
            upstreams=[Upstream(url, name=app.name) for url, app in zip(urls, apps, strict=True)]
        )
        transport = httpx.ASGITransport(app=AdminApp(proxy, token=token))
        async with (
            running(proxy, lifespan="on") as url,
            httpx.AsyncClient(base_url=url, timeout=10) as client,
            httpx.AsyncClient(transport=transport, base_url="http://admin") as admin,
        ):
            yield proxy, client, admin, urls


async def served(client: httpx.AsyncClient, count: int) -> Counter[str]:
    return Counter([(await client.get("/")).headers["x-upstream"] for _ in range(count)])


async def test_marking_down_fencing_and_weighing_through_the_api() -> None:
    async with admin_of(UpstreamApp("a"), UpstreamApp("b")) as (proxy, client, admin, _):
        answer = await admin.post("/upstreams/a", json={"down": True}, headers=AUTH)
        assert answer.status_code == 200
        assert (answer.json()["up"], list(answer.json()["down"])) == (False, ["manual"])
        assert await served(client, 10) == {"b": 10}
        answer = await admin.post("/upstreams/a", json={"down": False}, headers=AUTH)
        assert answer.json()["up"] is True
        answer = await admin.post("/upstreams/b", json={"fenced": True, "weight": 3}, headers=AUTH)
        assert (answer.json()["fenced"], answer.json()["weight"]) == (True, 3)
        assert await served(client, 5) == {"a": 5}
        assert proxy.upstreams["b"].weight == 3


async def test_adding_and_removing_through_the_api() -> None:
    async with running(UpstreamApp("c")) as c_url, admin_of(UpstreamApp("a")) as (
        proxy, client, admin, _,
    ):  # fmt: skip
        answer = await admin.put("/upstreams/c", json={"url": c_url, "weight": 2}, headers=AUTH)
        assert (answer.status_code, answer.json()["name"], answer.json()["weight"]) == (200, "c", 2)
        assert "c" in await served(client, 20)
        again = await admin.put("/upstreams/c", json={"url": c_url}, headers=AUTH)
        assert again.status_code == 409
        gone = await admin.delete("/upstreams/a", headers=AUTH)
        assert (gone.status_code, gone.json()) == (200, {"removed": "a"})
        assert list(proxy.upstreams) == ["c"]
        assert await served(client, 5) == {"c": 5}


async def test_an_upstream_named_by_its_url_is_addressed_percent_encoded() -> None:
    async with running(UpstreamApp("a")) as url:
        proxy = LeastTimeProxy(upstreams=[url])  # named by its URL
        transport = httpx.ASGITransport(app=AdminApp(proxy, token=TOKEN))
        async with httpx.AsyncClient(transport=transport, base_url="http://admin") as admin:
            encoded = url.replace(":", "%3A").replace("/", "%2F")
            answer = await admin.post(f"/upstreams/{encoded}", json={"down": True}, headers=AUTH)
        assert answer.status_code == 200, answer.text
        assert not proxy.balancer[url].up


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"authorization": "Bearer wrong-token-of-some-length"}, 401),
        ({"authorization": f"Basic {TOKEN}"}, 401),
        ({"authorization": f"bearer {TOKEN}"}, 200),
    ],
)
async def test_the_token_is_required(headers: dict[str, str], status: int) -> None:
    async with admin_of(UpstreamApp("a")) as (proxy, _, admin, _urls):
        answer = await admin.post("/upstreams/a", json={"down": True}, headers=headers)
        assert answer.status_code == status
        assert proxy.balancer["a"].up is (status != 200)
        if status == 401:
            assert answer.headers["www-authenticate"] == "Bearer"


async def test_without_a_token_the_write_api_is_off() -> None:
    async with admin_of(UpstreamApp("a"), token=None) as (proxy, _, admin, _urls):
        answer = await admin.post("/upstreams/a", json={"down": True}, headers=AUTH)
        assert answer.status_code == 403
        assert proxy.balancer["a"].up
        assert (await admin.get("/status")).status_code == 200  # reading stays open


def test_a_short_token_is_refused() -> None:
    with pytest.raises(OptionError, match="token"):
        AdminApp(LeastTimeProxy(upstreams=["http://127.0.0.1:9"]), token="short")


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/upstreams/a", b'{"weight": -1}', 400),
        ("POST", "/upstreams/a", b'{"weight": "heavy"}', 400),
        ("POST", "/upstreams/a", b'{"down": "yes"}', 400),
        ("POST", "/upstreams/a", b'{"colour": "red"}', 400),
        ("POST", "/upstreams/a", b"{}", 400),
        ("POST", "/upstreams/a", b"not json", 400),
        ("POST", "/upstreams/a", b"[1, 2]", 400),
        ("POST", "/upstreams/a", b'{"down": true, "pad": "' + b"x" * 70_000 + b'"}', 400),
        ("POST", "/upstreams/nobody", b'{"down": true}', 404),
        ("PUT", "/upstreams/z", b'{"url": "ftp://x"}', 400),
        ("PUT", "/upstreams/z", b'{"weight": 2}', 400),
        ("PUT", "/upstreams/z", b'{"url": "http://127.0.0.1:9", "weight": "heavy"}', 400),
        ("PUT", "/upstreams/z", b'{"url": "http://127.0.0.1:9", "fenced": "yes"}', 400),
        ("GET", "/upstreams/a", b"", 405),
        ("POST", "/status", b"{}", 405),
    ],
)
async def test_bad_calls_get_a_clear_answer_and_change_nothing(
    method: str, path: str, body: bytes, status: int
) -> None:
    async with admin_of(UpstreamApp("a")) as (proxy, _, admin, _urls):
        answer = await admin.request(method, path, content=body, headers=AUTH)
        assert answer.status_code == status, answer.text
        assert "error" in answer.json()
        assert (list(proxy.upstreams), proxy.balancer["a"].up) == (["a"], True)
        assert proxy.balancer["a"].weight == 1
