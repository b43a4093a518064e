"""The middleware form: some of an app's requests go upstream, the rest reach the app untouched.

``app.add_middleware(LeastTimeMiddleware, upstreams=[...], paths=["/api"])`` is how Starlette and
FastAPI users add anything to their app; the requests it selects (by path prefix, by host, by a
predicate on the scope) go through a :class:`~asgi_leasttime.proxy.LeastTimeProxy`, everything
else (the app's routes, its docs, its static files, its WebSockets) is the app's. The proxy's
lifespan runs around the app's, so its client and health checks live as long as the app.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote

from asgi_leasttime._paths import path_below_root
from asgi_leasttime.options import OptionError
from asgi_leasttime.proxy import LeastTimeProxy
from asgi_leasttime.types import ASGIApp, Message, Receive, Scope, Send
from asgi_leasttime.upstream import Upstream, upstream_list

__all__ = ["LeastTimeMiddleware"]

_SHUTDOWN_OVER = frozenset({"lifespan.shutdown.complete", "lifespan.shutdown.failed"})


class LeastTimeMiddleware:
    """Send the requests an app selects upstream, through a least-time proxy of their own.

    A request goes upstream when it matches every selection given: its path is under one of
    ``paths``, its host matches one of ``hosts``, and ``when(scope)`` is true. The rest, and
    every request the selections leave out, reach ``app`` unchanged. At least one selection is
    required: a middleware that sent everything upstream would leave the app nothing.

    Arguments:
        app: the wrapped app (Starlette's ``add_middleware`` passes it).
        upstreams: URLs or :class:`~asgi_leasttime.upstream.Upstream` objects, for a proxy made
            here with ``proxy_options``; or give ``proxy`` instead.
        proxy: a :class:`~asgi_leasttime.proxy.LeastTimeProxy` made beforehand, to keep a hand
            on it (``set_status``, an ``AdminApp``).
        paths: path prefixes, each matched whole segments at a time (``/api`` takes ``/api`` and
            ``/api/users``, not ``/apiary``).
        hosts: host names, the port left out; ``*`` or a ``{name}`` placeholder matches any run
            of characters as in Starlette's ``Host`` route (``*.example.org``,
            ``{tenant}.example.org``); case does not matter.
        when: a predicate on the ASGI scope, for anything else.
        strip_prefix: remove the matched path prefix before forwarding, as ``Mount`` does
            (``GET /api/users`` reaches the upstream as ``GET /users``); ``False`` sends the
            whole path.
        fallback: let the app answer a selected request when no upstream is available, instead
            of ``503 no available server``.
        proxy_options: the keyword options of :class:`~asgi_leasttime.proxy.LeastTimeProxy`
            (``sticky``, ``health_check``, ``state``, ...). Its ``name`` defaults to one made
            from the first path or host (``leasttime-api`` for ``/api``), so that two
            middlewares in one app keep apart their sticky cookies, shared state and metrics.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        upstreams: Iterable[str | Upstream] | None = None,
        proxy: LeastTimeProxy | None = None,
        paths: Iterable[str] = (),
        hosts: Iterable[str] = (),
        when: Callable[[Scope], bool] | None = None,
        strip_prefix: bool = True,
        fallback: bool = False,
        **proxy_options: Any,
    ) -> None:
        _check_proxy_options(proxy_options)
        self.app = app
        self.paths = tuple(_prefix(path) for path in _strings("paths", paths))
        self.hosts = tuple(_strings("hosts", hosts))
        self.when = when
        if not (self.paths or self.hosts or when is not None):
            raise OptionError(
                "paths",
                "give paths, hosts or when to choose the requests that go upstream; a "
                "middleware that took them all would leave the app none (to proxy everything, "
                "serve a LeastTimeProxy as the app)",
            )
        self._host_pattern = _host_pattern(self.hosts) if self.hosts else None
        self.strip_prefix = strip_prefix
        self.fallback = fallback
        if (proxy is None) == (upstreams is None):
            raise OptionError("upstreams", "give either upstreams (and proxy options) or proxy")
        if proxy is None:
            assert upstreams is not None
            proxy_options.setdefault("name", _default_name(self.paths, self.hosts))
            proxy = LeastTimeProxy(upstreams=upstream_list(upstreams), **proxy_options)
        elif proxy_options:
            raise OptionError(next(iter(proxy_options)), "is an option of the proxy given")
        self.proxy = proxy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            # The proxy's start-up before the app's, its shutdown after: the app's own start-up
            # may already send requests upstream.
            await self._lifespan(scope, receive, send)
            return
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        prefix = self._selected(scope)
        if prefix is None:
            await self.app(scope, receive, send)
            return
        if prefix and self.strip_prefix:
            scope = _below(scope, prefix)
        fallback = self.app if self.fallback else None
        await self.proxy.forward(scope, receive, send, fallback=fallback)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The app's word that its shutdown is over waits for the proxy's shutdown: servers end
        # the lifespan once they have it (hypercorn cancels its task, uvicorn and gunicorn's
        # uvicorn workers close the event loop), which cut the proxy's shutdown off.
        held: list[Message] = []

        async def send_when_all_is_over(message: Message) -> None:
            if message["type"] in _SHUTDOWN_OVER:
                held.append(message)
            else:
                await send(message)

        async with self.proxy.lifespan():
            await self.app(scope, receive, send_when_all_is_over)
        for message in held:
            await send(message)

    def _selected(self, scope: Scope) -> str | None:
        """The matched path prefix ("" without ``paths``) if the request goes upstream."""
        if self._host_pattern is not None and not self._host_pattern.fullmatch(_host(scope)):
            return None
        prefix = ""
        if self.paths:
            path = path_below_root(scope)  # below the app's own mount, as Starlette routes
            for candidate in self.paths:
                if path == candidate or path.startswith(candidate + "/") or candidate == "/":
                    prefix = candidate
                    break
            else:
                return None
        if self.when is not None and not self.when(scope):
            return None
        return prefix


