"""UpstreamSet: the one owner of a proxy's upstreams and of everything kept for each of them.

Shaped like httpcore's pool, which owns its list of connections and recomputes from it on every
exit path: one :class:`Member` per upstream holds the upstream, its balancer server, how requests
reach it (its opener), the id its sticky cookies carry, and what the proxy hangs on it (its health
watcher, a nested proxy's link). One :meth:`UpstreamSet.add`, one :meth:`UpstreamSet.remove`,
and one :meth:`UpstreamSet.apply` for every :class:`~asgi_leasttime.state.Change` whatever made
it (the proxy's ``set_*`` methods, the admin API, a record from the store): validated whole
before anything moves, then applied whole. What lives outside (the passive check's counts, the
clients' pools, the health watchers) follows the set's ``added`` and ``removed`` listeners, so
removing an upstream leaves nothing behind.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from types import MappingProxyType
from typing import Any

from asgi_leasttime.balancer import Balancer, Server, UnknownServer
from asgi_leasttime.health import PassiveCheck, report_status
from asgi_leasttime.state import Change
from asgi_leasttime.status import UpstreamStatus
from asgi_leasttime.sticky import server_id
from asgi_leasttime.upstream import Upstream

__all__ = ["Member", "MemberListener", "UpstreamSet"]


class Member:
    """One upstream of a proxy, and everything the proxy keeps for it."""

    __slots__ = (
        "child_link",
        "manual_down",
        "opener",
        "origin",
        "server",
        "since",
        "sticky_id",
        "upstream",
        "watcher",
    )

    def __init__(
        self, upstream: Upstream, server: Server | None, opener: Any, origin: str = "config"
    ) -> None:
        self.upstream = upstream
        self.origin = origin
        """Where it came from: ``config``, ``api`` or ``dns`` (see :class:`UpstreamStatus`)."""
        self.since = time.time()
        self.server = server
        """The balancer's server; ``None`` while a weight of 0 leaves the upstream out."""
        self.opener = opener
        """How requests reach an upstream with a URL (the proxy's, made once when added)."""
        self.sticky_id = server_id(upstream.name)
        self.manual_down = False  # kept here too: a server left out (weight 0) has no flags
        self.watcher: Any = None  # the active check's cancel scope, while it runs
        self.child_link: Any = None  # a nested proxy's status updater

    @property
    def name(self) -> str:
        """The upstream's name."""
        return self.upstream.name

    def __repr__(self) -> str:
        return f"<Member {self.name!r} server={self.server!r}>"


MemberListener = Callable[[Member], None]


