"""``serve`` reloads its file without a restart: on SIGHUP, and with ``[server] watch`` when the
file changes; under traffic, with one worker and with several; a refused file changes nothing;
what only a restart applies is named. And :meth:`LeastTimeProxy.reconfigure` in process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from asgi_leasttime import HealthCheck, LeastTimeProxy, PassiveHealthCheck, StickyCookie, Upstream
from asgi_leasttime.client import DEFAULT_TIMEOUT
from asgi_leasttime.retry import Retry
from tests.servers import (
    UpstreamApp,
    free_port,
    running,
    running_in_thread,
    stop_process,
    wait_for_port,
    wait_until,
)

# -- serve as a process ---------------------------------------------------------------------------


@dataclass
class Served:
    process: subprocess.Popen[str]
    port: int
    lines: list[str] = field(default_factory=list)

    def wait_for(self, text: str, count: int = 1, limit: float = 10.0) -> list[str]:
        """The log lines containing ``text``, once there are ``count`` of them."""
        deadline = time.monotonic() + limit
        while True:
            found = [line for line in list(self.lines) if text in line]
            if len(found) >= count:
                return found
            assert time.monotonic() < deadline, (text, self.lines)
            time.sleep(0.02)


@contextlib.contextmanager
def serving(*args: str, env: dict[str, str] | None = None, workers: int = 1) -> Iterator[Served]:
    """``asgi-leasttime serve ARGS`` on a free port, its log read line by line; once every
    worker has started; stopped with SIGINT at the end."""
    port = free_port()
    command = [sys.executable, "-m", "asgi_leasttime.cli", "serve", *args, "--port", str(port)]
    if workers > 1:
        command += ["--workers", str(workers)]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    served = Served(process, port)

    def read() -> None:
        assert process.stdout is not None
        served.lines.extend(iter(process.stdout.readline, ""))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_for_port(port, process)
        served.wait_for("Application startup complete", workers, limit=20)
        yield served
    finally:
        stop_process(process, signal.SIGINT, 20)
        reader.join(5)


def upstreams_toml(**urls: str) -> str:
    return "".join(f'[[upstreams]]\nurl = "{url}"\nname = "{name}"\n' for name, url in urls.items())


def served_by(port: int, count: int = 20) -> set[str]:
    """Who answers ``count`` requests, each on a new connection (every worker has a turn)."""
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        return {
            client.get("/", headers={"connection": "close"}).headers["x-upstream"]
            for _ in range(count)
        }


@pytest.fixture
def upstreams() -> Iterator[dict[str, str]]:
    with (
        running_in_thread(UpstreamApp("a")) as a,
        running_in_thread(UpstreamApp("b")) as b,
        running_in_thread(UpstreamApp("c")) as c,
    ):
        yield {"a": a, "b": b, "c": c}


@dataclass
class Answer:
    at: float
    upstream: str | None
    error: str | None


def load(port: int, until: float, answers: list[Answer], index: int) -> None:
    """About 100 requests a second until ``until``, GET and POST in turn; every tenth on a new
    connection, so that each worker of several is reached."""
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        count = 0
        while time.monotonic() < until:
            count += 1
            headers = {"connection": "close"} if count % 10 == 0 else {}
            try:
                if count % 2:
                    response = client.get(f"/get/{index}/{count}", headers=headers)
                else:
                    body = f"body {index} {count}".encode() * 50
                    response = client.post("/post", content=body, headers=headers)
                    assert response.json()["body"] == body.decode()
                error = None if response.status_code == 200 else f"status {response.status_code}"
                answers.append(Answer(time.monotonic(), response.headers["x-upstream"], error))
            except Exception as exc:  # counted: the test requires none
                answers.append(Answer(time.monotonic(), None, repr(exc)))
            time.sleep(0.01)


# -- (a) under load -------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_under_load_adds_and_removes_upstreams_without_an_error(
    tmp_path: Path, upstreams: dict[str, str], workers: int
) -> None:
    config = tmp_path / "lb.toml"
    config.write_text(upstreams_toml(a=upstreams["a"], b=upstreams["b"]))
    with serving(str(config), workers=workers) as served:
        assert served_by(served.port) == {"a", "b"}
        answers: list[Answer] = []
        until = time.monotonic() + 3.0
        clients = [
            threading.Thread(target=load, args=(served.port, until, answers, index))
            for index in range(4)
        ]
        for client in clients:
            client.start()
        time.sleep(1.0)
        config.write_text(upstreams_toml(b=upstreams["b"], c=upstreams["c"]))
        hangup = time.monotonic()
        served.process.send_signal(signal.SIGHUP)
        for client in clients:
            client.join(10)
        reloaded = served.wait_for("reloaded", workers)
        assert served.process.poll() is None
        assert "a" not in served_by(served.port)
    assert [a.error for a in answers if a.error is not None] == []
    assert len(answers) / 3.0 > 150  # requests a second (about 400 on an idle machine)
    first_c = min(a.at for a in answers if a.upstream == "c")
    assert first_c - hangup < 1.0
    assert [a for a in answers if a.upstream == "a" and a.at > hangup + 1.0] == []
    pids = {line.split("[")[1].split("]")[0] for line in reloaded}
    assert len(pids) == workers  # each worker applied it, in place
    if workers > 1:
        assert str(served.process.pid) not in pids
    assert "upstreams added: c; upstreams removed: a" in reloaded[0]
    assert not any("Child process" in line and "died" in line for line in served.lines)
    assert not any("restarting processes" in line for line in served.lines)


# -- (b) a refused file ---------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_a_refused_file_changes_nothing_and_the_log_names_every_mistake(
    tmp_path: Path, upstreams: dict[str, str], workers: int
) -> None:
    config = tmp_path / "lb.toml"
    config.write_text(upstreams_toml(a=upstreams["a"]))
    environ = {"RELOAD_TEST_SECRET": ""}
    with serving(str(config), workers=workers, env=environ) as served:
        config.write_text(
            upstreams_toml(b=upstreams["b"])
            + '[[upstreams]]\nurl = "ftp://x"\n'
            + "[retry]\natempts = 2\n[health_check]\ninterval = 0\n"
        )
        served.process.send_signal(signal.SIGHUP)
        (refused,) = served.wait_for("refused, nothing changed")
        # An environment the file needs is checked as serve checks it at start.
        config.write_text(
            upstreams_toml(b=upstreams["b"]) + '[sticky]\nsecret_key_env = "RELOAD_TEST_SECRET"\n'
        )
        served.process.send_signal(signal.SIGHUP)
        refusals = served.wait_for("refused, nothing changed", 2)
        time.sleep(0.3)
        assert served_by(served.port) == {"a"}
        assert served.process.poll() is None
    assert "(3 problem(s))" in refused
    for mistake in (
        "upstreams[1].url: upstream URL 'ftp://x' must start with http:// or https://",
        "retry.atempts: unknown key (did you mean 'attempts'?)",
        "health_check.interval: must be a positive number",
    ):
        assert mistake in refused
    assert "sticky.secret_key_env: the environment variable RELOAD_TEST_SECRET" in refusals[1]
    assert " WARNING: " in refused
    # Checked once: in the supervisor, with several workers.
    assert f"[{served.process.pid}]" in refused
    assert len([line for line in served.lines if "refused" in line]) == 2
    assert not any("reloaded" in line for line in served.lines)


# -- (c) [server] watch ---------------------------------------------------------------------------


def test_watch_applies_a_file_saved_by_rename(tmp_path: Path, upstreams: dict[str, str]) -> None:
    config = tmp_path / "lb.toml"
    config.write_text("[server]\nwatch = true\n" + upstreams_toml(a=upstreams["a"]))
    with serving(str(config)) as served:
        assert served_by(served.port) == {"a"}
        saved = tmp_path / "lb.toml.new"  # as editors save: a new file renamed over the old
        saved.write_text("[server]\nwatch = true\n" + upstreams_toml(c=upstreams["c"]))
        os.replace(saved, config)
        served.wait_for("reloaded", limit=5)
        assert served_by(served.port) == {"c"}
        time.sleep(1.5)  # looked at again, unchanged: not reloaded again
        with open(config, "a") as file:  # and written in place
            file.write(upstreams_toml(b=upstreams["b"]))
        served.wait_for("reloaded", 2, limit=5)
        assert served_by(served.port, 40) == {"b", "c"}
    assert len([line for line in served.lines if "reloaded" in line]) == 2


# -- (d) what only a restart applies --------------------------------------------------------------


def test_a_listen_port_change_is_named_as_not_applied(
    tmp_path: Path, upstreams: dict[str, str]
) -> None:
    config = tmp_path / "lb.toml"
    config.write_text(upstreams_toml(a=upstreams["a"]))
    with serving(str(config)) as served:
        other = free_port()
        config.write_text(
            f'[server]\nport = {other}\n[balancer]\nmode = "traefik"\n'
            + upstreams_toml(a=upstreams["a"], b=upstreams["b"])
        )
        served.process.send_signal(signal.SIGHUP)
        (waiting,) = served.wait_for("not applied until a restart")
        assert served_by(served.port, 40) == {"a", "b"}  # the upstreams did apply
        served.process.send_signal(signal.SIGHUP)  # still not applied: named again
        served.wait_for("not applied until a restart", 2)
    assert "server.port, balancer.mode changed in the file: not applied until a restart" in waiting
    assert " WARNING: " in waiting


def test_sighup_without_a_file_changes_nothing(upstreams: dict[str, str]) -> None:
    with serving("--upstream", upstreams["a"]) as served:
        served.process.send_signal(signal.SIGHUP)
        served.wait_for("nothing to reload")
        assert served_by(served.port) == {"a"}


# -- (e) reconfigure, in process ------------------------------------------------------------------

anyio_mark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def proxied(
    *apps: UpstreamApp, **options: Any
) -> AsyncIterator[tuple[LeastTimeProxy, httpx.AsyncClient, list[str]]]:
    async with contextlib.AsyncExitStack() as stack:
        urls = [await stack.enter_async_context(running(app)) for app in apps]
        proxy = LeastTimeProxy(
            upstreams=[Upstream(url, name=app.name) for url, app in zip(urls, apps, strict=True)],
            **options,
        )
        url = await stack.enter_async_context(running(proxy, lifespan="on"))
        client = await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=10))
        yield proxy, client, urls


def reconfigure(proxy: LeastTimeProxy, **changed: Any) -> None:
    """The proxy's options as they are, but ``changed``."""
    options: dict[str, Any] = {
        "sticky": proxy.sticky,
        "health_check": proxy.health_check,
        "passive_health_check": proxy.passive_health_check,
        "retry": proxy.retry,
        "timeout": DEFAULT_TIMEOUT,
    }
    proxy.reconfigure(**{**options, **changed})


