"""Direct against proxied: real upstream software, real clients, every difference accounted for.

Each case is sent by each client straight to the upstream and through the proxy (on the lean client
and on httpx), and the two answers are compared after :func:`normalised`. A difference passes only
when it is listed in ``ACCEPTED`` with its reason and the proxied answer is exactly the one the
reason predicts; the same list is in docs/reliability.md. ``make test`` runs the cases marked fast,
``make conformance`` (``DIFFERENTIAL=all``) every case.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.differential.cases import ALL
from tests.differential.harness import (
    CLIENTS,
    Answer,
    Case,
    decoded,
    fetch,
    httpbin,
    nginx,
    normalised,
    proxy_for,
    raw_upstream,
)

EVERYTHING = os.environ.get("DIFFERENTIAL") == "all"
CASES = ALL if EVERYTHING else [case for case in ALL if case.fast]
UPSTREAM_CLIENTS = ["lean", "httpx"]


@dataclass(frozen=True)
class Accepted:
    """A difference by design: the proxied status it must have, and why."""

    status: int
    reason: str


DOT_SEGMENT = Accepted(400, "a path with a dot segment is refused (it could leave a base path)")
HTTPX_EARLY_ANSWER = Accepted(
    502,
    "httpx path only: gunicorn answers before reading the body and resets the connection; "
    "httpcore reads only while a read is awaited, so the answer is lost with the socket",
)

# (case, client or "*", upstream client or "*") -> what the proxied answer is instead.
ACCEPTED: dict[tuple[str, str, str], Accepted] = {
    # Only curl (--path-as-is) sends dot segments; the libraries resolve them before sending.
    ("anything-dot-segment", "curl", "*"): DOT_SEGMENT,
    ("status-401-big-body", "*", "httpx"): HTTPX_EARLY_ANSWER,
    ("status-413-big-body", "*", "httpx"): HTTPX_EARLY_ANSWER,
}

# Requests aimed outside the upstream's base path (nginx's upstream is /base): compared not with
# the direct answer (nginx resolves the dots and serves the file) but with "never the secret".
ESCAPES = {"escape-dotdot", "escape-encoded", "escape-slash-encoded", "escape-deeper"}
SECRET = b"outside the base"


def accepted(case: Case, client: str, upstream_client: str) -> Accepted | None:
    for key in ((case.name, client, upstream_client), (case.name, "*", upstream_client),
                (case.name, client, "*"), (case.name, "*", "*")):  # fmt: skip
        if key in ACCEPTED:
            return ACCEPTED[key]
    return None


@pytest.fixture(scope="module")
def targets() -> Iterator[dict[str, str]]:
    """Each upstream directly, and the proxy in front of it on each upstream client."""
    with contextlib.ExitStack() as stack:
        direct = {"httpbin": stack.enter_context(httpbin())}
        direct["nginx"] = stack.enter_context(nginx()) + "/base"
        found = dict(direct)
        for name, url in direct.items():
            for upstream_client in UPSTREAM_CLIENTS:
                found[f"{name} via {upstream_client}"] = stack.enter_context(
                    proxy_for(url, upstream_client)
                )
        yield found


def one_of_each(answer: Answer) -> None:
    """Exactly one Date and one Server on every answer the proxy forwards: uvicorn's."""
    if not answer.status:  # the client gave up: no answer to look at
        return
    names = [name for name, _ in answer.headers]
    assert names.count("date") == 1, answer.headers
    assert names.count("server") == 1, answer.headers


@pytest.mark.parametrize("upstream_client", UPSTREAM_CLIENTS)
@pytest.mark.parametrize("client", list(CLIENTS))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_direct_and_proxied_agree(
    targets: dict[str, str], case: Case, client: str, upstream_client: str
) -> None:
    proxied = fetch(client, targets[f"{case.upstream} via {upstream_client}"], case)
    one_of_each(proxied)
    if case.name in ESCAPES:
        assert SECRET not in decoded(proxied) if proxied.body else True
        # 400 from the proxy when the dots arrive; 404 below the base when the client resolved
        # them first (/base/secret.txt does not exist).
        assert proxied.status in (400, 404), proxied
        return
    direct = fetch(client, targets[case.upstream], case)
    if normalised(direct, case) == normalised(proxied, case):
        return
    difference = accepted(case, client, upstream_client)
    assert difference is not None, (normalised(direct, case), normalised(proxied, case))
    assert proxied.status == difference.status, (difference.reason, proxied)


# -- the misbehaving upstream, through every client -----------------------------------------------

HELLO = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"
SMUGGLED = b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\nx-smuggled: 1\r\n\r\nSMUGGLE"
TRAILERS = (
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: set-cookie, location\r\n\r\n"
    b"5\r\nhello\r\n0\r\nset-cookie: evil=1\r\nlocation: http://evil.example/\r\n\r\n"
)
REPEAT = 20 if EVERYTHING else 3


@pytest.mark.parametrize("upstream_client", UPSTREAM_CLIENTS)
@pytest.mark.parametrize("answer", [HELLO + SMUGGLED, TRAILERS], ids=["smuggle", "trailers"])
def test_no_desync_and_no_trailer_promotion_for_any_client(
    upstream_client: str, answer: bytes
) -> None:
    get = Case("probe", "raw", "GET", "/")
    post = Case("probe", "raw", "POST", "/", body=b"data")
    with raw_upstream(lambda _: answer) as url, proxy_for(url, upstream_client) as proxy:
        for _ in range(REPEAT):
            for client in CLIENTS:
                for case in (get, post):
                    proxied = fetch(client, proxy, case)
                    assert (proxied.status, proxied.body) == (200, b"hello"), (client, proxied)
                    names = {name for name, _ in proxied.headers}
                    assert not names & {"set-cookie", "location", "x-smuggled"}, proxied.headers
