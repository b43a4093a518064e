"""LeastTimeProxy: the ASGI app that spreads requests over upstreams by least time."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import anyio
import anyio.abc
import httpx

from asgi_leasttime._forwarding import Exchange, forget_upstream, send_error, upstream_target
from asgi_leasttime._headers import BadRequest, RequestHeaders
from asgi_leasttime._httpx import httpx_opener
from asgi_leasttime._logging import RateLimitedLog
from asgi_leasttime._tasks import keep_running
from asgi_leasttime.balancer import Balancer, Lease, Mode, NoAvailableServer
from asgi_leasttime.client import DEFAULT_LIMITS, DEFAULT_TIMEOUT, create_client, forget_cookies
from asgi_leasttime.discovery import Discovery, DnsResolver, clash
from asgi_leasttime.errors import NotConnected, UpstreamError
from asgi_leasttime.health import (
    HealthCheck,
    PassiveCheck,
    PassiveHealthCheck,
    report_status,
    watch_upstream,
)
from asgi_leasttime.load_reports import LoadReport, LoadReports, reading_reports
from asgi_leasttime.options import OptionError, check_instance
from asgi_leasttime.records import RequestObserver, RequestRecord
from asgi_leasttime.retry import Retry, RetryBudget, RetryCounts, reason_of
from asgi_leasttime.state import Change, InProcessState, StateStore
from asgi_leasttime.status import UpstreamStatus
from asgi_leasttime.sticky import StickyCookie
from asgi_leasttime.tls import UpstreamTLS
from asgi_leasttime.tracing import Tracing
from asgi_leasttime.types import ASGIApp, Headers, Message, Opener, Receive, Scope, Send
from asgi_leasttime.upstream import Upstream, upstream_list
from asgi_leasttime.upstreams import Member, UpstreamSet

if TYPE_CHECKING:
    from asgi_leasttime._lean import LeanClient, LeanResponse


__all__ = ["LeastTimeProxy"]


def _another_server(held: Upstream, given: Upstream) -> bool:
    """Whether a reloaded upstream of the same name is another one: another URL, address,
    app, or trust in its load reports (each fixed when its opener was made)."""
    return (str(held.url), held.address, held.load_reports) != (
        str(given.url),
        given.address,
        given.load_reports,
    ) or held.app is not given.app


logger = logging.getLogger("asgi_leasttime.proxy")

# One line per proxy (or upstream) per 10 s, the rest counted: a dead upstream behind a busy
# proxy is refused, tried again and refused again many times a second.
_retries_refused = RateLimitedLog(logger, 10.0)
_refusals = RateLimitedLog(logger, 10.0)
_observer_faults = RateLimitedLog(logger, 10.0)
_bad_reports = RateLimitedLog(logger, 10.0)

TIMER_STEP = 0.25
"""Seconds between two looks of the lifespan's timer: upstreams that refused come back (their
wait over), the retry budget's window moves."""

DEFAULT_RETRY = Retry()


