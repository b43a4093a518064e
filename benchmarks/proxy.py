"""Requests per second through each proxy, against three nginx upstreams, in one run.

    python benchmarks/proxy.py [--seconds 10] [--rounds 3] [--only ours,asgiproxy] [--workers N]

Needs nginx and wrk (Debian: nginx-light, wrk) and the peers in benchmarks/requirements.txt.
Everything runs on 127.0.0.1 and shares this machine's cores: read the ratios, which are measured
in the same run, rather than the absolute figures. Targets are measured in alternation, round
after round, and each figure is the median of the rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
from collections import defaultdict

from harness import (
    WrkResult,
    free_port,
    machine,
    median_result,
    nginx,
    peak_rss_mib,
    require,
    selected,
    start_upstreams,
    uvicorn_app,
    wait_for_port,
    worker_pids,
    wrk,
)

PYTHON_PROXIES = {
    "uvicorn answering itself (no proxy)": "benchmarks.apps:answer_ok",
    "asgi-leasttime": "benchmarks.apps:ours",
    "asgi-leasttime on httpx": "benchmarks.apps:ours_on_httpx",
    "asgi-leasttime on httpx-aiohttp (candidate)": "benchmarks.apps:ours_on_httpx_aiohttp",
    "asgiproxy 0.2 (aiohttp)": "benchmarks.apps:asgiproxy_app",
    "fastapi-proxy-lib 0.3 (httpx)": "benchmarks.apps:fastapi_proxy_lib_app",
    "minimal raw-ASGI proxy on aiohttp": "benchmarks.apps:minimal_aiohttp",
    "minimal raw-ASGI proxy on httpx": "benchmarks.apps:minimal_httpx",
    "minimal raw-ASGI proxy on our lean client": "benchmarks.apps:minimal_lean",
    "asgi-leasttime with shared state": "benchmarks.apps:ours_with_state",
}
CONNECTIONS = (1, 8, 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", help="comma-separated names of Python proxies to run")
    parser.add_argument(
        "--workers", type=int, default=1, help="uvicorn workers, and nginx worker_processes"
    )
    args = parser.parse_args()
    require("nginx", "wrk")
    proxies = {name: PYTHON_PROXIES[name] for name in selected(PYTHON_PROXIES, args.only)}

    results: dict[str, dict[int, list[WrkResult]]] = defaultdict(lambda: defaultdict(list))
    memory: dict[str, list[float]] = defaultdict(list)  # peak RSS of each worker, MiB
    with contextlib.ExitStack() as stack:
        env = {}
        if "asgi-leasttime with shared state" in proxies:  # a private valkey, as serve starts one
            from asgi_leasttime._private_store import private_store

            env["BENCH_STATE_URL"] = stack.enter_context(private_store())
        ports = start_upstreams(stack)
        upstreams = [f"http://127.0.0.1:{port}" for port in ports]
        nginx_port = free_port()
        balancer = (
            "upstream pool { least_conn; "
            + " ".join(f"server 127.0.0.1:{p};" for p in ports)
            + " keepalive 128; }"
            f" server {{ listen 127.0.0.1:{nginx_port}; location / {{ proxy_pass http://pool;"
            ' proxy_http_version 1.1; proxy_set_header Connection ""; } }'
        )
        stack.enter_context(nginx(balancer, workers=args.workers))
        wait_for_port(nginx_port)
        fixed = {
            "direct to one upstream": upstreams[0],
            "nginx least_conn": f"http://127.0.0.1:{nginx_port}",
        }
        for round_number in range(1, args.rounds + 1):
            print(f"round {round_number}/{args.rounds}", flush=True)
            for name, url in fixed.items():
                for connections in CONNECTIONS:
                    results[name][connections].append(wrk(url + "/", connections, args.seconds))
            for name, factory in proxies.items():
                port = free_port()
                with uvicorn_app(factory, upstreams, port, env, workers=args.workers) as pid:
                    url = f"http://127.0.0.1:{port}/"
                    wrk(url, 8, 1.0)  # warm up: connections, imports, caches
                    for connections in CONNECTIONS:
                        results[name][connections].append(wrk(url, connections, args.seconds))
                    memory[name] += [peak_rss_mib(worker) for worker in worker_pids(pid)]
                print(f"  {name}: done", flush=True)
    report(results, args, memory)


def report(
    results: dict[str, dict[int, list[WrkResult]]],
    args: argparse.Namespace,
    memory: dict[str, list[float]],
) -> None:
    medians = {
        name: {c: median_result(r) for c, r in by_c.items()} for name, by_c in results.items()
    }
    today = datetime.date.today().isoformat()
    print(f"\n## Requests per second, {today}\n")
    print(
        f"{machine()}; wrk {args.seconds:g} s per figure, median of {args.rounds} rounds;"
        f" {args.workers} uvicorn worker(s) per Python proxy, nginx worker_processes"
        f" {args.workers}.\n"
    )
    print("| target | c1 | c8 | c64 | c64 p50 / p99 ms | c1 p50 ms | errors | RSS/worker MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, by_c in medians.items():
        c1, c8, c64 = (by_c[c] for c in CONNECTIONS)
        errors = sum(r.errors for r in by_c.values())
        rss = f"{max(memory[name]):.0f}" if memory.get(name) else ""
        print(
            f"| {name} | {c1.rps:,.0f} | {c8.rps:,.0f} | {c64.rps:,.0f} "
            f"| {c64.p50_ms:.2f} / {c64.p99_ms:.2f} | {c1.p50_ms:.3f} | {errors} | {rss} |"
        )
    ours = medians.get("asgi-leasttime")
    if ours is None:
        return
    print()
    for peer in (
        "asgiproxy 0.2 (aiohttp)",
        "minimal raw-ASGI proxy on aiohttp",
        "minimal raw-ASGI proxy on httpx",
    ):
        if peer in medians:
            for c in (8, 64):
                print(f"- ours / {peer} at c{c}: {ours[c].rps / medians[peer][c].rps:.2f}x")
    if "asgiproxy 0.2 (aiohttp)" in medians:
        theirs = medians["asgiproxy 0.2 (aiohttp)"][64].p99_ms
        print(f"- p99 at c64: ours {ours[64].p99_ms:.1f} ms, asgiproxy {theirs:.1f} ms")
    nginx_c64 = medians["nginx least_conn"][64].rps
    share = ours[64].rps / nginx_c64
    print(f"- ours / nginx least_conn at c64: {share:.3f} (1/{1 / share:.1f})")
    direct = medians["direct to one upstream"][1].p50_ms
    print(f"- latency added over direct at c1 (p50): ours {ours[1].p50_ms - direct:.3f} ms")
    for floor in (
        "uvicorn answering itself (no proxy)",
        "minimal raw-ASGI proxy on our lean client",
    ):
        if floor in medians:
            print(f"  - {floor}: {medians[floor][1].p50_ms - direct:.3f} ms")


if __name__ == "__main__":
    main()
