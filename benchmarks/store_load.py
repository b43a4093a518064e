"""What the shared state asks of its server as the number of processes grows.

    python benchmarks/store_load.py [--processes 8,100,1000] [--seconds 5] [--report-every 1.0]

Simulates N processes against a private valkey-server (or ``--url``): each writes its figures for
ten upstreams every ``--report-every`` seconds, exactly as RedisState does (DEL, HSET, PEXPIRE in
one transaction), and one admin scrape a second gathers them all (SCAN, then one HGETALL per
process). Prints the commands the server ran per second (from its INFO counters), its CPU time per
second, and how many of the simulated reports were late. One asyncio process drives all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis.asyncio  # noqa: E402

from asgi_leasttime._private_store import private_store  # noqa: E402

UPSTREAMS = 10


async def one_process(client: redis.asyncio.Redis, number: int, every: float, until: float) -> int:
    """Report like a process would; returns how many reports came later than their period."""
    key = f"asgi-leasttime:bench:load:process-{number}"
    figures = {
        f"upstream-{u}": json.dumps(
            {"inflight": 3, "requests": 1000 + u, "failures": 2, "average_ttfb": 0.004}
        )
        for u in range(UPSTREAMS)
    }
    late = 0
    await asyncio.sleep(every * (number % 97) / 97)  # processes do not start in step
    while time.monotonic() < until:
        started = time.monotonic()
        async with client.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping=figures)  # type: ignore[arg-type]
            pipe.pexpire(key, int(3 * every * 1000))
            await pipe.execute()
        spent = time.monotonic() - started
        late += spent > every
        await asyncio.sleep(max(every - spent, 0))
    return late


async def scrape(client: redis.asyncio.Redis, until: float) -> None:
    while time.monotonic() < until:
        async for key in client.scan_iter(match="asgi-leasttime:bench:load:*", count=1000):
            await client.hgetall(key)
        await asyncio.sleep(1.0)


async def measure(url: str, processes: int, seconds: float, every: float) -> str:
    pool = redis.asyncio.BlockingConnectionPool.from_url(url, max_connections=64, timeout=30)
    client = redis.asyncio.Redis(connection_pool=pool)
    info = await client.info()
    commands, cpu = info["total_commands_processed"], info["used_cpu_sys"] + info["used_cpu_user"]
    until = time.monotonic() + seconds
    started = time.monotonic()
    results = await asyncio.gather(
        *(one_process(client, n, every, until) for n in range(processes)), scrape(client, until)
    )
    elapsed = time.monotonic() - started
    info = await client.info()
    await client.flushdb()
    await client.aclose()
    ran = (info["total_commands_processed"] - commands) / elapsed
    busy = (info["used_cpu_sys"] + info["used_cpu_user"] - cpu) / elapsed
    late = sum(r for r in results if isinstance(r, int))
    return f"| {processes} | {ran:,.0f} | {ran / processes:,.1f} | {busy * 100:.1f} % | {late} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="8,100,1000")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--report-every", type=float, default=1.0)
    parser.add_argument("--url", help="a Redis or Valkey server (default: a private one)")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(private_store())
        print("| processes | server commands / s | per process / s | server CPU | late reports |")
        print("|---|---|---|---|---|")
        for count in (int(n) for n in args.processes.split(",")):
            print(asyncio.run(measure(url, count, args.seconds, args.report_every)), flush=True)


if __name__ == "__main__":
    main()
