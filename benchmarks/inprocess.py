"""What a request costs in Python: ours against the minimal proxy on the same client, in-process.

    python benchmarks/inprocess.py [--requests 20000] [--concurrency 1,8]

No uvicorn and no wrk, so the figures move little between runs (a server in front adds the
same cost to both proxies, and on a shared machine wrk's figures move by a third):

- **from memory**: the lean client's ``send`` answers from memory (no socket; the request head
  is still built), so what is left is each proxy's own Python per request, best of 7 rounds;
  then the parts of ours timed alone: a lease from pick to release, the request's header rules,
  the response's, the upstream target;
- **over sockets** (needs nginx): concurrent requests through each app to three nginx
  upstreams, the process's CPU time per request, median of 5 rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import statistics
import time
import timeit
from collections.abc import Callable, Iterator
from typing import Any

import uvloop
from apps import minimal_lean, ours, ours_with_access_log
from harness import require, start_upstreams

from asgi_leasttime import _lean
from asgi_leasttime._forwarding import upstream_target
from asgi_leasttime._headers import RequestHeaders, response_headers
from asgi_leasttime.balancer import Balancer

SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/",
    "raw_path": b"/",
    "query_string": b"",
    "root_path": "",
    "headers": [(b"host", b"127.0.0.1:8000")],  # what wrk sends
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
}

# What the benchmarks' nginx upstreams answer.
HEAD = [
    (b"Server", b"nginx/1.22.1"),
    (b"Date", b"Sat, 28 Nov 2026 12:00:00 GMT"),
    (b"Content-Type", b"text/plain"),
    (b"Content-Length", b"2"),
    (b"Connection", b"keep-alive"),
]


class _MemoryResponse:
    __slots__ = ("raw_headers", "status_code")

    def __init__(self) -> None:
        self.status_code = 200
        self.raw_headers = HEAD

    async def next_chunk(self) -> tuple[bytes, bool]:
        return b"ok", False

    async def aclose(self) -> None:
        pass


async def _send_from_memory(
    self: _lean.LeanClient,
    method: str,
    host: str,
    port: int,
    target: bytes,
    headers: Any,
    body: Any,
    https: bool = False,
    address: str | None = None,
) -> _MemoryResponse:
    _lean._request_head(method, target, headers, host, port, chunked=False)
    return _MemoryResponse()


async def _send_to_from_memory(
    self: _lean.LeanClient, pool: Any, method: str, target: bytes, headers: Any, body: Any
) -> _MemoryResponse:
    _lean._request_head(method, target, headers, pool.name, pool.shown_port, chunked=False)
    return _MemoryResponse()


@contextlib.contextmanager
def answered_from_memory() -> Iterator[None]:
    """Every LeanClient made inside answers from memory (ours captures ``send_to`` when an
    upstream is added, so the app is made inside too; ``send`` in the trees before it)."""
    patched = {"send": _send_from_memory, "send_to": _send_to_from_memory}
    real = {name: getattr(_lean.LeanClient, name, None) for name in patched}
    for name, stand_in in patched.items():
        setattr(_lean.LeanClient, name, stand_in)
    try:
        yield
    finally:
        for name, method in real.items():
            if method is None:
                delattr(_lean.LeanClient, name)
            else:
                setattr(_lean.LeanClient, name, method)


@contextlib.contextmanager
def access_log_to_devnull() -> Iterator[None]:
    """The access log as ``serve`` writes it (a queue in front of its handler), to /dev/null."""
    from asgi_leasttime.access_log import log_without_blocking, logger

    with open(os.devnull, "w") as sink:
        handler = logging.StreamHandler(sink)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            with log_without_blocking(logger):
                yield
        finally:
            logger.removeHandler(handler)


async def _requests(app: Any, concurrency: int, count: int) -> None:
    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # no body, and the client never leaves
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        # A proxy answering its own 502 would look fast: only the upstream's answer counts.
        if message["type"] == "http.response.start" and message["status"] != 200:
            raise RuntimeError(f"the app answered {message['status']}, not the upstream's 200")

    async def client(requests: int) -> None:
        for _ in range(requests):
            await app(dict(SCOPE), receive, send)

    await asyncio.gather(*(client(count // concurrency) for _ in range(concurrency)))


def microseconds_from_memory(app: Any, count: int) -> float:
    async def best() -> float:
        await _requests(app, 1, 1000)
        times = []
        for _ in range(7):
            started = time.perf_counter()
            await _requests(app, 1, count)
            times.append(time.perf_counter() - started)
        return min(times) / count * 1e6

    return uvloop.run(best())


def cpu_microseconds_over_sockets(app: Any, concurrencies: list[int], count: int) -> list[float]:
    async def medians() -> list[float]:  # one loop for all: the pooled connections are its
        cells = []
        for concurrency in concurrencies:
            await _requests(app, concurrency, 200 * concurrency)
            times = []
            for _ in range(5):
                started = time.process_time()
                await _requests(app, concurrency, count)
                times.append(time.process_time() - started)
            cells.append(statistics.median(times) / count * 1e6)
        return cells

    return uvloop.run(medians())


def parts_of_ours() -> dict[str, Callable[[], object]]:
    balancer = Balancer()
    for name in ("a", "b", "c"):
        balancer.add(name)
    answers = iter([0.0010, 0.0011, 0.0009] * 10**7)

    def lease() -> None:
        held = balancer.acquire()
        held.answered(200, next(answers))
        held.release()

    request_headers = RequestHeaders()
    return {
        "a lease: pick, answer recorded, release": lease,
        "the request's header rules": lambda: request_headers(SCOPE),
        "the response's header rules": lambda: response_headers(HEAD, 200),
        "the upstream target": lambda: upstream_target(SCOPE),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", default="1,8")
    args = parser.parse_args()
    proxies = {"asgi-leasttime": ours, "minimal proxy on our lean client": minimal_lean}
    gc.freeze()  # as ours does at startup; the same for both

    print("From memory, us a request (best of 7)\n")
    print("| app | us |\n|---|---|")
    os.environ["BENCH_UPSTREAMS"] = "http://127.0.0.1:1,http://127.0.0.1:2,http://127.0.0.1:3"
    for name, factory in proxies.items():
        with answered_from_memory():
            print(f"| {name} | {microseconds_from_memory(factory(), args.requests):.2f} |")
    for format in ("text", "json"):
        with answered_from_memory(), access_log_to_devnull():
            cost = microseconds_from_memory(ours_with_access_log(format), args.requests)
        print(
            f"| asgi-leasttime, access log ({format}, through a queue to /dev/null) | {cost:.2f} |"
        )
    for name, part in parts_of_ours().items():
        seconds = min(timeit.repeat(part, number=100_000, repeat=5)) / 100_000
        print(f"| ours, alone: {name} | {seconds * 1e6:.2f} |")

    require("nginx")
    concurrency = [int(c) for c in args.concurrency.split(",")]
    print("\nOver sockets to three nginx upstreams, CPU us a request (median of 5)\n")
    print("| app | " + " | ".join(f"c{c}" for c in concurrency) + " |")
    print("|---|" + "---|" * len(concurrency))
    with contextlib.ExitStack() as stack:
        ports = start_upstreams(stack, 3)
        os.environ["BENCH_UPSTREAMS"] = ",".join(f"http://127.0.0.1:{p}" for p in ports)
        for name, factory in proxies.items():
            cells = cpu_microseconds_over_sockets(factory(), concurrency, args.requests)
            print(f"| {name} | " + " | ".join(f"{cell:.1f}" for cell in cells) + " |")
        with access_log_to_devnull():  # the queue's thread counts in the process's CPU time
            cells = cpu_microseconds_over_sockets(
                ours_with_access_log("text"), concurrency, args.requests
            )
        print(
            "| asgi-leasttime, access log (text) | " + " | ".join(f"{c:.1f}" for c in cells) + " |"
        )


if __name__ == "__main__":
    main()
