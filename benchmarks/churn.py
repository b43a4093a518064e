"""Upstreams killed, restarted and frozen under load: what clients see, ours against nginx and
haproxy in one run.

    python benchmarks/churn.py [--seconds 8] [--rate 300] [--only "rolling SIGKILL"]

Three upstreams, each a uvicorn process of its own (``churn_upstream.py``, which notes every
request it received and answered in a file); clients send GETs and POSTs (half each, each with
an ``x-request-id``) at ``--rate`` requests a second over 16 keep-alive connections, one cookie
jar each. Scenarios:

- **rolling SIGKILL**: each upstream in turn killed, and started again 0.5 s later;
- **rolling SIGTERM**: the same, stopped gracefully (uvicorn finishes what it has);
- **freeze 3 s**: one upstream stopped (SIGSTOP) for 3 s, then continued;
- **dead from the start**: one upstream never started.

Proxies: ``asgi-leasttime serve`` with defaults, with an active check every second and the
passive check, and with a sticky cookie (no check); nginx (``proxy_next_upstream error timeout``,
its default, which for a POST means only "never sent"); haproxy (``retries 3``, ``option
redispatch``). Printed per scenario and proxy: errors the clients saw (any status but 200, or no
answer) for GET and POST, p99 in ms, and how many requests the upstreams received (retries
included) per client request. Needs nginx and haproxy (``apt-get install nginx-light haproxy``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from harness import ROOT, free_port, nginx, wait_for_port

HERE = Path(__file__).resolve().parent

SCENARIOS = ("rolling SIGKILL", "rolling SIGTERM", "freeze 3 s", "dead from the start")


@dataclass
class Upstream:
    """One upstream process on a port of its own, restarted on the same port."""

    name: str
    notes: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "uvicorn", "churn_upstream:app", "--port",
                   str(self.port), "--log-level", "error", "--no-access-log"]  # fmt: skip
        env = {**os.environ, "CHURN_NOTES": str(self.notes), "PYTHONPATH": str(HERE)}
        self.process = subprocess.Popen(command, env=env, cwd=HERE)
        wait_for_port(self.port, 20)

    def signal(self, number: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(number)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(10)


@contextlib.contextmanager
def upstreams(directory: Path, start: bool = True) -> Iterator[list[Upstream]]:
    group = [Upstream(name, directory / f"{name}.notes") for name in ("a", "b", "c")]
    try:
        for upstream in group:
            upstream.notes.write_text("")
            if start:
                upstream.start()
        yield group
    finally:
        for upstream in group:
            upstream.stop()


# -- the proxies -----------------------------------------------------------------------------------


@contextlib.contextmanager
def ours(ports: list[int], directory: Path, variant: str) -> Iterator[int]:
    port = free_port()
    lines = ["[server]", 'host = "127.0.0.1"', f"port = {port}"]
    for upstream_port, name in zip(ports, "abc", strict=True):
        lines += ["[[upstreams]]", f'url = "http://127.0.0.1:{upstream_port}"', f'name = "{name}"']
    if variant == "checks":
        lines += ["[health_check]", "interval = 1.0", "timeout = 1.0", "[passive_health_check]"]
    if variant == "sticky":
        lines += ["[sticky]", 'secret_key = "churn-benchmark-secret-key"', 'name = "lb"']
    config = directory / f"ours-{variant}.toml"
    config.write_text("\n".join(lines) + "\n")
    # No access log, as nginx and haproxy run here: the comparison is of what clients see.
    command = [sys.executable, "-m", "asgi_leasttime.cli", "serve", str(config),
               "--log-level", "warning"]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_port(port, 20)
        yield port
    finally:
        process.terminate()
        process.wait(10)


@contextlib.contextmanager
def nginx_proxy(ports: list[int], directory: Path, variant: str) -> Iterator[int]:
    port = free_port()
    servers = "".join(f"server 127.0.0.1:{p};" for p in ports)
    body = f"""
    upstream churn {{ {servers} keepalive 32; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://churn;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
    """
    with nginx(body):
        wait_for_port(port)
        yield port


@contextlib.contextmanager
def haproxy(ports: list[int], directory: Path, variant: str) -> Iterator[int]:
    port = free_port()
    servers = "\n".join(f"    server {n} 127.0.0.1:{p}" for n, p in zip("abc", ports, strict=True))
    config = directory / "haproxy.cfg"
    config.write_text(
        f"""
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch
    http-reuse safe
frontend churn
    bind 127.0.0.1:{port}
    default_backend upstreams
backend upstreams
    balance leastconn
{servers}
"""
    )
    process = subprocess.Popen(["haproxy", "-f", str(config)], stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield port
    finally:
        process.terminate()
        process.wait(10)


Proxy = Callable[[list[int], Path, str], contextlib.AbstractContextManager[int]]

PROXIES: list[tuple[str, Proxy, str]] = [
    ("ours, defaults", ours, "defaults"),
    ("ours, with checks", ours, "checks"),
    ("ours, sticky", ours, "sticky"),
    ("nginx", nginx_proxy, ""),
    ("haproxy (retries 3, redispatch)", haproxy, ""),
]


# -- the clients ----------------------------------------------------------------------------------


@dataclass
class Seen:
    errors: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)  # what the errors were
    sent: int = 0
    latencies: list[float] = field(default_factory=list)


async def clients(port: int, seconds: float, rate: float, seen: Seen) -> None:
    """16 keep-alive clients with their own cookie jars, ``rate`` requests a second in all."""
    ids = itertools.count()
    deadline = time.monotonic() + seconds
    interval = 16 / rate

    async def one_client(index: int) -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=30
        ) as client:
            await asyncio.sleep(index * interval / 16)
            next_at = time.monotonic()
            while time.monotonic() < deadline:
                number = next(ids)
                method = "POST" if number % 2 else "GET"
                headers = {"x-request-id": str(number)}
                began = time.monotonic()
                seen.sent += 1
                try:
                    answer = await client.request(method, "/", headers=headers, content=b"x" * 64)
                    kind = str(answer.status_code)
                except httpx.HTTPError as exc:
                    kind = type(exc).__name__
                took = time.monotonic() - began
                seen.latencies.append(took)
                if kind != "200":
                    seen.errors[method] += 1
                    seen.kinds[f"{method} {kind} after {took:.2f} s"] += 1
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    await asyncio.gather(*(one_client(index) for index in range(16)))


async def run_scenario(
    scenario: str, group: list[Upstream], port: int, seconds: float, rate: float
) -> Seen:
    seen = Seen()
    load = asyncio.create_task(clients(port, seconds, rate, seen))
    await asyncio.sleep(1.0)
    if scenario.startswith("rolling"):
        how = signal.SIGKILL if "KILL" in scenario else signal.SIGTERM
        for upstream in group:
            upstream.signal(how)
            assert upstream.process is not None
            await asyncio.to_thread(upstream.process.wait, 20)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(upstream.start)
            await asyncio.sleep(1.0)
    elif scenario.startswith("freeze"):
        group[0].signal(signal.SIGSTOP)
        await asyncio.sleep(3.0)
        group[0].signal(signal.SIGCONT)
    await load
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--only", default="", help="run the scenarios whose name contains this")
    parser.add_argument("--proxies", default="", help="run the proxies whose name contains this")
    arguments = parser.parse_args()
    for tool in ("nginx", "haproxy"):
        if shutil.which(tool) is None:
            sys.exit(f"missing: {tool} (Debian: apt-get install nginx-light haproxy)")
    rows = []
    for scenario in SCENARIOS:
        if arguments.only and arguments.only not in scenario:
            continue
        for label, proxy, variant in PROXIES:
            if arguments.proxies and arguments.proxies not in label:
                continue
            with tempfile.TemporaryDirectory(prefix="churn-") as directory:
                path = Path(directory)
                start = scenario != "dead from the start"
                with upstreams(path) as group:
                    if not start:
                        group[0].stop()
                    ports = [u.port for u in group]
                    with proxy(ports, path, variant) as port:
                        time.sleep(0.5)
                        seen = asyncio.run(
                            run_scenario(scenario, group, port, arguments.seconds, arguments.rate)
                        )
                    upstream_requests = sum(u.notes.read_text().count("in ") for u in group)
            p99 = statistics.quantiles(seen.latencies, n=100)[98] * 1000 if seen.latencies else 0
            row = (scenario, label, seen.errors["GET"], seen.errors["POST"], p99,
                   upstream_requests / max(seen.sent, 1), seen.sent)  # fmt: skip
            rows.append(row)
            print(
                f"{scenario:22} {label:34} GET errors {row[2]:4}  POST errors {row[3]:4}  "
                f"p99 {p99:7.1f} ms  upstream/client {row[5]:.3f}  ({seen.sent} requests)",
                dict(seen.kinds) or "",
                flush=True,
            )
    print()
    print("| scenario | proxy | GET errors | POST errors | p99 ms | upstream requests / client |")
    print("|---|---|---|---|---|---|")
    for scenario, label, get, post, p99, ratio, _ in rows:
        print(f"| {scenario} | {label} | {get} | {post} | {p99:.1f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
