"""The path below root_path: one rule (a segment boundary) for the proxy's upstream target, the
middleware's path selection and the admin app's routes."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from asgi_leasttime import LeastTimeMiddleware, LeastTimeProxy
from asgi_leasttime._forwarding import upstream_target
from asgi_leasttime._paths import path_below_root
from asgi_leasttime.metrics import AdminApp
from tests.servers import UpstreamApp, running

pytestmark = pytest.mark.anyio

# (root_path, path, the path below root_path)
CASES = [
    ("", "/x", "/x"),
    ("/api", "/api/x", "/x"),
    ("/api", "/api", "/"),  # the mount point itself
    ("/api", "/api/", "/"),
    ("/api", "/apiary", "/apiary"),  # not below /api: no segment boundary
    ("/api", "/apiary/x", "/apiary/x"),
    ("/api", "/other", "/other"),  # a server that keeps root_path out of path
    ("/api/", "/api/x", "/x"),  # a root_path with its slash
    ("/a/b", "/a/b/c", "/c"),
    ("/a/b", "/a/bc", "/a/bc"),
]


@pytest.mark.parametrize(("root_path", "path", "below"), CASES)
def test_path_below_root(root_path: str, path: str, below: str) -> None:
    assert path_below_root({"root_path": root_path, "path": path}) == below


@pytest.mark.parametrize(("root_path", "path", "below"), CASES)
def test_the_upstream_target_follows_the_same_rule(root_path: str, path: str, below: str) -> None:
    scope: dict[str, Any] = {"root_path": root_path, "path": path, "query_string": b"q=1"}
    assert upstream_target(scope) == below.encode() + b"?q=1"  # rebuilt from the path
    scope["raw_path"] = path.encode()  # Starlette keeps the mount prefix in raw_path
    assert upstream_target(scope) == below.encode() + b"?q=1"


def test_the_upstream_target_keeps_the_raw_bytes_below_the_root() -> None:
    scope = {"root_path": "/api", "path": "/apiary/a b", "raw_path": b"/apiary/a%20b"}
    assert upstream_target(scope) == b"/apiary/a%20b"
    scope = {"root_path": "/api", "path": "/api/a b", "raw_path": b"/api/a%20b"}
    assert upstream_target(scope) == b"/a%20b"


async def test_the_middleware_selects_on_the_path_below_its_root() -> None:
    """Mounted at /api, a request for /apiary is not below the mount: its whole path is what
    the paths are matched against."""
    async with running(UpstreamApp("up")) as upstream_url:
        middleware = LeastTimeMiddleware(Starlette(), upstreams=[upstream_url], paths=["/apiary"])
        transport = httpx.ASGITransport(app=middleware, root_path="/api")
        async with (
            middleware.proxy.lifespan(),
            httpx.AsyncClient(transport=transport, base_url="http://test") as client,
        ):
            outside = await client.get("/apiary/x")
            assert outside.status_code == 200  # upstream, not Starlette's 404
            assert outside.json()["path"] == "/x"  # below the selected prefix
            under = await client.get("/api/apiary/y")
            assert under.status_code == 200
            assert under.json()["path"] == "/y"
            assert (await client.get("/api/other")).status_code == 404  # the app's


async def test_the_admin_app_routes_on_the_path_below_its_root() -> None:
    admin = AdminApp(LeastTimeProxy(upstreams=["http://127.0.0.1:9"]))

    async def get(root_path: str, path: str) -> int:
        transport = httpx.ASGITransport(app=admin, root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return (await client.get(path)).status_code

    assert await get("/ops", "/ops/status") == 200
    assert await get("/ops", "/ops") == 200  # the dashboard at the mount point
    assert await get("/st", "/status") == 200  # /st is not a prefix of /status: read whole
    assert await get("/ops", "/status") == 200  # a server that keeps root_path out of path
    assert await get("/ops", "/opsstatus") == 404
