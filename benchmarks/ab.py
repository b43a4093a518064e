"""Two or more source trees of asgi-leasttime, one against the other, in one run.

    git worktree add /tmp/before HEAD~1
    python benchmarks/ab.py /tmp/before . [--connections 1,64] [--seconds 5] [--rounds 2]
    python benchmarks/ab.py . --http httptools,h11    # uvicorn's two HTTP parsers in front
    python benchmarks/ab.py . --factory benchmarks.apps:ours,benchmarks.apps:ours_with_state

Each tree's proxy (``benchmarks.apps:ours`` by default, imported from that tree) runs under one
uvicorn worker in front of the same three nginx upstreams; the trees take turns, round after
round, each round starting with the next. Prints the medians of requests per second, p50 and
p99, and the proxy's CPU time per request (user + system, from /proc): on a shared machine that
last figure moves less than the others. Needs nginx and wrk.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
from collections import defaultdict
from pathlib import Path

from harness import (
    cpu_seconds,
    free_port,
    require,
    start_upstreams,
    uvicorn_app,
    wrk,
)

Setup = tuple[Path, str, str]  # source tree, uvicorn's parser, app factory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", type=Path, help="source trees (with asgi_leasttime/)")
    parser.add_argument("--connections", default="1,64")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--factory", default="benchmarks.apps:ours", help="an app factory, or several: a,b"
    )
    parser.add_argument(
        "--http", default="auto", help="uvicorn's --http, or several: h11,httptools"
    )
    args = parser.parse_args()
    require("nginx", "wrk")
    parsers, factories = args.http.split(","), args.factory.split(",")
    # Each tree behind each parser with each factory.
    setups = list(itertools.product([t.resolve() for t in args.trees], parsers, factories))
    connections = [int(c) for c in args.connections.split(",")]
    # (setup, connections) -> per round: (rps, p50 ms, p99 ms, CPU us per request)
    figures: dict[tuple[Setup, int], list[tuple[float, float, float, float]]] = defaultdict(list)
    with contextlib.ExitStack() as stack:
        upstreams = [f"http://127.0.0.1:{port}" for port in start_upstreams(stack)]
        extra_env = {}
        if any("state" in factory for factory in factories):
            from asgi_leasttime._private_store import private_store

            extra_env["BENCH_STATE_URL"] = stack.enter_context(private_store())
        for round_number in range(1, args.rounds + 1):
            print(f"round {round_number}/{args.rounds}", flush=True)
            # Each round starts with the next setup: whichever runs first in a round measured
            # up to 12 % faster at 64 connections here, whatever the tree.
            shift = (round_number - 1) % len(setups)
            for setup in setups[shift:] + setups[:shift]:
                root, http, factory = setup
                port = free_port()
                with uvicorn_app(
                    factory, upstreams, port, extra_env=extra_env, root=root, http=http
                ) as pid:
                    url = f"http://127.0.0.1:{port}/"
                    wrk(url, 8, 1.0)  # warm up
                    for c in connections:
                        before = cpu_seconds(pid)
                        result = wrk(url, c, args.seconds)
                        used = cpu_seconds(pid) - before
                        per_request = used / (result.rps * args.seconds) * 1e6
                        figures[setup, c].append(
                            (result.rps, result.p50_ms, result.p99_ms, per_request)
                        )
    print("\n| setup | connections | RPS | p50 ms | p99 ms | CPU us per request |")
    print("|---|---|---|---|---|---|")
    for c in connections:
        for setup in setups:
            rounds = figures[setup, c]
            rps, p50, p99, cpu = (statistics.median(r[i] for r in rounds) for i in range(4))
            label = " ".join(
                [str(setup[0])]
                + ([setup[1]] if len(parsers) > 1 else [])
                + ([setup[2].rsplit(":", 1)[-1]] if len(factories) > 1 else [])
            )
            print(f"| {label} | {c} | {rps:,.0f} | {p50:.3f} | {p99:.2f} | {cpu:.0f} |")


if __name__ == "__main__":
    main()
