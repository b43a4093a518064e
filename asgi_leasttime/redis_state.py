"""RedisState: one state for every worker and machine, on a Redis or Valkey server.

The server holds, under ``asgi-leasttime:<proxy name>``, a hash of one record per changed upstream
and a version counter; a change is written in one transaction (the record merged, the counter
bumped, the upstream's name published on a channel), retried when another writer got there first.
Every process subscribes to the channel, then loads the whole hash, and applies whatever is newer
than what it has, reading each named record from the hash; it does the same after every
reconnect, so a change made while it was cut off still arrives. Nothing here is on the request path.

The server may be unreachable at start or vanish at any time: the proxy keeps serving on what it
knows (the configuration at start), logs the outage once, retries with a growing pause (0.1 s to
2 s), keeps the changes made meanwhile and writes them, in order, once the server is back. A
message on the channel that is not a well-formed record is logged and ignored. Only the proxy's
own methods and the admin API write to the store: nothing a proxied client sends reaches it.

Needs the ``state`` extra (``pip install 'asgi-leasttime[state]'``) to be made; the module imports
without it, so the configuration file can read the signature.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc

from asgi_leasttime._extras import need
from asgi_leasttime._tasks import keep_running
from asgi_leasttime.options import OptionError, check_positive
from asgi_leasttime.state import Change, Fleet, Record, StateStore, merge, valid_record

__all__ = ["RedisState"]

logger = logging.getLogger("asgi_leasttime.state")

BACKOFF_FIRST, BACKOFF_MOST = 0.1, 2.0

FIGURES = ("inflight", "requests", "failures", "average_ttfb")
"""What each process reports per upstream (see :meth:`RedisState.fleet`)."""

_SCHEMES = ("redis://", "rediss://", "unix://")


class RedisState(StateStore):
    """The state shared through the Redis or Valkey server at ``url``.

    Arguments:
        url: ``redis://[:password@]host:port/db``, ``rediss://`` for TLS, or
            ``unix:///path/to/socket``; a password may also come as ``password``.
        prefix: the keys' prefix; the proxy's name is added, so several proxies can share one
            server.
        password: the server's password, if not in the URL.
        report_every: seconds between this process's reports of its figures (``/status`` and
            ``/metrics`` of any process add up every process's); ``None`` reports nothing (a
            process that serves no traffic).

    Given to a proxy, it is an option: the proxy makes its own store from it
    (:meth:`~asgi_leasttime.state.StateStore.attached`), with a connection of its own.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "asgi-leasttime",
        password: str | None = None,
        report_every: float | None = 1.0,
    ) -> None:
        super().__init__()
        check_positive("report_every", report_every)
        if not isinstance(url, str) or not url.lower().startswith(_SCHEMES):
            raise OptionError("url", f"must start with redis://, rediss:// or unix://, not {url!r}")
        # Imported here, not with the module: the configuration file reads this signature in an
        # installation without the state extra.
        need("redis", "state", "RedisState")
        import redis.asyncio
        import redis.exceptions

        # What a lost or refusing server raises through redis-py.
        self._errors: tuple[type[BaseException], ...] = (
            redis.exceptions.RedisError,
            OSError,
            asyncio.TimeoutError,
        )
        self._watch_error: type[Exception] = redis.exceptions.WatchError
        self.url = url
        self._prefix = prefix
        self._password = password
        self.report_every = report_every
        try:
            # health_check_interval: a silent connection (the server gone without a word) is
            # noticed by a PING within that many seconds. socket_timeout: a command that gets
            # no answer fails (and the store counts as lost) instead of waiting for ever; the
            # subscription's blocking read is exempt (redis-py reads it without a timeout).
            self._client = redis.asyncio.from_url(
                url,
                password=password,
                socket_connect_timeout=2,
                socket_timeout=5,
                health_check_interval=5,
            )
        except ValueError as exc:
            raise OptionError("url", str(exc)) from None
        # Who this process is to the others: the holder of a probe lease.
        self._id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}".encode()
        self._probing: set[str] = set()  # the upstreams whose probe lease this process holds
        self._pending: collections.deque[Change] = collections.deque()
        self._wake_writer = asyncio.Event()
        self._connected = False
        self._epoch: bytes | str | None = None  # which life of the server the versions are of
        self._outage_logged = False
        self._ignored_at = 0.0
        self._stopping = False  # the proxy's lifespan is ending: every loop ends

    def options(self) -> dict[str, Any]:
        """The keyword arguments that make a store like this one."""
        return {
            "url": self.url,
            "prefix": self._prefix,
            "password": self._password,
            "report_every": self.report_every,
        }

    @property
    def connected(self) -> bool:
        """Whether the store is in step with the server right now."""
        return self._connected

    def _key(self, what: str) -> str:
        name = self.host.name if self.host is not None else "leasttime"
        return f"{self._prefix}:{name}:{what}"

    # -- the proxy's side -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self, task_group: anyio.abc.TaskGroup) -> AsyncIterator[None]:
        """Follow the server's changes and write this process's for the proxy's lifespan, with
        the loops in the proxy's task group (each restarted if it meets an unexpected error)."""
        self._stopping = False
        loops = anyio.CancelScope()

        async def run_loops() -> None:
            with loops:
                async with anyio.create_task_group() as group:
                    group.start_soon(
                        keep_running, "following the state store", self._follow, logger
                    )
                    group.start_soon(
                        keep_running, "writing to the state store", self._write_pending, logger
                    )
                    if self.report_every is not None:
                        group.start_soon(
                            keep_running, "reporting to the state store", self._report, logger
                        )

        task_group.start_soon(run_loops)
        try:
            yield
        finally:
            # A cancellation that arrives inside a redis-py command can come out as a
            # connection error, which the loops take for an outage: each loop also stops at
            # this flag, and the hand-over of probes is bounded, so a shutdown never hangs.
            self._stopping = True
            self._wake_writer.set()
            loops.cancel()
            with anyio.move_on_after(5, shield=True):
                await self._give_up_probes()
            await self._client.aclose()

    def share(self, change: Change) -> None:
        """Queue a change already applied here for the server (written in order, kept while
        the server is away)."""
        self._pending.append(change)
        self._wake_writer.set()

    async def submit(self, change: Change) -> None:
        """Write ``change`` to the server and apply the record it makes; while the server is
        away, apply it here and queue it like :meth:`share`."""
        if self._connected and not self._pending:
            try:
                name, record = await self._write(change)
            except self._errors as exc:
                self._lost(exc)
            else:
                self.apply(name, record)
                return
        self._host().apply(change)
        self.share(change)

    # -- what each process carries ----------------------------------------------------------------

    async def _report(self) -> None:
        """Every ``report_every`` seconds, this process's figures per upstream, under a key of its
        own that expires when reports stop: one write per process per period, so the store's
        work grows with the number of processes and no process reads the others' on its own."""
        assert self.report_every is not None
        key = self._key(f"load:{self._id.decode()}")
        expiry = max(int(3 * self.report_every * 1000), 1000)
        while not self._stopping:
            await asyncio.sleep(self.report_every)
            if not self._connected or self.host is None:
                continue
            figures = {
                status.name: json.dumps({name: getattr(status, name) for name in FIGURES})
                for status in self.host.statuses()
            }
            if not figures:
                continue
            try:
                async with self._client.pipeline(transaction=True) as pipe:
                    pipe.delete(key)
                    pipe.hset(key, mapping=figures)  # type: ignore[arg-type]
                    pipe.pexpire(key, expiry)
                    await pipe.execute()
            except self._errors as exc:
                self._lost(exc)

    async def fleet(self) -> Fleet | None:
        """The last figures of every process that reports: process -> upstream -> figures
        (:data:`FIGURES`); malformed ones left out; ``None`` while the server is away."""
        try:
            return await self._gather()
        except self._errors as exc:
            self._lost(exc)
            return None

    async def _gather(self) -> Fleet:
        found: Fleet = {}
        prefix = self._key("load:")
        async for key in self._client.scan_iter(match=prefix + "*", count=1000):
            process = _text(key)[len(prefix) :]
            upstreams = {}
            for name, raw in (await self._client.hgetall(key)).items():
                try:
                    figures = json.loads(raw)
                    upstreams[_text(name)] = {k: float(figures[k]) for k in FIGURES}
                except (ValueError, KeyError, TypeError):
                    continue
            found[process] = upstreams
        return found

    # -- one prober per upstream ------------------------------------------------------------------

    async def may_probe(self, name: str, interval: float) -> bool:
        """Whether this process probes ``name`` now: the one that holds its probe lease does.
        The lease lasts two intervals and is renewed at each probe, so when its holder dies
        another process takes over within two intervals. Cut off from the server, a process
        probes for itself, and so does one whose passive check holds the upstream down: only a
        probe of its own ends that."""
        if not self._connected or self._held_down_passively(name):
            return True
        key, lasts = self._key(f"prober:{name}"), max(int(2 * interval * 1000), 100)
        try:
            if await self._client.set(key, self._id, nx=True, px=lasts):
                self._probing.add(name)
                return True
            if await self._client.get(key) == self._id:
                await self._client.pexpire(key, lasts)
                return True
        except self._errors as exc:
            self._lost(exc)
            return True
        self._probing.discard(name)
        return False

    def _held_down_passively(self, name: str) -> bool:
        return self.host is not None and "passive" in self.host.down_flags(name)

    async def _give_up_probes(self) -> None:
        """Hand the probe leases over at once rather than let them run out."""
        for name in self._probing if self._connected else ():
            key = self._key(f"prober:{name}")
            with contextlib.suppress(*self._errors):
                if await self._client.get(key) == self._id:
                    await self._client.delete(key)
        self._probing.clear()

    # -- writing ----------------------------------------------------------------------------------

    async def _write(self, change: Change) -> tuple[str, Record]:
        """One change in one transaction: the record merged, the version bumped, the record
        published. Retried when another process wrote in between (WATCH)."""
        records, version_key, channel = (
            self._key("records"),
            self._key("version"),
            self._key("changes"),
        )
        async with self._client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(records, version_key)
                    raw = await pipe.hget(records, change.name)
                    current = json.loads(raw) if raw else None
                    version = int(await pipe.get(version_key) or 0) + 1
                    record = merge(current if valid_record(current) else None, change, version)
                    encoded = json.dumps(record)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.set(version_key, version)
                    pipe.hset(records, change.name, encoded)
                    pipe.publish(channel, json.dumps({"name": change.name}))
                    await pipe.execute()
                    return change.name, record
                except self._watch_error:
                    continue

    async def _write_pending(self) -> None:
        while not self._stopping:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            while self._pending and self._connected:
                change = self._pending[0]
                try:
                    await self._write(change)
                except self._errors as exc:
                    self._lost(exc)
                    break
                except ValueError as exc:  # no longer takes (removed meanwhile, say)
                    logger.warning("state store: dropped change %s: %s", change, exc)
                self._pending.popleft()

    # -- following --------------------------------------------------------------------------------

    async def _follow(self) -> None:
        pause = BACKOFF_FIRST
        while not self._stopping:
            try:
                async with self._client.pubsub() as pubsub:
                    await pubsub.subscribe(self._key("changes"))
                    await self._load_all()  # after subscribing: nothing falls in between
                    self._reached()
                    pause = BACKOFF_FIRST
                    while not self._stopping:
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=None
                        )
                        if message is not None and message.get("type") == "message":
                            await self._receive(message["data"])
            except self._errors as exc:
                self._lost(exc)
            await asyncio.sleep(pause)
            pause = min(pause * 2, BACKOFF_MOST)

    async def _load_all(self) -> None:
        # A server that lost its data (restarted without persistence) counts versions from 1
        # again: its epoch, made by the first process to find none, tells this process to
        # forget the versions of the server it knew, or it would ignore every new change.
        epoch_key = self._key("epoch")
        await self._client.set(epoch_key, uuid.uuid4().hex, nx=True)
        epoch = await self._client.get(epoch_key)
        if epoch != self._epoch:
            if self._epoch is not None:
                logger.warning("state store %s was reset: following its new state", self.url)
            self._epoch = epoch
            self.forget()
        for name, raw in (await self._client.hgetall(self._key("records"))).items():
            self._take(name, raw)

    async def _receive(self, data: Any) -> None:
        """A message says which upstream changed; its record is read from the hash, which is
        what a message cannot forge (a record published with a huge version would otherwise
        hold back every later change)."""
        try:
            name = json.loads(data)["name"]
        except (ValueError, TypeError, KeyError):
            self._ignore("a message that is not a change", data)
            return
        if not isinstance(name, str):
            self._ignore("a message that names no upstream", data)
            return
        raw = await self._client.hget(self._key("records"), name)
        if raw is not None:
            self._take(name, raw)

    def _take(self, name: Any, raw: Any) -> None:
        try:
            if isinstance(name, bytes):
                name = name.decode()
            record = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            self._ignore("a record that is not JSON", raw)
            return
        if not isinstance(name, str) or not valid_record(record):
            self._ignore("a malformed record", record)
            return
        self.apply(name, record)

    def _ignore(self, what: str, data: Any) -> None:
        now = time.monotonic()
        if now - self._ignored_at > 10:  # a flood of them logs once in ten seconds
            self._ignored_at = now
            logger.warning("state store: ignored %s: %.200r", what, data)

    def _reached(self) -> None:
        self._connected = True
        if self._outage_logged:
            logger.warning("state store %s reached again; its state loaded", self.url)
            self._outage_logged = False
        self._wake_writer.set()  # what was changed meanwhile goes out now

    def _lost(self, exc: BaseException) -> None:
        self._connected = False
        if not self._outage_logged and not self._stopping:
            self._outage_logged = True
            logger.warning(
                "state store %s unreachable (%r): serving on the last known state, retrying",
                self.url,
                exc,
            )


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value
