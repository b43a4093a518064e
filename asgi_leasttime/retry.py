"""Retries on another upstream: when a request may be sent again, how often, and what is counted.

An upstream that is restarted, killed or drained fails the requests it meets in one of a few
ways (:mod:`asgi_leasttime.errors`), and each says how far the request got. The one rule here,
:func:`may_send_again`, reads that and nothing else, as NGINX's ``proxy_next_upstream``, HAProxy's
``retries`` with ``option redispatch`` and Envoy's retry policies do:

- never connected (refused, unreachable, connect timeout, no free pooled connection): any method;
  nothing was sent and the request body has not been read;
- a reused pooled connection closed or reset before any byte of an answer: any method whose body
  was not read yet (the upstream closed an idle connection as the request went out), else only
  a method that may be sent twice (RFC 9110 section 9.2.2) with its body kept;
- written on a fresh connection, no byte of an answer, the connection closed or reset: only a
  method that may be sent twice, with its body kept (bodies up to ``max_body`` bytes are kept);
- an answer started: never;
- an upstream's own status (502, 503, 504, ...): only when listed in ``retry_on_status``, and only
  for a method that may be sent twice with its body kept.

Each retry goes to another upstream with a lease of its own, so the failed attempt counts
against its server and the passive check sees it. Retries are bounded twice: ``attempts`` per
request, and a :class:`RetryBudget` over all requests (Envoy's and Linkerd's retry budgets), so a
whole outage cannot multiply the load on what is left.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from asgi_leasttime.errors import NoResponse, NotConnected, ResponseBroken, UpstreamError
from asgi_leasttime.options import OptionError, check_not_negative, check_positive

__all__ = [
    "IDEMPOTENT",
    "REASONS",
    "Retry",
    "RetryBudget",
    "RetryCounts",
    "may_send_again",
    "reason_of",
]

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""The methods that may be sent twice (RFC 9110 section 9.2.2)."""

REASONS = ("refused", "reset", "no_response", "timeout", "status")
"""Why an attempt is tried again: ``refused`` (never connected), ``reset`` (a reused pooled
connection closed before an answer), ``no_response`` (a fresh connection closed before an
answer, the request written whole or in part), ``timeout`` (the per-try timeout), ``status``
(a status in ``retry_on_status``)."""


@dataclass(frozen=True, kw_only=True)
class Retry:
    """When and how often a request is tried again on another upstream (on by default).

    Arguments:
        attempts: tries in all for one request, the first included (Traefik's retry
            middleware's ``attempts``; HAProxy's default is 3 too). 1 turns retries off.
        budget_ratio: retries may add at most this share of the requests of the last
            ``budget_window`` seconds (Envoy's ``budget_percent``, Linkerd's ``retryRatio``).
        budget_window: seconds over which requests and retries are counted for the budget.
        min_retries_per_second: retries allowed whatever the ratio says, so a quiet proxy
            still retries (Linkerd's ``minRetriesPerSecond``).
        retry_on_status: upstream statuses that are tried again elsewhere, for methods that
            may be sent twice (Envoy's ``retriable_status_codes``, NGINX's ``http_502``...).
            Empty by default: an upstream's own answer is the answer.
        per_try_timeout: seconds an attempt of a method that may be sent twice waits for the
            response head before it is tried again elsewhere (Envoy's ``per_try_timeout``);
            ``None``: the read timeout alone, then 504.
        max_body: the largest request body kept in memory so that it can be sent again; a
            larger one is streamed as before and its request not retried once its body was
            read.
    """

    attempts: int = 3
    budget_ratio: float = 0.2
    budget_window: float = 10.0
    min_retries_per_second: float = 3.0
    retry_on_status: tuple[int, ...] = field(default=())
    per_try_timeout: float | None = None
    max_body: int = 65536

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise OptionError("attempts", "must be a whole number")
        if self.attempts < 1:
            raise OptionError("attempts", "must be at least 1 (the first try)")
        check_not_negative("budget_ratio", self.budget_ratio)
        check_positive("budget_window", self.budget_window)
        check_not_negative("min_retries_per_second", self.min_retries_per_second)
        check_positive("per_try_timeout", self.per_try_timeout)
        if not isinstance(self.max_body, int) or self.max_body < 0:
            raise OptionError("max_body", "must be a number of bytes, 0 or more")
        statuses = tuple(self.retry_on_status)
        if not all(isinstance(s, int) and 500 <= s <= 599 for s in statuses):
            raise OptionError("retry_on_status", "must be statuses from 500 to 599")
        object.__setattr__(self, "retry_on_status", statuses)

    @property
    def enabled(self) -> bool:
        """Whether a request may be tried more than once."""
        return self.attempts > 1


