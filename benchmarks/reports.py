"""Load reports for real: two ``asgi-leasttime serve`` processes in front of three uvicorn
upstreams that run ``LoadReportMiddleware``, one upstream made slow for a while; the same run
with the reports read and with them ignored.

    python benchmarks/reports.py [--seconds 12] [--rate 240] [--rounds 2]
    python benchmarks/reports.py --cost     # what the middleware costs an app, us a request

Each upstream serves with two "workers" (a semaphore: requests beyond two wait), 10 ms a
request, and the slow one 40 ms from second 3 to second 9. The clients send ``--rate`` requests
a second in all (open loop), half to each proxy. Printed per run: the clients' p50 and p99, the
slow upstream's largest count of requests in flight as its middleware saw it, and its share of
the requests while slow. No timed asserts: figures to compare, in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from asgi_leasttime.load_reports import LoadReportMiddleware

HERE = Path(__file__).resolve().parent
SLOW_FROM, SLOW_TO = 3.0, 9.0


class Worked:
    """An upstream with two workers: 10 ms a request, ``slow_ms`` while it is slow."""

    def __init__(self, name: str, slow: bool) -> None:
        self.name = name
        self.slow = slow
        self.started = 0.0
        self.peak = 0
        self.served = 0
        self.served_while_slow = 0
        self.workers: asyncio.Semaphore | None = None
        self.middleware: LoadReportMiddleware | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/stats":
            body = f"{self.peak} {self.served} {self.served_while_slow}".encode()
            self.peak = self.served = self.served_while_slow = 0
            self.started = time.monotonic()
        else:
            assert self.middleware is not None
            self.peak = max(self.peak, self.middleware.inflight)
            if self.workers is None:
                self.workers = asyncio.Semaphore(2)
            elapsed = time.monotonic() - self.started
            slow = self.slow and SLOW_FROM <= elapsed < SLOW_TO
            async with self.workers:
                await asyncio.sleep(0.040 if slow else 0.010)
            self.served += 1
            self.served_while_slow += slow
            body = b"ok"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})


def upstream_app(name: str, slow: bool) -> Any:
    """``python benchmarks/reports.py --upstream NAME [--slow]`` serves this."""
    app = Worked(name, slow)
    app.middleware = LoadReportMiddleware(app)
    return app.middleware


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, "a process of the benchmark ended"
        try:
            httpx.get(f"http://127.0.0.1:{port}/stats", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing on port {port}")


@contextlib.contextmanager
def started(command: list[str], port: int) -> Iterator[None]:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(port, process)
        yield
    finally:
        process.terminate()
        process.wait(15)


async def load(proxies: list[str], rate: float, seconds: float) -> list[float]:
    """Open loop: ``rate`` requests a second in all, spread over the proxies; the latencies."""
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def one(url: str) -> None:
            began = time.perf_counter()
            answer = await client.get(url)
            answer.raise_for_status()
            latencies.append(time.perf_counter() - began)

        tasks = []
        began = time.monotonic()
        for index in range(int(rate * seconds)):
            delay = began + index / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(proxies[index % len(proxies)] + "/work")))
        await asyncio.gather(*tasks)
    return latencies


def one_run(reports: bool, seconds: float, rate: float) -> dict[str, float]:
    ports = {name: free_port() for name in ("a", "b", "slow")}
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as stack:
        for name, port in ports.items():
            command = [sys.executable, str(HERE / "reports.py"), "--upstream", name,
                       "--port", str(port)] + (["--slow"] if name == "slow" else [])  # fmt: skip
            stack.enter_context(started(command, port))
        config = Path(folder) / "lb.toml"
        upstreams = "".join(
            f'[[upstreams]]\nurl = "http://127.0.0.1:{port}"\nname = "{name}"\n'
            for name, port in ports.items()
        )
        config.write_text(upstreams + ("[load_reports]\n" if reports else ""))
        proxies = []
        for _ in range(2):  # two balancers, each blind to the other's requests
            port = free_port()
            command = [sys.executable, "-m", "asgi_leasttime.cli", "serve", str(config),
                       "--port", str(port)]  # fmt: skip
            stack.enter_context(started_proxy(command, port))
            proxies.append(f"http://127.0.0.1:{port}")
        asyncio.run(load(proxies, rate, 2.0))  # warm: every proxy learns every upstream
        for port in ports.values():
            httpx.get(f"http://127.0.0.1:{port}/stats")  # resets the figures and the clock
        latencies = asyncio.run(load(proxies, rate, seconds))
        peak, served, while_slow = map(
            int, httpx.get(f"http://127.0.0.1:{ports['slow']}/stats").text.split()
        )
    latencies.sort()
    return {
        "p50 ms": statistics.median(latencies) * 1000,
        "p99 ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "slow peak in flight": peak,
        "slow's requests while slow": while_slow,
        "slow's requests": served,
    }


@contextlib.contextmanager
def started_proxy(command: list[str], port: int) -> Iterator[None]:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, "serve ended"
            try:
                httpx.get(f"http://127.0.0.1:{port}/work", timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "serve did not start"
                time.sleep(0.1)
        yield
    finally:
        process.terminate()
        process.wait(15)


def middleware_cost() -> None:
    """A bare ASGI app called from memory, alone and through the middleware (best of 5)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def send(message: dict[str, Any]) -> None:
        pass

    async def microseconds(target: Any, count: int = 100_000) -> float:
        best = math.inf
        for _ in range(5):
            began = time.perf_counter()
            for _ in range(count):
                await target({"type": "http", "path": "/"}, None, send)
            best = min(best, (time.perf_counter() - began) / count * 1e6)
        return best

    print("| app | us a request |\n|---|---|")
    for name, target in (
        ("bare", app),
        ("LoadReportMiddleware", LoadReportMiddleware(app)),
        ("LoadReportMiddleware(cpu=True)", LoadReportMiddleware(app, cpu=True)),
    ):
        print(f"| {name} | {asyncio.run(microseconds(target)):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--rate", type=float, default=240.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--upstream")
    parser.add_argument("--port", type=int)
    parser.add_argument("--slow", action="store_true")
    parser.add_argument("--cost", action="store_true")
    args = parser.parse_args()
    if args.cost:
        middleware_cost()
        return
    if args.upstream:
        import uvicorn

        app = upstream_app(args.upstream, args.slow)
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", lifespan="off")
        return
    rows = []
    for round_ in range(args.rounds):
        for reports in (False, True):
            figures = one_run(reports, args.seconds, args.rate)
            rows.append((round_ + 1, "read" if reports else "ignored", figures))
            print(f"round {round_ + 1}, reports {rows[-1][1]}: {figures}", flush=True)
    keys = list(rows[0][2])
    print("\n| round | reports | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for round_, reports_, figures in rows:
        cells = " | ".join(f"{figures[key]:.1f}" for key in keys)
        print(f"| {round_} | {reports_} | {cells} |")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(HERE.parent))
    main()
