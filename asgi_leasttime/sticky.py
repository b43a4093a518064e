"""StickyCookie: keep a client on the upstream that served it, with a signed cookie.

Traefik's sticky cookie is an unsigned hash of the server URL that anyone can compute and forge.
This one carries an opaque server id signed with itsdangerous' ``TimestampSigner``: it cannot be
forged without the secret, it names no URL, and its timestamp lets the server enforce ``max_age``
itself instead of trusting the browser to drop it.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

from itsdangerous import BadData, TimestampSigner

from asgi_leasttime.options import OptionError

__all__ = ["StickyCookie", "cookie_name_for", "server_id"]


T = TypeVar("T")

SALT = "asgi-leasttime.sticky"
"""Salt of the signature: a value signed for anything else with the same key does not pass."""

_SAMESITE = {"none": "None", "lax": "Lax", "strict": "Strict"}
_NOT_TOKEN = re.compile(r"[^!#$%&'*+\-.^_`|~0-9A-Za-z]")
_LONGEST_VALUE = 256  # ours are ~60 bytes; anything much longer is not worth verifying


def server_id(name: str) -> str:
    """The opaque id of a server in a cookie: the same on every worker and machine."""
    return hashlib.sha256(b"asgi-leasttime:" + name.encode()).hexdigest()[:16]


def cookie_name_for(proxy_name: str) -> str:
    """A cookie name derived from a proxy's name, made an RFC 6265 token."""
    return _NOT_TOKEN.sub("_", proxy_name) or "_leasttime"


class StickyCookie:
    """Sticky sessions in a signed cookie.

    Arguments:
        secret_key: a key, or a list of keys for rotation: cookies are signed with the last and
            accepted when signed with any. Required: an empty key is an error.
        name: the cookie's name; by default derived from the proxy's ``name``.
        secure: add ``Secure``.
        httponly: add ``HttpOnly``.
        samesite: ``"none"``, ``"lax"`` or ``"strict"`` (any case), or ``None`` to omit it.
        max_age: seconds the cookie lives, enforced by the browser (``Max-Age``) and by the
            signature's timestamp here; ``None`` (or 0, as in Traefik) for a session cookie.
        path: ``Path`` of the cookie.
        domain: ``Domain`` of the cookie, if any.
        sliding: send a freshly signed cookie with every response, so ``max_age`` counts from
            the client's last request instead of its first.
    """

    def __init__(
        self,
        *,
        secret_key: str | bytes | Sequence[str | bytes],
        name: str | None = None,
        secure: bool = False,
        httponly: bool = False,
        samesite: str | None = None,
        max_age: int | None = None,
        path: str = "/",
        domain: str | None = None,
        sliding: bool = False,
    ) -> None:
        if secret_key is None:
            raise OptionError(
                "secret_key",
                "must be a non-empty key or list of keys, not None (is the environment variable "
                "it comes from set?)",
            )
        if isinstance(secret_key, str | bytes):
            given: list[str | bytes] = [secret_key]
        elif isinstance(secret_key, Iterable):
            given = list(secret_key)
        else:
            raise OptionError(
                "secret_key", f"must be a non-empty key or list of keys, not {secret_key!r}"
            )
        if not given or any(not key or not isinstance(key, str | bytes) for key in given):
            raise OptionError("secret_key", "must be a non-empty key or list of keys")
        if name is not None and (not name or _NOT_TOKEN.search(name)):
            raise OptionError("name", f"{name!r} is not a valid cookie name")
        if samesite is not None and samesite.lower() not in _SAMESITE:
            raise OptionError("samesite", f"must be 'none', 'lax' or 'strict', not {samesite!r}")
        if max_age is not None and max_age < 0:
            raise OptionError("max_age", "must be a number of seconds, or unset for a session")
        for label, value in (("path", path), ("domain", domain or "")):
            if any(c in value for c in ";\r\n,"):
                raise OptionError(label, f"{value!r} may not hold ';', ',' or a newline")
        self.name = name
        self.secure = secure
        self.httponly = httponly
        self.samesite = _SAMESITE[samesite.lower()] if samesite else None
        self.max_age = max_age or None
        self.path = path
        self.domain = domain
        self.sliding = sliding
        keys = [key.encode() if isinstance(key, str) else key for key in given]
        self._signer = TimestampSigner(keys, salt=SALT)
        self._settle()

    def _settle(self) -> None:
        self._name_bytes = (self.name or "").encode("ascii")
        self._attributes = self._cookie_attributes()

    def named_for(self, proxy_name: str) -> StickyCookie:
        """These options with the cookie's name settled: the given one, or one made from the
        proxy's name. The proxy keeps what this returns; this object is left as it is, so one
        ``StickyCookie`` can serve several proxies."""
        if self.name is not None:
            return self
        cookie = copy.copy(self)
        cookie.name = cookie_name_for(proxy_name)
        cookie._settle()
        return cookie

    def known_in(self, headers: Iterable[tuple[bytes, bytes]], known: Mapping[str, T]) -> T | None:
        """What ``known`` holds for the server id of a request's valid sticky cookie (see
        :func:`server_id`), or ``None``.

        Missing, tampered, expired, truncated, oversized or unknown: ``None``, never an error.
        Which ids are known is the proxy's to say: it holds its upstreams.
        """
        for value in self._cookie_values(headers):
            try:
                unsigned = self._signer.unsign(value, max_age=self.max_age)
            except (BadData, ValueError, TypeError):
                continue
            found = known.get(unsigned.decode("ascii", "replace"))
            if found is not None:
                return found
        return None

    def sent_in(self, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        """Whether a request carries this cookie at all (valid or not)."""
        return bool(self._cookie_values(headers))

    def set_cookie_header(self, server: str) -> tuple[bytes, bytes]:
        """A ``Set-Cookie`` header sending the client to ``server`` from now on."""
        value = self._signer.sign(server_id(server))
        return (b"set-cookie", self._name_bytes + b"=" + value + self._attributes)

    def _cookie_values(self, headers: Iterable[tuple[bytes, bytes]]) -> list[bytes]:
        wanted = self._name_bytes
        values = []
        for header, value in headers:
            if header != b"cookie" or wanted not in value:
                continue
            for pair in value.split(b";"):
                name, sep, cookie = pair.strip().partition(b"=")
                if sep and name == wanted and len(cookie) <= _LONGEST_VALUE:
                    values.append(cookie.strip(b'"'))
        return values

    def _cookie_attributes(self) -> bytes:
        parts = [f"Path={self.path}"]
        if self.domain:
            parts.append(f"Domain={self.domain}")
        if self.max_age:
            parts.append(f"Max-Age={self.max_age}")
        if self.secure:
            parts.append("Secure")
        if self.httponly:
            parts.append("HttpOnly")
        if self.samesite:
            parts.append(f"SameSite={self.samesite}")
        return ("; " + "; ".join(parts)).encode("latin-1")
