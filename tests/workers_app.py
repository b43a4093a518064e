"""An app with the middleware on ``WorkersState``, for ``uvicorn tests.workers_app:app
--workers 2`` (tests/test_workers_state.py): its upstreams come from ``UPSTREAMS``;
``/whoami`` says which worker answers and what it holds of each upstream, ``PUT
/admin/{name}/down`` marks one down."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_leasttime import HealthCheck, LeastTimeMiddleware, LeastTimeProxy, Upstream
from asgi_leasttime.workers_state import WorkersState

proxy = LeastTimeProxy(
    upstreams=[
        Upstream(url, name=name)
        for name, url in (item.split("=", 1) for item in os.environ["UPSTREAMS"].split(","))
    ],
    name="workers-test",
    # Each worker signs its probes, so that the upstream can tell who probes.
    health_check=HealthCheck(interval=0.1, headers={"x-prober": str(os.getpid())}),
    state=WorkersState(),
)


async def whoami(request: Request) -> JSONResponse:
    up = {status.name: status.up for status in proxy.upstream_status()}
    return JSONResponse({"pid": os.getpid(), "up": up})


async def down(request: Request) -> JSONResponse:
    proxy.set_status(request.path_params["name"], False)
    return JSONResponse({"pid": os.getpid()})


app = LeastTimeMiddleware(
    Starlette(
        routes=[Route("/whoami", whoami), Route("/admin/{name}/down", down, methods=["PUT"])]
    ),
    proxy=proxy,
    paths=["/api"],
)
