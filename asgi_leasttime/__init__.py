"""Traefik's least-time load balancer for ASGI applications."""

from asgi_leasttime.balancer import Balancer, Mode, NoAvailableServer, Server, UnknownServer

__version__ = "0.1.0"

__all__ = [
    "Balancer",
    "Mode",
    "NoAvailableServer",
    "Server",
    "UnknownServer",
    "__version__",
]
