"""Traefik's least-time load balancer for ASGI applications."""

from asgi_leasttime.balancer import Balancer, Lease, Mode, NoAvailableServer, Server, UnknownServer
from asgi_leasttime.discovery import DnsResolver
from asgi_leasttime.health import HealthCheck, PassiveHealthCheck
from asgi_leasttime.middleware import LeastTimeMiddleware
from asgi_leasttime.proxy import LeastTimeProxy
from asgi_leasttime.status import UpstreamStatus
from asgi_leasttime.sticky import StickyCookie
from asgi_leasttime.upstream import Upstream

__version__ = "0.1.0"

__all__ = [
    "Balancer",
    "DnsResolver",
    "HealthCheck",
    "Lease",
    "LeastTimeMiddleware",
    "LeastTimeProxy",
    "Mode",
    "NoAvailableServer",
    "PassiveHealthCheck",
    "Server",
    "StickyCookie",
    "UnknownServer",
    "Upstream",
    "UpstreamStatus",
    "__version__",
]
