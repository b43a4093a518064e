"""Upstream: one server behind the proxy, reached over HTTP or in-process."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

import httpx

from asgi_leasttime.options import OptionError, check_not_negative

__all__ = ["NO_UPSTREAMS", "Upstream", "check_address", "check_url", "upstream_list"]

NO_UPSTREAMS = "at least one upstream is required"
"""Why an empty list of upstreams is refused: the same words in Python and in the file."""


class Upstream:
    """One upstream server: a URL, or an ASGI app forwarded in-process.

    Arguments:
        url: ``http://host:port`` or ``https://...``, optionally with a base path that is put in
            front of every forwarded path.
        app: instead of a URL, an ASGI app called in-process (for instance another
            :class:`~asgi_leasttime.LeastTimeProxy`: a balancer of balancers).
        name: how the balancer, the status API and the metrics call it; defaults to the URL.
        weight: share at equal speed; 0 leaves the upstream out of the picks, as in Traefik
            (it stays known, and a weight given later brings it in).
        fenced: draining: no new picks, sticky clients still served.
        resolve: the URL's host is a DNS name for several servers (a Kubernetes headless
            Service, a Compose service scaled up): every address it resolves to becomes an
            upstream of its own, named ``host:port@address`` (``name@address`` given a name),
            re-resolved as the proxy's :class:`~asgi_leasttime.discovery.DnsResolver` says
            (Envoy's ``STRICT_DNS``). Needs the proxy's own upstream client.
        address: the IP address to connect to; the URL's host stays the ``Host`` header (when
            the client's is not passed) and the TLS server name. ``None``: the host is resolved
            at each new connection.
        load_reports: whether the upstream is trusted to report its load in its answers
            (:mod:`asgi_leasttime.load_reports`); ``None``: as the proxy's ``load_reports``
            says.
    """

    __slots__ = (
        "address",
        "app",
        "base_path",
        "fenced",
        "host",
        "load_reports",
        "name",
        "port",
        "resolve",
        "url",
        "weight",
    )

    def __init__(
        self,
        url: str | None = None,
        *,
        app: Any = None,
        name: str | None = None,
        weight: float = 1,
        fenced: bool = False,
        resolve: bool = False,
        address: str | None = None,
        load_reports: bool | None = None,
    ) -> None:
        if (url is None) == (app is None):
            raise OptionError(
                "url", "an Upstream takes either a url or an app, not both or neither"
            )
        if app is not None and not name:
            raise OptionError("name", "an in-process Upstream(app=...) needs a name")
        check_not_negative("weight", weight)
        if resolve and address is not None:
            raise OptionError("resolve", "an Upstream resolved by DNS takes no address")
        if (resolve or address is not None) and url is None:
            raise OptionError("resolve" if resolve else "address", "needs a url")
        if address is not None:
            check_address(address)
        self.app = app
        self.url: httpx.URL | None = None
        self.base_path = b""
        self.host = ""
        self.port = 0
        if url is not None:
            parsed = _parse_url(url)
            self.url = parsed
            self.base_path = parsed.raw_path.split(b"?", 1)[0].rstrip(b"/")
            self.host = parsed.host
            self.port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self.name: str = name or str(url)
        self.weight = weight
        self.fenced = fenced
        self.resolve = resolve
        self.address = address
        self.load_reports = load_reports

    def __repr__(self) -> str:
        where = f"app={self.app!r}" if self.app is not None else repr(str(self.url))
        return f"Upstream({where}, name={self.name!r}, weight={self.weight!r})"

    def target_url(self, target: bytes) -> httpx.URL:
        """The upstream URL for a request target (raw path and query) below the mount."""
        assert self.url is not None
        return self.url.copy_with(raw_path=self.base_path + target)


def upstream_list(upstreams: Iterable[str | Upstream]) -> list[str | Upstream]:
    """The ``upstreams`` option as a list, refused when it is not a non-empty list of URLs and
    :class:`Upstream` objects (a single URL string is refused rather than read as its
    characters)."""
    if isinstance(upstreams, str | bytes | Upstream):
        raise OptionError("upstreams", f"must be a list of URLs or Upstreams, not {upstreams!r}")
    try:
        listed = list(upstreams)
    except TypeError:
        raise OptionError(
            "upstreams", f"must be a list of URLs or Upstreams, not {upstreams!r}"
        ) from None
    if not listed:
        raise OptionError("upstreams", NO_UPSTREAMS)
    for index, upstream in enumerate(listed):
        if not isinstance(upstream, str | Upstream):
            raise OptionError(
                f"upstreams[{index}]", f"must be a URL or an Upstream, not {upstream!r}"
            )
    return listed


def check_address(address: str) -> None:
    """Raise :class:`~asgi_leasttime.options.OptionError` unless ``address`` is an IP address."""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise OptionError("address", f"{address!r} is not an IP address") from None


def check_url(url: str) -> None:
    """Raise :class:`~asgi_leasttime.options.OptionError` unless ``url`` can be an upstream's."""
    _parse_url(url)


def _parse_url(url: str) -> httpx.URL:
    def wrong(reason: str) -> OptionError:
        return OptionError("url", f"upstream URL {url!r} {reason}")

    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise wrong(f"is not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        raise wrong("must start with http:// or https://")
    if not parsed.host:
        raise wrong("has no host")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise wrong(f"has port {parsed.port}, not a TCP port (1-65535)")
    if parsed.query or parsed.fragment:
        raise wrong("must not have a query or a fragment")
    return parsed
