"""DNS discovery: one upstream per address a name resolves to, kept in step with the name.

Envoy's ``STRICT_DNS`` clusters and HAProxy's ``server-template`` with ``resolvers`` are the
models. An :class:`~asgi_leasttime.Upstream` given with ``resolve=True`` is a template, not a
server: every address its host resolves to (A and AAAA) becomes an upstream of its own, named
``host:port@address`` (``name@address`` when the template has a name), with its own statistics,
health checks and sticky id; the host stays the ``Host`` header and the TLS server name. The
name is resolved again every ``resolve_every`` seconds, sooner when the records' TTL says so
(never sooner than ``min_resolve_every``). An address that appears joins cold; one that
disappears is removed (no new picks, its sticky clients pick afresh, its requests in flight
finish). A failed lookup or an empty answer keeps the last addresses, logged once an outage.
Each process resolves for itself: nothing here is written to a shared state.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from asgi_leasttime._extras import need
from asgi_leasttime.options import OptionError, check_fields, check_positive
from asgi_leasttime.state import Change
from asgi_leasttime.upstream import Upstream
from asgi_leasttime.upstreams import Member, UpstreamSet

__all__ = ["Discovery", "DnsResolver", "LookupFailed"]

logger = logging.getLogger("asgi_leasttime.discovery")


class LookupFailed(Exception):
    """A name could not be resolved now (a timeout, SERVFAIL, no server answering)."""


@dataclass(frozen=True, kw_only=True)
class DnsResolver:
    """How the upstreams given with ``resolve=True`` are resolved.

    Arguments:
        nameservers: DNS servers to ask (``"10.0.0.10"``, ``"127.0.0.1:5353"``, ``"[::1]:53"``),
            with dnspython (the ``dns`` extra), which gives the records' TTL. Empty: the
            system's resolver (``getaddrinfo``: ``/etc/hosts``, the search domains), which
            gives no TTL.
        resolve_every: seconds between two lookups of a name (Envoy's ``dns_refresh_rate``).
        min_resolve_every: the floor when a record's TTL asks for sooner (Envoy's
            ``dns_min_refresh_rate``), and the wait after a failed lookup.
        timeout: seconds a lookup may take.
    """

    nameservers: Sequence[str] = ()
    resolve_every: float = 5.0
    min_resolve_every: float = 1.0
    timeout: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.nameservers, str):
            raise OptionError("nameservers", f"must be a list, not {self.nameservers!r}")
        check_fields(self)
        for option in ("resolve_every", "min_resolve_every", "timeout"):
            check_positive(option, getattr(self, option))
        object.__setattr__(self, "nameservers", tuple(self.nameservers))
        for server in self.nameservers:
            _nameserver(server)

    def next_lookup(self, ttl: float | None) -> float:
        """Seconds until a name is looked up again, given its records' TTL."""
        every = self.resolve_every if ttl is None else min(self.resolve_every, ttl)
        return max(self.min_resolve_every, every)

    def lookup_function(self) -> Callable[[str, int], Any]:
        """``await lookup(host, port)`` -> ``(addresses, ttl or None)``; raises
        :class:`LookupFailed`."""
        if not self.nameservers:
            return self._system_lookup
        return _DnsPythonLookup(self)

    async def _system_lookup(self, host: str, port: int) -> tuple[list[str], float | None]:
        loop = asyncio.get_running_loop()
        try:
            with anyio.fail_after(self.timeout):
                found = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except TimeoutError:
            raise LookupFailed(f"no answer in {self.timeout} s") from None
        except socket.gaierror as exc:
            if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)):
                return [], None
            raise LookupFailed(str(exc)) from None
        except UnicodeError as exc:  # a name the IDNA codec refuses
            raise LookupFailed(str(exc)) from None
        return sorted({str(address[4][0]) for address in found}), None


def _nameserver(server: str) -> tuple[str, int]:
    """``"host"``, ``"host:port"`` or ``"[v6]:port"`` as (address, port); raises OptionError."""
    address, port = server, 53
    if server.startswith("["):
        address, _, rest = server[1:].partition("]")
        if rest:
            port = _port(server, rest.removeprefix(":"))
    elif server.count(":") == 1:
        address, given = server.split(":")
        port = _port(server, given)
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise OptionError("nameservers", f"{server!r} is not an IP address[:port]") from None
    return address, port


