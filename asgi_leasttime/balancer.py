"""The least-time balancer: which server gets the next request, and the lease that holds it.

Sans-IO: no sockets, no event loop, no HTTP. The proxy asks for a server, counts the request in
flight, and reports how long the server took to answer (its time to first byte, TTFB). Everything
that depends on time reads an injectable clock, so tests drive it with a fake one.

The proxy does all three through a :class:`Lease` (:meth:`Balancer.acquire`): one request's hold
on a server, which records the request's outcome once and gives the server back once.

Score, as in Traefik: ``average TTFB * (1 + in flight) / weight``; the lowest wins, and servers
with equal scores are ordered by earliest-deadline-first (weighted round robin).

Two modes:

``"traefik"``
    Traefik v3.6's ``leasttime`` exactly: samples truncated to whole milliseconds, the plain mean of
    the last 100, no ageing, failures not recorded.
``"leasttime"`` (the default)
    The same score with Traefik's faults fixed: samples in float seconds (sub-millisecond servers
    stop tying at 0); only recent samples count (the last 100 within ``stale_after`` seconds); a
    server out of favour (no sample for :data:`RECHECK_FIRST` seconds, then up to
    :data:`RECHECK_MAX`) is probed again and its history starts afresh, so a server that was
    slow and recovered gets its share back whatever ``stale_after`` is; a cold or freshly probed
    server takes one request at a time until it has :data:`SURE_AFTER` samples instead of being
    flooded until its first answer; failures recorded as slow answers instead of nothing; and
    each request in flight weighted by how much it is seen to delay the next (see
    :class:`Server.queueing`) instead of as if the server answered one request at a time.

Not thread-safe: call it from one event loop (the proxy's). From another thread, hand the call to
the loop (``anyio.from_thread.run_sync`` or ``loop.call_soon_threadsafe``).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Container, Iterator, Mapping
from types import MappingProxyType, TracebackType
from typing import Literal

from asgi_leasttime.options import OptionError

__all__ = [
    "EXACT_UP_TO",
    "FAILURE_STATUS",
    "QUEUEING_FLOOR",
    "QUEUEING_PRIOR",
    "RECHECK_FIRST",
    "RECHECK_MAX",
    "SAMPLED_CHOICES",
    "SAMPLE_SIZE",
    "SOURCES",
    "SURE_AFTER",
    "Balancer",
    "Lease",
    "Mode",
    "NoAvailableServer",
    "Outcome",
    "OutcomeListener",
    "Server",
    "Source",
    "UnknownServer",
    "is_failure",
]

Mode = Literal["leasttime", "traefik"]

Source = Literal["manual", "active", "passive", "parent", "refused"]
"""Who says a server is down; each source sets and clears only its own flag."""

SOURCES: tuple[Source, ...] = ("manual", "active", "passive", "parent", "refused")

SAMPLE_SIZE = 100
"""How many of a server's most recent TTFB samples make its average (Traefik's ``sampleSize``)."""

EXACT_UP_TO = 64
"""A threshold for ``Balancer(exact_up_to=...)`` where a pick's cost matters more than its
quality (pools of thousands): above it a pick compares :data:`SAMPLED_CHOICES` servers drawn at
random, at about 1.1 us whatever the size, against 59 us for a scan of 1,000. By default every
pick scans every server, which balances better at any size the simulator tried (see the
large-pool scenarios of ``benchmarks/sim``)."""

SAMPLED_CHOICES = 4
"""How many servers a sampled pick compares."""

QUEUEING_FLOOR = 0.5
"""Default mode: the least one request in flight weighs in a score, against Traefik's 1."""

QUEUEING_PRIOR = 10
"""Default mode: how many samples' worth of Traefik's weight 1 the learned weight is set
against (see :attr:`Server.queueing`)."""

REPORT_USUAL_WEIGHT = 0.01
"""How much one load report moves a server's usual count from the other clients."""
REPORT_TAU_COLD = 0.05
"""Seconds a report takes to fade by 1/e on a server with no TTFB yet (else its average)."""
REPORT_STEPS_PER_TAU = 4
"""A report fades in steps of a quarter of tau (``exp(-1/4)`` a step)."""
REPORT_LAST_STEP = 12
"""Steps after which a report counts for nothing: at 3 tau under 5 % of it is left."""

SURE_AFTER = 3
"""Default mode: a server with fewer samples since it was cold or stale takes one request at a
time."""

RECHECK_FIRST = 2.0
"""Default mode: seconds without a sample after which a server out of favour is probed again."""

RECHECK_MAX = 8.0
"""Default mode: the longest wait between such probes; each probe that leaves the server out of
favour doubles the wait, up to this."""

Outcome = Literal["answered", "failed", "abandoned"]
"""How a lease's request went: answered (a status under :data:`FAILURE_STATUS`), failed (no
answer, or one of :data:`FAILURE_STATUS` or more), or abandoned (given back with neither)."""