def cookie_for(proxy: LeastTimeProxy, name: str) -> str:
    assert proxy.sticky is not None
    _, value = proxy.sticky.set_cookie_header(name)
    return value.decode().split(";")[0]


@anyio_mark
async def test_reconfigure_new_sticky_keys() -> None:
    sticky = StickyCookie(secret_key="the-old-key", name="lb")
    async with proxied(UpstreamApp("a"), UpstreamApp("b"), sticky=sticky) as (proxy, client, _):
        old = cookie_for(proxy, "b")
        answer = await client.get("/", headers={"cookie": old})
        assert (answer.headers["x-upstream"], "set-cookie" in answer.headers) == ("b", False)
        reconfigure(proxy, sticky=StickyCookie(secret_key=["the-new-key"], name="lb"))
        answer = await client.get("/", headers={"cookie": old})
        assert "set-cookie" in answer.headers  # the old key's cookie no longer counts
        assert cookie_for(proxy, "b") != old  # signed with the new key
        reconfigure(
            proxy, sticky=StickyCookie(secret_key=["the-old-key", "the-new-key"], name="lb")
        )
        for _ in range(5):
            answer = await client.get("/", headers={"cookie": old})
            assert (answer.headers["x-upstream"], "set-cookie" in answer.headers) == ("b", False)
        assert proxy.sticky is not None
        assert proxy.sticky.name == "lb"
        reconfigure(proxy, sticky=None)
        answer = await client.get("/", headers={"cookie": old})
        assert "set-cookie" not in answer.headers


