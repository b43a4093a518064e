"""The apps ``tests/test_servers.py`` serves under each ASGI server, as a user's module would:
``proxy``, the proxy as the whole app, and ``app``, an app of its own with the middleware form
sending ``/api`` upstream. The upstream's URL comes from ``UPSTREAM_URL``; ``PASS_SERVER_HEADER=1``
passes the upstream's ``Date`` and ``Server`` through."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_leasttime import LeastTimeMiddleware, LeastTimeProxy

UPSTREAM = os.environ.get("UPSTREAM_URL", "http://127.0.0.1:9")
PASSED = os.environ.get("PASS_SERVER_HEADER") == "1"

proxy = LeastTimeProxy(upstreams=[UPSTREAM], pass_server_header=PASSED)


async def own(request: object) -> PlainTextResponse:
    return PlainTextResponse("the app's own")


app = Starlette(routes=[Route("/own", own)])
app.add_middleware(
    LeastTimeMiddleware, upstreams=[UPSTREAM], paths=["/api"], pass_server_header=PASSED
)
