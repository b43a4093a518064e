"""https upstreams: real uvicorn TLS servers with certificates made here (trustme), through the
lean client and through httpx, verified, refused, and with client certificates."""

from __future__ import annotations

import datetime
import logging
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from asgi_leasttime import HealthCheck, LeastTimeProxy, Upstream
from asgi_leasttime.options import OptionError
from asgi_leasttime.tls import UpstreamTLS
from tests.servers import UpstreamApp, running, wait_until

pytestmark = pytest.mark.anyio


class Certificates:
    """A CA, the files made from it, and another CA nobody trusts."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca = trustme.CA()
        self.ca_file = self.write("ca.pem", self.ca.cert_pem)
        self.stranger_ca_file = self.write("stranger.pem", trustme.CA().cert_pem)

    def write(self, name: str, blob: Any) -> str:
        path = self.folder / name
        blob.write_to_path(str(path))
        return str(path)

    def server(self, name: str, *identities: str, **options: Any) -> str:
        """A server certificate and its key in one PEM file."""
        cert = self.ca.issue_cert(*(identities or ("127.0.0.1",)), **options)
        return self.write(name, cert.private_key_and_cert_chain_pem)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("tls"))


def https_options(pem: str, **more: Any) -> dict[str, Any]:
    return {"ssl_certfile": pem, "ssl_keyfile": pem, **more}


async def through(proxy: LeastTimeProxy, count: int = 1, **request: Any) -> list[httpx.Response]:
    async with running(proxy, lifespan="on") as url, httpx.AsyncClient(base_url=url) as client:
        return [await client.request(**{"method": "GET", "url": "/x", **request})
                for _ in range(count)]  # fmt: skip


@pytest.fixture
def upstream() -> UpstreamApp:
    return UpstreamApp("tls")


@pytest.mark.parametrize("client", ["lean", "httpx"])
async def test_a_verified_https_upstream(
    certs: Certificates, upstream: UpstreamApp, client: str
) -> None:
    async with running(upstream, **https_options(certs.server("ok.pem"))) as url:
        https = url.replace("http://", "https://")
        proxy = LeastTimeProxy(
            upstreams=[https],
            tls=UpstreamTLS(root_cas=[certs.ca_file]),
            upstream_client=client,  # type: ignore[arg-type]
        )
        async with running(proxy, lifespan="on") as proxy_url:
            async with httpx.AsyncClient(base_url=proxy_url) as http:
                answers = [await http.post("/x", content=b"over tls") for _ in range(5)]
            if client == "lean":  # the fast path, its connection kept alive between requests
                assert proxy._lean is not None
                (pool,) = proxy._lean._pools.values()
                assert pool.tls is not None
                assert len(pool.idle) == 1
    assert [a.status_code for a in answers] == [200] * 5
    assert answers[0].json()["body"] == "over tls"


async def test_new_connections_resume_the_tls_session(
    certs: Certificates, upstream: UpstreamApp
) -> None:
    async with running(upstream, **https_options(certs.server("resume.pem"))) as url:
        proxy = LeastTimeProxy(
            upstreams=[url.replace("http://", "https://")],
            tls=UpstreamTLS(root_cas=[certs.ca_file]),
            limits=httpx.Limits(max_keepalive_connections=0),  # a new connection every request
        )
        async with running(proxy, lifespan="on") as proxy_url:
            async with httpx.AsyncClient(base_url=proxy_url) as http:
                answers = [await http.get("/x") for _ in range(4)]
            assert proxy._lean is not None
            (pool,) = proxy._lean._pools.values()
            resumed = pool.resumed
    assert [answer.status_code for answer in answers] == [200] * 4
    assert upstream.requests == 4
    assert resumed == 3  # the first connection's handshake was full, the others resumed it


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("unknown CA", "CERTIFICATE_VERIFY_FAILED"),
        ("wrong name", "CERTIFICATE_VERIFY_FAILED"),
        ("expired", "certificate has expired"),
    ],
)
async def test_a_certificate_that_does_not_hold_is_a_502_and_a_log_line(
    certs: Certificates,
    upstream: UpstreamApp,
    caplog: pytest.LogCaptureFixture,
    case: str,
    reason: str,
) -> None:
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    pem = {
        "unknown CA": certs.server("ok2.pem"),
        "wrong name": certs.server("other.pem", "other.example"),
        "expired": certs.server("expired.pem", not_after=past),
    }[case]
    root = certs.stranger_ca_file if case == "unknown CA" else certs.ca_file
    async with running(upstream, **https_options(pem)) as url:
        proxy = LeastTimeProxy(
            upstreams=[url.replace("http://", "https://")], tls=UpstreamTLS(root_cas=[root])
        )
        with caplog.at_level(logging.WARNING, logger="asgi_leasttime"):
            (answer,) = await through(proxy)
    assert answer.status_code == 502
    assert upstream.requests == 0
    assert any(reason in record.getMessage() for record in caplog.records), caplog.text


async def test_a_server_name_other_than_the_address(
    certs: Certificates, upstream: UpstreamApp
) -> None:
    async with running(upstream, **https_options(certs.server("named.pem", "lb.internal"))) as url:
        tls = UpstreamTLS(root_cas=[certs.ca_file], server_name="lb.internal")
        https = url.replace("http://", "https://")
        proxy = LeastTimeProxy(upstreams=[https], tls=tls)
        (answer,) = await through(proxy)
        assert answer.status_code == 200
        # Skipping verification takes any certificate, the stranger's included.
        lax = LeastTimeProxy(upstreams=[https], tls=UpstreamTLS(insecure_skip_verify=True))
        (answer,) = await through(lax)
        assert answer.status_code == 200


async def test_mutual_tls_accepted_with_the_client_certificate_and_refused_without(
    certs: Certificates, upstream: UpstreamApp, tmp_path: Path
) -> None:
    client_ca = trustme.CA()
    client = client_ca.issue_cert("proxy.example")
    client_ca_file = str(tmp_path / "client-ca.pem")
    client_ca.cert_pem.write_to_path(client_ca_file)
    cert_file, key_file = str(tmp_path / "client.pem"), str(tmp_path / "client.key")
    client.cert_chain_pems[0].write_to_path(cert_file)
    client.private_key_pem.write_to_path(key_file)
    options = https_options(
        certs.server("mtls.pem"), ssl_ca_certs=client_ca_file, ssl_cert_reqs=ssl.CERT_REQUIRED
    )
    async with running(upstream, **options) as url:
        https = url.replace("http://", "https://")
        with_cert = UpstreamTLS(root_cas=[certs.ca_file], cert_file=cert_file, key_file=key_file)
        (answer,) = await through(LeastTimeProxy(upstreams=[https], tls=with_cert))
        assert answer.status_code == 200
        without = UpstreamTLS(root_cas=[certs.ca_file])
        (answer,) = await through(LeastTimeProxy(upstreams=[https], tls=without))
        assert answer.status_code == 502
    assert upstream.requests == 1


async def test_health_probes_over_https_use_the_same_trust(
    certs: Certificates, upstream: UpstreamApp
) -> None:
    async with running(upstream, **https_options(certs.server("probe.pem"))) as url:
        https = url.replace("http://", "https://")
        check = HealthCheck(interval=0.05, timeout=1)
        trusted = LeastTimeProxy(
            upstreams=[Upstream(https, name="u")],
            health_check=check,
            tls=UpstreamTLS(root_cas=[certs.ca_file]),
        )
        async with running(trusted, lifespan="on"):
            await wait_until(lambda: len(upstream.probes) >= 3, 3.0)
            assert trusted.balancer["u"].up
        untrusting = LeastTimeProxy(upstreams=[Upstream(https, name="u")], health_check=check)
        async with running(untrusting, lifespan="on"):
            await wait_until(lambda: not untrusting.balancer["u"].up, 3.0)  # system CAs: no


def test_files_that_cannot_be_loaded_are_named() -> None:
    with pytest.raises(OptionError, match="root_cas"):
        UpstreamTLS(root_cas=["/nonexistent/ca.pem"])
    with pytest.raises(OptionError, match="root_cas"):
        UpstreamTLS(root_cas="/one/string.pem")
    with pytest.raises(OptionError, match="cert_file"):
        UpstreamTLS(cert_file="/nonexistent/client.pem")
    with pytest.raises(OptionError, match="key_file"):
        UpstreamTLS(key_file="/nonexistent/client.key")


def test_verification_is_on_by_default() -> None:
    context = UpstreamTLS().context
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname


def test_the_system_store_is_loaded_only_when_an_https_upstream_needs_it() -> None:
    proxy = LeastTimeProxy(upstreams=["http://127.0.0.1:9"])
    assert "_built" not in proxy.tls.__dict__  # tens of milliseconds not spent
    assert proxy.tls.context is proxy.tls.context  # built once when asked
