"""WorkersState under real servers: the workers of one ``uvicorn --workers 2`` (and of one
gunicorn) share one state on the private Valkey the first of them starts, only one of them
probes each upstream, and nothing of the server is left once the master has stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import free_port, running_in_thread, wait_for_port

ROOT = Path(__file__).resolve().parent.parent

SERVERS = {
    "uvicorn": [sys.executable, "-m", "uvicorn", "tests.workers_app:app", "--workers", "2",
                "--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning"],
    "gunicorn": [sys.executable, "-m", "gunicorn", "tests.workers_app:app", "-w", "2",
                 "-k", "uvicorn.workers.UvicornWorker", "-b", "127.0.0.1:{port}",
                 "--log-level", "warning"],
}  # fmt: skip


class Probed:
    """An upstream that answers everything and notes which worker sent each health probe."""

    def __init__(self) -> None:
        self.probes: list[tuple[float, str]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/health":
            headers = dict(scope["headers"])
            self.probes.append((time.monotonic(), headers.get(b"x-prober", b"").decode()))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def probers_since(self, since: float) -> set[str]:
        return {prober for when, prober in self.probes if when >= since}


def ours(pattern: str, *, full: bool = True) -> set[int]:
    """The live processes of this user whose command line (or name) matches ``pattern``."""
    options = ["-f"] if full else []
    found = subprocess.run(
        ["pgrep", "-u", str(os.getuid()), *options, pattern], capture_output=True, text=True
    )
    return {int(pid) for pid in found.stdout.split() if not zombie(int(pid))}


def zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


KEEPER_PATTERN = "asgi_leasttime.workers_state"


def servers_of(keepers: set[int]) -> set[int]:
    """The Valkey (or Redis) servers the keepers run (valkey-server rewrites its command line)."""
    return {pid for keeper in keepers for pid in ours(".") if parent(pid) == keeper}


def parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def any_server() -> set[int]:
    return ours("^(valkey|redis)-server$", full=False)


def get(url: str) -> dict[str, Any]:
    """A request on a connection of its own, so that either worker may take it."""
    with httpx.Client(timeout=5) as client:
        response = client.get(url)
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


@pytest.fixture(params=list(SERVERS))
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, Probed, subprocess.Popen[bytes]]]:
    if request.param == "gunicorn":
        pytest.importorskip("gunicorn")
    a, b = Probed(), Probed()
    with running_in_thread(a) as url_a, running_in_thread(b) as url_b:
        port = free_port()
        command = [part.format(port=port) for part in SERVERS[request.param]]
        env = {**os.environ, "UPSTREAMS": f"a={url_a},b={url_b}"}
        before = ours(KEEPER_PATTERN)
        process = subprocess.Popen(command, env=env, cwd=ROOT)
        try:
            wait_for_port(port, process)
            yield f"http://127.0.0.1:{port}", a, process
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
            # Whatever happened, leave no server of this test behind.
            keepers = ours(KEEPER_PATTERN) - before
            for pid in servers_of(keepers) | keepers:
                os.kill(pid, signal.SIGKILL)


def test_workers_share_one_state_and_one_prober(
    server: tuple[str, Probed, subprocess.Popen[bytes]],
) -> None:
    url, upstream, process = server
    pids: dict[int, dict[str, bool]] = {}
    deadline = time.monotonic() + 20
    while len(pids) < 2:  # both workers answering
        assert time.monotonic() < deadline, f"only {list(pids)} answered"
        seen = get(f"{url}/whoami")
        pids[seen["pid"]] = seen["up"]
    # The keeper a worker of this master started.
    keepers = {pid for pid in ours(KEEPER_PATTERN) if parent(parent(pid) or 0) == process.pid}
    servers = servers_of(keepers)

    # One prober: after the start, only one worker probes the upstream.
    time.sleep(0.5)
    since = time.monotonic()
    time.sleep(1.0)
    assert len(upstream.probers_since(since)) == 1, upstream.probes[-20:]
    assert upstream.probers_since(since) <= {str(pid) for pid in pids}

    # A change made through one worker is seen by the other.
    with httpx.Client(timeout=5) as client:
        changed_by = client.put(f"{url}/admin/a/down").json()["pid"]
    seen_down: set[int] = set()
    deadline = time.monotonic() + 10
    while seen_down != set(pids):
        assert time.monotonic() < deadline, f"only {seen_down} saw the change of {changed_by}"
        seen = get(f"{url}/whoami")
        if seen["up"] == {"a": False, "b": True}:
            seen_down.add(seen["pid"])
        else:
            assert seen["pid"] != changed_by

    # One server for the two workers, gone with them when the master stops.
    assert len(keepers) == 1
    assert len(servers) == 1
    assert servers <= any_server()
    process.send_signal(signal.SIGTERM)
    assert process.wait(20) == 0
    deadline = time.monotonic() + 5
    while (any_server() & servers) or (ours(KEEPER_PATTERN) & keepers):
        assert time.monotonic() < deadline, "the workers' server outlived them"
        time.sleep(0.05)
    place = Path(tempfile.gettempdir(), f"asgi-leasttime-{os.getuid()}")
    assert not [path for path in place.iterdir() if path.suffix == ".sock"]
