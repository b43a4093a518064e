"""The admin app's write API: change the upstreams of a running proxy over HTTP, with a token.

``POST /upstreams/{name}`` with any of ``{"down": bool, "fenced": bool, "weight": number}``,
``PUT /upstreams/{name}`` with ``{"url": ..., "weight": ..., "fenced": ...}`` to add one,
``DELETE /upstreams/{name}`` to remove one. The name is the path segment, percent-decoded (an
upstream named by its URL is ``/upstreams/http%3A%2F%2F10.0.0.5%3A8000``). Every call needs
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

__all__ = ["WRITES", "write"]

WRITES = frozenset({"POST", "PUT", "DELETE"})
"""The methods of the write API; every other method only reads."""

MAX_BODY = 65536

Answer = tuple[int, dict[str, Any]]


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
    if method == "PUT":
        if name in proxy.upstreams:
            return 409, {"error": f"upstream {name!r} exists already"}
        changes = [Change(name, "add", document)]
    elif name not in proxy.upstreams:
        return 404, {"error": f"no upstream named {name!r}"}
    elif method == "DELETE":
        changes = [Change(name, "remove")]
    else:
        unknown = set(document) - {"down", "fenced", "weight"}
        if unknown or not document:
            return 400, {"error": "give any of down, fenced, weight", "unknown": sorted(unknown)}
        changes = [Change(name, key, value) for key, value in document.items()]
    try:
        for change in changes:
            await proxy.state.submit(change)
    except OptionError as exc:
        return 400, {"error": str(exc)}
    if method == "DELETE":
        return 200, {"removed": name}
    for status in proxy.upstream_status():
        if status.name == name:
            return 200, status.as_json()
    return 200, {"name": name, "left_out": "a weight of 0 leaves an upstream out"}
