"""The access log, OpenTelemetry spans and the per-upstream histograms, on real uvicorn servers
(the proxy's and its upstreams'), with OpenTelemetry's SDK and its in-memory exporter."""

from __future__ import annotations

import json
import logging
import re
import threading

import httpx
import pytest

from asgi_leasttime import LeastTimeProxy, StickyCookie, Upstream
from asgi_leasttime.access_log import AccessLog, log_without_blocking
from asgi_leasttime.metrics import AdminApp
from asgi_leasttime.options import OptionError
from asgi_leasttime.tracing import Tracing
from tests.servers import UpstreamApp, free_port, running, running_many

pytestmark = pytest.mark.anyio


def access(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "asgi_leasttime.access"]


async def test_one_text_line_per_request_with_the_upstreams_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "asgi_leasttime.access")
    async with running_many(UpstreamApp("a", delay=0.01)) as urls:
        proxy = LeastTimeProxy(upstreams=[Upstream(urls[0], name="a")])
        proxy.observe_requests(AccessLog("text", headers=["x-request-id"]))
        async with running(proxy) as url, httpx.AsyncClient(base_url=url) as client:
            answer = await client.get("/hello?x=1", headers={"x-request-id": "r-1\tok"})
            forged = await client.get("/a%0A127.0.0.1 - - fake%22line")
    lines = access(caplog)
    assert len(lines) == 2, lines
    first, second = lines
    port = urls[0].rsplit(":", 1)[1]
    assert first.startswith("127.0.0.1 - - [")
    assert f'"GET /hello?x=1 HTTP/1.1" 200 {len(answer.content)} ' in first
    assert 'upstream="a"' in first
    assert f"upstream_addr=127.0.0.1:{port}" in first
    assert "upstream_status=200" in first
    header_time = float(re.search(r"upstream_header_time=([0-9.]+)", first).group(1))  # type: ignore[union-attr]
    assert header_time >= 0.01
    assert "attempts=1 failed=- sticky=-" in first
    assert 'x-request-id="r-1\\x09ok"' in first
    # A newline and a quote in the path are escaped: the line stays one line, its fields its own.
    assert forged.status_code == 200
    assert "\n" not in second
    assert '"GET /a\\x0a127.0.0.1 - - fake\\x22line HTTP/1.1" 200' in second


async def test_json_lines_with_traefiks_names_and_the_attempts_that_failed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "asgi_leasttime.access")
    dead = f"http://127.0.0.1:{free_port()}"
    async with running_many(UpstreamApp("alive")) as urls:
        proxy = LeastTimeProxy(
            upstreams=[Upstream(dead, name="dead"), Upstream(urls[0], name="alive")]
        )
        proxy.observe_requests(AccessLog("json"))
        async with running(proxy) as url, httpx.AsyncClient(base_url=url) as client:
            for _ in range(4):
                assert (await client.get("/")).status_code == 200
    documents = [json.loads(line) for line in access(caplog)]
    assert len(documents) == 4
    retried = [d for d in documents if d["RetryAttempts"]]
    assert retried, documents  # the first pick of the dead one is tried again on the other
    document = retried[0]
    assert document["ServiceName"] == "alive"
    assert document["OriginStatus"] == 200
    assert document["DownstreamStatus"] == 200
    assert document["FailedAttempts"] == [
        {"upstream": "dead", "reason": "refused", "outcome": "retried"}
    ]
    assert document["RequestMethod"] == "GET"
    assert document["RequestProtocol"] == "HTTP/1.1"
    assert document["ClientHost"] == "127.0.0.1"
    assert isinstance(document["OriginDuration"], float)
    assert document["Duration"] >= document["OriginDuration"]


async def test_the_sticky_outcome_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "asgi_leasttime.access")
    async with running_many(UpstreamApp("a"), UpstreamApp("b")) as urls:
        proxy = LeastTimeProxy(
            upstreams=[Upstream(urls[0], name="a"), Upstream(urls[1], name="b")],
            sticky=StickyCookie(secret_key="k" * 32),
        )
        proxy.observe_requests(AccessLog("json"))
        async with running(proxy) as url, httpx.AsyncClient(base_url=url) as client:
            first = await client.get("/")
            await client.get("/")
            home = first.headers["x-upstream"]
            proxy.set_status(home, up=False)
            await client.get("/")
    outcomes = [json.loads(line)["Sticky"] for line in access(caplog)]
    assert outcomes == ["new", "kept", "moved"]


