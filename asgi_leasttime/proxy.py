"""LeastTimeProxy: the ASGI app that spreads requests over upstreams by least time."""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import anyio
import anyio.abc
import httpx

from asgi_leasttime._forwarding import (
    Opener,
    forward_http,
    httpx_opener,
    send_error,
    upstream_target,
)
from asgi_leasttime._headers import BadRequest, RequestHeaders
from asgi_leasttime.balancer import Balancer, Mode, NoAvailableServer
from asgi_leasttime.client import DEFAULT_LIMITS, DEFAULT_TIMEOUT, create_client, forget_cookies
from asgi_leasttime.health import HealthCheck, PassiveHealthCheck, report_status, watch_upstream
from asgi_leasttime.lease import Lease
from asgi_leasttime.state import Change, InProcessState, Record, StateStore
from asgi_leasttime.status import UpstreamStatus
from asgi_leasttime.types import ASGIApp, Headers, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from asgi_leasttime._lean import LeanClient, LeanResponse
    from asgi_leasttime.metrics import RequestMetrics
from asgi_leasttime.sticky import StickyCookie
from asgi_leasttime.tls import UpstreamTLS
from asgi_leasttime.upstream import Upstream

__all__ = ["LeastTimeProxy"]

logger = logging.getLogger("asgi_leasttime")


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
        balancer: a :class:`Balancer` to use instead of a new one.
        upstream_client: ``"lean"`` (the default): the proxy's own HTTP/1.1 client on
            httptools (:mod:`asgi_leasttime._lean`) for plain-http upstreams, about five times
            httpx's throughput here; or ``"httpx"``. A given ``client`` or ``transport``, and
            https upstreams, always use httpx.
        freeze_gc: on startup, move every object then alive out of the garbage collector's
            sight (``gc.freeze()``), so its full collections scan only what came after. The
            process's modules and the app are most of the heap, and scanning them stalled every
            request in flight: p99 at 64 connections fell from 44 ms to 18 ms in
            ``benchmarks/proxy.py``. It acts on the whole process; pass ``False`` to leave the
            collector alone.
        state: where runtime changes to the upstreams (manual down, fenced, weight, added,
            removed) are kept and shared: :class:`~asgi_leasttime.state.InProcessState` (the
            default, this process only) or :class:`~asgi_leasttime.redis_state.RedisState`
            (every process on one Redis or Valkey server).
        tls: an :class:`~asgi_leasttime.tls.UpstreamTLS` for https upstreams (a CA bundle, a
            client certificate, a server name, or no verification); without one, certificates
            are verified against the system's CA store. The lean client speaks TLS itself, so
            https upstreams take the fast path too.
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
        freeze_gc: bool = True,
        state: StateStore | None = None,
        tls: UpstreamTLS | None = None,
    ) -> None:
        if app is not None:
            raise TypeError(
                "LeastTimeProxy takes no app to wrap: it would send every request upstream. To "
                "send some of an app's requests upstream, add LeastTimeMiddleware(app, "
                "upstreams=..., paths=[...]) (or hosts=, when=); to proxy everything, serve the "
                "proxy as the app."
            )
        self.freeze_gc = freeze_gc
        self.name = name
        self.sticky = sticky
        if sticky is not None:
            sticky.bind(name, ())
        self.health_check = health_check
        self.passive_health_check = passive_health_check
        if passive_health_check is not None:
            passive_health_check.active_recovery = health_check is not None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._running = False  # in its lifespan
        self._watchers: dict[str, anyio.CancelScope] = {}  # an upstream's health checks
        self._child_updaters: dict[str, Callable[[bool], None]] = {}  # nested proxies' status
        self.metrics: RequestMetrics | None = None  # set by an AdminApp
        self.balancer = (
            balancer if balancer is not None else Balancer(mode=mode, wants_health_check=True)
        )
        if passive_health_check is not None:
            passive_health_check.watch(self.balancer)
        self.request_headers = RequestHeaders(
            pass_host_header=pass_host_header, trusted_proxies=trusted_proxies
        )
        self.upstreams: dict[str, Upstream] = {}
        self._openers: dict[str, Opener] = {}  # how each upstream with a URL is reached
        self.state = state if state is not None else InProcessState()
        self.state.bind(self)
        if passive_health_check is not None and passive_health_check.shared:
            share = self.state.share
            passive_health_check.tell_others = lambda name, until: share(
                Change(name, "passive_down", until)
            )
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
        for upstream in upstreams:
            self._add(Upstream(upstream) if isinstance(upstream, str) else upstream)

    # -- upstreams and status ---------------------------------------------------------------------

    def add_upstream(self, upstream: str | Upstream) -> Upstream:
        """Add an upstream while the proxy runs; it starts up and cold. An upstream with a URL
        is added in every process sharing this proxy's state store."""
        if isinstance(upstream, str):
            upstream = Upstream(upstream)
        self._add(upstream)
        if upstream.url is not None:
            value = {"url": str(upstream.url), "weight": upstream.weight, "fenced": upstream.fenced}
            self.state.share(Change(upstream.name, "add", value))
        return upstream

    def remove_upstream(self, name: str) -> None:
        """Remove an upstream and everything the proxy keeps for it: its health checks stop
        (a nested proxy's too) and its sticky cookies get a fresh pick; its requests in flight
        finish. Shared through the state store."""
        self._remove(name)
        self.state.share(Change(name, "remove"))

    def set_status(self, name: str, up: bool) -> None:
        """Mark an upstream down by hand, or clear that mark (the in-process health API). A
        health check never clears a manual down, and a manual up does not clear a failing check's
        down: the upstream takes requests once no source says it is down. Shared through the
        state store."""
        self.balancer.set_status(name, up, "manual")
        self.state.share(Change(name, "down", not up))

    def set_fenced(self, name: str, fenced: bool) -> None:
        """Drain an upstream (no new picks, sticky clients still served) or take it back.
        Shared through the state store."""
        self.balancer.set_fenced(name, fenced)
        self.state.share(Change(name, "fenced", fenced))

    def set_weight(self, name: str, weight: float) -> None:
        """Change an upstream's weight; its statistics are kept. Shared through the state
        store."""
        self._set_weight(name, weight)
        self.state.share(Change(name, "weight", weight))

    # Everything keyed by an upstream's name is added in _add and removed in _remove.

    def _add(self, upstream: Upstream) -> None:
        if upstream.name in self.upstreams:
            raise ValueError(f"an upstream named {upstream.name!r} is already in this proxy")
        server = self.balancer.add(upstream.name, weight=upstream.weight, fenced=upstream.fenced)
        if server is None:
            return  # weight 0: left out, as in Traefik
        name = upstream.name
        self.upstreams[name] = upstream
        if upstream.url is not None:
            self._openers[name] = self._opener(upstream)
        if self.sticky is not None:
            self.sticky.add_server(name)
        if self._task_group is not None:
            self._watch(upstream, self._task_group)
        child = upstream.app
        if isinstance(child, LeastTimeProxy):
            # A balancer of balancers: the child's overall status is this upstream's status.
            def follow_child(up: bool) -> None:
                self.balancer.set_status(name, up, "parent")

            child.balancer.register_status_updater(follow_child)
            self._child_updaters[name] = follow_child
            if not child.balancer.up:
                self.balancer.set_status(name, False, "parent")

    def _remove(self, name: str) -> None:
        self.balancer.remove(name)
        upstream = self.upstreams.pop(name)
        self._openers.pop(name, None)
        if self.sticky is not None:
            self.sticky.remove_server(name)
        watcher = self._watchers.pop(name, None)
        if watcher is not None:
            watcher.cancel()
        child = upstream.app
        if isinstance(child, LeastTimeProxy):
            child.balancer.unregister_status_updater(self._child_updaters.pop(name))
            child._stop_watching()

    def _set_weight(self, name: str, weight: float) -> None:
        self.balancer.set_weight(name, weight)
        self.upstreams[name].weight = weight

    def _stop_watching(self) -> None:
        """Stop every health check of this proxy and of the proxies nested in it."""
        for watcher in self._watchers.values():
            watcher.cancel()
        self._watchers.clear()
        for upstream in self.upstreams.values():
            if isinstance(upstream.app, LeastTimeProxy):
                upstream.app._stop_watching()

    def _probed(self, name: str, healthy: bool, reason: str) -> None:
        """An active probe's result, here or from the process that probes for all."""
        report_status(self.balancer, name, healthy, "active", reason)
        if healthy and self.passive_health_check is not None:
            self.passive_health_check.probe_passed(self.balancer, name, reason)

    def _apply_record(self, name: str, record: Record) -> None:
        """Bring an upstream to what a record from the state store says of it."""
        if record.get("removed"):
            if name in self.upstreams:
                self._remove(name)
            return
        upstream = self.upstreams.get(name)
        if upstream is None:
            if "url" not in record:
                return  # a change to an upstream this process was not configured with
            options = {k: record[k] for k in ("weight", "fenced") if k in record}
            self._add(Upstream(record["url"], name=name, **options))
        if "weight" in record and record["weight"] != self.upstreams[name].weight:
            self._set_weight(name, record["weight"])
        if "fenced" in record:
            self.balancer.set_fenced(name, record["fenced"])
        if "down" in record:
            self.balancer.set_status(name, not record["down"], "manual")
        server = self.balancer[name]
        if "active_down" in record and record["active_down"] != ("active" in server.down_flags):
            self._probed(name, not record["active_down"], "the active check of another process")
        if "passive_down" in record and self.passive_health_check is not None:
            until = record["passive_down"] and record.get("passive_until", 0)
            if record["passive_down"] != ("passive" in server.down_flags):
                self.passive_health_check.heard(self.balancer, name, until)

    def upstream_status(self) -> list[UpstreamStatus]:
        """Every upstream with its status and statistics, in the order they were added."""
        now = self.balancer.clock()
        return [
            UpstreamStatus.of(upstream, server, now)
            for upstream in self.upstreams.values()
            if (server := self.balancer.get(upstream.name)) is not None
        ]

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

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """For ``Starlette(lifespan=proxy.lifespan)``: open the client and start the health
        checks (and those of in-process child proxies) on startup; stop and close on shutdown.
        Entered again while it runs (a middleware's lifespan and the app's both naming it), it
        does nothing more."""
        if self._running:
            yield
            return
        self._running = True
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(setattr, self, "_running", False)
            _ = self.client
            stack.push_async_callback(self.aclose)
            await stack.enter_async_context(self.state.running())
            for upstream in self.upstreams.values():
                if isinstance(upstream.app, LeastTimeProxy):
                    await stack.enter_async_context(upstream.app.lifespan())
            task_group = await stack.enter_async_context(anyio.create_task_group())
            for upstream in self.upstreams.values():
                self._watch(upstream, task_group)
            self._task_group = task_group
            if self.freeze_gc:
                gc.collect()  # garbage left from start-up is freed, not frozen
                gc.freeze()
            try:
                yield
            finally:
                self._task_group = None
                self._watchers.clear()
                task_group.cancel_scope.cancel()

    def _watch(self, upstream: Upstream, task_group: anyio.abc.TaskGroup) -> None:
        check = self.health_check
        if check is None or upstream.url is None:
            return
        # A scope of the watcher's own, so removing the upstream stops just its checks.
        watcher = self._watchers[upstream.name] = anyio.CancelScope()

        async def watch() -> None:
            with watcher:
                await watch_upstream(
                    check, self.state, upstream, lambda: self.client, self.tls.server_name
                )

        task_group.start_soon(watch)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        async with self.lifespan():
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
        await send({"type": "lifespan.shutdown.complete"})

    # -- requests ---------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send, None)
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send, None)

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
        balancer, sticky, passive = self.balancer, self.sticky, self.passive_health_check
        if passive is not None and passive.next_return <= balancer.clock():
            passive.restore_due(balancer)
        if sticky is None:
            return balancer.acquire(), None
        name = sticky.server_from(scope["headers"])
        server = balancer.get(name) if name is not None else None
        if server is not None and server.up:
            lease = balancer.lease(server)  # sticky traffic weighs on the scores too
            return lease, [sticky.set_cookie_header(server.name)] if sticky.sliding else None
        lease = balancer.acquire()
        return lease, [sticky.set_cookie_header(lease.server.name)]

    def _http(
        self, scope: Scope, receive: Receive, send: Send, fallback: ASGIApp | None
    ) -> Coroutine[Any, Any, None]:
        # A plain function handing over a coroutine: one frame less on every request.
        if self.metrics is None:
            return self._forward(scope, receive, send, fallback)
        return self._counted(self.metrics, scope, receive, send, fallback)

    async def _counted(
        self,
        metrics: RequestMetrics,
        scope: Scope,
        receive: Receive,
        send: Send,
        fallback: ASGIApp | None,
    ) -> None:
        started = time.perf_counter()
        status = 499  # nginx's "client closed request": no response was started

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._forward(scope, receive, counting_send, fallback)
        finally:
            metrics.observe(scope["method"], status, "http", time.perf_counter() - started)

    async def _forward(
        self, scope: Scope, receive: Receive, send: Send, fallback: ASGIApp | None
    ) -> None:
        try:
            lease, set_cookie = self._choose(scope)
        except NoAvailableServer:
            if fallback is not None:
                await fallback(scope, receive, send)
            else:
                await send_error(send, 503, "no available server")
            return
        try:
            upstream = self.upstreams[lease.server.name]
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
            outcome = await forward_http(
                self._openers[upstream.name],
                target,
                upstream.name,
                scope,
                receive,
                send,
                headers,
                extra_response_headers=set_cookie,
                on_response=lease.answered,
            )
            if outcome.retries and self.metrics is not None:
                self.metrics.retried(outcome.retries)
            if outcome.failed:
                lease.failed()
        finally:  # not a with block: one method call less on every request
            lease.release()

    def _opener(self, upstream: Upstream) -> Opener:
        """How requests reach an upstream with a URL: made once, when the upstream is added."""
        assert upstream.url is not None
        lean = self._lean
        if lean is not None:
            host, port, base_path = upstream.host, upstream.port, upstream.base_path
            https = upstream.url.scheme == "https"
            send = lean.send

            def open_upstream(
                method: str, target: bytes, headers: Headers, body: AsyncIterator[bytes] | None
            ) -> Coroutine[Any, Any, LeanResponse]:
                return send(method, host, port, base_path + target, headers, body, https)

            return open_upstream
        return httpx_opener(lambda: self.client, upstream.target_url)

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
            upstream = self.upstreams[lease.server.name]
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
            await forward_websocket(url, scope, receive, send, headers, lease)

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