class UpstreamSet:
    """The upstreams of one proxy, by name, with their balancer servers.

    Arguments:
        name: the proxy's name (the state store's key for processes sharing a state).
        balancer: the balancer whose servers follow the members; it must start empty.
        make_opener: how requests will reach an upstream with a URL, made when it is added.
    """

    def __init__(
        self, name: str, balancer: Balancer, make_opener: Callable[[Upstream], Any]
    ) -> None:
        self.name = name
        self.balancer = balancer
        self._make_opener = make_opener
        self._members: dict[str, Member] = {}
        self.by_name: Mapping[str, Member] = MappingProxyType(self._members)
        """Members by name, read-only (the request path looks them up here)."""
        self.by_sticky_id: dict[str, Member] = {}
        """Members by the id their sticky cookies carry."""
        self.in_process: set[str] = set()
        """The names of the in-process upstreams (ASGI apps, no URL)."""
        self.passive: PassiveCheck | None = None
        self.added: list[MemberListener] = []
        self.removed: list[MemberListener] = []
        self.fenced: list[MemberListener] = []
        """Told when an upstream is fenced (it drains: no new picks)."""

    # -- reading ----------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> Member:
        try:
            return self._members[name]
        except KeyError:
            raise UnknownServer(name) from None

    def get(self, name: str) -> Member | None:
        """The member of that name, or ``None``."""
        return self._members.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def __iter__(self) -> Iterator[Member]:
        return iter(tuple(self._members.values()))

    def __len__(self) -> int:
        return len(self._members)

    def upstreams(self) -> dict[str, Upstream]:
        """Every upstream by name, in the order they were added (a copy)."""
        return {name: member.upstream for name, member in self._members.items()}

    def statuses(self) -> list[UpstreamStatus]:
        """Every upstream in the picks, with its status and statistics, in the order added."""
        now = self.balancer.clock()
        return [
            UpstreamStatus.of(member.upstream, member.server, now, member.origin, member.since)
            for member in self._members.values()
            if member.server is not None
        ]

    def down_flags(self, name: str) -> Collection[str]:
        """Which sources say the upstream is down (none for one not held or left out)."""
        member = self._members.get(name)
        if member is None or member.server is None:
            return ()
        return member.server.down_flags.keys()

    # -- membership -------------------------------------------------------------------------------

    def add(self, upstream: Upstream, origin: str = "config") -> Member:
        """Add an upstream, up and cold (left out of the picks with a weight of 0); ``origin``
        says where it came from (``config``, ``api`` or ``dns``)."""
        name = upstream.name
        if name in self._members:
            raise ValueError(f"an upstream named {name!r} is already in this proxy")
        upstream = copy.copy(upstream)  # the caller's stays as given: its weight may change here
        opener = self._make_opener(upstream) if upstream.url is not None else None
        server = None
        if upstream.weight > 0:
            server = self.balancer.add(name, weight=upstream.weight, fenced=upstream.fenced)
        member = self._members[name] = Member(upstream, server, opener, origin)
        self.by_sticky_id[member.sticky_id] = member
        if upstream.app is not None:
            self.in_process.add(name)
        for listener in tuple(self.added):
            listener(member)
        return member

    def remove(self, name: str) -> Member:
        """Remove an upstream and everything kept for it; its requests in flight finish on the
        server they hold."""
        member = self._members.pop(name, None)
        if member is None:
            raise UnknownServer(name)
        self.by_sticky_id.pop(member.sticky_id, None)
        self.in_process.discard(name)
        if member.server is not None:
            self.balancer.remove(name)
            member.server = None
        if self.passive is not None:
            self.passive.forget(name)
        for listener in tuple(self.removed):
            listener(member)
        return member

    # -- the one funnel ---------------------------------------------------------------------------

    def apply(self, change: Change) -> None:
        """Apply a validated change whole: an add (it carries a URL), a removal, or any of
        weight, fenced, down, and the health checks' shared flags. Raises
        :class:`~asgi_leasttime.balancer.UnknownServer` (a ``KeyError``) for an upstream not
        held, before anything moves."""
        fields, name = change.fields, change.name
        member = self._members.get(name)
        if fields.get("removed"):
            self.remove(name)
            return
        if change.adds:
            url = fields["url"]
            if member is not None and str(member.upstream.url) != url:
                self.remove(name)  # the same name for another server: a new upstream
                member = None
            if member is None:
                weight, fenced = fields.get("weight", 1), fields.get("fenced", False)
                upstream = Upstream(url, name=name, weight=weight, fenced=fenced)
                member = self.add(upstream, origin="api")
        elif member is None:
            raise UnknownServer(name)
        if "weight" in fields:
            self._set_weight(member, fields["weight"])
        if "fenced" in fields:
            member.upstream.fenced = fields["fenced"]
            if member.server is not None:
                self.balancer.set_fenced(name, fields["fenced"])
            if fields["fenced"]:
                for listener in tuple(self.fenced):
                    listener(member)
        if "down" in fields:
            member.manual_down = fields["down"]
            if member.server is not None:
                self.balancer.set_status(name, not fields["down"], "manual")
        server = member.server
        if server is None:
            return
        active_down = fields.get("active_down")
        if active_down is not None and active_down != ("active" in server.down_flags):
            self.probed(name, not active_down, "the active check of another process")
        passive_down, passive = fields.get("passive_down"), self.passive
        held = "passive" in server.down_flags
        if passive is not None and passive_down is not None and passive_down != held:
            passive.heard(name, passive_down and fields.get("passive_until", 0))

    def _set_weight(self, member: Member, weight: float) -> None:
        member.upstream.weight = weight
        name, server = member.name, member.server
        if server is not None and weight > 0:
            self.balancer.set_weight(name, weight)
        elif server is not None:  # 0: out of the picks, as in Traefik; its sticky clients move
            self.balancer.remove(name)
            member.server = None
        elif weight > 0:  # back in, cold
            fenced = member.upstream.fenced
            member.server = self.balancer.add(name, weight=weight, fenced=fenced)
            if member.manual_down:
                self.balancer.set_status(name, False, "manual")

    def probed(self, name: str, healthy: bool, reason: str) -> None:
        """An active probe's result, here or from the process that probes for all."""
        if name not in self.balancer:
            return
        report_status(self.balancer, name, healthy, "active", reason)
        if healthy:
            # A passing probe also ends what the proxy's own requests concluded.
            report_status(self.balancer, name, True, "refused", reason)
            if self.passive is not None:
                self.passive.probe_passed(name, reason)