@anyio_mark
async def test_reconfigure_retry() -> None:
    bad, good = UpstreamApp("bad"), UpstreamApp("good")
    bad.fail_with = 503
    sticky = StickyCookie(secret_key="a-key", name="lb")
    retry = Retry(retry_on_status=[503])
    async with proxied(bad, good, sticky=sticky, retry=retry) as (proxy, client, _):
        on_bad = {"cookie": cookie_for(proxy, "bad")}  # each request goes to bad first
        answer = await client.get("/", headers=on_bad)
        assert (answer.status_code, answer.headers["x-upstream"]) == (200, "good")
        assert proxy.retry_budget_json()["retries"] == 1  # type: ignore[index]
        reconfigure(proxy, retry=Retry(attempts=1))
        assert proxy.retry is None
        assert proxy.retry_budget_json() is None
        answer = await client.get("/", headers=on_bad)
        assert (answer.status_code, answer.headers["x-upstream"]) == (503, "bad")
        reconfigure(proxy, retry=Retry(retry_on_status=[503], budget_ratio=0.5))
        assert proxy.retry_budget_json()["retries"] == 0  # type: ignore[index]  # a fresh one
        answer = await client.get("/", headers=on_bad)
        assert (answer.status_code, answer.headers["x-upstream"]) == (200, "good")


