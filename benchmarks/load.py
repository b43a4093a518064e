"""Load: 20,000 requests at 256 concurrent connections through the proxy, one upstream slow.

    python benchmarks/load.py [--requests 20000] [--connections 256]

Three upstreams under uvicorn (two answering at once, one after 50 ms) and asgi-leasttime under
one uvicorn worker, each a process of its own; an aiohttp client keeps ``--connections`` requests
in flight. Prints errors (the goal: 0), latency percentiles, each upstream's share, and the proxy's
RSS after a warm-up and after the run (the goal: within 10 %).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from harness import free_port, machine, uvicorn_app


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def drive(url: str, requests: int, connections: int) -> tuple[list[float], Counter[str], int]:
    import aiohttp

    latencies: list[float] = []
    served: Counter[str] = Counter()
    errors = 0
    remaining = requests
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            nonlocal remaining, errors
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                try:
                    async with session.get(url) as response:
                        await response.read()
                        if response.status != 200:
                            errors += 1
                        served[response.headers.get("x-upstream", "?")] += 1
                except (TimeoutError, aiohttp.ClientError):
                    errors += 1
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(connections)))
    return latencies, served, errors


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--connections", type=int, default=256)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        upstreams = []
        for name, delay in (("fast-1", "0"), ("fast-2", "0"), ("slow", "0.05")):
            port = free_port()
            env = {"BENCH_DELAY": delay, "BENCH_NAME": name}
            stack.enter_context(uvicorn_app("benchmarks.apps:upstream", [], port, env))
            upstreams.append(f"http://127.0.0.1:{port}")
        proxy_port = free_port()
        pid = stack.enter_context(uvicorn_app("benchmarks.apps:ours", upstreams, proxy_port))
        url = f"http://127.0.0.1:{proxy_port}/"
        asyncio.run(drive(url, 2_000, args.connections))  # warm-up
        rss_before = rss_mib(pid)
        started = time.perf_counter()
        latencies, served, errors = asyncio.run(drive(url, args.requests, args.connections))
        elapsed = time.perf_counter() - started
        rss_after = rss_mib(pid)
    print(f"{machine()}")
    print(
        f"{args.requests:,} requests at {args.connections} connections in {elapsed:.1f} s "
        f"({args.requests / elapsed:,.0f}/s), errors: {errors}"
    )
    print(
        f"latency ms: p50 {percentile(latencies, 50) * 1000:.1f}, "
        f"p99 {percentile(latencies, 99) * 1000:.1f}, max {max(latencies) * 1000:.1f}, "
        f"mean {statistics.mean(latencies) * 1000:.1f}"
    )
    print(f"share: {', '.join(f'{k} {v / args.requests:.1%}' for k, v in sorted(served.items()))}")
    change = (rss_after - rss_before) / rss_before
    print(
        f"proxy RSS: {rss_before:.1f} MiB after warm-up, {rss_after:.1f} MiB after ({change:+.1%})"
    )
    sys.exit(1 if errors or abs(change) > 0.10 else 0)


if __name__ == "__main__":
    main()
