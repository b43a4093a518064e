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
from pathlib import Path

import httpx
import pytest

from tests.servers import UpstreamApp, free_port, running_in_thread, serve, wait_for_port


@pytest.fixture
def upstream_urls() -> Iterator[list[str]]:
    with (
        running_in_thread(UpstreamApp("a", delay=0.0)) as a,
        running_in_thread(UpstreamApp("b", delay=0.0)) as b,
    ):
        yield [a, b]


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


def test_version() -> None:
    from asgi_leasttime import __version__

    command = [sys.executable, "-m", "asgi_leasttime.cli", "--version"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert (finished.returncode, finished.stdout.strip()) == (0, f"asgi-leasttime {__version__}")


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999", "http://127.0.0.1:0"])
def test_check_names_the_key_of_a_port_out_of_range(tmp_path: Path, url: str) -> None:
    config = tmp_path / "lb.toml"
    config.write_text(f'[[upstreams]]\nurl = "{url}"\n')
    command = [sys.executable, "-m", "asgi_leasttime.cli", "check", str(config)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert finished.returncode == 1
    assert "upstreams[0].url" in finished.stderr
    assert "not a TCP port" in finished.stderr


def test_serve_sends_one_date_and_one_server(upstream_urls: list[str]) -> None:
    process, port = serve("--upstream", upstream_urls[0])
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/")
        answered = httpx.get(f"http://127.0.0.1:{port}/r/status?code=503")
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(15) == 0
    assert response.headers["x-upstream"] == "a"
    for answer in (response, answered):
        assert len(answer.headers.get_list("date")) == 1
        assert answer.headers.get_list("server") == ["uvicorn"]  # the front uvicorn's


@pytest.mark.parametrize(
    ("key", "value"), [("port", 70000), ("port", -1), ("port", 0), ("workers", 0)]
)
def test_serve_refuses_command_line_values_as_the_file_does(key: str, value: int) -> None:
    """``--port 70000`` used to listen on 4464, ``--workers 0`` to start one process."""
    from asgi_leasttime.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as in_file:
        parse_config({"upstreams": [{"url": "http://127.0.0.1:9"}], "server": {key: value}})
    (message,) = in_file.value.errors
    assert message.startswith(f"server.{key}: ")
    command = [sys.executable, "-m", "asgi_leasttime.cli", "serve", "--upstream",
               "http://127.0.0.1:9", f"--{key}", str(value)]  # fmt: skip
    if key != "port":
        command += ["--port", str(free_port())]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert finished.returncode == 2
    assert finished.stderr.strip() == f"--{key}: {message.removeprefix(f'server.{key}: ')}"


@pytest.mark.parametrize("admin", [False, True], ids=["alone", "with-admin"])
def test_serve_logs_each_status_change_with_level_time_and_process(
    tmp_path: Path, admin: bool
) -> None:
    """Every line (uvicorn's, its access lines, ours) with the time and the process, once: with
    ``[admin]`` one process runs two uvicorn servers, which must not set uvicorn's bare format
    again nor say twice that the process started."""
    dead = free_port()
    admin_port = free_port()
    config = tmp_path / "lb.toml"
    config.write_text(
        f'[[upstreams]]\nurl = "http://127.0.0.1:{dead}"\nname = "late"\n'
        '[health_check]\npath = "/health"\ninterval = 0.2\ntimeout = 0.5\n'
        + (f"[admin]\nport = {admin_port}\n" if admin else "")
    )
    port = free_port()
    command = [sys.executable, "-m", "asgi_leasttime.cli", "serve", str(config)]
    process = subprocess.Popen(
        [*command, "--port", str(port)],
        stdout=subprocess.PIPE,  # uvicorn's access lines
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ),
    )
    lines: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        lines.extend(iter(process.stdout.readline, ""))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        wait_for_port(port, process)
        deadline = time.monotonic() + 10
        while not any("is down" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        with running_in_thread(UpstreamApp("late"), port=dead):
            while not any("up again" in line for line in lines) and time.monotonic() < deadline:
                time.sleep(0.05)
            httpx.get(f"http://127.0.0.1:{port}/", timeout=5).raise_for_status()
            if admin:
                httpx.get(f"http://127.0.0.1:{admin_port}/status", timeout=5).raise_for_status()
            time.sleep(0.2)  # the access lines
            process.send_signal(signal.SIGINT)  # before the upstream goes away again
            process.wait(15)
    finally:
        if process.poll() is None:
            process.kill()
        reader.join(5)
    down = [line for line in lines if "'late' is down" in line]
    up = [line for line in lines if "'late' is up again" in line]
    assert (len(down), len(up)) == (1, 1), lines
    assert (" WARNING: " in down[0], f"[{process.pid}]" in down[0]) == (True, True)
    assert (" INFO: " in up[0], f"[{process.pid}]" in up[0]) == (True, True)
    assert down[0][:4].isdigit()  # the time comes first
    for line in lines:
        assert line[:4].isdigit(), line
        assert f" [{process.pid}] " in line, line
    assert sum('"GET / HTTP/1.1" 200' in line for line in lines) == 1, lines
    assert sum('"GET /status HTTP/1.1" 200' in line for line in lines) == int(admin), lines
    for said in ("Started server process", "Finished server process", "Application startup"):
        assert sum(said in line for line in lines) == 1, (said, lines)


def raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_the_front_end_parsers_trade(http: str) -> None:
    """What docs/deployment.md says of --http: h11 forwards any method token and answers
    HTTP/1.0 clients without chunks; httptools (the default, twice as fast) refuses an unknown
    method with 400 and chunks an answer of unknown length even for HTTP/1.0."""
    with running_in_thread(UpstreamApp("a"), http="h11") as upstream:  # takes any method
        process, port = serve("--upstream", upstream, "--http", http)
        try:
            custom = raw_request(port, b"FOO / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            old = raw_request(port, b"GET /r/stream HTTP/1.0\r\nhost: x\r\n\r\n")
        finally:
            process.send_signal(signal.SIGINT)
            assert process.wait(15) == 0
    chunked = b"transfer-encoding: chunked" in old.lower()
    if http == "h11":
        assert custom.startswith(b"HTTP/1.1 200 ")
        assert b'"method": "FOO"' in custom
        assert not chunked
    else:
        assert custom.startswith(b"HTTP/1.1 400 ")
        assert chunked


def test_several_workers_share_one_state_out_of_the_box(tmp_path: Path) -> None:
    """serve --workers 2 with no [state]: a private store, and one admin call reaches both."""
    token = "a-token-of-at-least-16-characters"
    admin_port = free_port()
    with (
        running_in_thread(UpstreamApp("a")) as a,
        running_in_thread(UpstreamApp("b")) as b,
    ):
        config = tmp_path / "lb.toml"
        config.write_text(
            f'[[upstreams]]\nurl = "{a}"\nname = "a"\n[[upstreams]]\nurl = "{b}"\nname = "b"\n'
            f"[admin]\nport = {admin_port}\n"
        )
        environ = {"ASGI_LEASTTIME_ADMIN_TOKEN": token}
        process, port = serve(str(config), "--workers", "2", env=environ)
        try:
            wait_for_port(admin_port, process)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                assert {client.get("/").headers["x-upstream"] for _ in range(40)} == {"a", "b"}
                answer = httpx.post(
                    f"http://127.0.0.1:{admin_port}/upstreams/a",
                    json={"down": True},
                    headers={"authorization": f"Bearer {token}"},
                )
                assert answer.status_code == 200, answer.text
                time.sleep(1.0)
                served = Counter(
                    (client.get("/", headers={"connection": "close"})).headers["x-upstream"]
                    for _ in range(100)
                )  # new connections, so both workers answer
            assert served == {"b": 100}
        finally:
            process.send_signal(signal.SIGINT)
            assert process.wait(20) == 0
    leftover = subprocess.run(["pgrep", "-f", "asgi-leasttime-.*state.sock"], capture_output=True)
    assert leftover.stdout == b""  # the private store went with the supervisor


def test_two_serve_commands_share_a_store(tmp_path: Path) -> None:
    """Two serve processes on one real Valkey, one of them with two workers: an admin call on
    either reaches every worker of both; with the store killed every request is still
    answered, and once it is back a change propagates again."""
    from tests.stores import store_server

    token = "a-token-of-at-least-16-characters"
    with (
        store_server() as store,
        running_in_thread(UpstreamApp("a")) as a,
        running_in_thread(UpstreamApp("b")) as b,
        running_in_thread(UpstreamApp("c")) as c,
    ):
        ports, admins, processes = [free_port(), free_port()], [free_port(), free_port()], []
        environ = dict(os.environ, ASGI_LEASTTIME_ADMIN_TOKEN=token)
        for index, workers in enumerate((1, 2)):
            config = tmp_path / f"lb{index}.toml"
            config.write_text(
                "".join(f'[[upstreams]]\nurl = "{u}"\nname = "{n}"\n'
                        for u, n in ((a, "a"), (b, "b"), (c, "c")))
                + f'[admin]\nport = {admins[index]}\n[state]\nurl = "{store.url}"\n'
            )  # fmt: skip
            command = [sys.executable, "-m", "asgi_leasttime.cli", "serve", str(config)]
            command += ["--workers", str(workers), "--port", str(ports[index])]
            processes.append(subprocess.Popen(command, env=environ))

        def served() -> Counter[str]:
            counts: Counter[str] = Counter()
            for port in ports:
                for _ in range(50):
                    answer = httpx.get(f"http://127.0.0.1:{port}/", headers={"connection": "close"})
                    counts[answer.headers.get("x-upstream", str(answer.status_code))] += 1
            return counts

        def admin(index: int, name: str, change: dict[str, object]) -> None:
            answer = httpx.post(
                f"http://127.0.0.1:{admins[index]}/upstreams/{name}",
                json=change,
                headers={"authorization": f"Bearer {token}"},
            )
            assert answer.status_code == 200, answer.text

        try:
            for port, process in zip(ports + admins, processes * 2, strict=True):
                wait_for_port(port, process)
            time.sleep(0.5)  # every worker subscribed
            admin(0, "a", {"down": True})
            time.sleep(1.0)
            assert "a" not in served()
            admin(1, "b", {"fenced": True})
            time.sleep(1.0)
            assert set(served()) == {"c"}
            store.kill()
            assert set(served()) == {"c"}  # every request answered, on the last known state
            store.start()
            time.sleep(0.5)
            admin(1, "a", {"down": False})  # written once the store is reached again
            deadline = time.monotonic() + 10  # reconnects are tried at least every 2 s
            while set(served()) != {"a", "c"} and time.monotonic() < deadline:
                time.sleep(0.2)
            assert set(served()) == {"a", "c"}
        finally:
            for process in processes:
                process.send_signal(signal.SIGINT)
            for process in processes:
                assert process.wait(20) == 0


@pytest.mark.parametrize(("server", "frozen"), [({}, True), ({"freeze_gc": False}, False)])
def test_serve_freezes_the_heap_once_its_app_is_built(
    monkeypatch: pytest.MonkeyPatch, server: dict[str, bool], frozen: bool
) -> None:
    """The freeze is serve's (``[server] freeze_gc``, on by default), done once per process
    when uvicorn builds the app; a library user's proxy leaves the collector alone."""
    import gc
    import json

    from asgi_leasttime import cli

    document = {"server": server, "upstreams": [{"url": "http://127.0.0.1:9"}]}
    monkeypatch.setenv(cli.DOCUMENT_ENV, json.dumps(document))
    gc.unfreeze()
    try:
        cli.create_app()
        assert (gc.get_freeze_count() > 1000) is frozen  # the modules, the app, the test run
    finally:
        gc.unfreeze()  # the other tests' objects stay collectable