@anyio_mark
async def test_reconfigure_timeout() -> None:
    async with proxied(UpstreamApp("a")) as (proxy, client, _):
        assert (await client.get("/?delay=0.3")).status_code == 200
        reconfigure(proxy, timeout=httpx.Timeout(5.0, read=0.1))
        assert (await client.get("/?delay=0.3")).status_code == 504


@anyio_mark
async def test_reconfigure_health_checks_start_stop_and_let_go() -> None:
    a, b = UpstreamApp("a"), UpstreamApp("b")
    a.health_status = 503
    async with proxied(a, b) as (proxy, client, _):
        reconfigure(proxy, health_check=HealthCheck(interval=0.05, timeout=1))
        await wait_until(lambda: "active" in proxy.members.down_flags("a"))
        probes = len(b.probes)
        reconfigure(proxy, health_check=HealthCheck(path="/health", interval=0.05, timeout=2))
        await wait_until(lambda: len(b.probes) > probes)  # the new check's probes
        assert "active" in proxy.members.down_flags("a")  # what the old one found stands
        reconfigure(proxy, health_check=None)
        assert "active" not in proxy.members.down_flags("a")  # nothing would clear it
        probes = len(b.probes)
        await anyio.sleep(0.2)
        assert len(b.probes) <= probes + 1  # (one in flight when stopped)
        assert proxy.balancer["a"].up
        assert (await client.get("/")).status_code == 200


@anyio_mark
async def test_reconfigure_passive_check_on_and_off() -> None:
    a, b = UpstreamApp("a"), UpstreamApp("b")
    a.fail_with = 500
    async with proxied(a, b, retry=None) as (proxy, client, _):
        listeners = len(proxy.balancer._outcome_listeners)
        reconfigure(proxy, passive_health_check=PassiveHealthCheck(failure_window=30))
        assert len(proxy.balancer._outcome_listeners) == listeners + 1
        for _ in range(20):
            await client.get("/")
        assert "passive" in proxy.members.down_flags("a")
        reconfigure(proxy, passive_health_check=None)
        assert len(proxy.balancer._outcome_listeners) == listeners
        assert "passive" not in proxy.members.down_flags("a")  # the ejection ended with it
        assert proxy.passive is None
        assert proxy.members.passive is None
        for _ in range(5):
            await client.get("/")
        assert proxy.balancer["a"].up  # nothing ejects it any more