def may_send_again(
    error: UpstreamError, method: str, *, body_unread: bool, body_kept: bool
) -> bool:
    """Whether a request that met ``error`` may go out again (see the module's rules).

    ``body_unread``: no byte of the request body was read from the client yet (or it has
    none); ``body_kept``: every byte read so far is kept and can be sent again.
    """
    if isinstance(error, NotConnected):
        return True
    if isinstance(error, ResponseBroken):
        return False
    if error.timed_out and not (isinstance(error, NoResponse) and error.per_try):
        return False  # a read or write timeout: the upstream may still be working on it
    if error.reused and body_unread:
        return True  # an idle connection the upstream closed as the request went out
    return method in IDEMPOTENT and body_kept


def reason_of(error: UpstreamError | None) -> str:
    """The :data:`REASONS` entry of an attempt that failed with ``error`` (``None``: a status)."""
    if error is None:
        return "status"
    if isinstance(error, NotConnected):
        return "refused"
    if isinstance(error, NoResponse) and error.per_try:
        return "timeout"
    return "reset" if error.reused else "no_response"


class RetryBudget:
    """How many retries the proxy may make now: at most ``ratio`` times the requests of the
    last ``window`` seconds, plus ``floor`` a second, minus the retries already made in them.

    Counting a request is one addition (:meth:`count_request`, on every request); the window
    moves in whole seconds, from checkpoints taken by :meth:`tick` (the proxy's lifespan calls
    it every second) and whenever a retry is asked for, so nothing else runs per request.
    """

    def __init__(
        self,
        ratio: float,
        window: float,
        floor: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ratio = ratio
        self.window = window
        self.floor = floor
        self.clock = clock
        self.requests = 0  # every request counted, ever
        self.retries = 0  # every retry made, ever
        self.spent = 0  # retries refused because the budget was spent, ever
        start = clock()
        # (when, requests then, retries then), oldest first, one a second at most.
        self._checkpoints: collections.deque[tuple[float, int, int]] = collections.deque(
            [(start, 0, 0)]
        )

    @classmethod
    def of(cls, retry: Retry, clock: Callable[[], float] = time.monotonic) -> RetryBudget:
        """The budget ``retry`` describes."""
        return cls(retry.budget_ratio, retry.budget_window, retry.min_retries_per_second, clock)

    def count_request(self) -> None:
        """One more request from a client (a retry is not one)."""
        self.requests += 1

    def tick(self) -> None:
        """Take a checkpoint if a second has passed since the last, and forget those that have
        left the window."""
        now = self.clock()
        checkpoints = self._checkpoints
        if now - checkpoints[-1][0] >= 1.0:
            checkpoints.append((now, self.requests, self.retries))
        while len(checkpoints) > 1 and checkpoints[1][0] <= now - self.window:
            checkpoints.popleft()

    def allowed(self) -> float:
        """Retries that may be made now."""
        self.tick()
        since, requests, retries = self._checkpoints[0]
        seconds = min(self.window, max(self.clock() - since, 1.0))
        allowance = self.ratio * (self.requests - requests) + self.floor * seconds
        return allowance - (self.retries - retries)

    def try_spend(self) -> bool:
        """Take one retry from the budget if one is left; counts a refusal otherwise."""
        if self.allowed() >= 1:
            self.retries += 1
            return True
        self.spent += 1
        return False


class RetryCounts:
    """Retries by reason and outcome, for ``/metrics`` and ``/status``: ``retried``, or why not
    (``attempts`` used up, ``budget`` spent, ``no_upstream`` left to try)."""

    def __init__(self) -> None:
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def count(self, reason: str, outcome: str) -> None:
        """One attempt that failed for ``reason`` and came to ``outcome``."""
        self.counts[reason, outcome] += 1

    def as_json(self) -> dict[str, dict[str, int]]:
        """``{reason: {outcome: count}}``, only what happened."""
        document: dict[str, dict[str, int]] = {}
        for (reason, outcome), count in sorted(self.counts.items()):
            document.setdefault(reason, {})[outcome] = count
        return document

    def items(self) -> Iterable[tuple[tuple[str, str], int]]:
        """Every ((reason, outcome), count)."""
        return self.counts.items()
