"""The upstream HTTP client: an ``httpx.AsyncClient`` set up for a proxy.

httpx's defaults suit a browser-like client, not a proxy: a 5 s read timeout, one pool of 100
connections shared by every host, a cookie jar that remembers what one user's upstream set and
sends it with the next user's request, and redirects to follow. This module makes the client the
proxy creates, and defines the pieces a caller's own client needs too.
"""

from __future__ import annotations

import http.cookiejar
import ssl
import urllib.request
from typing import Any

import httpx

from asgi_leasttime.options import check_not_negative, check_positive
from asgi_leasttime.tls import UpstreamTLS

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_TIMEOUT",
    "NoCookies",
    "PerOriginTransport",
    "create_client",
    "forget_cookies",
    "limits",
    "timeouts",
]


def timeouts(
    *, connect: float = 5.0, read: float = 60.0, write: float = 60.0, pool: float = 10.0
) -> httpx.Timeout:
    """The proxy's timeouts, in seconds, checked: connecting; between two reads or two writes
    (long enough for slow pages and long polls, short enough to free a hung upstream); waiting
    for a free connection in a full pool. The ``[timeouts]`` table of the configuration file."""
    for option, value in (("connect", connect), ("read", read), ("write", write), ("pool", pool)):
        check_positive(option, value)
    return httpx.Timeout(connect=connect, read=read, write=write, pool=pool)


def limits(
    *,
    max_connections: int = 512,
    max_keepalive_connections: int = 512,
    keepalive_expiry: float = 4.0,
) -> httpx.Limits:
    """Connections per upstream, checked. Keep-alive connections as many as connections, since a
    smaller idle pool closes and reopens connections under load. Idle ones expire after 4 s,
    before the 5 s after which uvicorn closes an idle keep-alive connection, so the proxy does not
    reuse one the upstream is closing. The ``[limits]`` table of the configuration file."""
    check_positive("max_connections", max_connections)
    check_not_negative("max_keepalive_connections", max_keepalive_connections)
    check_not_negative("keepalive_expiry", keepalive_expiry)
    return httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_keepalive_connections,
        keepalive_expiry=keepalive_expiry,
    )


DEFAULT_TIMEOUT = timeouts()
"""The timeouts of :func:`timeouts`' defaults."""

DEFAULT_LIMITS = limits()
"""The limits of :func:`limits`' defaults, per upstream."""


class NoCookies(http.cookiejar.CookieJar):
    """A cookie jar that stores nothing.

    A proxy's client must never remember cookies: a ``Set-Cookie`` meant for one user would be
    sent upstream with every other user's requests. Not storing them also skips the cookie parsing
    that httpx does on every response.
    """

    def set_cookie(self, cookie: http.cookiejar.Cookie) -> None:
        return

    def extract_cookies(self, response: Any, request: urllib.request.Request) -> None:
        return

    def add_cookie_header(self, request: urllib.request.Request) -> None:
        return


def forget_cookies(client: httpx.AsyncClient) -> None:
    """Give a client a cookie jar that stores nothing (see :class:`NoCookies`)."""
    client.cookies = NoCookies()  # a jar is kept as it is; a Cookies object would be copied


class PerOriginTransport(httpx.AsyncBaseTransport):
    """One connection pool per upstream origin, found by a dictionary look-up.

    httpx's ``mounts`` match URL patterns one by one on every request; here the origin
    ``(scheme, host, port)`` selects the pool directly. A pool is made on an origin's first
    request, so upstreams added at run time get their own too.
    """

    def __init__(
        self, *, limits: httpx.Limits = DEFAULT_LIMITS, tls: UpstreamTLS | None = None
    ) -> None:
        self._limits = limits
        self._pools: dict[tuple[bytes, bytes, int | None], httpx.AsyncHTTPTransport] = {}
        self._retired: list[httpx.AsyncHTTPTransport] = []
        self._tls = tls if tls is not None else UpstreamTLS()

    def _new_pool(self, scheme: bytes) -> httpx.AsyncHTTPTransport:
        # httpx builds an SSL context (tens of milliseconds) for every transport unless given
        # one: the proxy's, built once and only when an https upstream needs it.
        verify: ssl.SSLContext | bool = self._tls.context if scheme == b"https" else False
        return httpx.AsyncHTTPTransport(limits=self._limits, verify=verify)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        origin = (url.raw_scheme, url.raw_host, url.port)
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = self._new_pool(url.raw_scheme)
        return await pool.handle_async_request(request)

    def retire(self, url: httpx.URL) -> None:
        """Forget an origin's pool (its upstream left the proxy): new requests to it get a
        pool afresh; the old one's connections finish what they carry and close with the
        client."""
        pool = self._pools.pop((url.raw_scheme, url.raw_host, url.port), None)
        if pool is not None:
            self._retired.append(pool)

    async def aclose(self) -> None:
        pools = [*self._pools.values(), *self._retired]
        self._retired.clear()
        self._pools.clear()
        for pool in pools:
            await pool.aclose()


def create_client(
    *,
    timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    limits: httpx.Limits = DEFAULT_LIMITS,
    transport: httpx.AsyncBaseTransport | None = None,
    tls: UpstreamTLS | None = None,
) -> httpx.AsyncClient:
    """The client a :class:`~asgi_leasttime.LeastTimeProxy` makes when it is given none.

    Per-upstream pools (unless ``transport`` replaces them) speaking TLS to https upstreams as
    ``tls`` says (by default verified against the system's CA store), explicit timeouts, no
    cookies, no redirects followed, and no proxy settings read from the environment.
    """
    client = httpx.AsyncClient(
        transport=transport or PerOriginTransport(limits=limits, tls=tls),
        timeout=timeout,
        follow_redirects=False,
        trust_env=False,
    )
    forget_cookies(client)
    return client
