"""Header rules for both directions of a proxied exchange.

Headers travel as raw ``(name, value)`` byte pairs and are never merged: two ``Set-Cookie`` stay
two. Hop-by-hop headers (RFC 9110 section 7.6.1) describe one connection, not the message, so they
stop here in both directions, together with every header that ``Connection`` names.

``Date`` and ``Server`` are the server's in front: every ASGI server tried (uvicorn with either
parser, gunicorn's uvicorn workers, hypercorn) adds its own pair to whatever the app sends, and
granian adds its own where the app sends none. So, as NGINX does by default, the upstream's stop
here and the client gets exactly one of each, the front server's. With ``pass_server_header``
(NGINX's ``proxy_pass_header``) the upstream's pass instead, one of each, the proxy adding its
own where the upstream sent none; the server in front must then add none (uvicorn's
``--no-server-header --no-date-header``; ``asgi-leasttime serve`` sets them itself).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from email.utils import formatdate

from asgi_leasttime.options import OptionError
from asgi_leasttime.types import Headers, Scope

__all__ = ["HOP_BY_HOP", "BadRequest", "BadResponse", "RequestHeaders", "response_headers"]


HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

_FRONT_SERVERS = frozenset({b"date", b"server"})
"""The response fields the server in front sends its own of (see the module's docstring)."""

# One set lookup per response header, as for the hop-by-hop ones alone.
_NOT_FORWARDED = HOP_BY_HOP | _FRONT_SERVERS

SERVER = b"asgi-leasttime"
"""The ``Server`` the proxy sends where it passes the upstream's and the upstream sent none."""

_date_second, _date_value = 0, b""  # the last second formatted, and its Date value


def http_date() -> bytes:
    """Now, as a ``Date`` value (RFC 9110 section 5.6.7), formatted once a second."""
    global _date_second, _date_value
    now = int(time.time())
    if now != _date_second:
        _date_second, _date_value = now, formatdate(now, usegmt=True).encode("ascii")
    return _date_value


# The upstream request is re-framed by the client: the client's expectation was answered by the
# server in front of us (uvicorn sends 100 Continue when the body is first read).
_REQUEST_ONLY_HOP = HOP_BY_HOP | {b"expect"}


_WHITESPACE = (b" ", b"\t")


class BadRequest(ValueError):
    """A request no upstream should see: answered ``400`` with this message."""


class BadResponse(ValueError):
    """An upstream answer whose framing no client should be asked to trust: answered ``502``,
    counted as the upstream's failure, and its connection closed."""


def _connection_tokens(value: bytes) -> AbstractSet[bytes]:
    """The header names one ``Connection`` header lists."""
    if value in _PLAIN_CONNECTION:
        return _NOTHING_NAMED  # the usual case, without a split
    return {token.strip().lower() for token in value.split(b",") if token.strip()}


# Connection values that name no header besides the hop-by-hop ones removed anyway.
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close"})
_NOTHING_NAMED: AbstractSet[bytes] = frozenset()


def _without_named(
    headers: Headers, named: AbstractSet[bytes], removed: frozenset[bytes]
) -> Headers:
    """``headers`` without those ``Connection`` named, unless they are gone already (the usual
    ``Connection: keep-alive`` or ``close`` costs no second pass)."""
    extra = named - removed
    if not extra:
        return headers
    return [(name, value) for name, value in headers if name not in extra]


def response_headers(
    raw: Iterable[tuple[bytes, bytes]], status: int, pass_server_header: bool = False
) -> Headers:
    """An upstream response's headers as ASGI wants them: lower-case names, hop-by-hop removed,
    the upstream's ``Date`` and ``Server`` removed unless ``pass_server_header`` (then the first
    of each passes, and one of the proxy's is added where the upstream sent none).

    The framing is checked on the way (RFC 9112 section 6): a protocol switch nobody asked for,
    a transfer coding other than ``chunked``, ``Content-Length`` beside ``Transfer-Encoding`` and
    more than one ``Content-Length`` raise :class:`BadResponse`. A 204 or
    304 answer loses its ``Content-Length``: it has no body, and the server in front would
    otherwise wait for one.
    """
    if status < 200:
        raise BadResponse(f"upstream answered {status} to a request that asked for no upgrade")
    headers: Headers = []
    named = _NOTHING_NAMED
    length: bytes | None = None
    transfer_coded = False
    passed = pass_server_header
    date = server = False  # passed already
    for name, value in raw:
        lower = name.lower()
        if lower in _NOT_FORWARDED:
            if lower == b"date":
                if passed and not date:
                    headers.append((lower, value))
                    date = True
            elif lower == b"server":
                if passed and not server:
                    headers.append((lower, value))
                    server = True
            elif lower == b"connection":
                named = named | _connection_tokens(value)
            elif lower == b"transfer-encoding":
                if transfer_coded or value.strip().lower() != b"chunked":
                    raise BadResponse(f"upstream sent Transfer-Encoding {value!r}")
                transfer_coded = True
            continue
        if lower == b"content-length":
            if length is not None:  # even an equal one: nginx and llhttp refuse it too
                raise BadResponse("upstream sent more than one Content-Length")
            length = value = value.strip()
            if status in (204, 304):
                continue
        headers.append((lower, value))
    if transfer_coded and length is not None:
        raise BadResponse("upstream sent both Content-Length and Transfer-Encoding")
    if passed:
        if not date:
            headers.append((b"date", http_date()))
        if not server:
            headers.append((b"server", SERVER))
    return _without_named(headers, named, HOP_BY_HOP) if named else headers


def _network(index: int, proxy: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(proxy, strict=False)
    except (ValueError, TypeError):
        raise OptionError(
            f"trusted_proxies[{index}]", f"{proxy!r} is not an address or network"
        ) from None


class RequestHeaders:
    """Builds the headers sent upstream from the ASGI scope's.

    - hop-by-hop headers and those named by ``Connection`` are removed;
    - ``Host`` passes through unless ``pass_host_header`` is false (then the client library sets
      the upstream's own);
    - ``X-Forwarded-For`` gets the client's address appended, ``X-Forwarded-Proto`` and
      ``X-Forwarded-Host`` are set. Incoming ``X-Forwarded-*`` and ``X-Real-Ip`` headers are kept
      only when the client's address is one of ``trusted_proxies`` (addresses or networks);
      from anyone else they are removed, so a client cannot forge its address;
    - trailing whitespace is removed from values (it is not part of a field value);
    - framing is made unambiguous (RFC 9112 section 6.3): with ``Transfer-Encoding`` the body is
      re-chunked and every ``Content-Length`` dropped; conflicting ``Content-Length`` values or
      more than one ``Host`` raise :class:`BadRequest`.

    ``pass_server_header`` is kept here with the other header options: the proxy hands it to
    :func:`response_headers` for each answer.
    """

    def __init__(
        self,
        *,
        pass_host_header: bool = True,
        trusted_proxies: Iterable[str] = (),
        pass_server_header: bool = False,
    ) -> None:
        for option, value in (
            ("pass_host_header", pass_host_header),
            ("pass_server_header", pass_server_header),
        ):
            if not isinstance(value, bool):
                raise OptionError(option, f"must be true or false, not {value!r}")
        if isinstance(trusted_proxies, str):
            raise OptionError("trusted_proxies", "must be a list of addresses, not one string")
        self.pass_host_header = pass_host_header
        self.pass_server_header = pass_server_header
        self.trusted_proxies = tuple(_network(i, p) for i, p in enumerate(trusted_proxies))

    def is_trusted(self, client_host: str | None) -> bool:
        """Whether forwarding headers from this client address are believed."""
        if not self.trusted_proxies or client_host is None:
            return False
        try:
            address = ipaddress.ip_address(client_host)
        except ValueError:
            return False
        return any(address in network for network in self.trusted_proxies)

    def client_address(self, scope: Scope) -> str | None:
        """The client as a log names it: the peer, or, when the peer is a trusted proxy, the
        last address of ``X-Forwarded-For`` that is not one too."""
        client = scope.get("client")
        peer: str | None = client[0] if client else None
        if not self.is_trusted(peer):
            return peer
        chain: list[str] = []
        for name, value in scope["headers"]:
            if name == b"x-forwarded-for":
                chain += [part.strip() for part in value.decode("latin-1").split(",")]
        for address in reversed(chain):
            if address and not self.is_trusted(address):
                return address
        return peer

    def __call__(self, scope: Scope) -> Headers:
        """The headers for the upstream request of this scope."""
        client = scope.get("client")
        client_host: str | None = client[0] if client else None
        trusted = self.is_trusted(client_host)
        headers: Headers = []
        forwarded_for: list[bytes] = []
        forwarded_proto = forwarded_host = host = None
        named = _NOTHING_NAMED  # by Connection headers
        chunked = False
        length: bytes | None = None
        lengths_differ = False
        for name, value in scope["headers"]:
            if value[-1:] in _WHITESPACE:
                value = value.rstrip(b" \t")  # not part of the value (RFC 9110 section 5.5)
            if name in _REQUEST_ONLY_HOP:
                if name == b"connection":
                    named = named | _connection_tokens(value)
                chunked = chunked or name == b"transfer-encoding"
                continue
            if name == b"content-length":
                value = value.strip()
                lengths_differ = lengths_differ or (length is not None and value != length)
                length = value
                continue  # added back once below, when the framing allows it
            if name == b"host":
                if host is not None:
                    raise BadRequest("more than one Host header")
                host = value
                if not self.pass_host_header:
                    continue
            elif name.startswith(b"x-forwarded-") or name == b"x-real-ip":
                if not trusted:
                    continue
                if name == b"x-forwarded-for":
                    forwarded_for.append(value)
                    continue
                if name == b"x-forwarded-proto":
                    forwarded_proto = value
                elif name == b"x-forwarded-host":
                    forwarded_host = value
            headers.append((name, value))
        if named:
            headers = _without_named(headers, named, _REQUEST_ONLY_HOP)
        if length is not None and not chunked:
            if lengths_differ:
                raise BadRequest("conflicting Content-Length headers")
            headers.append((b"content-length", length))
        if client_host is not None:
            forwarded_for.append(client_host.encode("latin-1"))
        if forwarded_for:
            headers.append((b"x-forwarded-for", b", ".join(forwarded_for)))
        if forwarded_proto is None:
            scheme = scope.get("scheme", "http")
            forwarded_proto = b"https" if scheme in ("https", "wss") else b"http"
            headers.append((b"x-forwarded-proto", forwarded_proto))
        if forwarded_host is None and host is not None:
            headers.append((b"x-forwarded-host", host))
        return headers
