"""Health: active probes and passive failure counting, both ending in ``Balancer.set_status``.

The active check probes every upstream on its own schedule, concurrently, as anyio tasks that live
as long as the proxy's lifespan. The passive check watches the proxy's own traffic: an upstream
that fails ``max_failed_attempts`` times within ``failure_window`` seconds is marked down, and comes
back after ``failure_window`` unless an active check is there to bring it back.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import httpx

from asgi_leasttime.options import OptionError, check_fields, check_port, check_positive

if TYPE_CHECKING:
    from asgi_leasttime.balancer import Balancer, Lease, Server, Source
    from asgi_leasttime.state import StateStore
    from asgi_leasttime.upstream import Upstream

__all__ = ["HealthCheck", "PassiveCheck", "PassiveHealthCheck"]

logger = logging.getLogger("asgi_leasttime.health")


@dataclass(frozen=True)
class HealthCheck:
    """Active health checks, with Traefik's options and defaults.

    Arguments:
        path: the path probed on every upstream (below the upstream URL's own path).
        scheme: ``"http"`` or ``"https"`` instead of the upstream's.
        port: a port instead of the upstream's.
        method: the probe's method.
        hostname: the ``Host`` header of the probe, instead of the upstream's.
        headers: extra headers for the probe.
        follow_redirects: follow redirects before judging the status.
        status: the status that means healthy; 0 accepts any 2xx or 3xx.
        interval: seconds between probes of a healthy upstream.
        timeout: seconds a probe may take in all before it counts as failed.
        unhealthy_interval: seconds between probes of an unhealthy upstream; ``interval`` if
            ``None``.
    """

    path: str = "/health"
    scheme: str | None = None
    port: int | None = None
    method: str = "GET"
    hostname: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    follow_redirects: bool = True
    status: int = 0
    interval: float = 30.0
    timeout: float = 5.0
    unhealthy_interval: float | None = None

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.path.startswith("/"):
            raise OptionError("path", f"must start with '/', not {self.path!r}")
        if self.scheme not in (None, "http", "https"):
            raise OptionError("scheme", f"must be 'http' or 'https', not {self.scheme!r}")
        check_port("port", self.port)
        if self.status != 0 and not 100 <= self.status <= 599:
            raise OptionError("status", "must be 0 or an HTTP status (100-599)")
        for name in ("interval", "timeout", "unhealthy_interval"):
            check_positive(name, getattr(self, name))

    def url_for(self, upstream_url: httpx.URL) -> httpx.URL:
        """The probe URL for an upstream."""
        base = upstream_url.raw_path.split(b"?", 1)[0].rstrip(b"/")
        url = upstream_url.copy_with(raw_path=base + self.path.encode())
        if self.scheme is not None:
            url = url.copy_with(scheme=self.scheme)
        if self.port is not None:
            url = url.copy_with(port=self.port)
        return url

    def is_healthy(self, status: int) -> bool:
        """Whether a probe's final status means healthy."""
        return status == self.status if self.status else 200 <= status < 400


async def probe(
    check: HealthCheck,
    client: httpx.AsyncClient,
    url: httpx.URL,
    server_name: str | None = None,
    host: str | None = None,
) -> bool:
    """One probe: healthy or not. Never raises for what the upstream does. ``server_name``:
    the TLS name to send and check instead of the URL's host; ``host``: the ``Host`` header
    instead of the URL's (an upstream reached at an address), unless the check names one."""
    headers = dict(check.headers)
    extensions = {"sni_hostname": server_name} if server_name else None
    if check.hostname is not None:
        headers["host"] = check.hostname
    elif host is not None:
        headers["host"] = host
    with anyio.move_on_after(check.timeout):
        try:
            response = await client.request(
                check.method,
                url,
                headers=headers,
                follow_redirects=check.follow_redirects,
                timeout=check.timeout,
                extensions=extensions,
            )
        except httpx.HTTPError as exc:
            logger.debug("health probe of %s failed: %r", url, exc)
            return False
        return check.is_healthy(response.status_code)
    logger.debug("health probe of %s timed out after %s s", url, check.timeout)
    return False


def report_status(balancer: Balancer, name: str, up: bool, source: Source, reason: str) -> None:
    """Set or clear ``source``'s down flag, logging each change once: WARNING when the upstream
    goes down, INFO when it comes back, DEBUG for a flag that changes nothing (another source
    still holds it down)."""
    server = balancer.get(name)
    if server is None or (source in server.down_flags) != up:
        return
    was_up = server.up
    balancer.set_status(name, up, source)
    if server.up and not was_up:
        logger.info("upstream %r is up again (%s)", name, reason)
    elif was_up and not server.up:
        logger.warning("upstream %r is down (%s)", name, reason)
    else:
        held = ", ".join(server.down_flags) or "nothing"
        logger.debug("upstream %r: %s says %s; down by %s", name, source, up, held)


async def watch_upstream(
    check: HealthCheck,
    state: StateStore,
    upstream: Upstream,
    client: Callable[[], httpx.AsyncClient],
    server_name: str | None = None,
) -> None:
    """Probe one upstream on its own schedule until cancelled (when it leaves the proxy).

    Where processes share a state, one of them probes each upstream for all and shares the
    result (``state.may_probe``); the others wait and follow."""
    assert upstream.url is not None
    url = check.url_for(upstream.url)
    host = None
    if upstream.address is not None:  # this server, under the name it answers to
        host = url.netloc.decode("ascii")
        server_name = server_name or upstream.host
        url = url.copy_with(host=upstream.address)
    unhealthy_interval = check.unhealthy_interval or check.interval
    longest = max(check.interval, unhealthy_interval)
    while True:
        healthy = True
        if await state.may_probe(upstream.name, longest):
            try:
                healthy = await probe(check, client(), url, server_name, host)
            except Exception:
                # A fault of ours or of the client library: this upstream counts as unhealthy
                # and the task goes on, since ending it would end every upstream's checks.
                logger.exception("health probe of %s failed unexpectedly", url)
                healthy = False
            state.report_probe(upstream.name, healthy, f"active check of {url}")
        await anyio.sleep(check.interval if healthy else unhealthy_interval)


@dataclass(frozen=True, kw_only=True)
class PassiveHealthCheck:
    """Passive health checks on the proxy's own traffic, with Traefik's semantics.

    A failure is what :func:`~asgi_leasttime.lease.is_failure` says: an upstream never reached or
    a final status of 500 or more; a success clears the count. ``max_failed_attempts`` failures
    within ``failure_window`` seconds mark the upstream down; it returns after ``failure_window``
    seconds, unless an active check is configured, which then decides when it returns.

    ``shared``: where processes share a state store, an upstream ejected by one process is
    ejected by all of them (for the rest of the window, or until a probe passes); each process
    counts failures on its own traffic either way.

    These are options only: each proxy given them keeps its own counts (a
    :class:`PassiveCheck`), so one object can serve several proxies.
    """

    failure_window: float = 10.0
    max_failed_attempts: int = 1
    shared: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        check_positive("failure_window", self.failure_window)
        if self.max_failed_attempts < 1:
            raise OptionError("max_failed_attempts", "must be at least 1")

    def start(
        self,
        balancer: Balancer,
        *,
        active_recovery: bool = False,
        tell_others: Callable[[str, float | bool], None] | None = None,
    ) -> PassiveCheck:
        """The running check of one proxy, counting the outcome of every lease of ``balancer``
        (see :class:`PassiveCheck`)."""
        return PassiveCheck(
            self, balancer, active_recovery=active_recovery, tell_others=tell_others
        )


class PassiveCheck:
    """One proxy's passive check at work: its failure counts and ejections.

    ``active_recovery``: an active check exists, so an ejection lasts until a probe passes.
    ``tell_others``: where the check is shared, tells the other processes of an ejection (until
    when, in seconds since the epoch; 0 for "until a probe passes") or of its end (``False``).
    The ends of ejections are timed by :meth:`run`, a loop of the proxy's lifespan, so an
    upstream comes back when its window is over whether or not requests arrive.
    """

    def __init__(
        self,
        options: PassiveHealthCheck,
        balancer: Balancer,
        *,
        active_recovery: bool = False,
        tell_others: Callable[[str, float | bool], None] | None = None,
    ) -> None:
        self.options = options
        self.balancer = balancer
        self.active_recovery = active_recovery
        self.tell_others = tell_others if options.shared else None
        self._failures: dict[str, tuple[int, float]] = {}  # name -> (count, first failure at)
        self._ejected: dict[str, float] = {}  # name -> when it may return (balancer clock)
        self._ejected_here: set[str] = set()  # ejections this process made (and so ends)
        self.next_return = math.inf  # the earliest of those
        self._woken: anyio.Event | None = None  # set when an ejection may return sooner
        self._stopped = False
        balancer.register_outcome_listener(self._count)

    def _count(self, lease: Lease) -> None:
        if lease.outcome != "abandoned":  # the client left, or it was never sent
            self.record(lease.server, lease.outcome == "failed")

    def record(self, server: Server, failed: bool) -> None:
        """Count one request's outcome (``failed`` by :func:`~asgi_leasttime.lease.is_failure`)."""
        if not failed:
            if server.name in self._failures:
                del self._failures[server.name]
            return
        now = self.balancer.clock()
        count, since = self._failures.get(server.name, (0, now))
        if now - since > self.options.failure_window:
            count, since = 0, now
        count += 1
        self._failures[server.name] = (count, since)
        if count >= self.options.max_failed_attempts and "passive" not in server.down_flags:
            del self._failures[server.name]
            self._eject(server.name, f"{count} failed requests")
            self._ejected_here.add(server.name)
            if self.tell_others is not None:
                window = self.options.failure_window
                until = 0.0 if self.active_recovery else time.time() + window
                self.tell_others(server.name, until)

    def forget(self, name: str) -> None:
        """Drop everything counted for an upstream that left the proxy."""
        self._failures.pop(name, None)
        self._ejected.pop(name, None)
        self._ejected_here.discard(name)
        self.next_return = min(self._ejected.values(), default=math.inf)

    def _eject(self, name: str, reason: str, lasts: float | None = None) -> None:
        report_status(self.balancer, name, False, "passive", reason)
        if not self.active_recovery:
            at = self.balancer.clock() + (self.options.failure_window if lasts is None else lasts)
            self._ejected[name] = at
            if at < self.next_return:
                self.next_return = at
                if self._woken is not None:
                    self._woken.set()

    def _end(self, name: str, reason: str) -> None:
        report_status(self.balancer, name, True, "passive", reason)
        if name in self._ejected_here:
            self._ejected_here.discard(name)
            if self.tell_others is not None:
                self.tell_others(name, False)

    def probe_passed(self, name: str, reason: str) -> None:
        """With an active check, an ejection lasts until a probe passes (Traefik's rule): the
        passive check hands the end of its flag to the active one."""
        if self.active_recovery:
            self._end(name, f"{reason} passed")

    def restore_due(self) -> None:
        """Bring back the upstreams whose window has passed."""
        now = self.balancer.clock()
        for name, at in list(self._ejected.items()):
            if at <= now:
                del self._ejected[name]
                if name in self.balancer:
                    self._end(name, "failure window over")
        self.next_return = min(self._ejected.values(), default=math.inf)

    async def run(self) -> None:
        """End ejections as their windows pass, for the proxy's lifespan. The wait is on the
        balancer's clock, looked at again at least once a second (a test's fake clock moves
        without waking anyone); returns once :meth:`stop` is called."""
        while not self._stopped:
            self._woken = anyio.Event()
            wait = self.next_return - self.balancer.clock()
            if wait <= 0:
                self.restore_due()
                continue
            with anyio.move_on_after(min(wait, 1.0)):
                await self._woken.wait()

    def stop(self, reason: str) -> None:
        """Stop for good (a reloaded file replaced or removed the passive check): no more
        counting, every upstream this check holds down comes back (told to the other processes
        where shared), and :meth:`run` returns."""
        if self._stopped:
            return
        self._stopped = True
        self.balancer.unregister_outcome_listener(self._count)
        for server in self.balancer:
            if "passive" in server.down_flags:
                self._end(server.name, reason)
        self._failures.clear()
        self._ejected.clear()
        self.next_return = math.inf
        if self._woken is not None:
            self._woken.set()

    def heard(self, name: str, until: float | bool) -> None:
        """Another process's ejection (``until`` as :attr:`tell_others` says it), or its end."""
        if name not in self.balancer or not self.options.shared:
            return
        if until is False:
            self._ejected.pop(name, None)
            report_status(self.balancer, name, True, "passive", "ejection over in another process")
            return
        lasts = None  # "until a probe passes", or for a window if this process has no probes
        if until:
            lasts = float(until) - time.time()
            if lasts <= 0:
                return  # over already (or clocks apart by more than the window)
        self._eject(name, "ejected by another process", lasts)
