"""forward_http on its own, with a fake upstream: when the watcher for a client leaving
starts, and which failed attempts are handed back to be sent again (the rules of
asgi_leasttime.retry)."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest

from asgi_leasttime import _forwarding as forwarding
from asgi_leasttime._forwarding import WATCH_AFTER, Exchange, ExchangeResult, forward_http
from asgi_leasttime.errors import NoResponse, NotConnected, RequestNotSent, ResponseBroken
from asgi_leasttime.retry import Retry

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
    monkeypatch.setattr(forwarding.Exchange, "_start_watching", lambda self: started.append(self))

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
    """Raises ``error`` on the first ``times`` sends (having written the body, unless the
    error says nothing was sent), then answers."""

    async def open_upstream(method: str, target: bytes, headers: Any, body: Any) -> FakeResponse:
        calls.append(method)
        if calls.count(method) <= times:
            if body is not None and not isinstance(error, NotConnected):
                async for _ in body:
                    pass
            raise error
        if body is not None:
            calls.append(b"".join([chunk async for chunk in body]).decode())
        return FakeResponse()

    return open_upstream


async def never_leaves() -> dict[str, Any]:
    await asyncio.Event().wait()
    raise AssertionError


def body_of(*chunks: bytes) -> Any:
    messages = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
    messages[-1]["more_body"] = False

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else await never_leaves()

    return receive


async def forward_with(
    open_upstream: Any,
    method: str,
    *,
    again: Any = None,
    receive: Any = never_leaves,
    headers: list[tuple[bytes, bytes]] | None = None,
    retry: Retry | None = None,
) -> tuple[ExchangeResult, list[dict[str, Any]]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {**SCOPE, "method": method, "headers": headers or []}
    outcome = await forward_http(
        open_upstream, b"/", "up", scope, receive, send, [], again=again, retry=retry or Retry()
    )
    return outcome, sent


def another_upstream(times: int = 1) -> tuple[Any, list[BaseException | None]]:
    """An ``again`` that aims the exchange at the same fake upstream up to ``times`` times."""
    seen: list[BaseException | None] = []

    def again(exchange: Exchange, error: BaseException | None) -> bool:
        seen.append(error)
        if len(seen) > times:
            return False
        exchange.aim(exchange.open_upstream, "another", None, None)
        return True

    return again, seen


RULES = [
    # (error, method, has a body, tried again)
    (NotConnected("refused"), "POST", True, True),  # nothing was sent: any method
    (NoResponse("closed", reused=True), "POST", False, True),  # an idle connection closed
    (NoResponse("closed"), "GET", False, True),  # may be sent twice
    (NoResponse("closed"), "POST", False, False),  # the upstream may have acted on it
    (RequestNotSent("closed"), "PUT", True, True),  # may be sent twice, its body kept
    (NoResponse("read timeout", timed_out=True), "GET", False, False),  # may be working on it
    (ResponseBroken("cut"), "GET", False, False),  # an answer had started
]


@pytest.mark.parametrize(("error", "method", "has_body", "tried_again"), RULES)
async def test_which_failed_requests_are_sent_again(
    error: Exception, method: str, has_body: bool, tried_again: bool
) -> None:
    calls: list[str] = []
    again, seen = another_upstream()
    headers = [(b"content-length", b"4")] if has_body else None
    receive = body_of(b"da", b"ta") if has_body else never_leaves
    outcome, sent = await forward_with(
        opener_failing(1, error, calls), method, again=again, receive=receive, headers=headers
    )
    if tried_again:
        assert seen == [error]
        assert (outcome.retries, outcome.status, sent[0]["status"]) == (1, 200, 200)
        assert calls[:2] == [method, method]
        if has_body:
            assert calls[2] == "data"  # the whole body, sent again
    else:
        assert seen == []
        assert calls == [method]
        assert (outcome.retries, outcome.failed) == (0, True)
        assert sent[0]["status"] in (502, 504)


async def test_a_second_failure_goes_to_again_again_and_its_refusal_stands() -> None:
    calls: list[str] = []
    again, seen = another_upstream(times=1)
    outcome, sent = await forward_with(
        opener_failing(2, NotConnected("refused"), calls), "GET", again=again
    )
    assert calls == ["GET", "GET"]
    assert len(seen) == 2
    assert (outcome.retries, outcome.status, outcome.failed) == (1, None, True)
    assert sent[0]["status"] == 502


async def test_a_body_larger_than_the_limit_is_not_kept_so_not_sent_again() -> None:
    calls: list[str] = []
    again, seen = another_upstream()
    _outcome, sent = await forward_with(
        opener_failing(1, RequestNotSent("closed"), calls),
        "PUT",
        again=again,
        receive=body_of(b"x" * 10, b"y" * 10),
        headers=[(b"content-length", b"20")],
        retry=Retry(max_body=15),
    )
    assert seen == []
    assert sent[0]["status"] == 502


async def test_a_listed_status_is_tried_again_and_the_last_answer_stands() -> None:
    class Answer503(FakeResponse):
        def __init__(self) -> None:
            super().__init__()
            self.status_code = 503

    opened: list[str] = []

    async def always_503(method: str, target: bytes, headers: Any, body: Any) -> FakeResponse:
        opened.append(method)
        return Answer503()

    again, seen = another_upstream(times=1)
    outcome, sent = await forward_with(
        always_503, "GET", again=again, retry=Retry(retry_on_status=(503,))
    )
    assert opened == ["GET", "GET"]
    assert seen == [None, None]  # None: a status, not an error
    assert (outcome.status, sent[0]["status"]) == (503, 503)


async def test_the_per_try_timeout_sends_a_slow_attempt_elsewhere() -> None:
    delays = [5.0, 0.0]

    async def slow_then_fast(method: str, target: bytes, headers: Any, body: Any) -> FakeResponse:
        await asyncio.sleep(delays.pop(0))
        return FakeResponse()

    again, seen = another_upstream()
    with anyio.fail_after(2):
        _outcome, sent = await forward_with(
            slow_then_fast, "GET", again=again, retry=Retry(per_try_timeout=0.1)
        )
    assert isinstance(seen[0], NoResponse)
    assert seen[0].per_try
    assert sent[0]["status"] == 200


async def test_a_retry_after_a_write_failed_on_the_last_piece_does_not_wait_for_more_body() -> None:
    """The first attempt took the body's one and last piece and failed writing it: the body
    had ended, and the retry sends what was kept instead of waiting for more from the client
    (a GET with a body hung here until the client gave up)."""
    attempts: list[bytes] = []

    async def fails_mid_write(method: str, target: bytes, headers: Any, body: Any) -> FakeResponse:
        async for chunk in body:
            attempts.append(chunk)
            if len(attempts) == 1:
                raise RequestNotSent("reset while writing")  # the generator is not resumed
        return FakeResponse()

    again, _seen = another_upstream()
    with anyio.fail_after(2):
        _outcome, sent = await forward_with(
            fails_mid_write,
            "GET",
            again=again,
            receive=body_of(b"the body"),
            headers=[(b"content-length", b"8")],
        )
    assert attempts == [b"the body", b"the body"]
    assert sent[0]["status"] == 200


async def test_a_listed_status_after_a_retry_is_handed_over_once() -> None:
    """A refusal, then a listed status on the retry with nothing left to try: ``again`` hears of
    each failed attempt once (it counted the status twice, and the budget with it)."""
    answers: list[Any] = [NotConnected("refused"), 503]

    class Answer503(FakeResponse):
        def __init__(self) -> None:
            super().__init__()
            self.status_code = 503

    async def refused_then_503(method: str, target: bytes, headers: Any, body: Any) -> FakeResponse:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return Answer503()

    again, seen = another_upstream(times=1)
    _outcome, sent = await forward_with(
        refused_then_503, "GET", again=again, retry=Retry(retry_on_status=(503,))
    )
    assert len(seen) == 2
    assert sent[0]["status"] == 503


# -- HTTP/2 and HTTP/3 bodies without a length ----------------------------------------------------


@pytest.mark.parametrize(
    ("chunks", "upstream_body"),
    [((b"da", b"ta"), "data"), ((b"",), None)],
    ids=["a body", "none"],
)
@pytest.mark.parametrize("error", [None, NotConnected("refused"), RequestNotSent("closed")])
async def test_an_http2_request_without_a_length_says_by_its_first_message_if_it_has_a_body(
    chunks: tuple[bytes, ...], upstream_body: str | None, error: Exception | None
) -> None:
    """HTTP/2 frames end a body, so no Content-Length need announce it (hypercorn and granian
    pass such requests on as they come): the first message says, and a body found is sent
    whole, again too when a retry allows."""
    calls: list[str | None] = []

    async def open_upstream(method: str, target: bytes, headers: Any, body: Any) -> FakeResponse:
        got = None if body is None else b"".join([chunk async for chunk in body]).decode()
        calls.append(got)
        if error is not None and len(calls) == 1:
            raise error
        return FakeResponse()

    again, _ = another_upstream()
    scope = {**SCOPE, "method": "PUT", "http_version": "2"}
    outcome = await forward_http(
        open_upstream, b"/", "up", scope, body_of(*chunks), _ignore, [], again=again,
        retry=Retry(),
    )  # fmt: skip
    assert outcome.status == 200
    assert calls == [upstream_body] * (1 if error is None else 2)


async def _ignore(message: dict[str, Any]) -> None:
    pass