def _port(server: str, given: str) -> int:
    if not given.isdigit() or not 0 < int(given) < 65536:
        raise OptionError("nameservers", f"{server!r} has no valid port")
    return int(given)


class _DnsPythonLookup:
    """A and AAAA from the given servers, with dnspython's asyncio resolver."""

    def __init__(self, options: DnsResolver) -> None:
        need("dns.asyncresolver", "dns", "resolving upstreams with nameservers")
        import dns.asyncresolver

        self.timeout = options.timeout
        self.resolvers = []
        for server in options.nameservers:  # dnspython takes one port per resolver
            address, port = _nameserver(server)
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [address]
            resolver.port = port
            self.resolvers.append(resolver)

    async def __call__(self, host: str, port: int) -> tuple[list[str], float | None]:
        import dns.exception
        import dns.resolver

        failure: Exception | None = None
        for resolver in self.resolvers:
            addresses: set[str] = set()
            ttls: list[float] = []
            try:
                for kind in ("A", "AAAA"):
                    answer = await resolver.resolve(
                        host, kind, lifetime=self.timeout, raise_on_no_answer=False
                    )
                    if answer.rrset is not None:
                        addresses.update(record.address for record in answer.rrset)
                        ttls.append(float(answer.rrset.ttl))
            except dns.resolver.NXDOMAIN:
                return [], None
            except dns.exception.DNSException as exc:
                failure = exc  # the next server, if any
                continue
            return sorted(addresses), min(ttls, default=None)
        raise LookupFailed(f"{type(failure).__name__}: {failure}")


def clash(templates: Iterable[Upstream]) -> str | None:
    """Why these templates cannot be resolved side by side (two would name their upstreams
    alike), or ``None``."""
    seen: dict[str, str] = {}
    for template in templates:
        base = names_base(template)
        if base in seen:
            return (
                f"{template.name!r}: another upstream resolved by DNS ({seen[base]!r}) already "
                f"names its upstreams {base}@..."
            )
        seen[base] = template.name
    return None


def names_base(template: Upstream) -> str:
    """What the upstreams a template makes are named after: its name, or, when it has none
    of its own (the URL stands for it), its host and port."""
    if "://" in template.name:
        return f"{template.host}:{template.port}"
    return template.name


class _Group:
    """One template and the upstreams its name resolves to now."""

    def __init__(self, template: Upstream, leftovers: Sequence[str] = ()) -> None:
        self.template = template
        self.names: dict[str, str] = {}  # address -> the upstream made for it
        # The upstreams of the template this one replaced (another URL): they serve until this
        # one's first answer, so that a reload never leaves the name with none.
        self.leftovers = list(leftovers)
        self.due = 0.0  # when the name is looked up next (time.monotonic())
        self.failing = False  # an outage logged and not yet over

    @property
    def base(self) -> str:
        """What its upstreams' names start with (:func:`names_base`)."""
        return names_base(self.template)

    def name_for(self, address: str) -> str:
        shown = f"[{address}]" if ":" in address else address
        return f"{self.base}@{shown}"

    def upstream_for(self, address: str) -> Upstream:
        template = self.template
        return Upstream(
            str(template.url),
            name=self.name_for(address),
            weight=template.weight,
            fenced=template.fenced,
            address=address,
            load_reports=template.load_reports,
        )


