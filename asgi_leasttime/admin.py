"""The admin app's write API: change the upstreams of a running proxy over HTTP, with a token.

``POST /upstreams/{name}`` with any of ``{"down": bool, "fenced": bool, "weight": number}``,
``PUT /upstreams/{name}`` with ``{"url": ..., "weight": ..., "fenced": ...}`` to add one,
``DELETE /upstreams/{name}`` to remove one. The name is the path segment, percent-decoded (an
upstream named by its URL is ``/upstreams/http%3A%2F%2F127.0.0.1%3A9003``). Every call needs
``Authorization: Bearer <token>``, compared in constant time; without a token configured the write
API is off. Changes go through the proxy's state store, so they reach every process sharing it.
Answers are JSON: the upstream as ``/status`` shows it, or ``{"error": ...}``.
"""

from __future__ import annotations

import hmac
import json
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from asgi_leasttime.options import OptionError
from asgi_leasttime.state import Change
from asgi_leasttime.types import Receive, Scope

if TYPE_CHECKING:
    from asgi_leasttime.proxy import LeastTimeProxy

__all__ = ["WRITES", "check_token", "write"]

WRITES = frozenset({"POST", "PUT", "DELETE"})
"""The methods of the write API; every other method only reads."""

MAX_BODY = 65536

Answer = tuple[int, dict[str, Any]]

SHORTEST_TOKEN = 16


def check_token(token: str | None) -> None:
    """A write API token: 16 characters or more (``None`` turns the write API off)."""
    if token is not None and len(token) < SHORTEST_TOKEN:
        raise OptionError("token", f"must be at least {SHORTEST_TOKEN} characters")


def _authorized(scope: Scope, token: str) -> bool:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, given = value.partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(given, token.encode())
    return False


async def _read_json(receive: Receive) -> Any:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > MAX_BODY:
            raise ValueError("the body is larger than 64 KiB")
        if not message.get("more_body", False):
            break
    if not body:
        return {}
    return json.loads(body)


async def write(
    proxy: LeastTimeProxy, token: str | None, scope: Scope, receive: Receive, name: str
) -> Answer:
    """Answer one call of the write API (``name`` as it stands in the path, still encoded)."""
    if token is None:
        return 403, {"error": "the write API is off: configure an admin token"}
    if not _authorized(scope, token):
        return 401, {"error": "a valid bearer token is required"}
    name = unquote(name)
    method = scope["method"]
    try:
        document = await _read_json(receive)
    except (ValueError, UnicodeDecodeError) as exc:
        return 400, {"error": f"the body is not JSON: {exc}"}
    if not isinstance(document, dict):
        return 400, {"error": "the body must be a JSON object"}
    exists = name in proxy.upstreams
    if method == "PUT" and exists:
        return 409, {"error": f"upstream {name!r} exists already"}
    if method != "PUT" and not exists:
        return 404, {"error": f"no upstream named {name!r}"}
    allowed = {"PUT": {"url", "weight", "fenced"}, "POST": {"down", "fenced", "weight"}}
    unknown = set(document) - allowed.get(method, set())
    if unknown or (method == "POST" and not document):
        wanted = ", ".join(sorted(allowed.get(method, ())))
        return 400, {"error": f"give any of {wanted}", "unknown": sorted(unknown)}
    if method == "PUT" and "url" not in document:
        return 400, {"error": "url: an added upstream needs a url"}
    fields = {"removed": True} if method == "DELETE" else document
    try:
        # Every field judged before anything moves: a change applies whole or not at all.
        await proxy.state.submit(Change(name, **fields))
    except OptionError as exc:
        return 400, {"error": str(exc)}
    except KeyError:  # removed by another call meanwhile
        return 404, {"error": f"no upstream named {name!r}"}
    if method == "DELETE":
        return 200, {"removed": name}
    for status in proxy.upstream_status():
        if status.name == name:
            return 200, status.as_json()
    return 200, {"name": name, "left_out": "a weight of 0 leaves an upstream out"}
