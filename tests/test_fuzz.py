"""Fuzzing the proxy with hypothesis: whatever a client sends, no 500 and no exception escapes.

Requests are written on raw sockets, so anything HTTP/1.1 allows on the wire can be sent (and
some of what it does not: the server in front may refuse those with a 400, which is fine).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asgi_leasttime import LeastTimeProxy, StickyCookie, Upstream
from tests.servers import UpstreamApp, running_in_thread

TOKEN = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
FIELD = bytes([*range(0x21, 0x7F), *range(0x80, 0x100)])
TARGET = bytes(range(0x21, 0x7F))  # visible ASCII: what a request target may hold on the wire


class Guard:
    """Records any exception that escapes the proxy (uvicorn would turn it into a 500)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.escaped: list[BaseException] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            await self.app(scope, receive, send)
        except Exception as exc:
            self.escaped.append(exc)
            raise


@contextlib.contextmanager
def proxy_in_thread() -> Iterator[tuple[Guard, int]]:
    with running_in_thread(UpstreamApp("a")) as upstream_url:
        proxy = LeastTimeProxy(
            upstreams=[Upstream(upstream_url, name="a")],
            sticky=StickyCookie(secret_key="fuzz", name="lb"),
        )
        guard = Guard(proxy)
        with running_in_thread(guard, lifespan="on") as url:
            yield guard, int(url.rsplit(":", 1)[1])


def status_of(port: int, request: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    if not answer:
        return 0  # closed without an answer: a refusal, not an error
    return int(answer.split(b" ", 2)[1])


def bytes_from(alphabet: bytes, min_size: int = 0, max_size: int = 60) -> st.SearchStrategy[bytes]:
    return st.lists(st.sampled_from(alphabet), min_size=min_size, max_size=max_size).map(bytes)


field_value = st.builds(
    lambda first, middle: (first + middle).strip(),
    bytes_from(FIELD, 1, 1),
    st.lists(st.sampled_from(FIELD + b" \t"), max_size=80).map(bytes),
).filter(bool)

request_parts = st.fixed_dictionaries(
    {
        "method": st.sampled_from(
            [b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH"]
        ),
        "path": bytes_from(TARGET, 0, 80).map(lambda p: b"/" + p.replace(b"?", b"%3F")),
        "query": st.one_of(st.just(b""), bytes_from(TARGET, 0, 80)),
        "headers": st.lists(st.tuples(bytes_from(TOKEN, 1, 30), field_value), max_size=8),
        "cookie": st.one_of(st.none(), field_value),
        "body": st.one_of(st.just(b""), st.binary(max_size=200)),
    }
)

SKIPPED = {b"content-length", b"transfer-encoding", b"host", b"connection", b"expect", b"upgrade"}


def build(parts: dict[str, Any]) -> bytes:
    target = parts["path"] + (b"?" + parts["query"] if parts["query"] else b"")
    lines = [parts["method"] + b" " + target + b" HTTP/1.1", b"host: fuzz.example"]
    lines += [
        name + b": " + value for name, value in parts["headers"] if name.lower() not in SKIPPED
    ]
    if parts["cookie"] is not None:
        lines.append(b"cookie: lb=" + parts["cookie"])
    lines.append(b"content-length: " + str(len(parts["body"])).encode())
    lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + parts["body"]


def test_no_request_gets_a_500_or_escapes_the_proxy() -> None:
    statuses: dict[int, int] = {}
    with proxy_in_thread() as (guard, port):

        @settings(
            max_examples=2000, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(parts=request_parts)
        def one_request(parts: dict[str, Any]) -> None:
            status = status_of(port, build(parts))
            statuses[status] = statuses.get(status, 0) + 1
            assert status != 500, build(parts)

        one_request()
    print(f"statuses of {sum(statuses.values())} fuzzed requests: {sorted(statuses.items())}")
    assert guard.escaped == []
    assert sum(statuses.values()) >= 2000
    assert statuses.get(200, 0) > 1000  # most of them were proxied, not refused
