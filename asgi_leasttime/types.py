"""The ASGI types, as Starlette writes them, and raw header lists."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any, Protocol

__all__ = [
    "ASGIApp",
    "Headers",
    "Message",
    "Opener",
    "Receive",
    "Scope",
    "Send",
    "UpstreamResponse",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

Headers = list[tuple[bytes, bytes]]
"""Header fields as raw ``(name, value)`` byte pairs, in order, duplicates kept apart."""


class UpstreamResponse(Protocol):
    """What forwarding needs of an upstream's response, whichever client fetched it."""

    status_code: int
    raw_headers: Headers

    async def next_chunk(self) -> tuple[bytes, bool]:
        """The next piece of the body as it arrives, undecoded, and whether more may follow;
        ``(b"", False)`` at the end."""
        ...

    async def aclose(self) -> None:
        """Give the connection back (or close it)."""


Opener = Callable[[str, bytes, Headers, AsyncIterator[bytes] | None], Awaitable[UpstreamResponse]]
"""Sends a request (method, target, headers, body or ``None``) to one upstream and returns once
the response head is in. Made once per upstream. Raises :mod:`asgi_leasttime.errors`, whichever
client is underneath."""
