"""Requests per second to https upstreams: ours on the lean client, ours on httpx, asgiproxy and
nginx, against three nginx TLS upstreams, in one run.

    python benchmarks/https.py [--seconds 10] [--rounds 3]

Certificates are made for the run (trustme); every client trusts its CA through SSL_CERT_FILE,
which Python's default SSL context reads. Needs nginx and wrk.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import trustme
from harness import (
    WrkResult,
    free_port,
    machine,
    median_result,
    nginx,
    require,
    uvicorn_app,
    wait_for_port,
    wrk,
)

PROXIES = {
    "asgi-leasttime (lean client, TLS)": "benchmarks.apps:ours",
    "asgi-leasttime on httpx": "benchmarks.apps:ours_on_httpx",
    "asgiproxy 0.2 (aiohttp)": "benchmarks.apps:asgiproxy_app",
}
CONNECTIONS = (1, 8, 64)


def tls_upstreams(stack: contextlib.ExitStack, folder: Path, count: int = 3) -> list[int]:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    pem = folder / "server.pem"
    # An IP for the Python clients, a DNS name for nginx (it checks names only).
    cert = ca.issue_cert("127.0.0.1", "upstream.test")
    cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
    ports = [free_port() for _ in range(count)]
    for port in ports:
        stack.enter_context(
            nginx(
                f"server {{ listen 127.0.0.1:{port} ssl; ssl_certificate {pem};"
                f' ssl_certificate_key {pem}; location / {{ return 200 "ok"; }} }}'
            )
        )
    for port in ports:
        wait_for_port(port)
    return ports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    require("nginx", "wrk")
    results: dict[str, dict[int, list[WrkResult]]] = defaultdict(lambda: defaultdict(list))
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-tls-")))
        ports = tls_upstreams(stack, folder)
        os.environ["SSL_CERT_FILE"] = str(folder / "ca.pem")  # for every proxy started below
        upstreams = [f"https://127.0.0.1:{port}" for port in ports]
        balancer_port = free_port()
        stack.enter_context(
            nginx(
                "upstream pool { least_conn; "
                + " ".join(f"server 127.0.0.1:{p};" for p in ports)
                + " keepalive 128; }"
                f" server {{ listen 127.0.0.1:{balancer_port}; location / {{"
                f" proxy_pass https://pool; proxy_http_version 1.1;"
                ' proxy_set_header Connection "";'
                f" proxy_ssl_verify on; proxy_ssl_trusted_certificate {folder}/ca.pem;"
                " proxy_ssl_name upstream.test; proxy_ssl_session_reuse on; } }"
            )
        )
        wait_for_port(balancer_port)
        for round_number in range(1, args.rounds + 1):
            print(f"round {round_number}/{args.rounds}", flush=True)
            for connections in CONNECTIONS:
                url = f"http://127.0.0.1:{balancer_port}/"
                results["nginx least_conn, proxy_pass https"][connections].append(
                    wrk(url, connections, args.seconds)
                )
            for name, factory in PROXIES.items():
                port = free_port()
                with uvicorn_app(factory, upstreams, port):
                    url = f"http://127.0.0.1:{port}/"
                    wrk(url, 8, 1.0)  # warm up: connections and handshakes
                    for connections in CONNECTIONS:
                        results[name][connections].append(wrk(url, connections, args.seconds))
                print(f"  {name}: done", flush=True)
    medians = {n: {c: median_result(r) for c, r in by.items()} for n, by in results.items()}
    print(f"\n## HTTPS upstreams, {datetime.date.today().isoformat()}\n")
    print(f"{machine()}; wrk {args.seconds:g} s per figure, median of {args.rounds} rounds.\n")
    print("| target | c1 | c8 | c64 | c64 p50 / p99 ms | errors |")
    print("|---|---|---|---|---|---|")
    for name, by_c in medians.items():
        c1, c8, c64 = (by_c[c] for c in CONNECTIONS)
        errors = sum(r.errors for r in by_c.values())
        print(f"| {name} | {c1.rps:,.0f} | {c8.rps:,.0f} | {c64.rps:,.0f} "
              f"| {c64.p50_ms:.2f} / {c64.p99_ms:.2f} | {errors} |")  # fmt: skip
    ours = medians["asgi-leasttime (lean client, TLS)"]
    print()
    for peer in ("asgi-leasttime on httpx", "asgiproxy 0.2 (aiohttp)"):
        for c in CONNECTIONS:
            print(f"- ours / {peer} at c{c}: {ours[c].rps / medians[peer][c].rps:.2f}x")


if __name__ == "__main__":
    main()
