"""The proxy's shared state: the runtime changes to its upstreams, seen by every process.

What the configuration says is each process's starting point; what operators change at run time
(an upstream marked down by hand, fenced, reweighed, added or removed) is a :class:`Change`,
validated once, whole, when it is made: the proxy's ``set_*`` methods, the admin API and the
records a store reads all make one, and all go through the same apply. A store keeps, per
upstream, one :data:`Record` of every change made so far, with a version that grows with each
change, and hands each new record to every process, which applies what changed in it since the
record it applied last: a late or replayed record never rolls a process back, and a field nobody
changed is never applied again over a change made here meanwhile.

Two stores: :class:`InProcessState` (the default: one process, nothing shared) and
:class:`~asgi_leasttime.redis_state.RedisState` (every worker and machine on one Redis or Valkey
server). A store given to a proxy is an option: the proxy makes a store of its own from it
(:meth:`StateStore.attached`), so one store object can serve two proxies. Neither is on the
request path: a change reaches the balancer through the store's own task, and the proxy keeps
serving on what it knows when the store is gone.

This module knows nothing of the proxy: a store is handed a :class:`StateHost` (what applies a
change, and what reports the upstreams' status) when the proxy makes it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Collection, Mapping
from typing import TYPE_CHECKING, Any, Protocol, Self

import anyio.abc

from asgi_leasttime.options import OptionError
from asgi_leasttime.upstream import check_url

if TYPE_CHECKING:
    from asgi_leasttime.status import UpstreamStatus

__all__ = [
    "FIELDS",
    "Change",
    "Fleet",
    "InProcessState",
    "Record",
    "StateHost",
    "StateStore",
    "fleet_totals",
    "merge",
    "valid_record",
]

logger = logging.getLogger("asgi_leasttime.state")

Record = dict[str, Any]
"""One upstream's changes so far: ``version`` (int), and the fields of :class:`Change`."""