class Discovery:
    """The DNS templates of one proxy and the loop that keeps their upstreams in step.

    Arguments:
        members: the proxy's upstreams, where the resolved ones are added and removed.
        options: how names are resolved.
    """

    def __init__(self, members: UpstreamSet, options: DnsResolver | None = None) -> None:
        self.members = members
        self.options = options if options is not None else DnsResolver()
        self._lookup = self.options.lookup_function()
        self.groups: dict[str, _Group] = {}
        """Templates by name, with what each resolves to."""
        self._changed = anyio.Event()
        members.removed.append(self._forget)

    def __bool__(self) -> bool:
        return bool(self.groups)

    def refusal(self, template: Upstream) -> str | None:
        """Why ``template`` cannot join (its name or its upstreams' names taken), or ``None``."""
        if template.name in self.groups or template.name in self.members:
            return f"an upstream named {template.name!r} is already in this proxy"
        return clash([*(group.template for group in self.groups.values()), template])

    def add(self, template: Upstream, leftovers: Sequence[str] = ()) -> None:
        """Resolve ``template``'s host from now on (at once, with the loop running)."""
        refusal = self.refusal(template)
        if refusal is not None:
            raise ValueError(refusal)
        self.groups[template.name] = _Group(template, leftovers)
        self._changed.set()

    def remove(self, name: str) -> None:
        """Stop resolving a template and remove the upstreams it made."""
        group = self.groups.pop(name)
        for member_name in [*group.names.values(), *group.leftovers]:
            if member_name in self.members:
                self.members.remove(member_name)
        group.names.clear()
        group.leftovers.clear()

    def update(self, template: Upstream) -> None:
        """A template changed: another URL starts afresh (its old upstreams serving until the
        new one's first answer); a weight or a fence passes to the upstreams it made."""
        group = self.groups[template.name]
        was = group.template
        if (str(was.url), was.load_reports) != (str(template.url), template.load_reports):
            old = self.groups.pop(template.name)
            leftovers = [*old.names.values(), *old.leftovers]
            old.names.clear()
            self.groups[template.name] = _Group(template, leftovers)
            self._changed.set()
            return
        group.template = template
        for name in group.names.values():
            if name in self.members:
                self.members.apply(Change(name, weight=template.weight, fenced=template.fenced))

    async def resolve_all(self) -> None:
        """Look every name up once, at once (the lifespan's start)."""
        for group in tuple(self.groups.values()):
            await self._resolve(group)

    async def run(self) -> None:
        """Look names up as they fall due, for the proxy's lifespan."""
        while True:
            now = time.monotonic()
            for group in tuple(self.groups.values()):
                if group.due <= now and group.template.name in self.groups:
                    await self._resolve(group)
            soonest = min((group.due for group in self.groups.values()), default=math.inf)
            self._changed = anyio.Event()
            with anyio.move_on_after(max(0.0, soonest - time.monotonic())):
                await self._changed.wait()

    def _forget(self, member: Member) -> None:
        """An upstream removed (by the API, say): if its address still resolves, it comes back
        at the next lookup."""
        for group in self.groups.values():
            for address, name in tuple(group.names.items()):
                if name == member.name:
                    del group.names[address]

    async def _resolve(self, group: _Group) -> None:
        template = group.template
        assert template.url is not None
        try:
            addresses, ttl = await self._lookup(template.host, template.port)
        except LookupFailed as exc:
            if self.groups.get(template.name) is group:
                self._keep(group, f"the lookup failed ({exc})")
            return
        if self.groups.get(template.name) is not group:
            return  # removed or replaced while the lookup was out
        if not addresses:
            self._keep(group, "the answer was empty")
            return
        if group.failing:
            group.failing = False
            logger.info("%s resolves again: %s", template.host, ", ".join(addresses))
        group.due = time.monotonic() + self.options.next_lookup(ttl)
        self._follow(group, addresses)

    def _keep(self, group: _Group, why: str) -> None:
        group.due = time.monotonic() + self.options.min_resolve_every
        if group.failing:
            return
        group.failing = True
        kept = ", ".join(group.names) or "none"
        logger.warning(
            "%s: %s; keeping its last addresses (%s) until it resolves",
            group.template.host,
            why,
            kept,
        )

    def _follow(self, group: _Group, addresses: list[str]) -> None:
        members = self.members
        leftovers, group.leftovers = group.leftovers, []
        for name in leftovers:  # the replaced template's: this one answers now
            if name in members:
                members.remove(name)
        for address in [a for a in group.names if a not in addresses]:
            name = group.names.pop(address)
            if name in members:
                members.remove(name)  # its requests in flight finish on the server they hold
                logger.info(
                    "upstream %r left: %s no longer resolves to it", name, group.template.host
                )
        for address in addresses:
            if address in group.names:
                continue
            upstream = group.upstream_for(address)
            if upstream.name in members:
                logger.warning("%r is taken by another upstream: address left out", upstream.name)
                continue
            members.add(upstream, origin="dns")
            group.names[address] = upstream.name
            logger.info("upstream %r joined: %s resolves to it", upstream.name, group.template.host)