async def test_a_websocket_is_one_line(caplog: pytest.LogCaptureFixture) -> None:
    from websockets.asyncio.client import connect

    caplog.set_level(logging.INFO, "asgi_leasttime.access")
    async with running_many(UpstreamApp("ws")) as urls:
        proxy = LeastTimeProxy(upstreams=[Upstream(urls[0], name="ws")])
        proxy.observe_requests(AccessLog("json"))
        async with running(proxy) as url:
            ws_url = url.replace("http://", "ws://") + "/socket"
            async with connect(ws_url, proxy=None, open_timeout=5) as socket:
                await socket.recv()
                await socket.send("hi")
                await socket.recv()
    (document,) = [json.loads(line) for line in access(caplog)]
    assert document["RequestProtocol"] == "WS/1.1"
    assert document["DownstreamStatus"] == 101
    assert document["ServiceName"] == "ws"
    assert document["DownstreamContentSize"] == len("hello from ws q=") + len("echo:hi")


def test_secrets_never_go_to_the_access_log() -> None:
    for name in ("Cookie", "authorization", "Proxy-Authorization"):
        with pytest.raises(OptionError) as refused:
            AccessLog(headers=[name])
        assert refused.value.option == "headers"
    with pytest.raises(OptionError):
        AccessLog("xml")  # type: ignore[arg-type]