def _bool(option: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise OptionError(option, "must be true or false")


def _number(option: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OptionError(option, "must be a number")


def _weight(option: str, value: Any) -> None:
    _number(option, value)
    if not (value >= 0 and math.isfinite(value)):
        raise OptionError(option, "must be a number, 0 or more (0 leaves the upstream out)")


def _time(option: str, value: Any) -> None:
    _number(option, value)
    if not (value >= 0 and math.isfinite(value)):
        raise OptionError(option, "must be a time in seconds since the epoch (0: until a probe)")


def _url(option: str, value: Any) -> None:
    if not isinstance(value, str):
        raise OptionError(option, "must be a URL")
    check_url(value)


FIELDS = {
    "url": _url,
    "weight": _weight,
    "fenced": _bool,
    "down": _bool,
    "active_down": _bool,
    "passive_down": _bool,
    "passive_until": _time,
    "removed": _bool,
}
"""Every field a change may carry, with its one rule. ``url``: an upstream added (with
``weight`` and ``fenced``, defaults 1 and false); ``down``: the manual flag; ``active_down``:
the active check's flag, from the process that probes; ``passive_down`` with ``passive_until``
(seconds since the epoch; 0 until a probe passes): an ejection shared by a passive check;
``removed``: the upstream taken out. A weight of 0 leaves an upstream out of the picks, wherever
it is given (``Upstream``, the file, ``set_weight``, the admin API), as in Traefik."""


class Change:
    """One change to one upstream: any of :data:`FIELDS`, validated together when it is made
    (every mistake reported at once, in one :class:`~asgi_leasttime.options.OptionError`), then
    applied together or not at all.

    ``Change("a", down=True)``, ``Change("a", weight=2, fenced=False)``,
    ``Change("b", url="http://10.0.0.7:8000", weight=2)`` (an add), ``Change("a", removed=True)``.
    """

    __slots__ = ("fields", "name")

    def __init__(self, name: str, **fields: Any) -> None:
        if not isinstance(name, str) or not name:
            raise OptionError("name", "an upstream's name must be a non-empty string")
        if not fields:
            raise OptionError("change", "give at least one of " + ", ".join(FIELDS))
        mistakes = []
        for option, value in fields.items():
            rule = FIELDS.get(option)
            try:
                if rule is None:
                    raise OptionError(option, "is not something an upstream has")
                rule(option, value)
            except OptionError as exc:
                mistakes.append(exc)
        if fields.get("removed") and len(fields) > 1:
            mistakes.append(OptionError("removed", "comes alone: a removal changes nothing else"))
        if "passive_until" in fields and fields.get("passive_down") is not True:
            mistakes.append(OptionError("passive_until", "goes with passive_down = true"))
        if mistakes:
            if len(mistakes) == 1:
                raise mistakes[0]
            raise OptionError(mistakes[0].option, "; ".join(str(m) for m in mistakes))
        self.name = name
        self.fields: Mapping[str, Any] = dict(fields)

    def __repr__(self) -> str:
        given = ", ".join(f"{key}={value!r}" for key, value in self.fields.items())
        return f"Change({self.name!r}, {given})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Change) and other.name == self.name and other.fields == self.fields

    __hash__ = None  # type: ignore[assignment]

    @property
    def adds(self) -> bool:
        """Whether the change adds the upstream (it carries a URL)."""
        return "url" in self.fields


def merge(record: Record | None, change: Change, version: int) -> Record:
    """The record after ``change``: an add starts the upstream afresh (up, unfenced, weight 1
    unless given), a removal keeps the rest for the record's history."""
    merged: Record = dict(record or {})
    fields = dict(change.fields)
    if change.adds:  # a new upstream: nothing of the one that had its name carries over
        for flag in ("active_down", "passive_down", "passive_until"):
            merged.pop(flag, None)
        fields = {"weight": 1, "fenced": False, "down": False, "removed": False, **fields}
    if fields.get("passive_down") is True:
        fields.setdefault("passive_until", 0)
    merged.update(fields)
    if not merged.get("passive_down"):
        merged.pop("passive_until", None)  # an until goes only with an ejection
    merged["version"] = version
    return merged


def valid_record(record: Any) -> bool:
    """Whether ``record`` (from a store, so from anyone) is a :data:`Record` whose fields each
    pass their rule."""
    if not isinstance(record, dict):
        return False
    version = record.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        return False
    fields = {key: value for key, value in record.items() if key != "version"}
    for key, value in fields.items():
        rule = FIELDS.get(key)
        if rule is None:
            return False
        try:
            rule(key, value)
        except OptionError:
            return False
    return True


def changed_since(previous: Record | None, record: Record) -> dict[str, Any]:
    """The fields of ``record`` that differ from ``previous`` (the record applied before it):
    what another process changed. The first record heard of, one made since a removal, and one
    for a new URL under the name are taken whole."""
    fields = {key: value for key, value in record.items() if key != "version"}
    if not fields.get("passive_down"):
        fields.pop("passive_until", None)  # records written before the rule was kept
    if record.get("removed"):
        return {"removed": True}
    if previous is None or previous.get("removed") or previous.get("url") != record.get("url"):
        return fields  # the first heard of, or a new upstream under the name: taken whole
    changed = {key: value for key, value in fields.items() if previous.get(key) != value}
    if "passive_down" in changed or "passive_until" in changed:
        changed["passive_down"] = fields.get("passive_down", False)
        if changed["passive_down"]:
            changed["passive_until"] = fields.get("passive_until", 0)
        else:
            changed.pop("passive_until", None)
    if changed.get("passive_down") is False:
        changed.pop("passive_until", None)
    return changed


Fleet = dict[str, dict[str, dict[str, float]]]
"""Process -> upstream -> figures (``inflight``, ``requests``, ``failures``, ``average_ttfb``)."""


def fleet_totals(fleet: Fleet) -> dict[str, dict[str, float]]:
    """Per upstream, the in-flight requests, requests and failures of every process added up,
    and ``average_ttfb``: the processes' averages weighted by their requests (where none has
    counted a request yet, the plain mean of the averages there are; 0 with none)."""
    totals: dict[str, dict[str, float]] = {}
    ttfbs: dict[str, list[tuple[float, float]]] = {}  # upstream -> (average, requests) each
    for upstreams in fleet.values():
        for name, figures in upstreams.items():
            total = totals.setdefault(name, {"inflight": 0, "requests": 0, "failures": 0})
            for key in total:
                total[key] += figures[key]
            average = figures.get("average_ttfb", 0.0)
            if average > 0:
                ttfbs.setdefault(name, []).append((average, figures["requests"]))
    for name, total in totals.items():
        averages = ttfbs.get(name, [])
        weights = sum(requests for _, requests in averages)
        if weights > 0:
            total["average_ttfb"] = sum(a * requests for a, requests in averages) / weights
        else:
            total["average_ttfb"] = sum(a for a, _ in averages) / len(averages) if averages else 0.0
    return totals


class StateHost(Protocol):
    """What a store is handed by the proxy that makes it: the proxy's upstreams."""

    name: str
    """The proxy's name: processes with the same name share one state."""

    def apply(self, change: Change) -> None:
        """Apply a change, whole or not at all; raises ``KeyError`` for an upstream not held
        and :class:`~asgi_leasttime.options.OptionError` for one it cannot take."""

    def probed(self, name: str, healthy: bool, reason: str) -> None:
        """An active probe's result, here or from the process that probes for all."""

    def down_flags(self, name: str) -> Collection[str]:
        """Which sources say the upstream is down (empty for one not held)."""

    def statuses(self) -> list[UpstreamStatus]:
        """Every upstream's status and figures, for the fleet's reports."""


class StateStore:
    """What a store does; :class:`InProcessState` and ``RedisState`` are the two there are.

    The object given to a proxy is an option: the proxy calls :meth:`attached` to make its own,
    runs :meth:`running` for its lifespan, calls :meth:`share` after each change made through its
    own methods (already applied here) and :meth:`submit` for the admin API's. A store calls
    :meth:`apply` with every record it learns of.
    """

    def __init__(self) -> None:
        self.host: StateHost | None = None
        self.versions: dict[str, int] = {}  # the newest version applied, per upstream
        self._applied: dict[str, Record] = {}  # the record of that version

    def options(self) -> dict[str, Any]:
        """The keyword arguments that make a store like this one."""
        return {}

    def attached(self, host: StateHost) -> Self:
        """A store of the same kind and options, of ``host``'s alone (this one is left as it
        is, so it can be given to another proxy)."""
        store = type(self)(**self.options())
        store.host = host
        return store

    @contextlib.asynccontextmanager
    async def running(self, task_group: anyio.abc.TaskGroup) -> AsyncIterator[None]:
        """For the proxy's lifespan: keep in step with the others, if there are any, with the
        store's loops in ``task_group``."""
        yield

    def share(self, change: Change) -> None:
        """Tell the other processes of a change already applied here."""

    async def fleet(self) -> Fleet | None:
        """Every process's last reported figures, where processes share the state; ``None``
        where there is nothing to gather (one process on its own, or the store away)."""
        return None

    async def may_probe(self, name: str, interval: float) -> bool:
        """Whether this process probes ``name`` now (checked every ``interval`` seconds at
        most): always, unless processes share the state and another one does."""
        return True

    def report_probe(self, name: str, healthy: bool, reason: str) -> None:
        """A probe's result: the active check's flag set or cleared here, and shared."""
        host = self._host()
        was_down = "active" in host.down_flags(name)
        host.probed(name, healthy, reason)
        if was_down == healthy:  # the flag changed
            self.share(Change(name, active_down=not healthy))

    async def submit(self, change: Change) -> None:
        """Make ``change`` everywhere, this process included before this returns; raises
        ``KeyError`` or :class:`~asgi_leasttime.options.OptionError` as the host's apply does."""
        self._host().apply(change)

    def apply(self, name: str, record: Record) -> bool:
        """Apply what changed in a record from the store since the one applied before, unless
        a newer one was; whether it was. A record no upstream could take is logged, and left
        unapplied so that a later load tries it again."""
        if self.host is None or self.versions.get(name, 0) >= record["version"]:
            return False
        previous = self._applied.get(name)
        fields = changed_since(previous, record)
        try:
            if fields:
                self.host.apply(Change(name, **fields))
        except KeyError:
            # A change to an upstream this process was not configured with: nothing to do.
            logger.debug("a change from the store to upstream %r, not held here", name)
        except OptionError as exc:
            logger.warning("ignored a change to upstream %r from the store: %s", name, exc)
            return False
        self.versions[name] = record["version"]
        self._applied[name] = record
        return True

    def forget(self) -> None:
        """Forget every version applied (the store's server lost its data and counts anew)."""
        self.versions.clear()
        self._applied.clear()

    def _host(self) -> StateHost:
        if self.host is None:
            raise RuntimeError("this store was given to no proxy; a proxy uses store.attached()")
        return self.host


class InProcessState(StateStore):
    """The state of one process: changes apply here, nothing is shared (the default)."""
