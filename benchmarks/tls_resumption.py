"""What resuming TLS sessions saves: a new upstream connection for every request, to one nginx
TLS upstream, with sessions resumed (the lean client's way) and with every handshake made
afresh, in alternation.

    python benchmarks/tls_resumption.py [--requests 500] [--rounds 3]

In-process, the lean client alone (keep-alive off, so each request connects); the proxy's CPU
time and the wall time per request, medians of the rounds. "Afresh" is the same client with
its sessions never kept. Needs nginx.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import uvloop
from harness import machine, require
from https import tls_upstreams

from asgi_leasttime._lean import LeanClient, _ResumingContext
from asgi_leasttime.tls import UpstreamTLS


@contextlib.contextmanager
def sessions_never_kept() -> Iterator[None]:
    real = _ResumingContext.keep
    _ResumingContext.keep = lambda self, ssl_object: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        _ResumingContext.keep = real  # type: ignore[method-assign]


async def requests(port: int, ca_file: str, count: int) -> tuple[float, float, int]:
    """CPU and wall microseconds a request, and how many connections resumed a session."""
    client = LeanClient(
        timeout=httpx.Timeout(10),
        limits=httpx.Limits(max_keepalive_connections=0),
        tls=UpstreamTLS(root_cas=[ca_file]),
    )
    headers = [(b"host", b"127.0.0.1")]
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(count):
        response = await client.send("GET", "127.0.0.1", port, b"/", headers, None, https=True)
        while (await response.next_chunk())[1]:
            pass
        await response.aclose()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    (pool,) = client._pools.values()
    await client.aclose()
    return cpu / count * 1e6, wall / count * 1e6, pool.resumed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    require("nginx")
    figures: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-tls-")))
        (port,) = tls_upstreams(stack, folder, count=1)
        ca_file = str(folder / "ca.pem")
        for _ in range(args.rounds):
            figures["resumed"].append(uvloop.run(requests(port, ca_file, args.requests)))
            with sessions_never_kept():
                figures["afresh"].append(uvloop.run(requests(port, ca_file, args.requests)))
    print(f"\n{machine()}; {args.requests} requests a round, median of {args.rounds} rounds.\n")
    print("| handshakes | CPU us a request | wall us a request | connections resumed |")
    print("|---|---|---|---|")
    for name, rows in figures.items():
        cpu = statistics.median(row[0] for row in rows)
        wall = statistics.median(row[1] for row in rows)
        resumed = statistics.median(row[2] for row in rows)
        print(f"| {name} | {cpu:,.0f} | {wall:,.0f} | {resumed:,.0f} of {args.requests} |")


if __name__ == "__main__":
    main()