def test_the_log_is_written_off_the_event_loops_thread() -> None:
    written: list[str] = []

    class Remember(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            written.append(threading.current_thread().name)

    target = logging.getLogger("asgi_leasttime.test_queue")
    target.setLevel(logging.INFO)
    target.propagate = False
    handler = Remember()
    target.addHandler(handler)
    try:
        with log_without_blocking(target):
            target.info("one line")
        assert target.handlers == [handler]  # as it was
    finally:
        target.removeHandler(handler)
    assert len(written) == 1
    assert written[0] != threading.current_thread().name


async def test_an_attempt_span_under_the_requests_span_and_its_traceparent_upstream() -> None:
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    dead = f"http://127.0.0.1:{free_port()}"
    async with running_many(UpstreamApp("alive")) as urls:
        proxy = LeastTimeProxy(
            upstreams=[Upstream(dead, name="dead"), Upstream(urls[0], name="alive")],
            tracing=Tracing(tracer_provider=provider),
        )
        app = OpenTelemetryMiddleware(proxy, tracer_provider=provider)
        async with running(app) as url, httpx.AsyncClient(base_url=url) as client:
            answers = [await client.get("/path") for _ in range(6)]
    spans = exporter.get_finished_spans()
    servers = [s for s in spans if s.kind == SpanKind.SERVER]
    clients = [s for s in spans if s.kind == SpanKind.CLIENT]
    assert len(servers) == 6
    assert len(clients) >= 7  # one retried request: two attempts
    by_trace = {s.context.trace_id: s for s in servers}
    for span in clients:
        parent = by_trace[span.context.trace_id]
        assert span.parent is not None
        assert span.parent.span_id == parent.context.span_id
        assert span.attributes["http.request.method"] == "GET"
        assert span.attributes["server.address"] == "127.0.0.1"
        assert span.attributes["url.full"].endswith("/path")
        assert span.attributes["leasttime.upstream"] in ("dead", "alive")
    assert any("leasttime.score" in span.attributes for span in clients)  # once it has one
    failed = [s for s in clients if s.attributes["leasttime.upstream"] == "dead"]
    assert failed
    assert failed[0].attributes["error.type"] == "refused"
    retried = [s for s in clients if s.attributes["leasttime.retry"] == 1]
    assert retried
    assert retried[0].attributes["http.response.status_code"] == 200
    # The upstream saw the traceparent of the attempt span that reached it.
    answered = [s for s in clients if s.attributes.get("http.response.status_code") == 200]
    seen = {dict(answer.json()["headers"])["traceparent"][:52] for answer in answers}
    expected = {f"00-{s.context.trace_id:032x}-{s.context.span_id:016x}" for s in answered}
    assert seen == expected  # (the flags after them: sampled, and W3C's random trace id)


async def test_a_bare_proxy_continues_the_clients_trace() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    async with running_many(UpstreamApp("a")) as urls:
        proxy = LeastTimeProxy(upstreams=[urls[0]], tracing=Tracing(tracer_provider=provider))
        async with running(proxy) as url, httpx.AsyncClient(base_url=url) as client:
            answer = await client.get("/", headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
    (span,) = exporter.get_finished_spans()
    assert f"{span.context.trace_id:032x}" == trace_id
    assert span.parent is not None
    assert f"{span.parent.span_id:016x}" == parent_id
    sent = [v for n, v in answer.json()["headers"] if n == "traceparent"]
    assert len(sent) == 1  # replaced, not added
    assert sent[0][:52] == f"00-{trace_id}-{span.context.span_id:016x}"


async def test_latency_histograms_per_upstream_in_metrics() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    async with running_many(UpstreamApp("a", delay=0.003), UpstreamApp("b")) as urls:
        failing = urls[1]
        proxy = LeastTimeProxy(upstreams=[Upstream(urls[0], name="a")])
        admin = AdminApp(proxy)
        async with running(proxy) as url, httpx.AsyncClient(base_url=url) as client:
            for _ in range(5):
                await client.get("/")
            await client.get("/r/status?code=503")
            _, _, body = admin.render_metrics()
    assert failing
    samples = [s for f in text_string_to_metric_families(body.decode()) for s in f.samples]

    def value(name: str, **labels: str) -> float:
        return sum(
            s.value for s in samples if s.name == name and labels.items() <= s.labels.items()
        )

    assert value("asgi_leasttime_server_ttfb_seconds_count", server="a") == 6
    assert value("asgi_leasttime_server_ttfb_seconds_bucket", server="a", le="0.001") == 0
    assert value("asgi_leasttime_server_ttfb_seconds_bucket", server="a", le="0.01") >= 5
    assert (
        value("asgi_leasttime_server_request_duration_seconds_count", server="a", code_class="2xx")
        == 5
    )
    assert (
        value("asgi_leasttime_server_request_duration_seconds_count", server="a", code_class="5xx")
        == 1
    )
    assert value("asgi_leasttime_service_attempts_count") == 6
    assert value("asgi_leasttime_service_attempts_bucket", le="1.0") == 6


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_writes_one_access_line_per_request_in_place_of_uvicorns(workers: str) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.servers import running_in_thread, wait_for_port

    with running_in_thread(UpstreamApp("a")) as upstream:
        port = free_port()
        command = [sys.executable, "-m", "asgi_leasttime.cli", "serve", "--upstream", upstream]
        command += ["--port", str(port), "--workers", workers, "--access-log", "json"]
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env=dict(os.environ),
        )  # fmt: skip
        try:
            wait_for_port(port, process)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
                for index in range(6):
                    client.get(f"/n/{index}", headers={"connection": "close"}).raise_for_status()
            time.sleep(0.5)  # the queue's thread writes the last lines
        finally:
            process.send_signal(signal.SIGINT)
            out, _ = process.communicate(timeout=20)
    lines = [line for line in out.splitlines() if line.strip()]
    documents = [json.loads(line) for line in lines]  # nothing else on stdout: uvicorn's are off
    assert sorted(d["RequestPath"] for d in documents) == [f"/n/{i}" for i in range(6)]
    assert {d["OriginStatus"] for d in documents} == {200}
    assert all(d["ServiceAddr"] == upstream.removeprefix("http://") for d in documents)


async def test_an_answer_of_the_proxys_own_names_no_attempt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bad request the proxy answers itself: no upstream was tried, whatever was picked."""
    caplog.set_level(logging.INFO, "asgi_leasttime.access")
    async with running_many(UpstreamApp("a")) as urls:
        proxy = LeastTimeProxy(upstreams=[Upstream(urls[0], name="a")])
        proxy.observe_requests(AccessLog("json"))
        async with running(proxy) as url, httpx.AsyncClient(base_url=url) as client:
            refused = await client.get("/x/%2e%2e/y")
    assert refused.status_code == 400
    (document,) = [json.loads(line) for line in access(caplog)]
    assert document["DownstreamStatus"] == 400
    assert document["OriginStatus"] is None
    assert document["RetryAttempts"] == 0


async def test_each_request_starts_its_attempts_at_zero_even_in_one_task() -> None:
    """httpx's ASGITransport runs every request in the caller's task: the count is per request."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with running_many(UpstreamApp("a")) as urls:
        proxy = LeastTimeProxy(upstreams=[urls[0]], tracing=Tracing(tracer_provider=provider))
        transport = httpx.ASGITransport(app=proxy)
        async with httpx.AsyncClient(transport=transport, base_url="http://front") as client:
            for _ in range(3):
                assert (await client.get("/")).status_code == 200
    assert [span.attributes["leasttime.retry"] for span in exporter.get_finished_spans()] == [
        0,
        0,
        0,
    ]
