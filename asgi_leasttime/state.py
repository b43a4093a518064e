"""The proxy's shared state: the runtime changes to its upstreams, seen by every process.

What the configuration says is each process's starting point; what operators change at run time
(an upstream marked down by hand, fenced, reweighed, added or removed) is a :class:`Change`. A
store keeps, per upstream, one :data:`Record` of every change made so far, with a version that
grows with each change, and hands each new record to every process, which applies it unless it
has a newer one already: a late or replayed record never rolls a process back.

Two stores: :class:`InProcessState` (the default: one process, nothing shared) and
:class:`~asgi_leasttime.redis_state.RedisState` (every worker and machine on one Redis or Valkey
server). Neither is on the request path: a change reaches the balancer through the store's own
task, and the proxy keeps serving on what it knows when the store is gone.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from asgi_leasttime.options import OptionError
from asgi_leasttime.upstream import Upstream

if TYPE_CHECKING:
    from asgi_leasttime.proxy import LeastTimeProxy

__all__ = [
    "Change",
    "Fleet",
    "InProcessState",
    "Record",
    "StateStore",
    "fleet_totals",
    "merge",
    "valid_record",
]

logger = logging.getLogger("asgi_leasttime")

Operation = Literal["down", "active_down", "passive_down", "fenced", "weight", "add", "remove"]

Record = dict[str, Any]
"""One upstream's changes so far: ``version`` (int), and any of ``url`` (str), ``weight``
(number), ``fenced`` (bool), ``down`` (bool: the manual flag), ``active_down`` (bool: the
active check's flag, from the process that probes it), ``passive_down`` (bool) with
``passive_until`` (seconds since the epoch; 0 until a probe passes) for an ejection shared by
a passive check, ``removed`` (bool)."""

_FIELDS: dict[str, tuple[type, ...]] = {
    "url": (str,),
    "weight": (int, float),
    "fenced": (bool,),
    "down": (bool,),
    "active_down": (bool,),
    "passive_down": (bool,),
    "passive_until": (int, float),
    "removed": (bool,),
}


Fleet = dict[str, dict[str, dict[str, float]]]
"""Process -> upstream -> figures (``inflight``, ``requests``, ``failures``, ``average_ttfb``)."""


def fleet_totals(fleet: Fleet) -> dict[str, dict[str, float]]:
    """Per upstream, the in-flight requests, requests and failures of every process added up."""
    totals: dict[str, dict[str, float]] = {}
    for upstreams in fleet.values():
        for name, figures in upstreams.items():
            total = totals.setdefault(name, {"inflight": 0, "requests": 0, "failures": 0})
            for key in total:
                total[key] += figures[key]
    return totals


@dataclass(frozen=True)
class Change:
    """One change an operator makes to an upstream.

    ``down``, ``active_down``, ``fenced``: a bool; ``passive_down``: False, or until when in
    seconds since the epoch (0: until a probe passes); ``weight``: a number; ``add``: a mapping
    with ``url`` and optionally ``weight`` and ``fenced``; ``remove``: no value.
    """

    name: str
    operation: Operation
    value: Any = None


def merge(record: Record | None, change: Change, version: int) -> Record:
    """The record after ``change``; raises :class:`~asgi_leasttime.options.OptionError` for a
    change no upstream could take."""
    merged: Record = dict(record or {})
    merged["version"] = version
    operation, value = change.operation, change.value
    if operation in ("down", "active_down", "fenced"):
        _check_bool(operation, value)
        merged[operation] = value
    elif operation == "passive_down":
        if value is not False:
            _check_number("passive_down", value)
            if not (value >= 0 and math.isfinite(value)):
                raise OptionError("passive_down", "must be false or a time")
        merged["passive_down"] = value is not False
        merged["passive_until"] = 0 if value is False else value
    elif operation == "weight":
        _check_number("weight", value)
        if not (value > 0 and math.isfinite(value)):
            raise OptionError("weight", "must be a positive number")
        merged["weight"] = value
    elif operation == "add":
        if not isinstance(value, dict) or not isinstance(value.get("url"), str):
            raise OptionError("url", "an added upstream needs a url")
        if "weight" in value:
            _check_number("weight", value["weight"])
        if "fenced" in value:
            _check_bool("fenced", value["fenced"])
        given = {key: value[key] for key in ("weight", "fenced") if key in value}
        upstream = Upstream(value["url"], name=change.name, **given)  # its defaults, its checks
        merged.update(url=value["url"], removed=False, weight=upstream.weight,
                      fenced=upstream.fenced, down=False)  # fmt: skip
    elif operation == "remove":
        merged["removed"] = True
    else:
        raise OptionError("operation", f"unknown: {operation!r}")
    return merged


def _check_bool(option: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise OptionError(option, "must be true or false")


def _check_number(option: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OptionError(option, "must be a number")


def valid_record(record: Any) -> bool:
    """Whether ``record`` (from a store, so from anyone) has the shape of a :data:`Record`."""
    if not isinstance(record, dict):
        return False
    version = record.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        return False
    for key, value in record.items():
        if key == "version":
            continue
        types = _FIELDS.get(key)
        if types is None or isinstance(value, bool) != (bool in types):
            return False
        if not isinstance(value, types):
            return False
    weight, until = record.get("weight"), record.get("passive_until", 0)
    return (weight is None or (weight > 0 and math.isfinite(weight))) and (
        until >= 0 and math.isfinite(until)
    )


class StateStore:
    """What a store does; :class:`InProcessState` and ``RedisState`` are the two there are.

    The proxy binds itself at construction, runs :meth:`running` for its lifespan, calls
    :meth:`share` after each change made through its own methods (already applied here), and the
    admin API calls :meth:`submit`. A store calls :meth:`apply` with every record it learns of.
    """

    def __init__(self) -> None:
        self.proxy: LeastTimeProxy | None = None
        self.versions: dict[str, int] = {}  # the newest version applied, per upstream

    def bind(self, proxy: LeastTimeProxy) -> None:
        """The proxy whose upstreams this store keeps."""
        self.proxy = proxy

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """For the proxy's lifespan: keep in step with the others, if there are any."""
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
        if self.proxy is None:
            return
        server = self.proxy.balancer.get(name)
        was = server is not None and "active" in server.down_flags
        self.proxy._probed(name, healthy, reason)
        if server is not None and was == healthy:  # the flag changed
            self.share(Change(name, "active_down", not healthy))

    async def submit(self, change: Change) -> None:
        """Make ``change`` everywhere, this process included before this returns; raises
        :class:`~asgi_leasttime.options.OptionError` for a change no upstream could take."""
        record = merge(None, change, 1)  # refuses what no upstream could take
        assert self.proxy is not None
        self.proxy._apply_record(change.name, record)

    def apply(self, name: str, record: Record) -> bool:
        """Apply a record from the store unless a newer one was; whether it was. A record no
        upstream could take is logged and ignored."""
        if self.proxy is None or self.versions.get(name, 0) >= record["version"]:
            return False
        self.versions[name] = record["version"]
        try:
            self.proxy._apply_record(name, record)
        except (ValueError, KeyError) as exc:  # OptionError, UnknownServer among them
            logger.warning("ignored a change to upstream %r from the store: %s", name, exc)
            return False
        return True


class InProcessState(StateStore):
    """The state of one process: changes apply here, nothing is shared (the default)."""
