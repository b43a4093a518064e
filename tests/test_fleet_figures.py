"""``serve --workers N``: the admin app runs in the supervisor on a proxy that serves no traffic,
so ``/status``, ``/metrics`` and the dashboard show the workers' figures from their reports."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from asgi_leasttime import LeastTimeProxy, Upstream
from asgi_leasttime.metrics import AdminApp
from asgi_leasttime.redis_state import RedisState
from asgi_leasttime.state import Fleet, fleet_totals
from tests.servers import UpstreamApp, free_port, running_in_thread, serve, wait_for_port

TOKEN = "a-token-of-at-least-16-characters"

FLEET: Fleet = {
    "one": {
        "a": {"inflight": 1, "requests": 30, "failures": 1, "average_ttfb": 0.010},
        "b": {"inflight": 0, "requests": 0, "failures": 0, "average_ttfb": 0.0},
    },
    "two": {
        "a": {"inflight": 2, "requests": 10, "failures": 0, "average_ttfb": 0.030},
        "b": {"inflight": 0, "requests": 0, "failures": 0, "average_ttfb": 0.0},
    },
}


def proxy_on(state: RedisState | None) -> LeastTimeProxy:
    return LeastTimeProxy(
        upstreams=[
            Upstream("http://127.0.0.1:1", name="a"),
            Upstream("http://127.0.0.1:2", name="b"),
        ],
        state=state,
    )


def test_fleet_totals_weigh_each_process_average_by_its_requests() -> None:
    totals = fleet_totals(FLEET)
    assert totals["a"]["requests"] == 40
    assert totals["a"]["inflight"] == 3
    assert totals["a"]["failures"] == 1
    assert totals["a"]["average_ttfb"] == pytest.approx((0.010 * 30 + 0.030 * 10) / 40)
    assert totals["b"]["average_ttfb"] == 0.0  # nothing measured: no TTFB, not a division by 0
    unweighted = {"p": {"a": {"inflight": 0, "requests": 0, "failures": 0, "average_ttfb": 0.02}}}
    assert fleet_totals(unweighted)["a"]["average_ttfb"] == 0.02  # samples, no requests counted


def test_a_relay_only_proxy_shows_the_fleets_figures() -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    app = AdminApp(proxy_on(RedisState("redis://127.0.0.1:1", report_every=None)))
    status = json.loads(app.render_status(FLEET))
    a, b = status["upstreams"]
    ttfb = (0.010 * 30 + 0.030 * 10) / 40
    assert (a["requests"], a["inflight"], a["failures"]) == (40, 3, 1)
    assert a["average_ttfb"] == pytest.approx(ttfb)
    assert a["score"] == pytest.approx(ttfb * (1 + 3) / 1)  # average x (1 + in flight) / weight
    assert (b["requests"], b["average_ttfb"], b["score"]) == (0, 0.0, 0.0)
    assert status["processes"] == 2
    assert a["fleet"]["requests"] == 40
    _, _, body = app.render_metrics(FLEET)
    found = {
        (sample.name, sample.labels.get("server")): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }
    assert found["asgi_leasttime_server_requests_total", "a"] == 40
    assert found["asgi_leasttime_server_inflight_requests", "a"] == 3
    assert found["asgi_leasttime_server_average_ttfb_seconds", "a"] == pytest.approx(ttfb)
    assert found["asgi_leasttime_server_score_seconds", "a"] == pytest.approx(4 * ttfb)
    assert found["asgi_leasttime_fleet_server_average_ttfb_seconds", "a"] == pytest.approx(ttfb)


@pytest.mark.parametrize("state", ["in-process", "reporting"])
def test_a_proxy_that_serves_keeps_its_own_figures(state: str) -> None:
    """One process, or one that reports to a shared state: its own figures, the fleet's apart."""
    store = RedisState("redis://127.0.0.1:1") if state == "reporting" else None
    app = AdminApp(proxy_on(store))
    status = json.loads(app.render_status(FLEET if store else None))
    a = status["upstreams"][0]
    assert (a["requests"], a["inflight"], a["average_ttfb"], a["score"]) == (0, 0, 0.0, 0.0)
    if store:
        assert a["fleet"]["requests"] == 40


