"""The command line, run as a real process: serve from URLs, shut down finishing requests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from tests.servers import UpstreamApp, running_in_thread


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], limit: float = 15) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert process.poll() is None, "the proxy exited early"
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port} after {limit} s")


@pytest.fixture
def upstream_urls() -> Iterator[list[str]]:
    with (
        running_in_thread(UpstreamApp("a", delay=0.0)) as a,
        running_in_thread(UpstreamApp("b", delay=0.0)) as b,
    ):
        yield [a, b]


def serve(*args: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = [sys.executable, "-m", "asgi_leasttime.cli", "serve", *args, "--port", str(port)]
    process = subprocess.Popen(command, env=dict(os.environ))
    wait_for_port(port, process)
    return process, port


def test_serve_from_upstream_urls_proxies_real_traffic(upstream_urls: list[str]) -> None:
    process, port = serve("--upstream", upstream_urls[0], "--upstream", upstream_urls[1])
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            served = Counter(client.get("/").headers["x-upstream"] for _ in range(20))
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(15) == 0
    assert set(served) == {"a", "b"}


def test_sigterm_finishes_the_requests_in_flight() -> None:
    with running_in_thread(UpstreamApp("slow", delay=1.0)) as url:
        process, port = serve("--upstream", url)
        results: list[int] = []

        def request() -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                results.append(client.get("/").status_code)

        thread = threading.Thread(target=request)
        thread.start()
        time.sleep(0.3)  # the request is in flight at the upstream
        process.send_signal(signal.SIGTERM)
        thread.join(10)
        # uvicorn re-raises the signal once it has shut down, so the exit reports SIGTERM.
        assert process.wait(15) in (0, -signal.SIGTERM)
    assert results == [200]


def test_serve_refuses_a_bad_configuration(tmp_path: object) -> None:
    command = [sys.executable, "-m", "asgi_leasttime.cli", "serve", "--upstream", "ftp://x"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert finished.returncode == 1
    assert "upstreams[0].url" in finished.stderr
