"""The public surface: what asgi_leasttime exports is documented, and the machinery is private."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import asgi_leasttime

API_PAGE = Path(__file__).resolve().parent.parent / "docs" / "api.md"

# Modules a user imports from besides the package itself; every other module is private.
PUBLIC_MODULES = {
    "admin", "balancer", "cli", "client", "config", "dashboard", "demo", "health", "lease",
    "metrics", "middleware",
    "options", "proxy", "redis_state", "state", "status", "sticky", "tls", "types", "upstream",
    "upstreams", "errors", "retry", "workers_state", "discovery",
    "records", "access_log", "tracing", "load_reports", "reload",
}  # fmt: skip


def test_every_exported_name_is_documented() -> None:
    page = API_PAGE.read_text()
    for name in asgi_leasttime.__all__:
        if name in ("__version__", "Mode"):  # a string and a Literal type: nothing to render
            continue
        value = getattr(asgi_leasttime, name)
        assert value.__doc__, name
        assert f"::: asgi_leasttime.{name}\n" in page, name


def test_the_machinery_is_private() -> None:
    modules = {info.name for info in pkgutil.iter_modules(asgi_leasttime.__path__)}
    assert {m for m in modules if not m.startswith("_")} == PUBLIC_MODULES
    for name in sorted(modules):
        module = importlib.import_module(f"asgi_leasttime.{name}")
        assert module.__doc__, name
