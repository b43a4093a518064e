"""The proxy and the middleware form under every ASGI server our users run, each started as its
docs say (no flags): exactly one ``Date`` and one ``Server`` on every answer.

Every server tried adds its own ``Date`` and ``Server`` to what the app sends (uvicorn with either
parser, gunicorn's uvicorn workers, hypercorn), or sends its own where the app sends none
(granian), so the proxy drops the upstream's, as NGINX does. With ``pass_server_header`` the
upstream's pass instead, under a server told to send none.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import free_port, process_on_port, running_in_thread

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
