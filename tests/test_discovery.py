"""DNS upstreams: one server per address a name resolves to, on a DNS server the tests change
while traffic flows (add, remove, SERVFAIL, silence, TTL). The upstreams listen on 127.0.0.2,
127.0.0.3, ... with one port, as the pods behind a headless Service do."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from asgi_leasttime import DnsResolver, LeastTimeProxy, StickyCookie, Upstream
from asgi_leasttime.discovery import LookupFailed
from asgi_leasttime.options import OptionError
from tests.dns_server import ControlledDns, dns_server
from tests.servers import UpstreamApp, free_port, running_in_thread

NAME = "api.test"
ADDRESSES = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]

pytestmark = pytest.mark.anyio


@pytest.fixture
def dns() -> Iterator[tuple[ControlledDns, str]]:
    with dns_server() as server:
        yield server


@contextlib.contextmanager
def pods(delays: dict[str, float]) -> Iterator[tuple[int, dict[str, UpstreamApp]]]:
    """One upstream per address, all on one port: (port, app by address)."""
    port = free_port()
    apps = {address: UpstreamApp(address, delay=delay) for address, delay in delays.items()}
    with contextlib.ExitStack() as stack:
        for address, app in apps.items():
            stack.enter_context(running_in_thread(app, port=port, host=address))
        yield port, apps


@contextlib.asynccontextmanager
async def proxied(proxy: LeastTimeProxy) -> AsyncIterator[httpx.AsyncClient]:
    async with proxy.lifespan():
        transport = httpx.ASGITransport(app=proxy)
        async with httpx.AsyncClient(transport=transport, base_url="http://front") as client:
            yield client


def dns_proxy(port: int, nameserver: str, **options: object) -> LeastTimeProxy:
    resolver = DnsResolver(nameservers=[nameserver], resolve_every=0.5, min_resolve_every=0.2)
    upstream = Upstream(f"http://{NAME}:{port}", resolve=True)
    return LeastTimeProxy(upstreams=[upstream], dns=resolver, **options)  # type: ignore[arg-type]


async def spread(client: httpx.AsyncClient, requests: int) -> Counter[str]:
    """Who answered ``requests`` GETs (8 at a time); every one must be a 200."""
    answered: Counter[str] = Counter()

    async def one() -> None:
        response = await client.get("/")
        assert response.status_code == 200, response.text
        answered[response.headers["x-upstream"]] += 1

    for _ in range(requests // 8):
        async with anyio.create_task_group() as group:
            for _ in range(8):
                group.start_soon(one)
    return answered


async def test_least_time_sees_every_address_as_a_server(dns: tuple[ControlledDns, str]) -> None:
    server, nameserver = dns
    server.records[NAME] = ADDRESSES
    with pods({"127.0.0.2": 0.002, "127.0.0.3": 0.002, "127.0.0.4": 0.03}) as (port, _):
        proxy = dns_proxy(port, nameserver)
        async with proxied(proxy) as client:
            answered = await spread(client, 240)
            statuses = {status.name: status for status in proxy.upstream_status()}
    names = {f"{NAME}:{port}@{address}" for address in ADDRESSES}
    assert set(statuses) == names
    assert {status.origin for status in statuses.values()} == {"dns"}
    assert {status.address for status in statuses.values()} == set(ADDRESSES)
    # Each its own figures: the slow one is seen as slow, and gets the smallest share.
    slow = statuses[f"{NAME}:{port}@127.0.0.4"]
    fast = statuses[f"{NAME}:{port}@127.0.0.2"]
    assert slow.average_ttfb > 3 * fast.average_ttfb
    assert answered["127.0.0.4"] < answered["127.0.0.2"]
    assert answered["127.0.0.4"] < answered["127.0.0.3"]
    assert set(answered) == set(ADDRESSES)


async def test_an_address_that_leaves_gets_no_new_requests_and_a_new_one_takes_traffic(
    dns: tuple[ControlledDns, str],
) -> None:
    server, nameserver = dns
    server.records[NAME] = ADDRESSES[:2]
    with pods(dict.fromkeys(ADDRESSES, 0.001)) as (port, apps):
        proxy = dns_proxy(port, nameserver)
        async with proxied(proxy) as client:
            assert set(await spread(client, 40)) == set(ADDRESSES[:2])
            server.records[NAME] = ADDRESSES[1:]  # one leaves, one joins
            began = time.monotonic()
            errors = 0
            while time.monotonic() - began < 0.5 + 1:  # resolve_every + 1 s
                errors += (await client.get("/")).status_code != 200
                await anyio.sleep(0.02)
            assert errors == 0
            left = apps["127.0.0.2"].requests
            answered = await spread(client, 80)
    assert "127.0.0.2" not in answered
    assert apps["127.0.0.2"].requests == left
    assert answered["127.0.0.4"] > 0  # the newcomer serves
    assert {s.name for s in proxy.upstream_status()} == {
        f"{NAME}:{port}@{address}" for address in ADDRESSES[1:]
    }


@pytest.mark.parametrize("fault", ["servfail", "silent", "empty", "nxdomain"])
async def test_dns_failing_changes_nothing_and_is_logged_once(
    dns: tuple[ControlledDns, str], fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    server, nameserver = dns
    server.records[NAME] = ADDRESSES[:2]
    caplog.set_level(logging.INFO, "asgi_leasttime.discovery")
    with pods(dict.fromkeys(ADDRESSES[:2], 0.001)) as (port, _):
        proxy = LeastTimeProxy(
            upstreams=[Upstream(f"http://{NAME}:{port}", resolve=True)],
            dns=DnsResolver(
                nameservers=[nameserver], resolve_every=0.3, min_resolve_every=0.2, timeout=0.3
            ),
        )
        async with proxied(proxy) as client:
            before = {s.name for s in proxy.upstream_status()}
            asked = server.questions
            if fault == "servfail":
                server.failing = True
            elif fault == "silent":
                server.silent = True
            elif fault == "empty":
                server.records[NAME] = []
            else:
                del server.records[NAME]
            answered = await spread(client, 16)
            await anyio.sleep(1.5)  # several lookups fail meanwhile
            answered += await spread(client, 16)
            assert server.questions > asked + 2
            assert {s.name for s in proxy.upstream_status()} == before
            server.failing = server.silent = False
            server.records[NAME] = ADDRESSES[:2]
            await anyio.sleep(0.8)
    assert set(answered) == set(ADDRESSES[:2])
    kept = [r for r in caplog.records if "keeping its last addresses" in r.getMessage()]
    assert len(kept) == 1, [r.getMessage() for r in caplog.records]
    assert kept[0].levelno == logging.WARNING
    assert any("resolves again" in r.getMessage() for r in caplog.records)


async def test_the_records_ttl_brings_the_next_lookup_forward(
    dns: tuple[ControlledDns, str],
) -> None:
    server, nameserver = dns
    server.records[NAME] = ADDRESSES[:1]
    server.ttl = 1
    with pods({ADDRESSES[0]: 0.0}) as (port, _):
        upstream = Upstream(f"http://{NAME}:{port}", resolve=True)
        slow = DnsResolver(nameservers=[nameserver], resolve_every=60, min_resolve_every=0.5)
        proxy = LeastTimeProxy(upstreams=[upstream], dns=slow)
        async with proxied(proxy):
            asked = server.questions
            await anyio.sleep(2.3)
            lookups = (server.questions - asked) // 2  # A and AAAA each time
    assert 2 <= lookups <= 3  # every TTL (1 s), not every 60 s


async def test_the_host_and_the_sticky_ids_stay_per_address(
    dns: tuple[ControlledDns, str],
) -> None:
    """The Host sent is the configured name, not the address; a sticky client stays on its
    address, and moves on when that address leaves."""
    server, nameserver = dns
    server.records[NAME] = ADDRESSES[:2]
    with pods(dict.fromkeys(ADDRESSES[:2], 0.0)) as (port, _):
        proxy = dns_proxy(
            port, nameserver, pass_host_header=False, sticky=StickyCookie(secret_key="k" * 32)
        )
        async with proxied(proxy) as client:
            first = await client.get("/")
            headers = dict(first.json()["headers"])
            assert headers["host"] == f"{NAME}:{port}"
            home = first.headers["x-upstream"]
            for _ in range(10):
                assert (await client.get("/")).headers["x-upstream"] == home
            server.records[NAME] = [a for a in ADDRESSES[:2] if a != home]
            await anyio.sleep(1.0)
            moved = await client.get("/")
    assert moved.status_code == 200
    assert moved.headers["x-upstream"] != home


async def test_each_address_is_probed_under_the_name(dns: tuple[ControlledDns, str]) -> None:
    from asgi_leasttime import HealthCheck

    server, nameserver = dns
    server.records[NAME] = ADDRESSES[:2]
    with pods(dict.fromkeys(ADDRESSES[:2], 0.0)) as (port, apps):
        apps["127.0.0.3"].health_status = 503
        proxy = dns_proxy(port, nameserver, health_check=HealthCheck(path="/health", interval=0.2))
        async with proxied(proxy) as client:
            await anyio.sleep(0.6)
            answered = await spread(client, 16)
            down = {s.name: s.up for s in proxy.upstream_status()}
    assert apps["127.0.0.2"].probes
    assert apps["127.0.0.3"].probes
    assert down == {f"{NAME}:{port}@127.0.0.2": True, f"{NAME}:{port}@127.0.0.3": False}
    assert set(answered) == {"127.0.0.2"}


async def test_the_system_resolver_reads_localhost() -> None:
    lookup = DnsResolver().lookup_function()
    addresses, ttl = await lookup("localhost", 80)
    assert "127.0.0.1" in addresses
    assert ttl is None
    with pytest.raises(LookupFailed):
        await DnsResolver(timeout=0.2).lookup_function()("bad..name", 80)


def test_the_next_lookup_follows_the_ttl_within_its_bounds() -> None:
    resolver = DnsResolver(resolve_every=5, min_resolve_every=1)
    assert resolver.next_lookup(None) == 5
    assert resolver.next_lookup(2) == 2
    assert resolver.next_lookup(0) == 1
    assert resolver.next_lookup(300) == 5


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"nameservers": "10.0.0.1"}, "nameservers"),
        ({"nameservers": ["dns.internal"]}, "nameservers"),
        ({"nameservers": ["10.0.0.1:0"]}, "nameservers"),
        ({"resolve_every": 0}, "resolve_every"),
        ({"timeout": "2"}, "timeout"),
    ],
)
def test_resolver_options_are_checked(options: dict[str, object], option: str) -> None:
    with pytest.raises(OptionError) as refused:
        DnsResolver(**options)  # type: ignore[arg-type]
    assert refused.value.option == option


def test_a_dns_upstream_needs_the_proxys_own_client() -> None:
    upstream = Upstream("http://api.test:80", resolve=True)
    with pytest.raises(OptionError) as refused:
        LeastTimeProxy(upstreams=[upstream], upstream_client="httpx")
    assert refused.value.option == "resolve"
    with pytest.raises(OptionError):
        Upstream("http://api.test:80", resolve=True, address="10.0.0.1")
    with pytest.raises(OptionError):
        Upstream("http://api.test:80", address="api")


async def test_ipv6_addresses_are_named_in_brackets(dns: tuple[ControlledDns, str]) -> None:
    server, nameserver = dns
    server.records[NAME] = ["127.0.0.2", "fd00::7"]
    proxy = dns_proxy(8000, nameserver)
    async with proxy.lifespan():
        names = {s.name for s in proxy.upstream_status()}
    assert names == {f"{NAME}:8000@127.0.0.2", f"{NAME}:8000@[fd00::7]"}


async def test_tls_is_verified_against_the_name_not_the_address(
    dns: tuple[ControlledDns, str], tmp_path: Path
) -> None:
    """A certificate for ``api.test`` only, served at 127.0.0.2: the proxy connects to the
    address and checks the name, as it would for one upstream named by its host."""
    import trustme

    from asgi_leasttime.tls import UpstreamTLS

    ca = trustme.CA()
    ca_file, pem = str(tmp_path / "ca.pem"), str(tmp_path / "server.pem")
    ca.cert_pem.write_to_path(ca_file)
    ca.issue_cert(NAME).private_key_and_cert_chain_pem.write_to_path(pem)
    server, nameserver = dns
    server.records[NAME] = ["127.0.0.2"]
    port = free_port()
    app = UpstreamApp("tls")
    tls = {"ssl_certfile": pem, "ssl_keyfile": pem}
    with running_in_thread(app, port=port, host="127.0.0.2", **tls):
        resolver = DnsResolver(nameservers=[nameserver])
        upstream = Upstream(f"https://{NAME}:{port}", resolve=True)
        proxy = LeastTimeProxy(
            upstreams=[upstream], dns=resolver, tls=UpstreamTLS(root_cas=[ca_file])
        )
        async with proxied(proxy) as client:
            response = await client.get("/")
    assert response.status_code == 200
    assert response.headers["x-upstream"] == "tls"


async def test_a_reload_adds_removes_and_reweighs_and_leaves_the_apis_alone(
    dns: tuple[ControlledDns, str],
) -> None:
    server, nameserver = dns
    server.records[NAME] = ["127.0.0.2", "127.0.0.3"]
    proxy = LeastTimeProxy(
        upstreams=[
            Upstream("http://127.0.0.1:1", name="a"),
            Upstream("http://127.0.0.1:2", name="b"),
            Upstream(f"http://{NAME}:8000", name="api", resolve=True),
        ],
        dns=DnsResolver(nameservers=[nameserver], resolve_every=0.3, min_resolve_every=0.1),
    )
    async with proxy.lifespan():
        proxy.add_upstream(Upstream("http://127.0.0.1:3", name="by-hand"))
        assert {s.name for s in proxy.upstream_status()} == {
            "a", "b", "api@127.0.0.2", "api@127.0.0.3", "by-hand"
        }  # fmt: skip
        proxy.reconcile_upstreams(
            [
                Upstream("http://127.0.0.1:1", name="a", weight=3),
                Upstream("http://127.0.0.1:9", name="c"),
                Upstream(f"http://{NAME}:8000", name="api", resolve=True, weight=2),
            ]
        )
        statuses = {s.name: s for s in proxy.upstream_status()}
        assert set(statuses) == {"a", "c", "api@127.0.0.2", "api@127.0.0.3", "by-hand"}
        assert statuses["a"].weight == 3
        assert statuses["api@127.0.0.2"].weight == 2
        assert statuses["by-hand"].origin == "api"
        assert statuses["c"].origin == "config"
        proxy.reconcile_upstreams([Upstream("http://127.0.0.1:1", name="a")])
        await anyio.sleep(0.5)  # a lookup falls due: nothing comes back for "api"
        assert {s.name for s in proxy.upstream_status()} == {"a", "by-hand"}


async def test_a_websocket_reaches_the_address_it_was_given(
    dns: tuple[ControlledDns, str],
) -> None:
    from websockets.asyncio.client import connect

    from tests.servers import running

    server, nameserver = dns
    server.records[NAME] = ["127.0.0.3"]
    with pods({"127.0.0.3": 0.0}) as (port, _):
        proxy = dns_proxy(port, nameserver)
        async with running(proxy, lifespan="on") as url:
            ws_url = url.replace("http://", "ws://") + "/socket"
            async with connect(ws_url, proxy=None, open_timeout=5) as socket:
                hello = await socket.recv()
    assert hello == "hello from 127.0.0.3 q="


# -- the seams a review found ---------------------------------------------------------------------


class HeldLookup:
    """A lookup the test answers: each call waits until ``answer`` is set."""

    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.asked = anyio.Event()
        self.go = anyio.Event()
        self.calls = 0

    async def __call__(self, host: str, port: int) -> tuple[list[str], float | None]:
        self.calls += 1
        self.asked.set()
        await self.go.wait()
        return list(self.addresses), None


def held_proxy(*upstreams: Upstream) -> tuple[LeastTimeProxy, HeldLookup]:
    proxy = LeastTimeProxy(
        upstreams=list(upstreams),
        dns=DnsResolver(resolve_every=0.2, min_resolve_every=0.1),
    )
    lookup = HeldLookup()
    proxy._discovery._lookup = lookup
    return proxy, lookup


def names(proxy: LeastTimeProxy) -> set[str]:
    return {status.name for status in proxy.upstream_status()}


async def test_a_template_removed_while_its_lookup_is_out_leaves_nothing_behind() -> None:
    proxy, lookup = held_proxy(
        Upstream("http://127.0.0.1:9", name="a"),
        Upstream("http://svc:80", name="svc", resolve=True),
    )
    lookup.addresses = ["10.0.0.1"]
    lookup.go.set()
    async with proxy.lifespan():
        assert names(proxy) == {"a", "svc@10.0.0.1"}
        lookup.go, lookup.asked = anyio.Event(), anyio.Event()
        lookup.addresses = ["10.0.0.1", "10.0.0.2"]
        await lookup.asked.wait()  # the next lookup is out
        proxy.reconcile_upstreams([Upstream("http://127.0.0.1:9", name="a")])
        lookup.go.set()  # and answers after the template is gone
        await anyio.sleep(0.3)
        assert names(proxy) == {"a"}


async def test_a_reload_bringing_the_first_name_to_resolve_resolves_it() -> None:
    proxy, lookup = held_proxy(Upstream("http://127.0.0.1:9", name="a"))
    lookup.addresses = ["10.0.0.7"]
    lookup.go.set()
    async with proxy.lifespan():
        proxy.reconcile_upstreams(
            [Upstream("http://127.0.0.1:9", name="a"), Upstream("http://svc:80", resolve=True)]
        )
        with anyio.fail_after(2):
            while "svc:80@10.0.0.7" not in names(proxy):  # noqa: ASYNC110 (a state to poll)
                await anyio.sleep(0.02)


async def test_a_new_url_for_a_name_keeps_the_old_addresses_until_the_new_ones_answer() -> None:
    proxy, lookup = held_proxy(Upstream("http://svc:80", name="svc", resolve=True))
    lookup.addresses = ["10.0.0.1"]
    lookup.go.set()
    async with proxy.lifespan():
        lookup.go, lookup.asked = anyio.Event(), anyio.Event()
        proxy.reconcile_upstreams([Upstream("http://svc-v2:80", name="svc", resolve=True)])
        await lookup.asked.wait()
        assert names(proxy) == {"svc@10.0.0.1"}  # still served while the new name is looked up
        lookup.addresses = ["10.0.0.9"]
        lookup.go.set()
        with anyio.fail_after(2):
            while names(proxy) != {"svc@10.0.0.9"}:  # noqa: ASYNC110 (a state to poll)
                await anyio.sleep(0.02)


async def test_a_reload_leaves_what_the_admin_api_set_unless_the_file_changes_it() -> None:
    first = [Upstream("http://127.0.0.1:9", name="a"), Upstream("http://127.0.0.1:8", name="b")]
    proxy = LeastTimeProxy(upstreams=first)
    proxy.set_fenced("a", True)  # an operator drains a
    proxy.set_weight("b", 5)
    again = [Upstream("http://127.0.0.1:9", name="a"), Upstream("http://127.0.0.1:8", name="b")]
    proxy.reconcile_upstreams(again, previous=first)
    statuses = {s.name: s for s in proxy.upstream_status()}
    assert statuses["a"].fenced
    assert statuses["b"].weight == 5
    changed = [
        Upstream("http://127.0.0.1:9", name="a"),
        Upstream("http://127.0.0.1:8", name="b", weight=2),
    ]
    proxy.reconcile_upstreams(changed, previous=again)
    assert {s.name: s.weight for s in proxy.upstream_status()}["b"] == 2


def test_names_that_would_collide_are_refused_before_anything_moves() -> None:
    template = Upstream("http://svc:80/v1", resolve=True)
    with pytest.raises(ValueError, match="already names its upstreams svc:80@"):
        LeastTimeProxy(upstreams=[template, Upstream("http://svc:80/v2", resolve=True)])
    with pytest.raises(ValueError, match="already"):
        LeastTimeProxy(
            upstreams=[
                Upstream("http://svc:80", name="x", resolve=True),
                Upstream("http://a:1", name="x"),
            ]
        )
    proxy = LeastTimeProxy(upstreams=["http://127.0.0.1:9"])
    proxy.add_upstream(Upstream("http://127.0.0.1:8", name="by-hand"))
    before = names(proxy)
    with pytest.raises(ValueError, match="added while running"):
        proxy.reconcile_upstreams([Upstream("http://svc:80", name="by-hand", resolve=True)])
    assert names(proxy) == before  # nothing moved
    with pytest.raises(OptionError):
        proxy.add_upstream(Upstream("http://svc:80", resolve=True))
