"""Sticky sessions over HTTP through real uvicorn: Traefik's cases 12-14, signing, rotation, expiry
and tampering."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from itsdangerous import TimestampSigner

from asgi_leasttime import LeastTimeProxy, StickyCookie, Upstream
from asgi_leasttime.sticky import SALT, server_id
from tests.servers import UpstreamApp, running, running_in_thread, running_many
from tests.test_proxy import proxied

pytestmark = pytest.mark.anyio

SECRET = "correct horse battery staple"


def sticky(**options: Any) -> StickyCookie:
    options.setdefault("secret_key", SECRET)
    options.setdefault("name", "lb")
    return StickyCookie(**options)


def our_cookies(response: httpx.Response, name: str = "lb") -> list[str]:
    return [c for c in response.headers.get_list("set-cookie") if c.startswith(name + "=")]


def cookie_value(response: httpx.Response, name: str = "lb") -> str:
    (header,) = our_cookies(response, name)
    return header.split(";", 1)[0].split("=", 1)[1]


async def get(
    client: httpx.AsyncClient, cookie: str | None = None, path: str = "/"
) -> httpx.Response:
    client.cookies.clear()  # the tests say which cookie each request carries
    headers = {"cookie": f"lb={cookie}"} if cookie is not None else {}
    response = await client.get(path, headers=headers)
    assert response.status_code == 200, response.text
    return response


# -- Traefik's cases 12, 13, 14 over HTTP ---------------------------------------------------------


async def test_12_sticky_cookie_keeps_the_server() -> None:
    async with proxied(UpstreamApp("a"), UpstreamApp("b"), sticky=sticky()) as (_, client):
        first = await get(client)
        cookie = cookie_value(first)
        for _ in range(5):
            again = await get(client, cookie)
            assert again.headers["x-upstream"] == first.headers["x-upstream"]
            assert our_cookies(again) == []  # a valid cookie is not sent again


async def test_13_sticky_falls_back_when_its_server_goes_down() -> None:
    apps = UpstreamApp("a", delay=0.05), UpstreamApp("b", delay=0.05)
    async with proxied(*apps, sticky=sticky()) as (proxy, client):
        first = await get(client)
        sticky_server = first.headers["x-upstream"]
        proxy.set_status(sticky_server, up=False)
        fallback = await get(client, cookie_value(first))
        assert fallback.headers["x-upstream"] != sticky_server
        new_cookie = cookie_value(fallback)
        assert (await get(client, new_cookie)).headers["x-upstream"] == fallback.headers[
            "x-upstream"
        ]
        proxy.set_status(sticky_server, up=True)
        for _ in range(3):
            again = await get(client, new_cookie)
            assert again.headers["x-upstream"] == fallback.headers["x-upstream"]


async def test_14_sticky_reaches_a_fenced_server() -> None:
    async with proxied(UpstreamApp("a"), UpstreamApp("b"), sticky=sticky()) as (proxy, client):
        first = await get(client)
        sticky_server = first.headers["x-upstream"]
        proxy.balancer.set_fenced(sticky_server, True)
        assert (await get(client, cookie_value(first))).headers["x-upstream"] == sticky_server
        for _ in range(3):
            assert (await get(client)).headers["x-upstream"] != sticky_server


# -- what Traefik does not do ---------------------------------------------------------------------


async def test_sticky_requests_are_counted_and_timed() -> None:
    async with proxied(UpstreamApp("a"), sticky=sticky()) as (proxy, client):
        cookie = cookie_value(await get(client))
        for _ in range(4):
            await get(client, cookie)
        server = proxy.balancer["a"]
    assert server.requests == 5
    assert server.sample_count == 5


async def test_cookie_is_appended_to_the_upstreams_own() -> None:
    async with proxied(UpstreamApp("a"), sticky=sticky()) as (_, client):
        response = await get(client, path="/r/cookies?user=alice")
    cookies = response.headers.get_list("set-cookie")
    assert cookies[:2] == ["session=alice; Path=/", "theme=dark; Path=/"]
    assert len(our_cookies(response)) == 1


async def test_sliding_cookie_is_refreshed_on_every_response() -> None:
    async with proxied(UpstreamApp("a"), sticky=sticky(sliding=True, max_age=60)) as (_, client):
        cookie = cookie_value(await get(client))
        again = await get(client, cookie)
    assert len(our_cookies(again)) == 1


async def test_the_value_names_no_url_and_is_signed() -> None:
    async with proxied(UpstreamApp("a"), sticky=sticky()) as (proxy, client):
        value = cookie_value(await get(client))
        upstream_url = str(proxy.upstreams["a"].url)
    assert "127.0.0.1" not in value
    assert upstream_url not in value
    assert TimestampSigner(SECRET, salt=SALT).unsign(value).decode() == server_id("a")


async def test_key_rotation() -> None:
    old, new = "old secret", "new secret"
    async with proxied(
        UpstreamApp("a"), UpstreamApp("b"), sticky=sticky(secret_key=[old, new])
    ) as (proxy, client):
        signed_with_old = TimestampSigner(old, salt=SALT).sign(server_id("b")).decode()
        response = await get(client, signed_with_old)
        assert response.headers["x-upstream"] == "b"
        assert our_cookies(response) == []
        proxy.set_status("b", up=False)
        fresh = cookie_value(await get(client))
    assert TimestampSigner(new, salt=SALT).unsign(fresh)  # signed with the newest key


class _SignedLongAgo(TimestampSigner):
    def get_timestamp(self) -> int:
        return int(time.time()) - 3600


async def test_expired_cookie_gets_a_fresh_pick() -> None:
    async with proxied(UpstreamApp("a"), UpstreamApp("b"), sticky=sticky(max_age=60)) as (_, c):
        stale = _SignedLongAgo(SECRET, salt=SALT).sign(server_id("b")).decode()
        fresh = _SignedLongAgo(SECRET, salt=SALT).sign(server_id("b")).decode()
        response = await get(c, stale)
        assert len(our_cookies(response)) == 1
        assert cookie_value(response) != fresh
        assert "Max-Age=60" in our_cookies(response)[0]


def tampered_values() -> list[str]:
    valid = TimestampSigner(SECRET, salt=SALT).sign(server_id("a")).decode()
    # Not the last character: its low bits are base64 padding, and changing only them can leave
    # the signature's bytes, and so the cookie, valid (this test failed once that way).
    flipped = valid[:-5] + ("A" if valid[-5] != "A" else "B") + valid[-4:]
    return [
        flipped,
        valid[: len(valid) // 2],
        "",
        "x" * 10_000,
        "caf\u00e9." + valid,
        TimestampSigner(SECRET, salt="another app").sign(server_id("a")).decode(),
        TimestampSigner("another secret", salt=SALT).sign(server_id("a")).decode(),
        TimestampSigner(SECRET, salt=SALT).sign("not-a-server-id").decode(),
        "...",
        valid.replace(".", ""),
    ]


async def test_tampered_cookies_get_a_fresh_pick_and_cookie() -> None:
    async with proxied(UpstreamApp("a"), sticky=sticky()) as (_, client):
        for value in tampered_values():
            client.cookies.clear()
            response = await client.get("/", headers={"cookie": f"lb={value}".encode()})
            assert response.status_code == 200, value
            assert len(our_cookies(response)) == 1, value


# -- the cookie's options -------------------------------------------------------------------------


def test_cookie_attributes() -> None:
    cookie = sticky(secure=True, httponly=True, samesite="LAX", max_age=3600, domain="example.com")
    cookie = cookie.named_for("ignored")
    _, header = cookie.set_cookie_header("a")
    assert header.endswith(
        b"; Path=/; Domain=example.com; Max-Age=3600; Secure; HttpOnly; SameSite=Lax"
    )


def test_session_cookie_by_default() -> None:
    options = StickyCookie(secret_key=SECRET)
    cookie = options.named_for("my api/v2")
    _, header = cookie.set_cookie_header("a")
    assert options.name is None  # the options given are left as they are
    assert cookie.name == "my_api_v2"
    assert header.startswith(b"my_api_v2=")
    assert b"Max-Age" not in header
    assert header.endswith(b"; Path=/")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"secret_key": ""}, "secret_key"),
        ({"secret_key": []}, "secret_key"),
        ({"secret_key": ["ok", ""]}, "secret_key"),
        ({"samesite": "sometimes"}, "samesite"),
        ({"max_age": -1}, "max_age"),
        ({"name": "bad name"}, "name"),
        ({"path": "/;evil"}, "path"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], message: str) -> None:
    options = {"secret_key": SECRET, **options}
    with pytest.raises(ValueError, match=message):
        StickyCookie(**options)


# -- 10,000 generated cookies: no 500, each answered with a pick and a fresh cookie ---------------


@contextlib.contextmanager
def sticky_proxy_in_thread() -> Iterator[tuple[LeastTimeProxy, httpx.Client]]:
    with running_in_thread(UpstreamApp("a")) as upstream_url:
        proxy = LeastTimeProxy(upstreams=[Upstream(upstream_url, name="a")], sticky=sticky())
        with running_in_thread(proxy, lifespan="on") as url, httpx.Client(base_url=url) as client:
            yield proxy, client


# What can travel in a header value (RFC 9110 field-value: visible ASCII, obs-text, inner spaces).
_FIELD_BYTES = bytes([*range(0x21, 0x7F), *range(0x80, 0x100)])


def _field_value(raw: bytes) -> bytes:
    return bytes(b for b in raw if b in _FIELD_BYTES or b == 0x20).strip()


_VALID = TimestampSigner(SECRET, salt=SALT).sign(server_id("a"))

cookie_bytes = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=120).map(lambda t: t.encode("utf-8")),
    st.builds(
        lambda parts: b".".join(parts),
        st.lists(st.binary(min_size=0, max_size=40), min_size=1, max_size=5),
    ),
    st.integers(0, len(_VALID) - 1).map(lambda cut: _VALID[:cut]),  # truncated
).map(_field_value)


def test_ten_thousand_generated_cookies() -> None:
    answered = 0
    with sticky_proxy_in_thread() as (proxy, client):

        @settings(
            max_examples=10_000,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(value=cookie_bytes)
        def one_request(value: bytes) -> None:
            nonlocal answered
            client.cookies.clear()
            response = client.get("/", headers={"cookie": b"lb=" + value})
            assert response.status_code == 200
            assert len(our_cookies(response)) == 1
            answered += 1

        one_request()
        server = proxy.balancer["a"]
        deadline = time.monotonic() + 5  # the last release follows the last byte sent
        while server.inflight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.inflight == 0
    assert answered >= 10_000


async def test_websocket_follows_the_sticky_cookie() -> None:
    from websockets.asyncio.client import connect

    async with running_many(UpstreamApp("a"), UpstreamApp("b")) as urls:
        proxy = LeastTimeProxy(
            upstreams=[Upstream(urls[0], name="a"), Upstream(urls[1], name="b")], sticky=sticky()
        )
        value = TimestampSigner(SECRET, salt=SALT).sign(server_id("b")).decode()
        async with running(proxy) as url:
            ws_url = url.replace("http://", "ws://") + "/ws"
            for _ in range(3):
                async with connect(ws_url, additional_headers={"cookie": f"lb={value}"}) as ws:
                    assert (await ws.recv()).startswith("hello from b")
        await proxy.aclose()
