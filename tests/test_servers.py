"""The proxy and the middleware form under every ASGI server our users run, each started as its
docs say (no flags): exactly one ``Date`` and one ``Server`` on every answer.

Every server tried adds its own ``Date`` and ``Server`` to what the app sends (uvicorn with either
parser, gunicorn's uvicorn workers, hypercorn), or sends its own where the app sends none
(granian), so the proxy drops the upstream's, as NGINX does. With ``pass_server_header`` the
upstream's pass instead, under a server told to send none.

Then what each server must carry through the proxy, against one upstream in this process whose
state the tests read: a large request body streamed up (the upstream has its first chunk before
the client sends the rest), a response streamed down (the client has its first chunk while the
upstream waits), a client that leaves mid-response (the upstream's stream ends, the proxy goes on
answering), WebSocket messages and close codes both ways, the proxy's lifespan (its health checks
probe, its shutdown runs on SIGTERM), and HTTP/2 (TLS with ALPN and cleartext with prior
knowledge) where the server speaks it: the client's ``:authority`` is the upstream's ``Host``.
The differences are in docs/deployment.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import h2.config
import h2.connection
import h2.events
import httpx
import pytest
import trustme
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from tests.servers import (
    UpstreamApp,
    free_port,
    process_on_port,
    running_in_thread,
    wait_for_port,
)

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_DATE = "Mon, 01 Jan 2001 00:00:00 GMT"

# How each server is started, as its docs say: the command, then the app ({port} filled in).
SERVERS = {
    "uvicorn": "uvicorn --port {port}",
    "uvicorn-h11": "uvicorn --http h11 --port {port}",
    "gunicorn": "gunicorn -k uvicorn.workers.UvicornWorker -b 127.0.0.1:{port}",
    "hypercorn": "hypercorn -b 127.0.0.1:{port}",
    "granian": "granian --interface asgi --port {port}",
}


async def upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An upstream with a Date and a Server of its own (none with ``?bare=1``)."""
    if scope["type"] != "http":
        return
    headers = [(b"x-upstream", b"a"), (b"content-length", b"2")]
    if scope["query_string"] != b"bare=1":
        headers += [(b"date", UPSTREAM_DATE.encode()), (b"server", b"upstream-a")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(scope="module")
def upstream_url() -> Iterator[str]:
    # Only the app's own Date and Server: uvicorn's are turned off.
    with running_in_thread(upstream, server_header=False, date_header=False) as url:
        yield url


@contextlib.contextmanager
def front(server: str, app: str, upstream_url: str, *flags: str, **env: str) -> Iterator[str]:
    """``server`` serving ``tests.front_app:app`` on a loopback port; yields its URL."""
    port = free_port()
    command = ["-m", *SERVERS[server].format(port=port).split(), *flags, f"tests.front_app:{app}"]
    environ = {**os.environ, "UPSTREAM_URL": upstream_url, **env}
    with process_on_port([sys.executable, *command], port, env=environ, cwd=ROOT) as url:
        yield url


def one_of_each(answer: httpx.Response) -> tuple[str, str]:
    """The answer's one Date and one Server."""
    dates, servers = answer.headers.get_list("date"), answer.headers.get_list("server")
    assert len(dates) == 1, answer.headers
    assert len(servers) == 1, answer.headers
    return dates[0], servers[0]


@pytest.mark.parametrize("server", list(SERVERS))
@pytest.mark.parametrize("app", ["proxy", "app"])
def test_one_date_and_one_server_on_every_answer(server: str, app: str, upstream_url: str) -> None:
    with front(server, app, upstream_url) as url, httpx.Client(base_url=url) as client:
        proxied = client.get("/x" if app == "proxy" else "/api/x")
        assert proxied.headers["x-upstream"] == "a"
        date, name = one_of_each(proxied)
        assert name != "upstream-a"  # the server in front's, as NGINX sends its own
        assert date != UPSTREAM_DATE
        one_of_each(client.get("/x?bare=1" if app == "proxy" else "/api/x?bare=1"))
        if app == "app":
            assert client.get("/own").text == "the app's own"
            one_of_each(client.get("/own"))


@pytest.mark.parametrize("app", ["proxy", "app"])
def test_the_upstream_s_date_and_server_pass_when_asked(app: str, upstream_url: str) -> None:
    """``pass_server_header`` under a server told to send none of its own: the upstream's pass,
    and where the upstream sent none the proxy sends one of each."""
    flags = ("--no-server-header", "--no-date-header")
    prefix = "" if app == "proxy" else "/api"
    with (
        front("uvicorn", app, upstream_url, *flags, PASS_SERVER_HEADER="1") as url,
        httpx.Client(base_url=url) as client,
    ):
        assert one_of_each(client.get(f"{prefix}/x")) == (UPSTREAM_DATE, "upstream-a")
        date, name = one_of_each(client.get(f"{prefix}/x?bare=1"))
        assert name == "asgi-leasttime"
        assert date.endswith(" GMT")
        assert date != UPSTREAM_DATE


# -- streaming, leaving clients, WebSocket, lifespan: one front per server and app form ----------

FORMS = {"proxy": "", "app": "/api"}  # the app in tests/front_app.py, and its upstream prefix
LIMIT = 10.0  # seconds any one wait may take
CHUNK = bytes(range(256)) * 256  # 64 KiB


def wait_for(condition: Callable[[], bool], what: str, limit: float = LIMIT) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"still not {what} after {limit} s"
        time.sleep(0.01)


class Recording(UpstreamApp):
    """The tests' upstream, which also shows how much of an upload it has, holds a response
    until told (``/r/gated``), and counts its open WebSockets."""

    def __init__(self) -> None:
        super().__init__("a")
        self.url = ""
        self.uploaded = 0  # bytes of the last upload received so far
        self.gate = threading.Event()  # set by a test: /r/gated sends the rest of its answer
        self.sockets = 0

    async def route_upload(self, scope: Any, receive: Any, send: Any, query: Any) -> None:
        digest, self.uploaded = hashlib.sha256(), 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            digest.update(chunk)
            self.uploaded += len(chunk)
            if not message.get("more_body"):
                break
        await self.respond(send, 200, f"{self.uploaded} {digest.hexdigest()}".encode())

    async def route_gated(self, scope: Any, receive: Any, send: Any, query: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        deadline = time.monotonic() + LIMIT
        while not self.gate.is_set() and time.monotonic() < deadline:  # noqa: ASYNC110
            await anyio.sleep(0.005)  # the gate is set from the test's thread
        self.gate.clear()
        await send({"type": "http.response.body", "body": b" rest"})

    async def websocket(self, scope: Any, receive: Any, send: Any) -> None:
        self.sockets += 1
        try:
            await super().websocket(scope, receive, send)
        finally:
            self.sockets -= 1


@pytest.fixture(scope="module")
def recording() -> Iterator[Recording]:
    app = Recording()
    with running_in_thread(app, lifespan="off") as url:
        app.url = url
        yield app


@dataclass
class Front:
    """A server serving one app of tests/front_app.py, its output kept in ``log``."""

    url: str
    prefix: str  # where the app sends requests upstream
    process: subprocess.Popen[bytes]
    log: Path

    def to(self, path: str, scheme: str = "http") -> str:
        """The URL of ``path`` upstream, through this front."""
        return self.url.replace("http", scheme, 1) + self.prefix + path

    def stop(self) -> int:
        """SIGTERM, as a service manager stops a server; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def tracebacks(self) -> str:
        """What the server logged of exceptions (nothing, if all went well)."""
        text = self.log.read_text(errors="replace")
        return text if "Traceback" in text else ""


@contextlib.contextmanager
def started(
    server: str, app: str, upstream_url: str, folder: Path, *flags: str, **env: str
) -> Iterator[Front]:
    """``server`` serving ``tests.front_app:app`` on a loopback port, its output in a log."""
    port = free_port()
    command = ["-m", *SERVERS[server].format(port=port).split(), *flags, f"tests.front_app:{app}"]
    environ = {**os.environ, "UPSTREAM_URL": upstream_url, **env}
    log = folder / f"{server}-{app}.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, *command], env=environ, cwd=ROOT, stdout=output, stderr=output
        )
    front = Front(f"http://127.0.0.1:{port}", FORMS[app], process, log)
    try:
        wait_for_port(port, process)
        yield front
    finally:
        front.stop()


FRONTS = [(server, app) for app in FORMS for server in SERVERS]


def front_id(front: tuple[str, ...]) -> str:
    return "-".join(reversed(front))


@pytest.fixture(scope="module", params=FRONTS, ids=front_id)
def served(
    request: pytest.FixtureRequest,
    recording: Recording,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Front]:
    server, app = request.param
    folder = tmp_path_factory.mktemp(f"{server}-{app}")
    with started(server, app, recording.url, folder, HEALTH_INTERVAL="0.2") as front:
        yield front


def test_a_large_request_body_streams_up(served: Front, recording: Recording) -> None:
    """64 chunks of 64 KiB without a length (chunked on HTTP/1.1): the upstream has the first
    before the client sends the second, and gets every byte."""

    def body() -> Iterator[bytes]:
        yield CHUNK
        wait_for(lambda: recording.uploaded > 0, "at the upstream: the first chunk")
        for _ in range(63):
            yield CHUNK

    expected = hashlib.sha256(CHUNK * 64).hexdigest()
    recording.uploaded = 0  # not the last test's
    with httpx.Client(timeout=LIMIT) as client:
        answer = client.post(served.to("/r/upload"), content=body())
        assert answer.text == f"{64 * len(CHUNK)} {expected}"
        # A body of known length too.
        answer = client.post(served.to("/r/upload"), content=CHUNK * 16)
        assert answer.text == f"{16 * len(CHUNK)} {hashlib.sha256(CHUNK * 16).hexdigest()}"
    assert not served.tracebacks()


def test_a_streamed_response_comes_down_as_the_upstream_sends_it(
    served: Front, recording: Recording
) -> None:
    with httpx.Client(timeout=LIMIT) as client:
        with client.stream("GET", served.to("/r/gated")) as answer:
            pieces = answer.iter_raw()
            # The upstream holds the rest until the gate opens: this came down alone.
            assert next(pieces) == b"first"
            recording.gate.set()
            assert b"".join(pieces) == b" rest"
        # 4 MiB in 256 pieces, whole.
        answer = client.get(served.to("/r/stream?chunks=256&size=16384"))
        assert answer.status_code == 200
        assert len(answer.content) == 256 * 16384
    wait_for(lambda: recording.streaming == 0, "the upstream's stream ended")


def test_a_client_leaving_mid_response_ends_the_upstream_s_stream(
    served: Front, recording: Recording
) -> None:
    """The client reads the first piece of a 20 s stream and closes its connection: the proxy
    closes its upstream connection, whose stream ends, and goes on answering."""
    with httpx.Client(timeout=LIMIT) as client:
        url = served.to("/r/stream?chunks=2000&size=1024&pause=0.01")
        with client.stream("GET", url) as answer:
            assert answer.status_code == 200
            next(answer.iter_raw())
            assert recording.streaming == 1
        client.close()  # the connection too (closing a response mid-body closes it anyway)
        wait_for(lambda: recording.streaming == 0, "the upstream's stream ended")
    with httpx.Client(timeout=LIMIT) as client:
        assert client.get(served.to("/x")).status_code == 200
        assert client.get(served.to("/r/stream?chunks=3")).content == b"x" * 3072
    assert not served.tracebacks()


def test_a_websocket_both_ways(served: Front, recording: Recording) -> None:
    url = served.to("/ws?q=1", "ws")
    with ws_connect(url, proxy=None, open_timeout=LIMIT, close_timeout=LIMIT) as ws:
        assert ws.recv(LIMIT) == "hello from a q=q=1"
        ws.send("hi")
        assert ws.recv(LIMIT) == "echo:hi"
        ws.send(b"abc")
        assert ws.recv(LIMIT) == b"cba"
        ws.send("close:4001")  # the upstream closes with 4001
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(LIMIT)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "asked")
    # The client closes: the upstream's socket closes too.
    with ws_connect(url, proxy=None, open_timeout=LIMIT, close_timeout=LIMIT) as ws:
        ws.recv(LIMIT)
        assert recording.sockets == 1
    wait_for(lambda: recording.sockets == 0, "the upstream's WebSocket closed")
    # The client leaves without a close frame: the same.
    with ws_connect(url, proxy=None, open_timeout=LIMIT, close_timeout=0.1) as ws:
        ws.recv(LIMIT)
        ws.socket.shutdown(socket.SHUT_RDWR)
        wait_for(lambda: recording.sockets == 0, "the upstream's WebSocket closed")
    assert not served.tracebacks()


@pytest.mark.parametrize(("server", "app"), FRONTS, ids=list(map(front_id, FRONTS)))
def test_the_proxy_s_lifespan_runs_under_the_server(
    server: str, app: str, recording: Recording, tmp_path: Path
) -> None:
    """The proxy's lifespan starts with the server (its health checks probe the upstream) and
    its shutdown runs on SIGTERM, after which the server exits 0."""
    log = tmp_path / "lifespan.log"
    with started(
        server, app, recording.url, tmp_path, HEALTH_INTERVAL="0.05", LIFESPAN_LOG=str(log)
    ) as front:
        wait_for(lambda: log.exists() and "startup" in log.read_text(), "started")
        probes = len(recording.probes)
        wait_for(lambda: len(recording.probes) >= probes + 2, "probing")
        with httpx.Client(timeout=LIMIT) as client:
            assert client.get(front.to("/x")).status_code == 200
        # uvicorn ends by the signal it shut down for, once done (as a shell shows it, 143).
        assert front.stop() in (0, -signal.SIGTERM), front.log.read_text()
    assert [line.split()[0] for line in log.read_text().splitlines()] == ["startup", "shutdown"]
    assert not front.tracebacks()


# -- HTTP/2 -----------------------------------------------------------------------------------

# The servers that speak HTTP/2, and how each is given a certificate (TLS, h2 by ALPN).
TLS_FLAGS = {
    "hypercorn": ("--certfile", "{pem}", "--keyfile", "{pem}"),
    "granian": ("--ssl-certificate", "{pem}", "--ssl-keyfile", "{pem}"),
}
H2_FRONTS = [(server, app, tls) for tls in ("tls", "h2c") for app in FORMS for server in TLS_FLAGS]


@dataclass
class Certificate:
    ca: trustme.CA
    pem: str  # the key and the chain for 127.0.0.1

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    ca = trustme.CA()
    pem = tmp_path_factory.mktemp("h2") / "front.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(pem)
    return Certificate(ca, str(pem))


@pytest.fixture(scope="module", params=H2_FRONTS, ids=front_id)
def h2_served(
    request: pytest.FixtureRequest,
    recording: Recording,
    certificate: Certificate,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Front, str]]:
    """A front for HTTP/2 clients, and the scheme they reach it by."""
    server, app, tls = request.param
    flags = [f.format(pem=certificate.pem) for f in TLS_FLAGS[server]] if tls == "tls" else []
    folder = tmp_path_factory.mktemp(f"{server}-{app}-{tls}")
    with started(server, app, recording.url, folder, *flags) as front:
        yield front, "https" if tls == "tls" else "http"


def h2_client(certificate: Certificate, scheme: str) -> httpx.Client:
    # Over cleartext, http1=False sends the HTTP/2 preface at once (prior knowledge).
    return httpx.Client(
        http1=scheme == "https", http2=True, verify=certificate.context(), timeout=LIMIT
    )


def test_http2_authority_is_the_upstream_s_host(
    h2_served: tuple[Front, str], certificate: Certificate
) -> None:
    front, scheme = h2_served
    with h2_client(certificate, scheme) as client:
        # httpx sends the Host asked for as :authority, and no host field.
        answer = client.get(front.to("/echo", scheme), headers={"host": "front.example:8443"})
    assert answer.http_version == "HTTP/2"
    seen = json.loads(answer.content)
    headers = [(name, value) for name, value in seen["headers"] if name != "x-forwarded-for"]
    assert [value for name, value in headers if name == "host"] == ["front.example:8443"]
    assert ("x-forwarded-host", "front.example:8443") in headers
    assert ("x-forwarded-proto", scheme) in headers
    assert seen["path"] == "/echo"
    # An HTTP/2 request says it has no body by its frames alone: none is made up for it.
    assert seen["body"] == ""
    assert not {"content-length", "transfer-encoding"} & {name for name, _ in headers}


def test_http2_streams_both_ways(
    h2_served: tuple[Front, str], recording: Recording, certificate: Certificate
) -> None:
    front, scheme = h2_served

    def body() -> Iterator[bytes]:
        yield CHUNK
        wait_for(lambda: recording.uploaded > 0, "at the upstream: the first chunk")
        for _ in range(31):
            yield CHUNK

    recording.uploaded = 0  # not the last test's
    with h2_client(certificate, scheme) as client:
        answer = client.post(front.to("/r/upload", scheme), content=body())
        assert answer.text == f"{32 * len(CHUNK)} {hashlib.sha256(CHUNK * 32).hexdigest()}"
        with client.stream("GET", front.to("/r/gated", scheme)) as streamed:
            pieces = streamed.iter_raw()
            assert next(pieces) == b"first"
            recording.gate.set()
            assert b"".join(pieces) == b" rest"


def test_http2_a_stream_reset_mid_response_ends_the_upstream_s_stream(
    h2_served: tuple[Front, str], recording: Recording, certificate: Certificate
) -> None:
    """RST_STREAM on one stream of a connection that stays: the upstream's stream ends, and the
    next stream on the same connection is answered."""
    front, scheme = h2_served
    port = httpx.URL(front.url).port
    assert port is not None
    sock: socket.socket = socket.create_connection(("127.0.0.1", port), LIMIT)
    if scheme == "https":
        context = certificate.context()
        context.set_alpn_protocols(["h2"])
        sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()

    def request(stream: int, path: str) -> None:
        head = [(":method", "GET"), (":path", front.prefix + path), (":scheme", scheme),
                (":authority", f"127.0.0.1:{port}")]  # fmt: skip
        connection.send_headers(stream, head, end_stream=True)
        sock.sendall(connection.data_to_send())

    def until(wanted: type, stream: int) -> list[Any]:
        """The events read until one of kind ``wanted`` on ``stream``."""
        events: list[Any] = []
        while not any(
            isinstance(e, wanted) and getattr(e, "stream_id", 0) == stream for e in events
        ):
            data = sock.recv(65536)
            assert data, "the server closed the connection"
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    connection.acknowledge_received_data(event.flow_controlled_length, stream)
                events.append(event)
            sock.sendall(connection.data_to_send())
        return events

    with sock:
        request(1, "/r/stream?chunks=2000&size=1024&pause=0.01")
        until(h2.events.DataReceived, 1)
        assert recording.streaming == 1
        connection.reset_stream(1)
        sock.sendall(connection.data_to_send())
        wait_for(lambda: recording.streaming == 0, "the upstream's stream ended")
        request(3, "/x")
        events = until(h2.events.StreamEnded, 3)
        [response] = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
        assert dict(response.headers)[b":status"] == b"200"
    assert not front.tracebacks()