class LeastTimeProxy:
    """An ASGI app that forwards each request to the upstream with the lowest least-time score.

    Use it as the whole app, or mount it (``Mount("/api", app=proxy)``; the mount prefix is
    stripped). To send only some requests of an app upstream, add it to the app as
    :class:`~asgi_leasttime.middleware.LeastTimeMiddleware`.

    Arguments:
        app: refused: a proxy wraps no app. ``app.add_middleware(LeastTimeProxy, ...)`` would send
            every request upstream, the app's own routes included; the error names the
            middleware that selects which requests go.
        upstreams: URLs or :class:`Upstream` objects.
        client: an ``httpx.AsyncClient`` to send with. The proxy gives it a cookie jar that stores
            nothing and never closes it. Without one, the proxy uses its lean client for http
            upstreams and creates an httpx client (per-upstream pools, ``timeout`` and
            ``limits``) for https upstreams and health probes, and closes what it created.
        transport: the transport under the client the proxy creates (see
            :mod:`asgi_leasttime.client`).
        timeout: ``httpx.Timeout`` for the created client.
        limits: ``httpx.Limits`` for each upstream's pool in the created client.
        name: the proxy's name: in logs, and the default sticky cookie name.
        sticky: a :class:`StickyCookie` to keep clients on the upstream that served them.
        health_check: a :class:`HealthCheck` to probe every URL upstream actively.
        passive_health_check: a :class:`PassiveHealthCheck` to mark upstreams down from the
            proxy's own failed requests.
        mode: the balancing mode (``"leasttime"`` or ``"traefik"``).
        pass_host_header: send the client's ``Host`` upstream (Traefik's default), or the
            upstream's own.
        trusted_proxies: addresses or networks whose ``X-Forwarded-*`` headers are kept.
        balancer: an empty :class:`Balancer` to use instead of a new one (a clock of a
            test's, say); the proxy adds a server for each upstream and owns them.
        upstream_client: ``"lean"`` (the default): the proxy's own HTTP/1.1 client on
            httptools (:mod:`asgi_leasttime._lean`) for plain-http upstreams, about five times
            httpx's throughput here; or ``"httpx"``. A given ``client`` or ``transport``, and
            https upstreams, always use httpx.
        freeze_gc: on startup, move every object then alive out of the garbage collector's
            sight (``gc.freeze()``), so its full collections scan only
            what came after: p99 at 64 connections fell from 44 ms to 18 ms in
            ``benchmarks/proxy.py``. It acts on the whole process, so a library leaves it off
            by default; ``asgi-leasttime serve`` turns it on.
        state: where runtime changes to the upstreams (manual down, fenced, weight, added,
            removed) are kept and shared: :class:`~asgi_leasttime.state.InProcessState` (the
            default, this process only) or :class:`~asgi_leasttime.redis_state.RedisState`
            (every process on one Redis or Valkey server).
        tls: an :class:`~asgi_leasttime.tls.UpstreamTLS` for https upstreams (a CA bundle, a
            client certificate, a server name, or no verification); without one, certificates
            are verified against the system's CA store. The lean client speaks TLS itself, so
            https upstreams take the fast path too.
        retry: when a request that failed before its answer started is tried again on another
            upstream, how often, within which budget (:class:`~asgi_leasttime.retry.Retry`; on
            by default: 3 attempts, retries at most 20 % of the last 10 s's requests plus 3 a
            second). ``None`` or ``Retry(attempts=1)``: never. An upstream that refuses a
            connection is taken out of the picks at once either way.
        pass_server_header: pass the upstream's ``Date`` and ``Server`` to the client (NGINX's
            ``proxy_pass_header``), adding a ``Date`` and a ``Server`` of the proxy's where the
            upstream sent none; then the server in front must send none of its own (uvicorn's
            ``--no-server-header --no-date-header``). Off (the default), the upstream's are
            dropped and the server in front sends its own, as NGINX does: one of each either
            way (see :mod:`asgi_leasttime._headers`).
        dns: how the upstreams given with ``resolve=True`` are resolved
            (:class:`~asgi_leasttime.discovery.DnsResolver`; by default the system's resolver,
            every 5 s). Their addresses are looked up when the lifespan starts.
        tracing: an OpenTelemetry client span for every attempt at an upstream
            (:class:`~asgi_leasttime.tracing.Tracing`, the ``otel`` extra); ``None``: none.
        load_reports: read the upstreams' ORCA load reports
            (:class:`~asgi_leasttime.load_reports.LoadReports`): every upstream is trusted to
            report unless given ``load_reports=False``; ``None``: only those given
            ``load_reports=True`` are (with the default metric names).
    """

    def __init__(
        self,
        app: Any = None,
        *,
        upstreams: Sequence[str | Upstream],
        client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        limits: httpx.Limits = DEFAULT_LIMITS,
        name: str = "leasttime",
        sticky: StickyCookie | None = None,
        health_check: HealthCheck | None = None,
        passive_health_check: PassiveHealthCheck | None = None,
        mode: Mode = "leasttime",
        pass_host_header: bool = True,
        trusted_proxies: Iterable[str] = (),
        balancer: Balancer | None = None,
        upstream_client: Literal["httpx", "lean"] = "lean",
        freeze_gc: bool = False,
        state: StateStore | None = None,
        tls: UpstreamTLS | None = None,
        retry: Retry | None = DEFAULT_RETRY,
        pass_server_header: bool = False,
        dns: DnsResolver | None = None,
        tracing: Tracing | None = None,
        load_reports: LoadReports | None = None,
    ) -> None:
        if app is not None:
            raise TypeError(
                "LeastTimeProxy takes no app to wrap: it would send every request upstream. To "
                "send some of an app's requests upstream, add LeastTimeMiddleware(app, "
                "upstreams=..., paths=[...]) (or hosts=, when=); to proxy everything, serve the "
                "proxy as the app."
            )
        upstreams = upstream_list(upstreams)
        for option, value, kind in (
            ("sticky", sticky, StickyCookie),
            ("health_check", health_check, HealthCheck),
            ("passive_health_check", passive_health_check, PassiveHealthCheck),
            ("balancer", balancer, Balancer),
            ("state", state, StateStore),
            ("tls", tls, UpstreamTLS),
            ("retry", retry, Retry),
            ("dns", dns, DnsResolver),
            ("tracing", tracing, Tracing),
            ("load_reports", load_reports, LoadReports),
            ("client", client, httpx.AsyncClient),
            ("transport", transport, httpx.AsyncBaseTransport),
        ):
            check_instance(option, value, kind)
        self.freeze_gc = freeze_gc
        self.name = name
        # Option objects are read, never changed: the proxy builds its runtime from them.
        self.sticky = sticky.named_for(name) if sticky is not None else None
        self.health_check = health_check
        self.passive_health_check = passive_health_check
        if balancer is not None and len(balancer):
            raise OptionError(
                "balancer",
                "must be empty: the proxy adds a server for each of its upstreams and owns them",
            )
        self.balancer = (
            balancer if balancer is not None else Balancer(mode=mode, wants_health_check=True)
        )
        self._pass_server_header = pass_server_header  # read on every request
        self.request_headers = RequestHeaders(
            pass_host_header=pass_host_header,
            trusted_proxies=trusted_proxies,
            pass_server_header=pass_server_header,
        )
        self._observers: tuple[RequestObserver, ...] = ()  # see observe_requests()
        self._recording: dict[Exchange, RequestRecord] = {}  # observed requests in flight
        self._users = 0  # lifespans entered and not left
        self._all_left: anyio.Event | None = None
        self._stopping: anyio.Event | None = None  # set once the last user's teardown is over
        self._task_group: anyio.abc.TaskGroup | None = None
        self._members = UpstreamSet(name, self.balancer, self._opener)
        self._by_name = self._members.by_name
        self._members.added.append(self._follow_added)
        self._members.removed.append(self._forget)
        self._members.fenced.append(self._drain)
        self.retry = retry if retry is not None and retry.enabled else None
        self.retry_counts = RetryCounts()
        """Attempts tried again, or not and why, by reason (see :mod:`asgi_leasttime.retry`)."""
        self._budget = RetryBudget.of(self.retry) if self.retry is not None else None
        self._on_failed_attempt = self._again  # bound once, not on every request
        self.state: StateStore = (state or InProcessState()).attached(self._members)
        self.passive: PassiveCheck | None = None
        """The passive check at work, built from ``passive_health_check``."""
        if passive_health_check is not None:
            self.passive = passive_health_check.start(
                self.balancer,
                active_recovery=health_check is not None,
                tell_others=self._tell_ejection,
            )
            self._members.passive = self.passive
        self._timeout = timeout
        self._limits = limits
        self._transport = transport
        self._client = client
        self._owns_client = client is None
        self._lean: LeanClient | None = None
        self.tls = tls if tls is not None else UpstreamTLS()
        if upstream_client == "lean" and client is None and transport is None:
            from asgi_leasttime._lean import LeanClient

            self._lean = LeanClient(timeout=timeout, limits=limits, tls=self.tls)
        if client is not None:
            forget_cookies(client)
        self.tracing = tracing
        # Neither traced nor observed: requests take the plain path (one check a request).
        self._plain = tracing is None
        self.load_reports = load_reports
        self.dns = dns if dns is not None else DnsResolver()
        self._discovery = Discovery(self._members, self.dns)
        for upstream in upstreams:
            self._add_configured(Upstream(upstream) if isinstance(upstream, str) else upstream)

    # -- upstreams and status ---------------------------------------------------------------------

    @property
    def upstreams(self) -> dict[str, Upstream]:
        """Every upstream by name, in the order they were added (a copy: change them through
        the methods below)."""
        return self._members.upstreams()

    @property
    def dns_names(self) -> dict[str, Upstream]:
        """The upstreams given with ``resolve=True``, by name: each stands for the upstreams
        its host resolves to (a copy)."""
        return {name: group.template for name, group in self._discovery.groups.items()}

    @property
    def members(self) -> UpstreamSet:
        """The upstreams and everything kept for each (see :class:`UpstreamSet`)."""
        return self._members

    def add_upstream(self, upstream: str | Upstream) -> Upstream:
        """Add an upstream while the proxy runs; it starts up and cold. An upstream with a URL
        is added in every process sharing this proxy's state store."""
        if isinstance(upstream, str):
            upstream = Upstream(upstream)
        if upstream.resolve:
            raise OptionError("resolve", "a name to resolve is configured, not added: reload")
        if upstream.name in self._discovery.groups:
            raise ValueError(f"an upstream named {upstream.name!r} is already in this proxy")
        self._members.add(upstream, origin="api")
        if upstream.url is not None:
            self.state.share(
                Change(
                    upstream.name,
                    url=str(upstream.url),
                    weight=upstream.weight,
                    fenced=upstream.fenced,
                )
            )
        return upstream

    def _add_configured(self, upstream: Upstream) -> None:
        """An upstream of the options or the file: a server, or a name to resolve."""
        if not upstream.resolve:
            if upstream.name in self._discovery.groups:
                raise ValueError(f"an upstream named {upstream.name!r} is already in this proxy")
            self._members.add(upstream)
            return
        if self._lean is None:
            raise OptionError(
                "resolve",
                "needs the proxy's own upstream client (upstream_client='lean', no client or "
                "transport given)",
            )
        self._discovery.add(upstream)

    def reconcile_upstreams(
        self, upstreams: Sequence[Upstream], previous: Sequence[Upstream] | None = None
    ) -> None:
        """Make the configured upstreams these (a reloaded file): the new ones join cold, the
        ones gone leave (their requests in flight finish), weights and fences follow, and one
        whose URL, address or trust in its load reports changed starts afresh. Upstreams added
        through the API stay. ``previous``: the upstreams the file gave before; a weight or a
        fence it does not change is left as it is now (the admin API may have set it).
        Nothing is shared through the state store: every process applies its own file. Raises
        ``ValueError`` before anything moves for a list that cannot be applied."""
        wanted = {upstream.name: upstream for upstream in upstreams}
        before = {upstream.name: upstream for upstream in previous or ()}
        discovery, members = self._discovery, self._members
        self._check_reconcilable(wanted)
        for name in tuple(discovery.groups):
            if name not in wanted or not wanted[name].resolve:
                discovery.remove(name)
        for member in members:
            if member.origin == "config" and (
                member.name not in wanted or wanted[member.name].resolve
            ):
                members.remove(member.name)
        for name, upstream in wanted.items():
            held = members.get(name)
            if upstream.resolve:
                if name in discovery.groups:
                    discovery.update(upstream)
                else:
                    self._add_configured(upstream)
            elif held is None:
                self._add_configured(upstream)
            elif _another_server(held.upstream, upstream):
                members.remove(name)
                self._add_configured(upstream)
            else:
                held.origin = "config"  # the file names it now
                said = before.get(name, held.upstream)  # the file's last word, else the live one
                if (said.weight, said.fenced) != (upstream.weight, upstream.fenced):
                    members.apply(Change(name, weight=upstream.weight, fenced=upstream.fenced))

    def _check_reconcilable(self, wanted: dict[str, Upstream]) -> None:
        members = self._members
        for name, upstream in wanted.items():
            held = members.get(name)
            if (
                held is not None
                and held.origin not in ("config",)
                and (upstream.resolve or held.origin == "dns")
            ):
                raise ValueError(f"{name!r} is the name of an upstream added while running")
            if upstream.resolve and self._lean is None:
                raise OptionError("resolve", "needs the proxy's own upstream client")
        clashing = clash(upstream for upstream in wanted.values() if upstream.resolve)
        if clashing is not None:
            raise ValueError(clashing)

    def remove_upstream(self, name: str) -> None:
        """Remove an upstream and everything the proxy keeps for it: its health checks stop
        (a nested proxy's too), its sticky cookies get a fresh pick, its idle connections
        close; its requests in flight finish. Shared through the state store."""
        self.change(Change(name, removed=True))

    def set_status(self, name: str, up: bool) -> None:
        """Mark an upstream down by hand, or clear that mark (the in-process health API). A
        health check never clears a manual down, and a manual up does not clear a failing check's
        down: the upstream takes requests once no source says it is down. Shared through the
        state store."""
        self.change(Change(name, down=not up))

    def set_fenced(self, name: str, fenced: bool) -> None:
        """Drain an upstream (no new picks, sticky clients still served) or take it back.
        Shared through the state store."""
        self.change(Change(name, fenced=fenced))

    def set_weight(self, name: str, weight: float) -> None:
        """Change an upstream's weight; its statistics are kept. A weight of 0 leaves it out of
        the picks (as in Traefik) until it gets a weight again. Shared through the state
        store."""
        self.change(Change(name, weight=weight))

    def change(self, change: Change) -> None:
        """Apply a :class:`~asgi_leasttime.state.Change` here, whole or not at all, and share
        it through the state store: what every ``set_*`` method does."""
        self._members.apply(change)
        self.state.share(change)

    def _tell_ejection(self, name: str, until: float | bool) -> None:
        if until is False:
            self.state.share(Change(name, passive_down=False))
        else:
            self.state.share(Change(name, passive_down=True, passive_until=until))

    def _follow_added(self, member: Member) -> None:
        if self._task_group is not None:
            self._watch(member, self._task_group)
        child = member.upstream.app
        if isinstance(child, LeastTimeProxy):
            # A balancer of balancers: the child's overall status is this upstream's status.
            name, balancer = member.name, self.balancer

            def follow_child(up: bool) -> None:
                if name in balancer:  # left out (weight 0): nothing to follow
                    balancer.set_status(name, up, "parent")

            child.balancer.register_status_updater(follow_child)
            member.child_link = follow_child
            if not child.balancer.up:
                follow_child(False)

    def _forget(self, member: Member) -> None:
        """What the proxy hangs on an upstream that left: its checks, its link to a nested
        proxy, its pooled idle connections (unless another upstream shares its origin)."""
        if member.watcher is not None:
            member.watcher.cancel()
        forget_upstream(member.name)
        child = member.upstream.app
        if isinstance(child, LeastTimeProxy):
            child.balancer.unregister_status_updater(member.child_link)
            child._stop_watching()
        upstream = member.upstream
        if upstream.url is None:
            return
        origin = (upstream.url.scheme, upstream.host, upstream.port, upstream.address)
        for other in self._members:
            held = other.upstream
            if held.url is not None and (held.url.scheme, held.host, held.port, held.address) == (
                origin
            ):
                return
        if self._lean is not None:
            https = upstream.url.scheme == "https"
            self._lean.retire(upstream.host, upstream.port, https, upstream.address)
        if self._client is not None:
            transport = getattr(self._client, "_transport", None)
            retire = getattr(transport, "retire", None)
            if retire is not None:
                retire(upstream.url)

    def _drain(self, member: Member) -> None:
        """A fenced upstream gets no new picks: its idle pooled connections close now."""
        upstream = member.upstream
        if self._lean is not None and upstream.url is not None:
            https = upstream.url.scheme == "https"
            self._lean.close_idle(upstream.host, upstream.port, https, upstream.address)

    def _stop_watching(self) -> None:
        """Stop every health check of this proxy and of the proxies nested in it."""
        for member in self._members:
            if member.watcher is not None:
                member.watcher.cancel()
                member.watcher = None
            if isinstance(member.upstream.app, LeastTimeProxy):
                member.upstream.app._stop_watching()

    def upstream_status(self) -> list[UpstreamStatus]:
        """Every upstream in the picks with its status and statistics, in the order added."""
        return self._members.statuses()

    def retry_budget_json(self) -> dict[str, float] | None:
        """The retry budget as ``/status`` shows it: the retries it allows now, those made and
        those it refused since start; ``None`` with retries off."""
        budget = self._budget
        if budget is None:
            return None
        return {"allowed": budget.allowed(), "retries": budget.retries, "refused": budget.spent}

    def observe_requests(self, observer: RequestObserver) -> None:
        """Tell ``observer`` of every request this proxy answers, with a
        :class:`~asgi_leasttime.records.RequestRecord` once it is over (the admin app's
        metrics, an :class:`~asgi_leasttime.access_log.AccessLog`). Without observers no
        record is made."""
        if observer not in self._observers:
            self._observers = (*self._observers, observer)
        self._plain = self.tracing is None and not self._observers

    def stop_observing(self, observer: RequestObserver) -> None:
        """Stop telling ``observer`` of requests."""
        self._observers = tuple(o for o in self._observers if o is not observer)
        self._plain = self.tracing is None and not self._observers

    # -- the client and the lifespan --------------------------------------------------------------

    @property
    def client(self) -> httpx.AsyncClient:
        """The client the proxy sends with; created on first use if none was given."""
        if self._client is None:
            self._client = create_client(
                timeout=self._timeout,
                limits=self._limits,
                transport=self._transport,
                tls=self.tls,
            )
        return self._client

    async def aclose(self) -> None:
        """Close the client if the proxy created it."""
        if self._lean is not None:
            await self._lean.aclose()
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    @property
    def running(self) -> bool:
        """Whether the proxy is in its lifespan (started and not yet stopped)."""
        return self._users > 0

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """For ``Starlette(lifespan=proxy.lifespan)``: open the client and start the background
        loops (health checks, the passive check's timer, the state store, and those of
        in-process child proxies) on startup; stop and close on shutdown. Entered again while
        it runs (a middleware's lifespan and the app's both naming it), it counts its users and
        stops when the last one leaves."""
        while self._stopping is not None:  # the last user is leaving: start afresh after
            await self._stopping.wait()
        if self._users:
            self._users += 1
            try:
                yield
            finally:
                self._users -= 1
                if not self._users and self._all_left is not None:
                    self._all_left.set()
            return
        self._users = 1
        self._all_left = anyio.Event()
        try:
            async with self._start():
                try:
                    yield
                finally:
                    self._users -= 1
                    if self._users:  # another user, in another task, is still inside
                        await self._all_left.wait()
                    self._stopping = anyio.Event()  # from here on, newcomers wait
        except BaseExceptionGroup as group:
            # The task group wraps what it meets; one error is shown as itself.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            self._users = 0
            self._all_left = None
            stopping, self._stopping = self._stopping, None
            if stopping is not None:
                stopping.set()

    @contextlib.asynccontextmanager
    async def _start(self) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            _ = self.client
            stack.push_async_callback(self.aclose)
            for member in self._members:
                if isinstance(member.upstream.app, LeastTimeProxy):
                    await stack.enter_async_context(member.upstream.app.lifespan())
            # Every loop of this proxy lives in one task group, cancelled on the way out.
            task_group = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(task_group.cancel_scope.cancel)
            await stack.enter_async_context(self.state.running(task_group))
            if self.passive is not None:
                task_group.start_soon(keep_running, "the passive check", self.passive.run, logger)
            task_group.start_soon(keep_running, "the proxy's timer", self._timer, logger)
            self._task_group = task_group
            stack.callback(self._stopped)
            for member in self._members:
                self._watch(member, task_group)
            discovery = self._discovery
            if discovery:  # the names' first addresses before the first request
                await discovery.resolve_all()
            # Always: a reload may bring the first name to resolve.
            task_group.start_soon(keep_running, "DNS discovery", discovery.run, logger)
            if self.freeze_gc:
                gc.collect()  # garbage left from start-up is freed, not frozen
                gc.freeze()
            yield

    def _timers_due(self) -> None:
        """What the lifespan's timer does, for a proxy served without a lifespan
        (``--lifespan off``): refused upstreams and ended ejections come back on requests."""
        balancer, passive = self.balancer, self.passive
        now = balancer.clock()
        if balancer.next_return <= now:
            self._return_refused()
        if passive is not None and passive.next_return <= now:
            passive.restore_due()

    async def _timer(self) -> None:
        balancer = self.balancer
        while True:
            if balancer.next_return <= balancer.clock():
                self._return_refused()
            budget = self._budget  # a reloaded file may have made a new one
            if budget is not None:
                budget.tick()
            await anyio.sleep(TIMER_STEP)

    def _stopped(self) -> None:
        self._task_group = None
        for member in self._members:
            member.watcher = None

    def _watch(self, member: Member, task_group: anyio.abc.TaskGroup) -> None:
        check, upstream = self.health_check, member.upstream
        if check is None or upstream.url is None:
            return
        # A scope of the watcher's own, so removing the upstream stops just its checks.
        watcher = member.watcher = anyio.CancelScope()

        async def watch() -> None:
            await watch_upstream(
                check, self.state, upstream, lambda: self.client, self.tls.server_name
            )

        async def watched() -> None:
            with watcher:
                await keep_running(f"the health check of {upstream.name!r}", watch, logger)

        task_group.start_soon(watched)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        # As Starlette's router: a failure is sent as startup.failed or shutdown.failed.
        started = False
        await receive()  # lifespan.startup
        try:
            async with self.lifespan():
                await send({"type": "lifespan.startup.complete"})
                started = True
                await receive()  # lifespan.shutdown
        except Exception:
            failed = "lifespan.shutdown.failed" if started else "lifespan.startup.failed"
            await send({"type": failed, "message": traceback.format_exc()})
            raise
        await send({"type": "lifespan.shutdown.complete"})

    # -- requests ---------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send, None)
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send, None)  # observed there

    async def forward(
        self, scope: Scope, receive: Receive, send: Send, *, fallback: ASGIApp | None = None
    ) -> None:
        """Forward one HTTP or WebSocket request upstream; when no upstream is available,
        ``fallback`` answers it if given (else ``503``, or a WebSocket close with 1013)."""
        if scope["type"] == "http":
            await self._http(scope, receive, send, fallback)
        else:
            await self._websocket(scope, receive, send, fallback)

    def _choose(self, scope: Scope) -> tuple[Lease, Headers | None]:
        """A lease on the server for this request, and a Set-Cookie to send if any.

        A valid sticky cookie naming an up server (fenced or not) wins; otherwise a pick.
        Raises :class:`NoAvailableServer`.
        """
        balancer, sticky = self.balancer, self.sticky
        if sticky is None:
            return balancer.acquire(), None
        member = sticky.known_in(scope["headers"], self._members.by_sticky_id)
        server = member.server if member is not None else None
        if server is not None and server.up:
            lease = balancer.lease(server)  # sticky traffic weighs on the scores too
            return lease, [sticky.set_cookie_header(server.name)] if sticky.sliding else None
        lease = balancer.acquire()
        return lease, [sticky.set_cookie_header(lease.server.name)]

    def _http(
        self, scope: Scope, receive: Receive, send: Send, fallback: ASGIApp | None
    ) -> Coroutine[Any, Any, None]:
        # A plain function handing over a coroutine: one frame less on every request.
        if self._plain:
            return self._forward(scope, receive, send, fallback)
        return self._observed(self._forward, "http", scope, receive, send, fallback)

    async def _observed(
        self,
        relay: Callable[..., Awaitable[None]],
        protocol: str,
        scope: Scope,
        receive: Receive,
        send: Send,
        fallback: ASGIApp | None,
    ) -> None:
        """``relay`` (the HTTP or the WebSocket path) with its attempts traced and a record
        made for the observers, as they are asked for."""
        if self.tracing is not None:
            self.tracing.new_request()
        if not self._observers:
            await relay(scope, receive, send, fallback)
            return
        record = RequestRecord(scope, time.time(), protocol)
        started = time.perf_counter()

        async def observed_send(message: Message) -> None:
            record.saw(message)
            await send(message)

        try:
            await relay(scope, receive, observed_send, fallback, record)
        finally:
            record.duration = time.perf_counter() - started
            self._tell_observers(record)

    def _tell_observers(self, record: RequestRecord) -> None:
        scope = record.scope
        if record.protocol == "websocket" and record.upstream is not None:
            # The upstream's 101 once accepted; a refused or failed handshake reaches the client
            # as a close, which says nothing of what the upstream answered.
            record.upstream_status = 101 if record.status == 101 else None
        record.client = self.request_headers.client_address(scope)
        sticky = self.sticky
        if sticky is not None and record.upstream is not None:
            held = sticky.known_in(scope["headers"], self._members.by_sticky_id)
            if held is not None and held.name == record.upstream:
                record.sticky = "kept"
            else:
                record.sticky = "moved" if sticky.sent_in(scope["headers"]) else "new"
        for observer in self._observers:
            try:
                observer.finished(record)
            except Exception:  # an observer's fault is not the client's
                _observer_faults.error(
                    type(observer).__name__, "observer %r failed", observer, exc_info=True
                )

    def _record(self, record: RequestRecord, lease: Lease, exchange: Exchange | None) -> None:
        """What the request came to upstream, into its record."""
        final = exchange.lease if exchange is not None else lease
        name = record.upstream = final.server.name
        member = self._by_name.get(name)
        if member is not None and member.upstream.url is not None:
            upstream = member.upstream
            host = upstream.address or upstream.host
            record.address = (
                f"[{host}]:{upstream.port}" if ":" in host else f"{host}:{upstream.port}"
            )
        if exchange is None:
            if member is not None and member.upstream.app is not None:
                # In-process: one attempt, whose status the client got.
                record.attempts = 1
                record.upstream_status = record.status if record.status != 499 else None
            return  # else the proxy answered itself (a bad request, no upstream): none tried
        self._recording.pop(exchange, None)
        record.upstream_status = exchange.status
        record.ttfb = exchange.ttfb
        record.attempts = 1 + exchange.retries

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        fallback: ASGIApp | None,
        record: RequestRecord | None = None,
    ) -> None:
        budget = self._budget
        if budget is not None:
            budget.requests += 1  # count_request() spelt out: one call less on every request
        if self._task_group is None:
            self._timers_due()  # no lifespan runs the timer: the requests do
        try:
            lease, set_cookie = self._choose(scope)
        except NoAvailableServer:
            chosen = self._choose_after_returns(scope)
            if chosen is None:
                if fallback is not None:
                    await fallback(scope, receive, send)
                else:
                    await send_error(send, 503, "no available server")
                return
            lease, set_cookie = chosen
        exchange = None
        try:
            member = self._by_name.get(lease.server.name)
            if member is None:  # a server put in the balancer by hand, not an upstream
                await send_error(send, 503, "no available server")
                return
            upstream = member.upstream
            if upstream.app is not None:
                app = upstream.app
                await self._forward_in_process(app, lease, scope, receive, send, set_cookie)
                return
            try:
                target = upstream_target(scope)
                headers = self.request_headers(scope)
            except BadRequest as exc:
                await send_error(send, 400, f"bad request: {exc}")
                return
            exchange = Exchange(
                member.opener,
                upstream.name,
                scope,
                receive,
                send,
                headers,
                set_cookie,
                lease.answered,
                self._pass_server_header,
                lease,
                self._on_failed_attempt,
                self.retry,
            )  # positional: keywords cost on every request
            if record is not None:
                self._recording[exchange] = record
            await exchange.run(target)
            if exchange.failed:
                exchange.lease.failed()
        finally:  # not a with block: one method call less on every request
            if record is not None:
                self._record(record, lease, exchange)
            lease.release()
            if exchange is not None and exchange.lease is not lease:
                exchange.lease.release()

    def _choose_after_returns(self, scope: Scope) -> tuple[Lease, Headers | None] | None:
        """No upstream available: if one is out only because it refused a connection, the one
        whose wait ends first takes this request (a restarted upstream may be back before its
        wait is over, and a refusal is retried elsewhere anyway); else none."""
        if not self._return_refused(soonest=True):
            return None
        try:
            return self._choose(scope)
        except NoAvailableServer:
            return None

    def _return_refused(self, soonest: bool = False) -> bool:
        returned = self.balancer.return_refused(soonest)
        for name in returned:
            _refusals.log(
                logging.INFO,
                (self.name, name, "back"),
                "upstream %r refused connections; trying it again",
                name,
            )
        return bool(returned)

    def _again(self, exchange: Exchange, error: UpstreamError | None) -> bool:
        """An attempt failed in a way the retry rules allow to try again (``error``, or ``None``
        for a status the policy lists): count it against its upstream, take a refusing upstream
        out of the picks, and aim the exchange at another upstream if the attempts, the budget
        and the upstreams left allow."""
        lease: Lease = exchange.lease
        server = lease.server
        reason = reason_of(error)
        if reason != "reset":
            # The passive check sees it (a status was counted when it came). A pooled
            # connection the upstream had closed says nothing of its health: not counted.
            lease.failed()
        if isinstance(error, NotConnected) and not error.pool_full:
            if "refused" not in server.down_flags:
                _refusals.warning(
                    (self.name, server.name),
                    "upstream %r refused a connection (%s): out of the picks until it answers",
                    server.name,
                    error,
                )
            self.balancer.refused(server)
        retry, budget = self.retry, self._budget
        if retry is None or budget is None or exchange.retries + 1 >= retry.attempts:
            self._attempt_failed(exchange, server.name, reason, "attempts")
            return False
        if budget.allowed() < 1:  # before bringing back a refused upstream for nothing
            budget.spent += 1
            self._attempt_failed(exchange, server.name, reason, "budget")
            _retries_refused.warning(
                self.name, "retry budget of %r spent: %s failed for good", self.name, reason
            )
            return False
        # Not the upstreams tried already; the same one again only for a pooled connection it
        # had closed (its pool then has no idle ones left: the next attempt connects afresh).
        tried: tuple[str, ...] = getattr(exchange, "tried", ())
        exclude = {*tried, *self._members.in_process}
        if reason != "reset":
            exclude.add(server.name)
        try:
            other = self.balancer.next_server_except(exclude)
        except NoAvailableServer:
            other = None
        if other is None and self._return_refused(soonest=True):
            with contextlib.suppress(NoAvailableServer):
                other = self.balancer.next_server_except(exclude)
        member = self._by_name.get(other.name) if other is not None else None
        if other is None or member is None:  # (a server put in the balancer by hand)
            self._attempt_failed(exchange, server.name, reason, "no_upstream")
            return False
        budget.try_spend()
        lease.release()
        exchange.lease = new = self.balancer.lease(other)
        exchange.tried = (*tried, server.name)
        sticky = self.sticky
        set_cookie = [sticky.set_cookie_header(other.name)] if sticky is not None else None
        exchange.aim(member.opener, other.name, new.answered, set_cookie)
        self._attempt_failed(exchange, server.name, reason, "retried")
        return True

    def _reporting(self, opener: Opener, upstream: Upstream) -> Opener:
        """``opener`` reading the upstream's load reports, if it is trusted to report."""
        options = self.load_reports
        trusted = upstream.load_reports if upstream.load_reports is not None else options
        if not trusted:
            return opener
        balancer, name = self.balancer, upstream.name

        def heard(report: LoadReport) -> None:
            if report.inflight is not None and name in balancer:
                balancer.heard_load(name, report.inflight)

        def refused(why: str) -> None:
            _bad_reports.warning(name, "load report of upstream %r ignored: %s", name, why)

        return reading_reports(opener, options or LoadReports(), heard, refused)

    def _attempt_failed(self, exchange: Exchange, name: str, reason: str, outcome: str) -> None:
        self.retry_counts.count(reason, outcome)
        record = self._recording.get(exchange)
        if record is not None:  # the request is observed
            record.failed_attempts.append((name, reason, outcome))

    def _opener(self, upstream: Upstream) -> Opener:
        """How requests reach an upstream with a URL: made once, when the upstream is added."""
        assert upstream.url is not None
        lean = self._lean
        if lean is not None:
            host, port, base_path = upstream.host, upstream.port, upstream.base_path
            https, address = upstream.url.scheme == "https", upstream.address
            send_to, pool_of = lean.send_to, lean.pool
            pool = pool_of(host, port, https, address)

            def open_upstream(
                method: str, target: bytes, headers: Headers, body: AsyncIterator[bytes] | None
            ) -> Coroutine[Any, Any, LeanResponse]:
                nonlocal pool
                if pool.retired and not pool.left:  # the client closed (a lifespan ended)
                    pool = pool_of(host, port, https, address)
                # (A pool whose upstream left is kept: a late attempt closes its connection.)
                return send_to(pool, method, base_path + target, headers, body)

            return self._layered(open_upstream, upstream)
        if upstream.address is not None or upstream.resolve:
            raise OptionError(
                "resolve" if upstream.resolve else "address",
                "needs the proxy's own upstream client (upstream_client='lean', no client or "
                "transport given)",
            )
        return self._layered(httpx_opener(lambda: self.client, upstream.target_url), upstream)

    def _layered(self, opener: Opener, upstream: Upstream) -> Opener:
        """``opener`` with what the options add: load reports read, attempts traced."""
        opener = self._reporting(opener, upstream)
        tracing = self.tracing
        if tracing is None:
            return opener
        balancer, name = self.balancer, upstream.name

        def score() -> float:
            return balancer[name].score if name in balancer else math.inf

        return tracing.wrap(opener, upstream, score)

    async def _forward_in_process(
        self,
        app: ASGIApp,
        lease: Lease,
        scope: Scope,
        receive: Receive,
        send: Send,
        set_cookie: Headers | None,
    ) -> None:
        sent_at = time.perf_counter()
        answered = False

        async def timed_send(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start" and not answered:
                answered = True
                lease.answered(message["status"], time.perf_counter() - sent_at)
                if set_cookie:
                    message = {**message, "headers": [*message.get("headers", ()), *set_cookie]}
            await send(message)

        try:
            await app(dict(scope), receive, timed_send)
        except Exception:
            # The in-process upstream's fault, not the client's: a 502 like any upstream's.
            logger.exception("in-process upstream %s raised", lease.server.name)
        if not answered:
            lease.failed()
            await send_error(send, 502, "bad gateway")

    async def _websocket(
        self, scope: Scope, receive: Receive, send: Send, fallback: ASGIApp | None
    ) -> None:
        if not self._observers:
            await self._relay_websocket(scope, receive, send, fallback)
            return
        await self._observed(self._relay_websocket, "websocket", scope, receive, send, fallback)

    async def _relay_websocket(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        fallback: ASGIApp | None,
        record: RequestRecord | None = None,
    ) -> None:
        from asgi_leasttime._websocket import forward_websocket

        try:
            lease, _ = self._choose(scope)
        except NoAvailableServer:
            if fallback is not None:
                await fallback(scope, receive, send)
                return
            await send({"type": "websocket.close", "code": 1013, "reason": "no available server"})
            return
        with lease:
            member = self._by_name.get(lease.server.name)
            if record is not None:
                self._record(record, lease, None)
            if member is None:  # a server put in the balancer by hand, not an upstream
                await send({"type": "websocket.close", "code": 1013})
                return
            upstream = member.upstream
            if upstream.app is not None:
                await self._websocket_in_process(upstream.app, lease, scope, receive, send)
                return
            try:
                url = upstream.target_url(upstream_target(scope))
                headers = self.request_headers(scope)
            except (BadRequest, httpx.InvalidURL, UnicodeError) as exc:
                logger.info("WebSocket request refused: %s", exc)
                await send({"type": "websocket.close", "code": 1008})  # a 403 to the handshake
                return
            await forward_websocket(
                url,
                scope,
                receive,
                send,
                headers,
                lease,
                tls=self.tls,
                pass_host_header=self.request_headers.pass_host_header,
                address=upstream.address,
            )

    async def _websocket_in_process(
        self, app: ASGIApp, lease: Lease, scope: Scope, receive: Receive, send: Send
    ) -> None:
        sent_at = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if lease.outcome is None:
                if message["type"] == "websocket.accept":
                    lease.answered(101, time.perf_counter() - sent_at)
                elif message["type"] == "websocket.close":
                    lease.answered(403, time.perf_counter() - sent_at)  # the handshake refused
            await send(message)

        await app(dict(scope), receive, timed_send)

    # -- reload -----------------------------------------------------------------------------------

    def reconfigure(
        self,
        *,
        sticky: StickyCookie | None,
        health_check: HealthCheck | None,
        passive_health_check: PassiveHealthCheck | None,
        retry: Retry | None,
        timeout: httpx.Timeout,
    ) -> None:
        """Apply a reloaded file's options to the requests that start from now on; the requests
        in flight finish as they began. Each argument is the constructor's (``None`` turns the
        feature off) and each is given, changed or not:

        - ``sticky``: new cookies are signed with the newest key; a cookie is accepted if any
          key given here signed it (keep the old key listed to keep its clients).
        - ``health_check``: when it differs, every upstream's probes start again with it; turned
          off, the upstreams it held down come back.
        - ``passive_health_check``: when it differs (or the active check comes or goes, which
          decides how an ejection ends), the counting starts afresh and the upstreams the old
          one held down come back.
        - ``retry``: when it differs, with a fresh budget (the counts by reason are kept).
        - ``timeout``: the proxy's own client's, and the created httpx client's.
        """
        for option, value, kind in (
            ("sticky", sticky, StickyCookie),
            ("health_check", health_check, HealthCheck),
            ("passive_health_check", passive_health_check, PassiveHealthCheck),
            ("retry", retry, Retry),
            ("timeout", timeout, httpx.Timeout),
        ):
            check_instance(option, value, kind)
        self.sticky = sticky.named_for(self.name) if sticky is not None else None
        retry = retry if retry is not None and retry.enabled else None
        if retry != self.retry:
            self.retry = retry
            self._budget = RetryBudget.of(retry) if retry is not None else None
        if timeout != self._timeout:
            self._timeout = timeout
            if self._lean is not None:
                self._lean.retime(timeout)
            if self._owns_client and self._client is not None:
                self._client.timeout = timeout
        active_changed = (health_check is None) != (self.health_check is None)
        if health_check != self.health_check:
            self._restart_active_checks(health_check)
        if passive_health_check != self.passive_health_check or (
            active_changed and passive_health_check is not None
        ):
            self._restart_passive_check(passive_health_check)

    def _restart_active_checks(self, health_check: HealthCheck | None) -> None:
        for member in self._members:
            if member.watcher is not None:
                member.watcher.cancel()
                member.watcher = None
        self.health_check = health_check
        if health_check is None:  # nothing will clear what the old probes concluded
            for member in self._members:
                if member.server is not None:
                    report_status(
                        self.balancer, member.name, True, "active", "active check removed"
                    )
        task_group = self._task_group
        if task_group is not None:
            for member in self._members:
                self._watch(member, task_group)

    def _restart_passive_check(self, passive_health_check: PassiveHealthCheck | None) -> None:
        if self.passive is not None:
            self.passive.stop("passive check replaced")
        self.passive_health_check = passive_health_check
        self.passive = None
        if passive_health_check is not None:
            self.passive = passive_health_check.start(
                self.balancer,
                active_recovery=self.health_check is not None,
                tell_others=self._tell_ejection,
            )
            if self._task_group is not None:
                self._task_group.start_soon(
                    keep_running, "the passive check", self.passive.run, logger
                )
        self._members.passive = self.passive
