"""The apps ``tests/test_servers.py`` serves under each ASGI server, as a user's module would:
``proxy``, the proxy as the whole app, and ``app``, an app of its own with the middleware form
sending ``/api`` upstream. The upstream's URL comes from ``UPSTREAM_URL``; ``PASS_SERVER_HEADER=1``
passes the upstream's ``Date`` and ``Server`` through; ``HEALTH_INTERVAL`` (seconds) turns on the
active health check, which runs only in the proxy's lifespan; ``LIFESPAN_LOG`` names a file the
proxy writes ``startup <pid>`` to once its lifespan has started and ``shutdown <pid>`` once its
shutdown is over."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_leasttime import HealthCheck, LeastTimeMiddleware, LeastTimeProxy

UPSTREAM = os.environ.get("UPSTREAM_URL", "http://127.0.0.1:9")
PASSED = os.environ.get("PASS_SERVER_HEADER") == "1"
INTERVAL = os.environ.get("HEALTH_INTERVAL")
LIFESPAN_LOG = os.environ.get("LIFESPAN_LOG")


class MarkedProxy(LeastTimeProxy):
    """The proxy, marking in ``LIFESPAN_LOG`` when its lifespan has started and when its
    shutdown is over (its checks stopped, its clients closed)."""

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        async with super().lifespan(app):
            mark("startup")
            yield
        mark("shutdown")


def mark(event: str) -> None:
    assert LIFESPAN_LOG is not None
    with open(LIFESPAN_LOG, "a") as log:
        log.write(f"{event} {os.getpid()}\n")


options: dict[str, Any] = {
    "pass_server_header": PASSED,
    "health_check": HealthCheck(interval=float(INTERVAL)) if INTERVAL else None,
}
Proxy = MarkedProxy if LIFESPAN_LOG else LeastTimeProxy

proxy = Proxy(upstreams=[UPSTREAM], **options)


async def own(request: object) -> PlainTextResponse:
    return PlainTextResponse("the app's own")


app = Starlette(routes=[Route("/own", own)])
if LIFESPAN_LOG:
    app.add_middleware(LeastTimeMiddleware, proxy=Proxy(upstreams=[UPSTREAM], **options),
                       paths=["/api"])  # fmt: skip
else:
    app.add_middleware(LeastTimeMiddleware, upstreams=[UPSTREAM], paths=["/api"], **options)