OutcomeListener = Callable[["Lease"], None]
"""Called once per lease, when its outcome is known (``Balancer.register_outcome_listener``)."""

FAILURE_STATUS = 500


def is_failure(status: int | None) -> bool:
    """The one rule of what counts against a server: no answer, or an answer of 500 or more
    (Traefik's passive health check counts the same)."""
    return status is None or status >= FAILURE_STATUS


logger = logging.getLogger("asgi_leasttime.balancer")


class NoAvailableServer(Exception):
    """No server is both up and unfenced. The proxy answers ``503 no available server``."""

    def __init__(self) -> None:
        super().__init__("no available server")


class UnknownServer(KeyError):
    """A server name that the balancer does not hold.

    Traefik accepts unknown names in ``SetStatus``, which lets a parent balancer believe a child is
    up while every pick fails; here it is an error.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"no server named {self.name!r} in this balancer"


class _Queueing:
    """How much each request already in flight on a server delays the next one, learned from
    its samples (default mode).

    Traefik's score counts every request in flight in full, as if the server answered one at a
    time. That holds for a server with one worker; one with many answers several at once, and
    counting them in full sends work to slower servers that are merely idle. From the samples in
    the average: the mean TTFB of requests sent while others were in flight, over that of
    requests sent alone, less 1, per request alongside, clamped between QUEUEING_FLOOR and 1.
    That estimate is noisy when either kind of sample is scarce (a busy server with a few
    workers is seldom alone), and one that comes out too low piles requests up on the server:
    it counts as many samples as the rarer kind has, against QUEUEING_PRIOR samples of 1.
    """

    __slots__ = ("alone", "alone_sum", "alongside_sum", "factor", "shared", "shared_sum")

    def __init__(self) -> None:
        self.alone = self.shared = self.alongside_sum = 0
        self.alone_sum = self.shared_sum = 0.0
        self.factor = 1.0

    def count(self, ttfb: float, alongside: int, sign: int = 1) -> None:
        """Count a sample (``sign=-1``: forget one) sent with ``alongside`` others in flight;
        ``alongside < 0``: not known, not counted. :meth:`relearn` then updates the factor."""
        if alongside == 0:
            self.alone += sign
            self.alone_sum = self.alone_sum + sign * ttfb if self.alone else 0.0
        elif alongside > 0:
            self.shared += sign
            self.shared_sum = self.shared_sum + sign * ttfb if self.shared else 0.0
            self.alongside_sum += sign * alongside

    def relearn(self) -> None:
        """The factor from the samples counted."""
        evidence = min(self.alone, self.shared)
        if evidence and self.alone_sum > 0:
            slowdown = (self.shared_sum / self.shared) / (self.alone_sum / self.alone) - 1
            per_request = slowdown * self.shared / self.alongside_sum
            learned = min(1.0, max(QUEUEING_FLOOR, per_request))
            self.factor = (learned * evidence + QUEUEING_PRIOR) / (evidence + QUEUEING_PRIOR)
        else:
            self.factor = 1.0


class _Report:
    """What a server's load reports have said (default mode): the others' usual count, and the
    last excess over it, when it came and how fast it fades."""

    __slots__ = ("at", "excess", "tau", "usual")

    def __init__(self, usual: float) -> None:
        self.usual = usual
        self.excess = 0.0
        self.at = 0.0
        self.tau = REPORT_TAU_COLD


class Server:
    """One server of a :class:`Balancer`, with its read-only statistics.

    Handed out by :meth:`Balancer.next_server`, and held by a :class:`Lease` as its
    :attr:`Lease.server`; the primitives (:meth:`Balancer.track`, :meth:`Balancer.release`,
    :meth:`Balancer.record_ttfb`, :meth:`Balancer.record_failure`) take it. A server removed from
    its balancer keeps its own counters, so requests still in flight on it finish cleanly.
    """

    __slots__ = (
        "_alongside",
        "_average",
        "_count",
        "_deadline",
        "_down",
        "_elsewhere",
        "_failures",
        "_fenced",
        "_index",
        "_inflight",
        "_last_sample_at",
        "_others",
        "_queueing",
        "_recheck",
        "_refused_until",
        "_refused_wait",
        "_report",
        "_reported",
        "_requests",
        "_sample_times",
        "_samples",
        "_scale",
        "_score",
        "_slot",
        "_stale",
        "_sum",
        "_up",
        "_weight",
        "name",
    )

    def __init__(self, name: str, weight: float, fenced: bool, deadline: float, scale: float):
        self.name = name
        self._weight = weight
        self._fenced = fenced
        self._up = True  # no source says down: kept beside _down for the hot path
        self._down: dict[Source, float] = {}  # source -> when it said down (balancer clock)
        self._deadline = deadline
        self._inflight = 0
        self._elsewhere = 0.0  # requests other processes have in flight on it, as last heard
        self._reported = 0.0  # default mode: what its load reports add (Balancer.heard_load)
        self._others = 0.0  # the two above, added once for the score
        self._report: _Report | None = None
        self._requests = 0
        self._failures = 0
        self._samples = [0.0] * SAMPLE_SIZE
        self._sample_times = [0.0] * SAMPLE_SIZE  # default mode: when each sample was taken
        self._alongside = [-1] * SAMPLE_SIZE  # default mode: others in flight when it was sent
        self._queueing = _Queueing()
        self._index = 0
        self._count = 0
        self._sum = 0.0
        self._average = 0.0  # in the mode's unit: milliseconds for "traefik", seconds otherwise
        self._scale = scale  # seconds per unit of _average
        self._last_sample_at = 0.0
        self._stale = False  # default mode: no recent sample, due a probe
        self._recheck = RECHECK_FIRST  # default mode: seconds without a sample before that
        self._refused_until = 0.0  # refused a connection: out of the picks until then
        self._refused_wait = RECHECK_FIRST  # the next such wait: doubles while it refuses
        self._score = 0.0  # kept current by the balancer, in the unit of _average
        self._slot = -1  # position in the balancer's list of available servers, -1 if none

    def __repr__(self) -> str:
        return (
            f"Server(name={self.name!r}, weight={self._weight:g}, up={self._up}, "
            f"fenced={self._fenced}, average={self.average:.6f}, inflight={self._inflight})"
        )

    @property
    def weight(self) -> float:
        """The server's weight: twice the weight, twice the share at equal speed."""
        return self._weight

    @property
    def up(self) -> bool:
        """Whether the server is up: no source says it is down (see :attr:`down_flags`)."""
        return self._up

    @property
    def down_flags(self) -> Mapping[Source, float]:
        """Which sources say the server is down, and since when (on the balancer's clock):
        ``"manual"`` (the in-process and admin APIs), ``"active"`` and ``"passive"`` (the
        health checks), ``"parent"`` (every upstream of a nested proxy is down), ``"refused"``
        (it refused a connection: see :meth:`Balancer.refused`)."""
        return MappingProxyType(self._down)

    @property
    def fenced(self) -> bool:
        """A fenced server is draining: it keeps its sticky clients but gets no new picks."""
        return self._fenced

    @property
    def available(self) -> bool:
        """Up and not fenced: whether a pick may choose it."""
        return self._up and not self._fenced

    @property
    def inflight(self) -> int:
        """Requests counted in flight on this server right now."""
        return self._inflight

    @property
    def inflight_elsewhere(self) -> float:
        """Requests other processes sharing this server had in flight, as last heard through
        the shared state (:meth:`Balancer.set_inflight_elsewhere`); 0 when nothing is shared."""
        return self._elsewhere

    @property
    def reported(self) -> float:
        """What the server's load reports add to its requests in flight now: the other
        clients' requests above their usual, fading (:meth:`Balancer.heard_load`)."""
        return self._reported

    @property
    def average(self) -> float:
        """The mean of the last :data:`SAMPLE_SIZE` TTFB samples, in seconds (0 with none).

        In ``"traefik"`` mode the samples are whole milliseconds, as Traefik stores them.
        """
        return self._average * self._scale

    @property
    def sample_count(self) -> int:
        """How many samples make up the average (at most :data:`SAMPLE_SIZE`)."""
        return self._count

    @property
    def score(self) -> float:
        """What the next pick compares, in seconds: lower wins.

        ``average * (1 + inflight) / weight``. In the default mode a cold or stale server scores 0
        until it is probed, and infinity while its probe is out.
        """
        return self._score * self._scale

    @property
    def deadline(self) -> float:
        """Earliest-deadline-first position, used only to break ties between equal scores."""
        return self._deadline

    @property
    def queueing(self) -> float:
        """How much one request in flight weighs in the score: 1 in ``"traefik"`` mode; in the
        default mode learned from the samples, from :data:`QUEUEING_FLOOR` for a server that
        answers many requests at once without slowing down, to 1 for one that answers one at a
        time (and 1 until it has enough samples sent alone and alongside others)."""
        return self._queueing.factor

    @property
    def requests(self) -> int:
        """Requests counted on this server since it was added."""
        return self._requests

    @property
    def failures(self) -> int:
        """Failures recorded on this server since it was added."""
        return self._failures

    def _add_sample(self, value: float, at: float = 0.0, alongside: int = -1) -> None:
        samples = self._samples
        index = self._index
        if self._count < SAMPLE_SIZE:
            self._count += 1
            self._sum += value
        else:
            self._sum += value - samples[index]
            self._queueing.count(samples[index], self._alongside[index], -1)
        samples[index] = value
        self._alongside[index] = alongside
        self._queueing.count(value, alongside)
        self._queueing.relearn()
        self._sample_times[index] = at
        self._index = (index + 1) % SAMPLE_SIZE
        self._average = self._sum / self._count

    def _expire_before(self, cutoff: float) -> None:
        """Drop the samples taken before ``cutoff``, oldest first (default mode)."""
        times = self._sample_times
        expired = False
        while self._count:
            oldest = (self._index - self._count) % SAMPLE_SIZE
            if times[oldest] >= cutoff:
                break
            self._count -= 1
            self._sum -= self._samples[oldest]
            self._queueing.count(self._samples[oldest], self._alongside[oldest], -1)
            expired = True
        if expired:
            self._queueing.relearn()
        if self._count:
            self._average = self._sum / self._count
        else:
            self._sum = self._average = 0.0  # no rounding drift carried into the next samples


