"""The demo: three local upstreams, one of which slows down and recovers, and a live table.

Everything runs on 127.0.0.1 in this process: three upstreams under uvicorn ("fast" 5 ms,
"medium" 20 ms, "flaky" 10 ms that answers in 200 ms from a quarter to half of the run), the proxy
under uvicorn, its admin app with the dashboard, and a client keeping a few requests in flight.
The table shows what the balancer sees; the summary shows where the requests went before, during
and after the slow spell. Ctrl-C (or SIGTERM) ends it early: the requests in flight finish, the
servers stop, and the summary is printed for the time it ran.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal, TextIO

import anyio
import httpx

from asgi_leasttime._extras import need
from asgi_leasttime.metrics import AdminApp
from asgi_leasttime.proxy import LeastTimeProxy
from asgi_leasttime.upstream import Upstream

__all__ = ["run_demo"]

CONCURRENCY = 6
SLOW_FROM, SLOW_UNTIL = 0.25, 0.5  # the flaky upstream's slow spell, as fractions of the run
PHASES = ("before", "slow spell", "after")


class DemoUpstream:
    """An upstream that answers ``ok`` after ``delay()`` seconds."""

    def __init__(self, name: str, delay: Callable[[], float]) -> None:
        self.name = name
        self.delay = delay

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await anyio.sleep(self.delay())
        headers = [(b"content-type", b"text/plain"), (b"x-upstream", self.name.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})


@contextlib.asynccontextmanager
async def serving(app: Any, lifespan: Literal["on", "off"] = "on") -> AsyncIterator[str]:
    """Serve an app with uvicorn on an ephemeral loopback port."""
    import uvicorn

    from asgi_leasttime._serving import QuietServer

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", lifespan=lifespan, proxy_headers=False)
    server = QuietServer(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for it
            await anyio.sleep(0.01)
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"
        finally:
            server.should_exit = True
    sock.close()


class Demo:
    """Runs the demo and keeps what it saw."""

    def __init__(self, seconds: float, out: TextIO) -> None:
        self.seconds = seconds
        self.out = out
        self.live = out.isatty()
        self.started = 0.0
        self.served: list[Counter[str]] = [Counter() for _ in PHASES]
        self.recent: list[tuple[float, str]] = []
        self.errors = 0
        self.lines_drawn = 0
        self.stopped = False  # by Ctrl-C or SIGTERM
        self.stopped_at = 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def running(self) -> bool:
        return not self.stopped and self.elapsed() < self.seconds

    async def stop_on_signal(self, scope: anyio.CancelScope) -> None:
        """The first Ctrl-C (or SIGTERM) ends the run as if its time were up: the requests in
        flight finish and everything shuts down in order. A second one cancels what is left."""
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                if self.stopped:
                    scope.cancel()
                    return
                self.stopped, self.stopped_at = True, self.elapsed()
                self.out.write("\nStopping: the requests in flight finish first.\n")
                self.out.flush()

    def phase(self) -> int:
        fraction = self.elapsed() / self.seconds
        return 0 if fraction < SLOW_FROM else 1 if fraction < SLOW_UNTIL else 2

    def flaky_delay(self) -> float:
        return 0.200 if self.phase() == 1 else 0.010

    async def run(self) -> None:
        upstreams = [
            DemoUpstream("fast", lambda: 0.005),
            DemoUpstream("medium", lambda: 0.020),
            DemoUpstream("flaky", self.flaky_delay),
        ]
        async with contextlib.AsyncExitStack() as stack:
            urls = [await stack.enter_async_context(serving(app)) for app in upstreams]
            proxy = LeastTimeProxy(
                upstreams=[
                    Upstream(url, name=app.name) for url, app in zip(urls, upstreams, strict=True)
                ]
            )
            proxy_url = await stack.enter_async_context(serving(proxy))
            token = secrets.token_urlsafe(16)
            admin = AdminApp(proxy, token=token)
            admin_url = await stack.enter_async_context(serving(admin, lifespan="off"))
            self.out.write(
                f"Dashboard: {admin_url}/ (admin token for its controls: {token}); it stays up"
                " while the demo runs.\n\n"
            )
            self.out.flush()
            client = await stack.enter_async_context(
                httpx.AsyncClient(base_url=proxy_url, timeout=10, limits=httpx.Limits())
            )
            self.started = time.monotonic()
            async with anyio.create_task_group() as tg:
                for _ in range(CONCURRENCY):
                    tg.start_soon(self.keep_sending, client)
                tg.start_soon(self.keep_drawing, proxy)
                tg.start_soon(self.ending, tg.cancel_scope)
        self.summary()

    async def ending(self, scope: anyio.CancelScope) -> None:
        """Watch for Ctrl-C while the others run; stop watching when they are done."""
        async with anyio.create_task_group() as tg:
            if threading.current_thread() is threading.main_thread():  # where signals arrive
                tg.start_soon(self.stop_on_signal, scope)
            while self.running():  # noqa: ASYNC110 - the end is a time or a flag
                await anyio.sleep(0.1)
            tg.cancel_scope.cancel()

    async def keep_sending(self, client: httpx.AsyncClient) -> None:
        while self.running():
            try:
                response = await client.get("/")
                name = response.headers.get("x-upstream", "error")
            except httpx.HTTPError:
                name = "error"
            if name == "error":
                self.errors += 1
                continue
            self.served[self.phase()][name] += 1
            self.recent.append((time.monotonic(), name))

    async def keep_drawing(self, proxy: LeastTimeProxy) -> None:
        while self.running():
            await anyio.sleep(0.5 if self.live else 2.0)
            if self.running():
                self.draw(proxy)

    def draw(self, proxy: LeastTimeProxy) -> None:
        now = time.monotonic()
        self.recent = [(t, n) for t, n in self.recent if now - t < 2.0]
        share = Counter(name for _, name in self.recent)
        total = sum(share.values()) or 1
        elapsed = min(self.elapsed(), self.seconds)
        done = int(30 * elapsed / self.seconds)
        lines = [
            f"[{'#' * done}{'.' * (30 - done)}] {elapsed:4.1f} s / {self.seconds:.0f} s"
            f"  phase: {PHASES[self.phase()]}",
            f"{'upstream':<8} {'answers in':>10} {'share (2 s)':>11} {'avg TTFB':>9}"
            f" {'in flight':>9} {'score':>9}  status",
        ]
        speeds = {"fast": 0.005, "medium": 0.020, "flaky": self.flaky_delay()}
        for status in proxy.upstream_status():
            state = "up" if status.up else "down"
            lines.append(
                f"{status.name:<8} {speeds[status.name] * 1000:>8.0f} ms"
                f" {share[status.name] / total:>11.0%} {status.average_ttfb * 1000:>6.1f} ms"
                f" {status.inflight:>9} {status.score * 1000:>6.1f} ms  {state}"
            )
        if self.live and self.lines_drawn:
            self.out.write(f"\x1b[{self.lines_drawn}F")
        self.out.write("".join(f"{line}\x1b[K\n" if self.live else f"{line}\n" for line in lines))
        self.out.flush()
        self.lines_drawn = len(lines)

    def summary(self) -> None:
        names = ("fast", "medium", "flaky")
        out = self.out
        out.write("\nWhere the requests went (share of each phase):\n")
        out.write(f"  {'phase':<12}" + "".join(f"{n:>9}" for n in names) + f"{'requests':>10}\n")
        for phase, served in zip(PHASES, self.served, strict=True):
            total = sum(served.values()) or 1
            cells = "".join(f"{served[n] / total:>9.1%}" for n in names)
            out.write(f"  {phase:<12}{cells}{sum(served.values()):>10}\n")
        if self.stopped:
            out.write(f"\n(stopped after {self.stopped_at:.1f} s of {self.seconds:.0f} s)\n")
        if not all(self.served):  # a phase it did not reach: nothing to conclude
            out.flush()
            return
        before, during, after = (s["flaky"] / (sum(s.values()) or 1) for s in self.served)
        out.write(
            f"\n'flaky' took {before:.0%} of the requests while fast, {during:.0%} while it"
            f" answered in 200 ms, and {after:.0%} after it recovered: least-time routed around it,"
            f" and back to it because only recent samples count.\n"
        )
        if self.errors:
            out.write(f"({self.errors} requests failed)\n")
        out.flush()


def run_demo(seconds: float = 20.0, out: TextIO | None = None) -> int:
    """Run the demo for ``seconds`` and print the summary; returns an exit status."""
    need("uvicorn", "cli", "asgi-leasttime demo")
    if seconds <= 0:
        print("--seconds must be positive", file=sys.stderr)
        return 2
    demo = Demo(seconds, out or sys.stdout)
    print(
        f"Three upstreams on 127.0.0.1: fast (5 ms), medium (20 ms), flaky (10 ms, 200 ms from"
        f" {SLOW_FROM * seconds:.0f} s to {SLOW_UNTIL * seconds:.0f} s). {CONCURRENCY} requests"
        " in flight through the proxy. Ctrl-C stops it early.\n",
        file=demo.out,
    )
    try:
        anyio.run(demo.run)
    except KeyboardInterrupt:  # before the run could watch for it: nothing to summarise yet
        print("stopped", file=sys.stderr)
        return 130
    return 0
