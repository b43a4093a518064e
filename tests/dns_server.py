"""A DNS server on 127.0.0.1 that the tests change while traffic flows (dnslib's server).

``records`` maps a name to its addresses; ``ttl`` is every answer's; ``failing`` makes every
answer a SERVFAIL, ``silent`` makes the server drop every question (a timeout).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ControlledDns(BaseResolver):  # type: ignore[misc]
    """Answers A and AAAA from ``records``; NXDOMAIN for a name it does not know."""

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.ttl = 1
        self.failing = False
        self.silent = False
        self.questions = 0

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord | None:
        self.questions += 1
        if self.silent:
            return None
        reply = request.reply()
        if self.failing:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        name = str(request.q.qname).rstrip(".")
        if name not in self.records:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        kind = QTYPE[request.q.qtype]
        for address in self.records[name]:
            version = ipaddress.ip_address(address).version
            if (kind, version) == ("A", 4):
                reply.add_answer(RR(name, QTYPE.A, rdata=A(address), ttl=self.ttl))
            elif (kind, version) == ("AAAA", 6):
                reply.add_answer(RR(name, QTYPE.AAAA, rdata=AAAA(address), ttl=self.ttl))
        return reply


@contextlib.contextmanager
def dns_server() -> Iterator[tuple[ControlledDns, str]]:
    """A running server; yields it and its ``127.0.0.1:port``."""
    resolver = ControlledDns()
    port = free_udp_port()
    quiet = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
    server = DNSServer(resolver, port=port, address="127.0.0.1", logger=quiet)
    server.start_thread()
    try:
        yield resolver, f"127.0.0.1:{port}"
    finally:
        server.stop()
