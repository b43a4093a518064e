"""forward_http on its own, with a fake upstream: when the watcher for a client leaving
starts, and when a request is sent again."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from asgi_leasttime import _forwarding as forwarding
from asgi_leasttime._forwarding import WATCH_AFTER, ExchangeResult, forward_http

pytestmark = pytest.mark.anyio


class FakeResponse:
    def __init__(self) -> None:
        self.status_code = 200
        self.raw_headers = [(b"Content-Length", b"2")]

    async def next_chunk(self) -> tuple[bytes, bool]:
        return b"ok", False

    async def aclose(self) -> None:
        pass


SCOPE: dict[str, Any] = {"type": "http", "method": "GET", "headers": []}


def opener_answering_after(seconds: float) -> Any:
    async def open_upstream(method: str, target: bytes, headers: Any, body: Any) -> FakeResponse:
        await asyncio.sleep(seconds)
        return FakeResponse()

    return open_upstream


async def forward(seconds: float, receive: Any) -> tuple[ExchangeResult, list[dict[str, Any]]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    outcome = await forward_http(
        opener_answering_after(seconds), b"/", "up", SCOPE, receive, send, []
    )
    return outcome, sent


async def test_a_fast_answer_makes_no_watcher(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[object] = []
    monkeypatch.setattr(forwarding._Exchange, "_start_watching", lambda self: started.append(self))

    async def never_returns() -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError

    outcome, sent = await forward(0, never_returns)
    assert outcome.status == 200
    # The whole body in the one message that ends the response.
    assert sent[1] == {"type": "http.response.body", "body": b"ok", "more_body": False}
    assert len(sent) == 2
    await asyncio.sleep(WATCH_AFTER * 2)  # the sweeper's next ticks find nothing to start
    assert started == []


async def test_a_client_leaving_during_a_slow_answer_cancels_it() -> None:
    left = asyncio.Event()

    async def leaves_after_a_while() -> dict[str, Any]:
        await asyncio.sleep(WATCH_AFTER)
        left.set()
        return {"type": "http.disconnect"}

    loop = asyncio.get_running_loop()
    began = loop.time()
    outcome, sent = await asyncio.wait_for(forward(5.0, leaves_after_a_while), 2)
    assert left.is_set()
    assert outcome.status is None  # the upstream never answered: the exchange was cancelled
    assert sent == []  # nobody left to answer
    # Noticed within the watcher's delay, its tick and the receive above, not after 5 s.
    assert loop.time() - began < 1.0


def opener_failing(times: int, error: Exception, calls: list[str]) -> Any:
    """Raises ``error`` on the first ``times`` sends (a pooled connection the upstream had just
    closed), then answers."""

    async def open_upstream(method: str, target: bytes, headers: Any, body: Any) -> FakeResponse:
        calls.append(method)
        if len(calls) <= times:
            raise error
        return FakeResponse()

    return open_upstream


async def never_leaves() -> dict[str, Any]:
    await asyncio.Event().wait()
    raise AssertionError


async def forward_with(
    open_upstream: Any, method: str
) -> tuple[ExchangeResult, list[dict[str, Any]]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {**SCOPE, "method": method}
    outcome = await forward_http(open_upstream, b"/", "up", scope, never_leaves, send, [])
    return outcome, sent


@pytest.mark.parametrize("error", [httpx.RemoteProtocolError("closed"), httpx.ReadError("reset")])
async def test_a_request_that_may_be_sent_twice_is_sent_again_once(error: Exception) -> None:
    calls: list[str] = []
    outcome, sent = await forward_with(opener_failing(1, error, calls), "GET")
    assert calls == ["GET", "GET"]
    assert (outcome.retries, outcome.status, outcome.failed) == (1, 200, False)
    assert sent[0]["status"] == 200


async def test_a_second_failure_is_not_retried_again() -> None:
    calls: list[str] = []
    outcome, sent = await forward_with(
        opener_failing(2, httpx.RemoteProtocolError("closed"), calls), "GET"
    )
    assert calls == ["GET", "GET"]
    assert (outcome.retries, outcome.status, outcome.failed) == (1, None, True)
    assert sent[0]["status"] == 502


async def test_a_request_that_must_not_be_sent_twice_is_not_retried() -> None:
    calls: list[str] = []
    outcome, sent = await forward_with(
        opener_failing(1, httpx.RemoteProtocolError("closed"), calls), "POST"
    )
    assert calls == ["POST"]
    assert (outcome.retries, outcome.failed) == (0, True)
    assert sent[0]["status"] == 502
