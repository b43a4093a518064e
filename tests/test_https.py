"""``asgi-leasttime serve`` terminating TLS itself, as Traefik's entrypoints do: a real process
with a certificate the tests make, a client that trusts the tests' CA, one worker and two."""

from __future__ import annotations

import signal
import ssl
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trustme

from tests.servers import UpstreamApp, free_port, running_in_thread, serve, wait_for_port


@dataclass(frozen=True)
class Certificates:
    """A CA the client trusts and a certificate for 127.0.0.1 it signed, as PEM files."""

    ca: trustme.CA
    cert: str  # the certificate chain alone
    key: str  # its private key alone
    both: str  # the key and the chain in one file

    def client(self, port: int) -> httpx.Client:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=context, timeout=10)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    folder = tmp_path_factory.mktemp("https")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    paths = Certificates(ca, str(folder / "cert.pem"), str(folder / "key.pem"),
                         str(folder / "both.pem"))  # fmt: skip
    for blob, path in ((issued.cert_chain_pems[0], paths.cert),
                       (issued.private_key_pem, paths.key),
                       (issued.private_key_and_cert_chain_pem, paths.both)):  # fmt: skip
        blob.write_to_path(path)
    return paths


@pytest.fixture(scope="module")
def upstream_urls() -> Iterator[list[str]]:
    with (
        running_in_thread(UpstreamApp("a", delay=0.0)) as a,
        running_in_thread(UpstreamApp("b", delay=0.0)) as b,
    ):
        yield [a, b]


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGINT)
    assert process.wait(20) == 0


def test_serve_answers_over_https_with_the_flags(
    certificates: Certificates, upstream_urls: list[str]
) -> None:
    process, port = serve(
        "--upstream", upstream_urls[0], "--upstream", upstream_urls[1],
        "--cert-file", certificates.cert, "--key-file", certificates.key,
    )  # fmt: skip
    try:
        with certificates.client(port) as client:
            answers = [client.get("/") for _ in range(20)]
        assert all(answer.status_code == 200 for answer in answers)
        assert {answer.headers["x-upstream"] for answer in answers} == {"a", "b"}
        assert answers[0].url.scheme == "https"
        # A client that does not trust the tests' CA is refused the handshake.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"https://127.0.0.1:{port}/", timeout=10)
        # Plain HTTP gets no proxied answer on the TLS port.
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=10).raise_for_status()
    finally:
        stop(process)


def test_serve_answers_over_https_from_the_file_with_two_workers(
    tmp_path: Path, certificates: Certificates, upstream_urls: list[str]
) -> None:
    config = tmp_path / "lb.toml"
    config.write_text(
        f'[server]\ncert_file = "{certificates.both}"\n'
        f'[[upstreams]]\nurl = "{upstream_urls[0]}"\nname = "a"\n'
        f'[[upstreams]]\nurl = "{upstream_urls[1]}"\nname = "b"\n'
    )
    process, port = serve(str(config), "--workers", "2")
    try:
        with certificates.client(port) as client:
            served = Counter(
                client.get("/", headers={"connection": "close"}).headers["x-upstream"]
                for _ in range(40)
            )  # new connections, so both workers answer
        assert set(served) == {"a", "b"}
        assert sum(served.values()) == 40
    finally:
        stop(process)


def refused(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "asgi_leasttime.cli", "serve", *args,
               "--port", str(free_port())]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


def test_serve_refuses_certificate_flags_as_the_file_does(
    tmp_path: Path, certificates: Certificates
) -> None:
    missing = refused("--upstream", "http://127.0.0.1:9", "--cert-file", "/nonexistent/c.pem")
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        "--cert-file: cannot read '/nonexistent/c.pem' (No such file or directory)"
    )
    alone = refused("--upstream", "http://127.0.0.1:9", "--key-file", certificates.key)
    assert alone.returncode == 2
    assert alone.stderr.strip() == "--key-file: needs a cert_file"
    # A flag replaces the file's key, and the pair is judged together.
    config = tmp_path / "lb.toml"
    config.write_text(
        f'[server]\ncert_file = "{certificates.cert}"\nkey_file = "{certificates.key}"\n'
        '[[upstreams]]\nurl = "http://127.0.0.1:9"\n'
    )
    other = trustme.CA().issue_cert("127.0.0.1")
    other.private_key_pem.write_to_path(str(tmp_path / "other.key"))
    mismatched = refused(str(config), "--key-file", str(tmp_path / "other.key"))
    assert mismatched.returncode == 2
    assert mismatched.stderr.strip() == (
        f"--key-file: is not the private key of the certificate in '{certificates.cert}'"
    )


def test_serve_answers_over_https_beside_its_admin_app(
    tmp_path: Path, certificates: Certificates, upstream_urls: list[str]
) -> None:
    """One process with ``[admin]`` runs its own uvicorn servers: the proxy's speaks HTTPS,
    the admin app's stays plain HTTP on its port."""
    admin_port = free_port()
    config = tmp_path / "lb.toml"
    config.write_text(
        f'[server]\ncert_file = "{certificates.cert}"\nkey_file = "{certificates.key}"\n'
        f'[[upstreams]]\nurl = "{upstream_urls[0]}"\nname = "a"\n'
        f"[admin]\nport = {admin_port}\n"
    )
    process, port = serve(str(config))
    try:
        wait_for_port(admin_port, process)
        with certificates.client(port) as client:
            assert client.get("/").headers["x-upstream"] == "a"
        status = httpx.get(f"http://127.0.0.1:{admin_port}/status", timeout=10)
        assert status.status_code == 200
    finally:
        stop(process)
