"""WebSocket upstreams over ws and wss: the proxy's TLS options and the client's Host reach them.

Real uvicorn servers on both sides; certificates made here with trustme."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from asgi_leasttime import LeastTimeProxy
from asgi_leasttime._websocket import forward_websocket
from asgi_leasttime.tls import UpstreamTLS
from tests.servers import running

pytestmark = pytest.mark.anyio


async def host_echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A WebSocket upstream that says which Host it was asked for, over which scheme."""
    assert scope["type"] == "websocket"
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
    await send({"type": "websocket.send", "text": f"{scope['scheme']} {host}"})
    while (await receive())["type"] != "websocket.disconnect":
        pass


class Certificates:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca = trustme.CA()
        self.ca_file = str(folder / "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)

    def server(self, name: str, *identities: str) -> dict[str, Any]:
        """uvicorn's TLS options for a certificate for ``identities``."""
        path = str(self.folder / name)
        self.ca.issue_cert(*identities).private_key_and_cert_chain_pem.write_to_path(path)
        return {"ssl_certfile": path, "ssl_keyfile": path}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("wss"))


async def first_message(url: str, host: str | None = None) -> str:
    """The first text the WebSocket at ``url`` (ws://, on 127.0.0.1) sends, asked for with
    ``Host: host`` when given."""
    port = httpx.URL(url).port
    if host is not None:
        url = url.replace("127.0.0.1", host)
    async with connect(url, host="127.0.0.1", port=port, proxy=None, open_timeout=5) as ws:
        message = await ws.recv()
    assert isinstance(message, str)
    return message


# -- the client's Host ----------------------------------------------------------------------------


async def test_the_clients_host_reaches_a_websocket_upstream() -> None:
    async with running(host_echo) as upstream:
        proxy = LeastTimeProxy(upstreams=[upstream])
        async with running(proxy, lifespan="on") as url:
            port = httpx.URL(url).port
            got = await first_message(f"{url.replace('http', 'ws')}/ws", "front.example")
    assert got == f"ws front.example:{port}"


async def test_without_pass_host_header_the_upstream_gets_its_own_host() -> None:
    async with running(host_echo) as upstream:
        proxy = LeastTimeProxy(upstreams=[upstream], pass_host_header=False)
        async with running(proxy, lifespan="on") as url:
            got = await first_message(f"{url.replace('http', 'ws')}/ws", "front.example")
    assert got == f"ws {upstream.removeprefix('http://')}"


# -- wss upstreams --------------------------------------------------------------------------------


async def test_a_wss_upstream_verified_with_the_proxys_ca(certs: Certificates) -> None:
    async with running(host_echo, **certs.server("ip.pem", "127.0.0.1")) as upstream:
        proxy = LeastTimeProxy(
            upstreams=[upstream.replace("http://", "https://")],
            tls=UpstreamTLS(root_cas=[certs.ca_file]),
        )
        async with running(proxy, lifespan="on") as url:
            port = httpx.URL(url).port
            got = await first_message(f"{url.replace('http', 'ws')}/ws", "front.example")
    assert got == f"wss front.example:{port}"


class Lease:
    """What forward_websocket tells the balancer, kept."""

    def __init__(self) -> None:
        self.told: list[Any] = []

    def answered(self, status: int, ttfb: float) -> None:
        self.told.append(status)

    def failed(self) -> None:
        self.told.append("failed")


def forwarding_to(url: str, lease: Any, **options: Any) -> Any:
    """An ASGI app forwarding every WebSocket to ``url`` with ``options``, the client's Host
    among the headers as the proxy's RequestHeaders leave it."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = [(n, v) for n, v in scope["headers"] if n == b"host"]
        await forward_websocket(
            httpx.URL(url),
            scope,
            receive,
            send,
            headers,
            lease,
            **options,
        )

    return app


async def test_the_server_name_of_the_tls_options_is_the_one_checked(
    certs: Certificates,
) -> None:
    lease = Lease()
    async with running(host_echo, **certs.server("named.pem", "upstream.internal")) as upstream:
        https = upstream.replace("http://", "https://") + "/ws"
        tls = UpstreamTLS(root_cas=[certs.ca_file], server_name="upstream.internal")
        async with running(forwarding_to(https, lease, tls=tls)) as url:
            got = await first_message(url.replace("http", "ws"), "front.example")
    assert got.startswith("wss front.example:")
    assert lease.told == [101]


async def test_a_wss_upstream_whose_certificate_does_not_hold_fails(certs: Certificates) -> None:
    lease = Lease()
    async with running(host_echo, **certs.server("other.pem", "other.example")) as upstream:
        https = upstream.replace("http://", "https://") + "/ws"
        tls = UpstreamTLS(root_cas=[certs.ca_file])
        async with running(forwarding_to(https, lease, tls=tls)) as url:
            with pytest.raises(InvalidStatus, match="HTTP 403"):  # closed before accepting
                await first_message(url.replace("http", "ws"))
    assert lease.told == ["failed"]


async def test_pass_host_header_false_sends_the_upstreams_own_host() -> None:
    lease = Lease()
    async with (
        running(host_echo) as upstream,
        running(forwarding_to(upstream, lease, pass_host_header=False)) as url,
    ):
        got = await first_message(url.replace("http", "ws"), "front.example")
    assert got == f"ws {upstream.removeprefix('http://')}"
