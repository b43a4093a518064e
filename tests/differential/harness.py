"""The differential suite's parts: real upstream software, real clients, and the normalisation that
makes a direct answer and a proxied one comparable.

Upstreams: httpbin on gunicorn (a Flask app behind a WSGI server: early answers, 304s, redirects,
cookies, gzip, streaming), nginx (static files, gzip, ranges, conditional requests, a base path),
and a raw socket upstream that misbehaves on purpose. Clients: curl, requests, httpx and aiohttp,
each asked to decode nothing, so bodies compare byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import requests

from asgi_leasttime import LeastTimeProxy, Upstream
from tests.rawserver import threaded_upstream
from tests.servers import free_port, process_on_port, running_in_thread

Headers = list[tuple[str, str]]

HOST = "conformance.test"  # every request names this host, direct or proxied


@dataclass(frozen=True)
class Case:
    """One request, sent to an upstream directly and through the proxy."""

    name: str
    upstream: str  # "httpbin" or "nginx"
    method: str
    path: str
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    fast: bool = False  # in the subset make test runs
    # The answer echoes the request's header fields (httpbin), which the proxy changes by design:
    # compared decoded, without those fields, and without Content-Length.
    echo: bool = False

    def __str__(self) -> str:
        return self.name


@dataclass
class Answer:
    """What a client saw: the status, the final header section in order, the raw body; or the
    error it raised."""

    status: int
    headers: Headers
    body: bytes
    error: str = ""


# -- the upstreams --------------------------------------------------------------------------------


@contextlib.contextmanager
def httpbin() -> Iterator[str]:
    """httpbin 0.10 served by gunicorn's sync workers, as people deploy Flask apps."""
    port = free_port()
    gunicorn = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}"]
    command = [*gunicorn, "--workers", "2", "--log-level", "warning", "httpbin:app"]
    with process_on_port(command, port) as url:
        yield url


NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {root}/tmp;
    proxy_temp_path {root}/tmp;
    fastcgi_temp_path {root}/tmp;
    uwsgi_temp_path {root}/tmp;
    scgi_temp_path {root}/tmp;
    default_type text/plain;
    gzip on;
    gzip_types text/plain application/json;
    gzip_min_length 20;
    server {{
        listen 127.0.0.1:{port};
        root {root}/www;
        location /echo-status/ {{ return 418 "teapot"; }}
    }}
}}
"""

NGINX_FILES = {
    "www/base/index.txt": b"the base index\n",
    "www/base/big.txt": b"".join(
        b"line %05d of a text worth compressing\n" % i for i in range(5000)
    ),
    "www/base/data.json": b'{"a": [1, 2, 3], "b": "text"}\n' * 20,
    "www/base/sub/page.txt": b"a page below the base\n",
    "www/secret.txt": b"outside the base: nobody may read this through the proxy\n",
}


def nginx_executable() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else ""
    )
    if not found:
        raise RuntimeError("nginx is missing: make system-deps installs it (nginx-light)")
    return found


@contextlib.contextmanager
def nginx() -> Iterator[str]:
    """nginx serving static files with gzip; the proxy's upstream for it is ``/base``."""
    with tempfile.TemporaryDirectory() as root:
        for name, content in NGINX_FILES.items():
            path = Path(root, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        os.utime(Path(root, "www/base/big.txt"), (1_700_000_000, 1_700_000_000))
        Path(root, "tmp").mkdir()
        port = free_port()
        conf = Path(root, "nginx.conf")
        conf.write_text(NGINX_CONF.format(root=root, port=port))
        with process_on_port([nginx_executable(), "-c", str(conf), "-p", root], port) as url:
            yield url


@contextlib.contextmanager
def raw_upstream(answer: Callable[[bytes], bytes]) -> Iterator[str]:
    """A socket upstream that answers each request with ``answer(request head)``, as bytes
    written at once, whatever HTTP says about them."""

    def serve(sock: socket.socket) -> None:
        data = b""
        while True:
            request, data = read_request(sock, data)
            if not request:
                return
            sock.sendall(answer(request))

    with threaded_upstream(serve) as url:
        yield url


def read_request(sock: socket.socket, data: bytes) -> tuple[bytes, bytes]:
    """One request head from ``sock`` (its Content-Length body read past); the head and the
    bytes after the request. An empty head when the client closed."""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return b"", b""
        data += chunk
    head, _, data = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(data) < length:
        data += sock.recv(65536)
    return head, data[length:]


@contextlib.contextmanager
def proxy_for(url: str, upstream_client: str) -> Iterator[str]:
    """The proxy in front of one upstream, under uvicorn as ``asgi-leasttime serve`` runs it."""
    proxy = LeastTimeProxy(upstreams=[Upstream(url)], upstream_client=upstream_client)  # type: ignore[arg-type]
    with running_in_thread(proxy, lifespan="on", http="httptools") as proxy_url:
        yield proxy_url


# -- the clients ----------------------------------------------------------------------------------


def _curl(url: str, case: Case) -> Answer:
    with tempfile.TemporaryDirectory() as scratch:
        body_file, head_file = Path(scratch, "body"), Path(scratch, "head")
        command = ["curl", "-sS", "--path-as-is", "--max-time", "20", "-o", str(body_file)]
        command += ["-D", str(head_file), "-H", "Expect:"]
        command += ["-I"] if case.method == "HEAD" else ["-X", case.method]
        for name, value in case.headers:
            command += ["-H", f"{name}: {value}"]
        if case.method == "HEAD":
            command = [*command[:4], os.devnull, *command[5:]]  # -I writes the head to -o
        if case.body:
            command += ["--data-binary", "@-"]
        finished = subprocess.run([*command, url], input=case.body, capture_output=True, timeout=30)
        if finished.returncode != 0:
            return Answer(0, [], b"", f"curl exit {finished.returncode}")
        blocks = head_file.read_bytes().decode("latin-1").strip().split("\r\n\r\n")
        lines = blocks[-1].split("\r\n")  # the last head: interim ones come before it
        headers = [
            (n.strip().lower(), v.strip()) for n, _, v in (x.partition(":") for x in lines[1:])
        ]
        body = body_file.read_bytes() if body_file.exists() and case.method != "HEAD" else b""
        return Answer(int(lines[0].split()[1]), headers, body)


def _requests(url: str, case: Case) -> Answer:
    response = requests.request(
        case.method,
        url,
        headers=dict(case.headers),
        data=case.body or None,
        allow_redirects=False,
        stream=True,
        timeout=20,
    )
    with response:
        body = response.raw.read(decode_content=False)
        headers = [(n.lower(), v) for n, v in response.raw.headers.items()]
        return Answer(response.status_code, headers, body)


def _httpx(url: str, case: Case) -> Answer:
    with httpx.Client(timeout=20) as client:
        request = client.build_request(
            case.method, url, headers=case.headers, content=case.body or None
        )
        response = client.send(request, stream=True)
        with contextlib.closing(response):
            body = b"".join(response.iter_raw())
            headers = [(n.decode().lower(), v.decode("latin-1")) for n, v in response.headers.raw]
            return Answer(response.status_code, headers, body)


def _aiohttp(url: str, case: Case) -> Answer:
    async def fetch() -> Answer:
        timeout = aiohttp.ClientTimeout(total=20)
        async with (
            aiohttp.ClientSession(auto_decompress=False, timeout=timeout) as session,
            session.request(
                case.method,
                url,
                headers=case.headers,
                data=case.body or None,
                allow_redirects=False,
                skip_auto_headers=("Content-Type",),
            ) as response,
        ):
            body = await response.read()
            headers = [(n.decode().lower(), v.decode("latin-1")) for n, v in response.raw_headers]
            return Answer(response.status, headers, body)

    return asyncio.run(fetch())


CLIENTS: dict[str, Callable[[str, Case], Answer]] = {
    "curl": _curl,
    "requests": _requests,
    "httpx": _httpx,
    "aiohttp": _aiohttp,
}


def fetch(client: str, base: str, case: Case) -> Answer:
    """``case`` sent by ``client`` to ``base``; an error the client raises becomes the answer."""
    case_with_host = Case(**{**case.__dict__, "headers": [("Host", HOST), *case.headers]})
    try:
        return CLIENTS[client](base + case.path, case_with_host)
    except Exception as exc:  # the client's verdict on what it got: compared like the rest
        return Answer(0, [], b"", type(exc).__name__)


# -- normalisation --------------------------------------------------------------------------------

# Connection-level fields: the proxy frames its own connection to the client (RFC 9110 7.6.1).
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding"}
# Request fields httpbin echoes that differ by design: the proxy adds X-Forwarded-* (httpbin
# derives "origin" from X-Forwarded-For) and removes Connection, which is hop-by-hop.
FORWARDING_HEADERS = {"X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "Connection"}


def normalised(answer: Answer, case: Case) -> dict[str, object]:
    """What must be equal, direct and proxied.

    - the status and the error (a client that fails directly must fail through the proxy too);
    - header fields, in order, minus hop-by-hop ones; ``date`` and ``server`` by count only (the
      server in front sends its own, as NGINX does, first: the value and the place differ);
      nginx's multipart boundary (a per-request counter) replaced;
    - the body, byte for byte; for an echo (``case.echo``), decoded and with the forwarding
      fields and ``origin`` removed, and then ``Content-Length`` is not compared.
    """
    body = _echo_without_forwarding(answer) if case.echo else answer.body
    boundary = _multipart_boundary(answer)
    headers = []
    front = {"date": 0, "server": 0}
    for name, value in answer.headers:
        if name in HOP_BY_HOP or (case.echo and name == "content-length"):
            continue
        if name in front:
            front[name] += 1
            continue
        if boundary and name == "content-type":
            value = value.replace(boundary, "<boundary>")
        headers.append((name, value))
    if boundary:
        body = body.replace(boundary.encode(), b"<boundary>")
    return {
        "status": answer.status,
        "error": answer.error,
        "headers": headers,
        "front": front,
        "body": body,
    }


def _multipart_boundary(answer: Answer) -> str:
    """nginx numbers the boundaries of multipart/byteranges answers per request."""
    content_type = dict(answer.headers).get("content-type", "")
    if not content_type.startswith("multipart/byteranges"):
        return ""
    return content_type.partition("boundary=")[2]


def decoded(answer: Answer) -> bytes:
    """The body with its content coding undone."""
    coding = dict(answer.headers).get("content-encoding", "")
    if coding == "gzip":
        return gzip.decompress(answer.body)
    if coding == "deflate":
        return zlib.decompress(answer.body)
    if coding == "br":
        import brotlicffi  # httpbin's own dependency

        return bytes(brotlicffi.decompress(answer.body))
    return answer.body


def _echo_without_forwarding(answer: Answer) -> bytes:
    text = decoded(answer)
    try:
        documents = [json.loads(text)] if text else []
    except ValueError:  # /stream answers one document a line
        try:
            documents = [json.loads(line) for line in text.splitlines()]
        except ValueError:
            return answer.body
    for document in documents:
        if isinstance(document, dict):
            document.pop("origin", None)
            echoed = document.get("headers")
            if isinstance(echoed, dict):
                for name in FORWARDING_HEADERS:
                    echoed.pop(name, None)
    return "\n".join(json.dumps(document, sort_keys=True) for document in documents).encode()
