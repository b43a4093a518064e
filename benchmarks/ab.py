"""Two or more source trees of asgi-leasttime, one against the other, in one run.

    git worktree add /tmp/before HEAD~1
    python benchmarks/ab.py /tmp/before . [--connections 1,64] [--seconds 5] [--rounds 2]
    python benchmarks/ab.py . --http httptools,h11    # uvicorn's two HTTP parsers in front

Each tree's proxy (``benchmarks.apps:ours`` by default, imported from that tree) runs under one
uvicorn worker in front of the same three nginx upstreams; the trees take turns, round after
round, each round starting with the next. Prints the medians of requests per second, p50 and
p99, and the proxy's CPU time per request (user + system, from /proc): on a shared machine that
last figure moves less than the others. Needs nginx and wrk.
"""

from __future__ import annotations

import argparse
import contextlib
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", type=Path, help="source trees (with asgi_leasttime/)")
    parser.add_argument("--connections", default="1,64")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--factory", default="benchmarks.apps:ours")
    parser.add_argument(
        "--http", default="auto", help="uvicorn's --http, or several: h11,httptools"
    )
    args = parser.parse_args()
    require("nginx", "wrk")
    parsers = args.http.split(",")
    trees = [
        (tree.resolve(), http) for tree in args.trees for http in parsers
    ]  # each tree behind each parser
    connections = [int(c) for c in args.connections.split(",")]
    # ((tree, parser), connections) -> per round: (rps, p50 ms, p99 ms, CPU us per request)
    figures: dict[tuple[tuple[Path, str], int], list[tuple[float, float, float, float]]] = (
        defaultdict(list)
    )
    with contextlib.ExitStack() as stack:
        upstreams = [f"http://127.0.0.1:{port}" for port in start_upstreams(stack)]
        for round_number in range(1, args.rounds + 1):
            print(f"round {round_number}/{args.rounds}", flush=True)
            # Each round starts with the next configuration: whichever runs first in a round
            # measured up to 12 % faster at 64 connections here, whatever the tree.
            shift = (round_number - 1) % len(trees)
            for tree in trees[shift:] + trees[:shift]:
                port = free_port()
                root, http = tree
                with uvicorn_app(args.factory, upstreams, port, root=root, http=http) as pid:
                    url = f"http://127.0.0.1:{port}/"
                    wrk(url, 8, 1.0)  # warm up
                    for c in connections:
                        before = cpu_seconds(pid)
                        result = wrk(url, c, args.seconds)
                        used = cpu_seconds(pid) - before
                        per_request = used / (result.rps * args.seconds) * 1e6
                        figures[tree, c].append(
                            (result.rps, result.p50_ms, result.p99_ms, per_request)
                        )
    print("\n| tree | connections | RPS | p50 ms | p99 ms | CPU us per request |")
    print("|---|---|---|---|---|---|")
    for c in connections:
        for tree in trees:
            rounds = figures[tree, c]
            rps, p50, p99, cpu = (statistics.median(r[i] for r in rounds) for i in range(4))
            label = f"{tree[0]} ({tree[1]})" if len(parsers) > 1 else str(tree[0])
            print(f"| {label} | {c} | {rps:,.0f} | {p50:.3f} | {p99:.2f} | {cpu:.0f} |")


if __name__ == "__main__":
    main()
