"""How long a change takes to reach every process through the shared state.

    python benchmarks/state.py [--followers 8] [--changes 200] [--url redis://127.0.0.1:6379/0]

Starts a private Valkey server (or uses ``--url``), ``--followers`` processes that each run a proxy
on it, and one writer that makes ``--changes`` changes (an upstream's weight, 20 ms apart) through
the state store, as the admin API does. Each follower notes when each change reached its
balancer; the script prints the delay from the write to each arrival: p50, p99 and the worst,
over every change and every follower. Processes on one machine share one clock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from asgi_leasttime import LeastTimeProxy, Upstream  # noqa: E402
from asgi_leasttime._private_store import private_store  # noqa: E402
from asgi_leasttime.redis_state import RedisState  # noqa: E402
from asgi_leasttime.state import Change  # noqa: E402


def proxy_on(url: str) -> LeastTimeProxy:
    return LeastTimeProxy(
        upstreams=[Upstream("http://127.0.0.1:9", name="a")], state=RedisState(url), freeze_gc=False
    )


async def until_connected(proxy: LeastTimeProxy) -> None:
    while not proxy.state.connected:  # type: ignore[attr-defined]  # noqa: ASYNC110
        await asyncio.sleep(0.01)


async def follow(url: str, changes: int) -> None:
    """A follower: note when each weight arrives, print them as JSON."""
    proxy = proxy_on(url)
    arrived: dict[int, float] = {}
    apply = proxy.members.apply

    def noting(change: Change) -> None:
        apply(change)
        weight = change.fields.get("weight")
        if isinstance(weight, int):
            arrived.setdefault(weight, time.time())

    proxy.members.apply = noting  # type: ignore[method-assign]
    async with proxy.lifespan():
        await until_connected(proxy)
        print("ready", flush=True)
        deadline = time.monotonic() + 60
        while len(arrived) < changes and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    print(json.dumps(arrived), flush=True)


async def write(url: str, changes: int) -> dict[int, float]:
    proxy = proxy_on(url)
    written: dict[int, float] = {}
    async with proxy.lifespan():
        await until_connected(proxy)
        for weight in range(2, changes + 2):
            written[weight] = time.time()
            await proxy.state.submit(Change("a", "weight", weight))
            await asyncio.sleep(0.02)
    return written


def run(url: str, followers: int, changes: int) -> None:
    command = [sys.executable, __file__, "--follow", url, "--changes", str(changes)]
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(followers)
    ]
    for process in processes:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
    written = asyncio.run(write(url, changes))
    delays: list[float] = []
    missing = 0
    for process in processes:
        out, _ = process.communicate(timeout=90)
        arrived = {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}
        for weight, at in written.items():
            if weight in arrived:
                delays.append((arrived[weight] - at) * 1000)
            else:
                missing += 1
    delays.sort()
    p50 = statistics.median(delays)
    p99 = delays[int(len(delays) * 0.99) - 1]
    where = url.split("://")[0]
    print(f"{followers} followers x {changes} changes on {where}://: p50 {p50:.2f} ms, "
          f"p99 {p99:.2f} ms, worst {delays[-1]:.2f} ms, missing {missing}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--followers", type=int, default=8)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--url", help="a Redis or Valkey server (default: a private one)")
    parser.add_argument("--follow", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.follow:
        asyncio.run(follow(args.follow, args.changes))
        return
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(private_store())
        run(url, args.followers, args.changes)


if __name__ == "__main__":
    main()