def _check_proxy_options(options: dict[str, Any]) -> None:
    """Every option passed on is one of the proxy's: a misspelt ``uptreams=`` is named, with the
    option it was probably meant to be."""
    known = _PROXY_OPTIONS | _OWN_OPTIONS
    for option in options:
        if option not in _PROXY_OPTIONS:
            hint = difflib.get_close_matches(option, known, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise OptionError(option, f"unknown option{suggestion}")


_OWN_OPTIONS = frozenset(
    name for name in inspect.signature(LeastTimeMiddleware).parameters if name != "proxy_options"
) - {"app"}
_PROXY_OPTIONS = frozenset(inspect.signature(LeastTimeProxy).parameters) - {"app", "upstreams"}


def _strings(option: str, values: Iterable[str]) -> list[str]:
    if isinstance(values, str):
        raise OptionError(option, "must be a list of strings, not one string")
    values = list(values)
    if not all(isinstance(value, str) and value for value in values):
        raise OptionError(option, "must be non-empty strings")
    return values


def _prefix(path: str) -> str:
    if not path.startswith("/"):
        raise OptionError("paths", f"each must start with '/', not {path!r}")
    return path.rstrip("/") or "/"


def _host_pattern(hosts: tuple[str, ...]) -> re.Pattern[str]:
    """One regular expression for every host pattern: ``*`` and ``{name}`` match ``[^/:]+``."""
    alternatives = []
    for host in hosts:
        parts = re.split(r"(\*|\{[^}]*\})", host.lower())
        alternatives.append(
            "".join("[^/:]+" if i % 2 else re.escape(part) for i, part in enumerate(parts))
        )
    return re.compile("|".join(f"(?:{a})" for a in alternatives))


def _host(scope: Scope) -> str:
    """The request's host name, lower case, without its port."""
    for key, value in scope["headers"]:
        if key == b"host":
            host: str = value.decode("latin-1").lower()
            if host.startswith("["):  # an IPv6 literal
                return host[: host.find("]") + 1]
            return host.rsplit(":", 1)[0] if ":" in host else host
    server = scope.get("server")
    return str(server[0]) if server else ""


def _below(scope: Scope, prefix: str) -> Scope:
    """The scope as ``Mount(prefix)`` hands it on: the prefix moves into ``root_path``."""
    root_path = scope.get("root_path", "") + prefix
    child = {**scope, "root_path": root_path}
    raw_path: bytes | None = scope.get("raw_path")
    if raw_path is not None and not raw_path.startswith(root_path.encode("utf-8")):
        # A server that keeps its own root path out of raw_path (uvicorn's --root-path):
        # rebuild the raw path from the prefix, or let the path stand for it.
        encoded = quote(prefix, safe="/:@!$&'()*+,;=-._~").encode("ascii")
        child["raw_path"] = (
            scope.get("root_path", "").encode("utf-8") + raw_path
            if raw_path.startswith(encoded)
            else None
        )
    return child


def _default_name(paths: tuple[str, ...], hosts: tuple[str, ...]) -> str:
    """``leasttime-api`` for ``/api``, ``leasttime-shop.example.org`` for that host: the same in
    every process, so that processes sharing a state store find each other."""
    first = paths[0] if paths else hosts[0] if hosts else ""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", first).strip("-")
    return f"leasttime-{slug}" if slug else "leasttime"
