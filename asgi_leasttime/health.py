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

from asgi_leasttime.options import OptionError, check_port, check_positive

if TYPE_CHECKING:
    from asgi_leasttime.balancer import Balancer, Server, Source
    from asgi_leasttime.lease import Lease
    from asgi_leasttime.state import StateStore
    from asgi_leasttime.upstream import Upstream

__all__ = ["HealthCheck", "PassiveHealthCheck"]

logger = logging.getLogger("asgi_leasttime")


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
    check: HealthCheck, client: httpx.AsyncClient, url: httpx.URL, server_name: str | None = None
) -> bool:
    """One probe: healthy or not. Never raises for what the upstream does. ``server_name``:
    the TLS name to send and check instead of the URL's host."""
    headers = dict(check.headers)
    extensions = {"sni_hostname": server_name} if server_name else None
    if check.hostname is not None:
        headers["host"] = check.hostname
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
    unhealthy_interval = check.unhealthy_interval or check.interval
    longest = max(check.interval, unhealthy_interval)
    while True:
        healthy = True
        if await state.may_probe(upstream.name, longest):
            try:
                healthy = await probe(check, client(), url, server_name)
            except Exception:
                # A fault of ours or of the client library: this upstream counts as unhealthy
                # and the task goes on, since ending it would end every upstream's checks.
                logger.exception("health probe of %s failed unexpectedly", url)
                healthy = False
            state.report_probe(upstream.name, healthy, f"active check of {url}")
        await anyio.sleep(check.interval if healthy else unhealthy_interval)


class PassiveHealthCheck:
    """Passive health checks on the proxy's own traffic, with Traefik's semantics.

    A failure is what :func:`~asgi_leasttime.lease.is_failure` says: an upstream never reached or
    a final status of 500 or more; a success clears the count. ``max_failed_attempts`` failures
    within ``failure_window`` seconds mark the upstream down; it returns after ``failure_window``
    seconds, unless an active check is configured, which then decides when it returns.

    ``shared``: where processes share a state store, an upstream ejected by one process is
    ejected by all of them (for the rest of the window, or until a probe passes); each process
    counts failures on its own traffic either way.
    """

    def __init__(
        self, *, failure_window: float = 10.0, max_failed_attempts: int = 1, shared: bool = False
    ) -> None:
        check_positive("failure_window", failure_window)
        if max_failed_attempts < 1:
            raise OptionError("max_failed_attempts", "must be at least 1")
        self.failure_window = failure_window
        self.max_failed_attempts = max_failed_attempts
        self.shared = shared
        self.active_recovery = False  # set by the proxy when an active check exists
        # Set by the proxy when ``shared``: tells the others of an ejection (until when, in
        # seconds since the epoch; 0 for "until a probe passes") or of its end (False).
        self.tell_others: Callable[[str, float | bool], None] | None = None
        self._failures: dict[str, tuple[int, float]] = {}  # name -> (count, first failure at)
        self._ejected: dict[str, float] = {}  # name -> when it may return
        self._ejected_here: set[str] = set()  # ejections this process made (and so ends)
        self.next_return = math.inf  # the earliest of those, checked on the request path

    def watch(self, balancer: Balancer) -> None:
        """Count the outcome of every request ``balancer`` leases a server to."""

        def count(lease: Lease) -> None:
            if lease.outcome != "abandoned":  # the client left, or it was never sent
                self.record(balancer, lease.server, lease.outcome == "failed")

        balancer.register_outcome_listener(count)

    def record(self, balancer: Balancer, server: Server, failed: bool) -> None:
        """Count one request's outcome (``failed`` by :func:`~asgi_leasttime.lease.is_failure`)."""
        if not failed:
            if server.name in self._failures:
                del self._failures[server.name]
            return
        now = balancer.clock()
        count, since = self._failures.get(server.name, (0, now))
        if now - since > self.failure_window:
            count, since = 0, now
        count += 1
        self._failures[server.name] = (count, since)
        if count >= self.max_failed_attempts and "passive" not in server.down_flags:
            del self._failures[server.name]
            self._eject(balancer, server.name, f"{count} failed requests")
            self._ejected_here.add(server.name)
            if self.tell_others is not None:
                until = 0.0 if self.active_recovery else time.time() + self.failure_window
                self.tell_others(server.name, until)

    def _eject(
        self, balancer: Balancer, name: str, reason: str, lasts: float | None = None
    ) -> None:
        report_status(balancer, name, False, "passive", reason)
        if not self.active_recovery:
            at = balancer.clock() + (self.failure_window if lasts is None else lasts)
            self._ejected[name] = at
            self.next_return = min(self.next_return, at)

    def _end(self, balancer: Balancer, name: str, reason: str) -> None:
        report_status(balancer, name, True, "passive", reason)
        if name in self._ejected_here:
            self._ejected_here.discard(name)
            if self.tell_others is not None:
                self.tell_others(name, False)

    def probe_passed(self, balancer: Balancer, name: str, reason: str) -> None:
        """With an active check, an ejection lasts until a probe passes (Traefik's rule): the
        passive check hands the end of its flag to the active one."""
        if self.active_recovery:
            self._end(balancer, name, f"{reason} passed")

    def restore_due(self, balancer: Balancer) -> None:
        """Bring back the upstreams whose window has passed (called when ``next_return`` is due)."""
        now = balancer.clock()
        for name, at in list(self._ejected.items()):
            if at <= now:
                del self._ejected[name]
                if name in balancer:
                    self._end(balancer, name, "failure window over")
        self.next_return = min(self._ejected.values(), default=math.inf)

    def heard(self, balancer: Balancer, name: str, until: float | bool) -> None:
        """Another process's ejection (``until`` as :attr:`tell_others` says it), or its end."""
        if name not in balancer or not self.shared:
            return
        if until is False:
            self._ejected.pop(name, None)
            report_status(balancer, name, True, "passive", "ejection over in another process")
            return
        lasts = None  # "until a probe passes", or for a window if this process has no probes
        if until:
            lasts = float(until) - time.time()
            if lasts <= 0:
                return  # over already (or clocks apart by more than the window)
        self._eject(balancer, name, "ejected by another process", lasts)