class Balancer:
    """Least-time selection over a set of named servers.

    Arguments:
        mode: ``"leasttime"`` (the default, Traefik's faults fixed) or ``"traefik"`` (Traefik's
            algorithm exactly, for parity).
        wants_health_check: whether a parent may register a status updater
            (:meth:`register_status_updater`); Traefik refuses it otherwise.
        clock: seconds, monotonic; ``time.perf_counter`` unless a test passes a fake.
        stale_after: default mode only. How long a sample counts: the average is the mean of the
            last 100 samples taken within ``stale_after`` seconds, so a server that kept a
            trickle of traffic while slow sheds its slow samples once it recovers. A server with
            no sample that recent, or none for its recheck wait (2 s to 8 s), is probed with one
            request, as a cold server is.
        failure_penalty: default mode only. Seconds recorded as the TTFB of a failed request.
        exact_up_to: default mode only. With more available servers than this, a pick compares
            ``choices`` servers drawn at random instead of every server: the pick's cost stops
            growing with the pool, at some cost in balance. Unbounded by default.
        choices: how many servers a sampled pick compares.
        rng: the random source of sampled picks (tests and simulations pass a seeded one).
    """

    def __init__(
        self,
        *,
        mode: Mode = "leasttime",
        wants_health_check: bool = False,
        clock: Callable[[], float] = time.perf_counter,
        stale_after: float = 5.0,
        failure_penalty: float = 1.0,
        exact_up_to: float = math.inf,
        choices: int = SAMPLED_CHOICES,
        rng: random.Random | None = None,
    ) -> None:
        if mode not in ("leasttime", "traefik"):
            raise OptionError("mode", "must be one of 'leasttime', 'traefik'")
        if stale_after <= 0:
            raise ValueError("stale_after must be positive")
        if failure_penalty < 0:
            raise ValueError("failure_penalty must not be negative")
        if choices < 1:
            raise ValueError("choices must be at least 1")
        self.mode: Mode = mode
        self.wants_health_check = wants_health_check
        self.clock = clock
        self.stale_after = stale_after
        self.failure_penalty = failure_penalty
        self._traefik = mode == "traefik"
        # Traefik mode always scans every server, as Traefik does.
        self.exact_up_to = math.inf if self._traefik else exact_up_to
        self.choices = choices
        self._random = (rng or random.Random()).random
        self._servers: dict[str, Server] = {}
        # The pick's candidates and their scores, side by side: the pick is min() over a list
        # of floats, which runs in C. Rebuilt when membership, status or fencing changes; a
        # server's score is rewritten in place whenever its in-flight count or average moves.
        self._available: list[Server] = []
        self._scores: list[float] = []
        self._up_count = 0
        self._current_deadline = 0.0
        self._next_staleness_check = 0.0  # when next_server looks at the clock: the sooner of
        self._next_stale_check = 0.0  # the next look for stale servers,
        self._next_fade = math.inf  # and the next step of a load report's fading
        self._fading: set[Server] = set()
        self.next_return = math.inf
        """When the next server refused (:meth:`refused`) may come back, on :attr:`clock`."""
        self._updaters: list[Callable[[bool], None]] = []
        self._outcome_listeners: list[OutcomeListener] = []
        # The mode's rules, chosen once: every lease and every change of a server calls them.
        self._rescore: Callable[[Server], None]
        self._record_ttfb: Callable[[Server, float, int], None]
        self._record_failure: Callable[[Server, float | None], None]
        if self._traefik:
            self._rescore = self._rescore_traefik
            self._record_ttfb = self._record_ttfb_traefik
            self._record_failure = self._record_failure_traefik
        else:
            self._rescore = self._rescore_leasttime
            self._record_ttfb = self._record_ttfb_leasttime
            self._record_failure = self._record_failure_leasttime

    # -- membership -------------------------------------------------------------------------------

    def add(self, name: str, weight: float = 1, fenced: bool = False) -> Server | None:
        """Add a server, up. A weight of 0 or less drops it, as in Traefik, and returns ``None``.

        New servers are staggered: each one's deadline is the previous newest deadline plus
        ``1 / weight`` (three weight-1 servers get 1, 2 and 3).
        """
        if name in self._servers:
            raise ValueError(f"a server named {name!r} is already in this balancer")
        if weight <= 0:
            logger.debug("server %r has weight %s and is left out", name, weight)
            return None
        deadline = self._current_deadline + 1 / weight
        self._current_deadline = deadline
        scale = 0.001 if self._traefik else 1.0
        server = Server(name, float(weight), fenced, deadline, scale)
        was_up = self.up
        self._servers[name] = server
        self._up_count += 1
        self._membership_changed(was_up)
        return server

    def remove(self, name: str) -> Server:
        """Remove a server. Requests in flight on it finish; its counters go with it."""
        server = self._servers.pop(name, None)
        if server is None:
            raise UnknownServer(name)
        self._fading.discard(server)
        was_up = self.up
        if server._up:
            self._up_count -= 1
        self._membership_changed(was_up)
        return server

    def __getitem__(self, name: str) -> Server:
        try:
            return self._servers[name]
        except KeyError:
            raise UnknownServer(name) from None

    def get(self, name: str) -> Server | None:
        """The server of that name, or ``None``."""
        return self._servers.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._servers

    def __iter__(self) -> Iterator[Server]:
        return iter(tuple(self._servers.values()))

    def __len__(self) -> int:
        return len(self._servers)

    @property
    def servers(self) -> tuple[Server, ...]:
        """Every server, in the order they were added."""
        return tuple(self._servers.values())

    # -- status -----------------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        """Whether any server is up (fenced ones count: they still serve their sticky clients)."""
        return self._up_count > 0

    def set_status(self, name: str, up: bool, source: Source = "manual") -> None:
        """Set (``up=False``) or clear ``source``'s down flag on a server.

        A server takes new requests while no source says it is down, and each source clears
        only its own flag: a health probe never undoes a manual down, nor a manual up a failing
        probe. Traefik mode keeps Traefik's single status: an up from any source clears every
        flag. When the balancer as a whole flips, tell the updaters.
        """
        if source not in SOURCES:
            raise OptionError("source", f"must be one of {', '.join(map(repr, SOURCES))}")
        server = self[name]
        if up and source == "refused":
            server._refused_wait = RECHECK_FIRST  # cleared by proof (a probe): waits afresh
        self._flag(server, source, up, clear_all=self._traefik)

    def _flag(self, server: Server, source: Source, up: bool, clear_all: bool = False) -> None:
        flags = server._down
        if not up:
            flags.setdefault(source, self.clock())
        elif clear_all:
            flags.clear()
        else:
            flags.pop(source, None)
        now_up = not flags
        if server._up == now_up:
            return
        was_up = self.up
        server._up = now_up
        self._up_count += 1 if now_up else -1
        logger.debug("server %r is now %s", server.name, "up" if now_up else "down")
        self._membership_changed(was_up)

    def refused(self, server: Server) -> None:
        """The server refused a connection (nothing was sent): out of the picks at once, in
        either mode, with the ``"refused"`` flag. It is back after a wait of
        :data:`RECHECK_FIRST` seconds, doubled at each refusal in a row up to
        :data:`RECHECK_MAX` (:meth:`return_refused`), then takes one request at a time until it
        answers (the default mode's probe of a stale server); an answer, or clearing the flag
        (a passing health probe), starts the waits afresh."""
        if "refused" in server._down or server.name not in self._servers:
            return
        wait = server._refused_wait
        server._refused_wait = min(2 * wait, RECHECK_MAX)
        server._refused_until = until = self.clock() + wait
        self.next_return = min(self.next_return, until)
        self._flag(server, "refused", False)

    def return_refused(self, soonest: bool = False) -> list[str]:
        """Bring back the servers whose wait after a refusal is over (the proxy calls this when
        :attr:`next_return` is due; the balancer does no I/O and keeps no timer); their names.

        ``soonest``: also the one whose wait ends first, over or not: when nothing else is left
        to pick, one request tries it rather than none (a restarted upstream may be back already).
        """
        now = self.clock()
        if soonest:
            refused = [s for s in self._servers.values() if "refused" in s._down]
            if refused:
                now = max(now, min(s._refused_until for s in refused))
        later = math.inf
        returned = []
        for server in self._servers.values():
            if "refused" not in server._down:
                continue
            if server._refused_until > now:
                later = min(later, server._refused_until)
                continue
            if not self._traefik:
                server._stale = True  # one request at a time until it answers
            self._flag(server, "refused", True)
            returned.append(server.name)
        self.next_return = later
        return returned

    def set_fenced(self, name: str, fenced: bool) -> None:
        """Fence (drain) a server or take it back: fenced servers get no new picks."""
        self[name]._fenced = fenced
        self._membership_changed(self.up)

    def set_weight(self, name: str, weight: float) -> None:
        """Change a server's weight; its samples and counters are kept."""
        if weight <= 0:
            raise ValueError("a weight must be positive; remove() takes a server out")
        server = self[name]
        server._weight = float(weight)
        self._rescore(server)

    def register_status_updater(self, updater: Callable[[bool], None]) -> None:
        """Call ``updater(up)`` whenever the balancer as a whole goes up or down.

        This is how a parent balancer learns that a child went down. Refused unless the balancer
        was created with ``wants_health_check=True``, as in Traefik.
        """
        if not self.wants_health_check:
            raise RuntimeError(
                "health check not enabled for this balancer: create it with wants_health_check=True"
            )
        self._updaters.append(updater)

    def unregister_status_updater(self, updater: Callable[[bool], None]) -> None:
        """Stop calling ``updater`` (a parent that removed this balancer's proxy)."""
        self._updaters.remove(updater)

    def _membership_changed(self, was_up: bool) -> None:
        for server in self._available:
            server._slot = -1
        available = [s for s in self._servers.values() if s._up and not s._fenced]
        for server in available:
            self._rescore(server)
        for slot, server in enumerate(available):
            server._slot = slot
        self._available = available
        self._scores = [s._score for s in available]
        now_up = self.up
        if now_up != was_up:
            for updater in tuple(self._updaters):
                updater(now_up)

    # -- the pick ---------------------------------------------------------------------------------

    def next_server(self) -> Server:
        """The server with the lowest score; raises :class:`NoAvailableServer` if none is available.

        Like Traefik's ``nextServer`` it only picks: it counts nothing in flight. Use
        :meth:`acquire` to pick and count in one step.
        """
        scores = self._scores
        if len(scores) < 2:
            if scores:
                return self._available[0]
            raise NoAvailableServer
        if not self._traefik and self.clock() >= self._next_staleness_check:
            self._on_time()
        if len(scores) > self.exact_up_to:
            return self._available[self._sampled_slot()]
        best = min(scores)
        slot = scores.index(best)
        if scores.count(best) > 1:
            slot = self._earliest_deadline(best, slot)
        return self._available[slot]

    def next_server_except(self, exclude: Container[str]) -> Server:
        """The available server with the lowest score (ties to the earliest deadline) whose
        name is not in ``exclude``: where a retry goes. Raises :class:`NoAvailableServer`."""
        best: Server | None = None
        for server in self._available:
            if server.name in exclude:
                continue
            if best is None or (server._score, server._deadline) < (best._score, best._deadline):
                best = server
        if best is None:
            raise NoAvailableServer
        return best

    def _sampled_slot(self) -> int:
        """The lowest score of ``choices`` servers drawn at random (with replacement: cheaper,
        and a repeat only means one candidate fewer)."""
        scores, draw, n = self._scores, self._random, len(self._scores)
        slot = int(draw() * n)
        best = scores[slot]
        for _ in range(self.choices - 1):
            other = int(draw() * n)
            if scores[other] < best:
                slot, best = other, scores[other]
        return slot

    def _earliest_deadline(self, score: float, first: int) -> int:
        """Break a tie by earliest deadline, and move the winner back by its share of a round."""
        available, scores = self._available, self._scores
        slot = first
        deadline = available[first]._deadline
        for other in range(first + 1, len(scores)):
            if scores[other] == score and available[other]._deadline < deadline:
                slot, deadline = other, available[other]._deadline
        winner = available[slot]
        deadline += 1 / winner._weight
        winner._deadline = deadline
        if deadline > self._current_deadline:
            self._current_deadline = deadline
        return slot

    def _rescore_traefik(self, server: Server) -> None:
        # Every request in flight counts in full, and only this process's.
        score = server._average * (1 + server._inflight) / server._weight
        server._score = score
        if server._slot >= 0:
            self._scores[server._slot] = score

    def _rescore_leasttime(self, server: Server) -> None:
        if server._count >= SURE_AFTER and not server._stale:
            inflight = server._inflight + server._others
            score = server._average * (1 + server._queueing.factor * inflight) / server._weight
        elif server._inflight:
            # Too little known: one request at a time, so one lucky sample cannot draw a flood.
            score = math.inf
        elif server._count == 0 or server._stale:
            score = 0.0  # nothing known (cold) or nothing recent (stale): probe it now
        else:
            score = server._average / server._weight
        server._score = score
        if server._slot >= 0:
            self._scores[server._slot] = score

    def _on_time(self) -> None:
        """What falls due with time in the default mode: stale servers, fading reports."""
        now = self.clock()
        if now >= self._next_fade:
            self._fade_reports(now)
        if now >= self._next_stale_check:
            self._find_stale_servers()
        self._next_staleness_check = min(self._next_stale_check, self._next_fade)

    def _find_stale_servers(self) -> None:
        """Mark for a probe the servers with no sample for ``stale_after`` seconds, or for their
        recheck wait: one out of favour gets no traffic, so only a probe can show it recovered."""
        now = self.clock()
        self._next_stale_check = now + min(self.stale_after, RECHECK_FIRST) / 8
        self._next_staleness_check = min(self._next_stale_check, self._next_fade)
        for server in self._available:
            if not server._count or server._stale:
                continue
            wait = min(self.stale_after, server._recheck)
            if server._last_sample_at < now - wait:
                server._stale = True
                server._recheck = min(2 * server._recheck, RECHECK_MAX)
                self._rescore(server)

    # -- counting and timing ----------------------------------------------------------------------

    def acquire(self) -> Lease:
        """Pick a server and count one request in flight on it, with nothing in between; the
        :class:`Lease` records how the request went and gives it back."""
        server = self.next_server()
        self._count_in(server)
        return Lease(self, server)

    def lease(self, server: Server) -> Lease:
        """Count a request in flight on a server chosen without a pick (a sticky request): sticky
        traffic weighs on the scores too."""
        self._count_in(server)
        return Lease(self, server)

    def register_outcome_listener(self, listener: OutcomeListener) -> None:
        """Call ``listener(lease)`` once per lease, as soon as its outcome is known: answered or
        failed when the answer (or its absence) is seen, abandoned when it is given back with
        neither. The passive health check listens here."""
        self._outcome_listeners.append(listener)

    def unregister_outcome_listener(self, listener: OutcomeListener) -> None:
        """Stop calling ``listener`` (a passive check replaced by a reloaded file's)."""
        self._outcome_listeners.remove(listener)

    def _tell_listeners(self, lease: Lease) -> None:
        for listener in self._outcome_listeners:
            listener(lease)

    def heard_load(self, name: str, inflight: float) -> None:
        """A load report in a server's answer: its requests in flight, every client's, as the
        answer left it (ORCA's, see :mod:`asgi_leasttime.load_reports`); called while the
        answered request is still counted here. The default mode counts what the other clients
        have there above their usual (a running mean of their share, every report weighing
        :data:`REPORT_USUAL_WEIGHT`), fading over three of the server's average TTFBs: a report
        only ever makes a server look busier, and never for long (benchmarks/RESULTS.md, "Load
        reports"). Traefik mode ignores reports."""
        server = self._servers.get(name)
        if server is None or self._traefik or not 0 <= inflight < math.inf:
            return
        others = max(0.0, inflight - max(0, server._inflight - 1))
        report = server._report
        if report is None:  # the first report sets the usual: it adds nothing
            server._report = report = _Report(others)
        report.usual += REPORT_USUAL_WEIGHT * (others - report.usual)
        now = self.clock()
        report.excess = max(0.0, others - report.usual)
        report.at = now
        report.tau = server._average * server._scale if server._count else REPORT_TAU_COLD
        self._set_reported(server, report.excess)
        if report.excess > 0:
            self._fading.add(server)
            self._next_fade = min(self._next_fade, now + report.tau / REPORT_STEPS_PER_TAU)
            self._next_staleness_check = min(self._next_staleness_check, self._next_fade)
        else:
            self._fading.discard(server)

    def _fade_reports(self, now: float) -> None:
        """Each fading report a step further: ``excess * exp(-age / tau)``, by quarters of tau,
        and none from 3 tau on."""
        soonest = math.inf
        for server in tuple(self._fading):
            report = server._report
            assert report is not None
            step = report.tau / REPORT_STEPS_PER_TAU
            steps = int((now - report.at) / step) if step > 0 else REPORT_LAST_STEP
            if steps >= REPORT_LAST_STEP:
                self._fading.discard(server)
                self._set_reported(server, 0.0)
                continue
            self._set_reported(server, report.excess * math.exp(-steps / REPORT_STEPS_PER_TAU))
            soonest = min(soonest, report.at + (steps + 1) * step)
        self._next_fade = soonest

    def _set_reported(self, server: Server, reported: float) -> None:
        if server._reported != reported:
            server._reported = reported
            server._others = server._elsewhere + reported
            self._rescore(server)

    def set_inflight_elsewhere(self, name: str, inflight: float) -> None:
        """Tell the default mode how many requests other processes have in flight on a server:
        its score counts them beside its own (Traefik mode ignores them)."""
        server = self[name]
        if self._traefik or server._elsewhere == inflight:
            return
        server._elsewhere = inflight
        server._others = inflight + server._reported
        self._rescore(server)

    # -- the primitives ---------------------------------------------------------------------------
    #
    # What a lease is made of, on a Server: for code that drives the counting and the timing
    # step by step (the tests that port Traefik's, benchmarks/pick.py, a simulator). The proxy
    # uses leases. They tell no outcome listener (a lease does), and nothing checks that they
    # are paired.

    def track(self, server: Server) -> None:
        """Primitive: count a request in flight on ``server`` (:meth:`acquire` and
        :meth:`lease` do it for a lease)."""
        self._count_in(server)

    def release(self, server: Server) -> None:
        """Primitive: the request counted by :meth:`track` on ``server`` is over
        (:meth:`Lease.release` does it for a lease)."""
        self._count_out(server)

    def record_ttfb(self, server: Server, seconds: float, alongside: int | None = None) -> None:
        """Primitive: record a time to first byte on ``server``, in seconds
        (:meth:`Lease.answered` does it for a lease).

        ``alongside``: how many other requests the server had in flight when this one was sent
        (what :attr:`Lease.alongside` captures); the default mode learns from it how much a
        request in flight delays the next (:attr:`Server.queueing`). Without it nothing is
        learned.
        """
        self._record_ttfb(server, seconds, -1 if alongside is None else alongside)

    def record_failure(self, server: Server, ttfb: float | None = None) -> None:
        """Primitive: record a failed request on ``server``: never answered (``ttfb=None``) or
        answered with a 5xx (:meth:`Lease.failed` and :meth:`Lease.answered` do it for a lease).

        Traefik times whatever answered and ignores what did not, which makes a fast-failing
        server look fast; the default mode records ``failure_penalty`` seconds instead.
        """
        self._record_failure(server, ttfb)

    # The rules themselves, the mode's chosen in __init__: every lease calls them.

    def _count_in(self, server: Server) -> None:
        server._inflight += 1
        server._requests += 1
        self._rescore(server)

    def _count_out(self, server: Server) -> None:
        server._inflight -= 1
        self._rescore(server)

    def _record_ttfb_traefik(self, server: Server, seconds: float, alongside: int) -> None:
        # Go's Duration.Milliseconds(): integer nanoseconds, truncated to whole milliseconds.
        server._add_sample(float(round(seconds * 1e9) // 1_000_000))
        server._refused_wait = RECHECK_FIRST
        self._rescore_traefik(server)

    def _record_ttfb_leasttime(self, server: Server, seconds: float, alongside: int) -> None:
        now = self.clock()
        if server._stale:
            # A probe's answer starts the history afresh: older samples describe a server that
            # may have changed since (recovered, or slowed down).
            server._expire_before(math.inf)
            server._stale = False
            server._refused_wait = RECHECK_FIRST
        else:
            server._expire_before(now - self.stale_after)
        if now - server._last_sample_at < RECHECK_FIRST:
            server._recheck = RECHECK_FIRST  # in favour again: back to the first wait
        server._last_sample_at = now
        server._add_sample(seconds, now, alongside)
        self._rescore_leasttime(server)

    def _record_failure_traefik(self, server: Server, ttfb: float | None) -> None:
        server._failures += 1
        if ttfb is not None:  # what never answered is not timed
            self._record_ttfb_traefik(server, ttfb, -1)

    def _record_failure_leasttime(self, server: Server, ttfb: float | None) -> None:
        server._failures += 1
        self._record_ttfb_leasttime(server, max(self.failure_penalty, ttfb or 0.0), -1)


class Lease:
    """A request in flight on :attr:`server`, from the pick to the end of its answer. Made by
    :meth:`Balancer.acquire` (a pick) and :meth:`Balancer.lease` (a server chosen another way,
    such as a sticky cookie's).

    Shaped like httpcore's pool, which ties a connection's return to its response stream's close:
    the balancer hands out a lease with the server counted in flight, and the request gives it
    back once, however it ends. On the way the lease records, once, what the balancer learns from
    the request: answered (a status and a time to first byte) or failed (never answered). A lease
    given back with neither was abandoned: the client left first, or the request was refused
    before it was sent.

    Record the outcome with :meth:`answered` or :meth:`failed` (the first call counts, later ones
    are ignored) and give the lease back with :meth:`release`, or use it as a context manager.
    The server's name and statistics are the server's: ``lease.server.name``.

    What the balancer must know at the pick (how many other requests the server had in flight,
    which teaches it how much one more delays an answer) is captured when the lease is made, so
    no caller can pass it wrong.
    """

    __slots__ = ("_balancer", "_released", "alongside", "outcome", "server")

    def __init__(self, balancer: Balancer, server: Server) -> None:
        self._balancer = balancer
        self.server = server
        self.alongside = server._inflight - 1
        """How many other requests the server had in flight when this one was counted."""
        self.outcome: Outcome | None = None
        self._released = False

    def __repr__(self) -> str:
        return f"<Lease {self.server.name!r} outcome={self.outcome}>"

    def answered(self, status: int, ttfb: float) -> None:
        """The server answered with ``status`` after ``ttfb`` seconds (its response head)."""
        if self.outcome is not None:
            return
        balancer = self._balancer
        if is_failure(status):
            self.outcome = "failed"
            balancer._record_failure(self.server, ttfb)
        else:
            self.outcome = "answered"
            balancer._record_ttfb(self.server, ttfb, self.alongside)
        balancer._tell_listeners(self)

    def failed(self, ttfb: float | None = None) -> None:
        """The server never answered (refused, reset, timed out, or spoke no HTTP)."""
        if self.outcome is not None:
            return
        self.outcome = "failed"
        self._balancer._record_failure(self.server, ttfb)
        self._balancer._tell_listeners(self)

    def release(self) -> None:
        """The request is over, however it ended; idempotent."""
        if self._released:
            return
        self._released = True
        if self.outcome is None:
            self.outcome = "abandoned"
            self._balancer._tell_listeners(self)
        self._balancer._count_out(self.server)

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