def test_serve_with_workers_shows_the_workers_figures(tmp_path: Path) -> None:
    """serve --workers 2, private store, [admin]: traffic, then the supervisor's /status and
    /metrics carry each upstream's requests and TTFB from the workers' reports."""
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    admin_port = free_port()
    with (
        running_in_thread(UpstreamApp("a", delay=0.005)) as a,
        running_in_thread(UpstreamApp("b", delay=0.005)) as b,
    ):
        config = tmp_path / "lb.toml"
        config.write_text(
            f'[[upstreams]]\nurl = "{a}"\nname = "a"\n[[upstreams]]\nurl = "{b}"\nname = "b"\n'
            f"[admin]\nport = {admin_port}\n"
        )
        process, port = serve(
            str(config), "--workers", "2", env={"ASGI_LEASTTIME_ADMIN_TOKEN": TOKEN}
        )
        try:
            wait_for_port(admin_port, process)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                for _ in range(60):  # new connections, so both workers answer
                    client.get("/", headers={"connection": "close"}).raise_for_status()
            admin = f"http://127.0.0.1:{admin_port}"
            deadline = time.monotonic() + 10
            while True:  # the workers report every second
                status = httpx.get(f"{admin}/status").json()
                if sum(u["requests"] for u in status["upstreams"]) >= 60:
                    break
                assert time.monotonic() < deadline, status
                time.sleep(0.3)
            metrics = httpx.get(f"{admin}/metrics").text
        finally:
            process.send_signal(signal.SIGINT)
            assert process.wait(20) == 0
    assert status["processes"] == 2
    assert sum(u["requests"] for u in status["upstreams"]) == 60
    samples = [s for family in text_string_to_metric_families(metrics) for s in family.samples]
    found = {(sample.name, sample.labels.get("server")): sample.value for sample in samples}
    # The per-request counters the workers keep, added up by the supervisor.
    answered = [s for s in samples if s.name == "asgi_leasttime_service_requests_total"]
    assert [(s.labels["code"], s.labels["method"], s.value) for s in answered] == [
        ("200", "GET", 60.0)
    ]
    durations = "asgi_leasttime_service_request_duration_seconds_count"
    assert sum(s.value for s in samples if s.name == durations) == 60
    for upstream in status["upstreams"]:
        name = upstream["name"]
        assert upstream["requests"] > 0, upstream
        assert upstream["average_ttfb"] >= 0.005, upstream
        assert upstream["score"] is not None
        assert math.isfinite(upstream["score"])
        assert upstream["score"] >= upstream["average_ttfb"] / upstream["weight"]
        assert upstream["requests"] == upstream["fleet"]["requests"]
        assert found["asgi_leasttime_server_requests_total", name] == upstream["requests"]
        assert found["asgi_leasttime_server_average_ttfb_seconds", name] == pytest.approx(
            upstream["average_ttfb"]
        )


WORKER_AND_SUPERVISOR = """
import json, sys
from asgi_leasttime import LeastTimeProxy, Upstream
from asgi_leasttime.metrics import AdminApp, RequestMetrics
from asgi_leasttime.records import RequestRecord
from asgi_leasttime.redis_state import RedisState

def proxy(report_every):
    upstreams = [Upstream("http://127.0.0.1:1", name="a")]
    return LeastTimeProxy(upstreams=upstreams, state=RedisState("redis://127.0.0.1:1",
                          report_every=report_every))

worker = RequestMetrics(proxy(1.0))  # what a worker of serve --workers N counts
record = RequestRecord({"method": "GET", "headers": []}, 0.0)
record.status, record.duration, record.upstream, record.upstream_status = 200, 0.01, "a", 200
record.attempts = 3
record.failed_attempts = [("a", "refused", "retried"), ("b", "refused", "retried")]
worker.finished(record)
record.failed_attempts = [("a", "timeout", "budget")]
record.attempts = 1
worker.finished(record)
supervisor = AdminApp(proxy(None))
status, _, body = supervisor.render_metrics()
print(json.dumps([status, body.decode(), json.loads(supervisor.render_status())["retries"]]))
"""


def test_the_supervisor_adds_up_the_workers_counters(tmp_path: Path) -> None:
    """prometheus-client's multiprocess files: what a worker counts, the supervisor's /metrics
    and /status show (run apart: the mode is chosen when prometheus-client is imported)."""
    pytest.importorskip("prometheus_client")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    run = [sys.executable, "-c", WORKER_AND_SUPERVISOR]
    finished = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0, finished.stderr
    status, metrics, retries = json.loads(finished.stdout)
    assert status == 200
    assert 'asgi_leasttime_service_requests_total{code="200",method="GET"' in metrics
    assert 'asgi_leasttime_server_ttfb_seconds_count{server="a"' not in metrics  # no ttfb given
    assert 'asgi_leasttime_server_request_duration_seconds_count{code_class="2xx"' in metrics
    assert 'asgi_leasttime_retries_total{outcome="retried",reason="refused"' in metrics
    assert 'asgi_leasttime_server_requests_total{server="a"' in metrics  # the fleet's, as before
    assert retries == {"refused": {"retried": 2}, "timeout": {"budget": 1}}
