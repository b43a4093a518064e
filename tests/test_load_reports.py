"""ORCA load reports: the header's parser (fuzzed), and the middleware that writes it."""

from __future__ import annotations

import math

import anyio
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from asgi_leasttime.load_reports import (
    MOST_IN_FLIGHT,
    BadLoadReport,
    LoadReport,
    LoadReportMiddleware,
    parse_load_report,
)
from asgi_leasttime.options import OptionError

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("value", "report"),
    [
        (b"TEXT named_metrics.inflight=7", LoadReport(7.0, None)),
        (b"TEXT cpu_utilization=0.3, rps_fractional=120, named_metrics.inflight=7",
         LoadReport(7.0, 0.3)),
        (b"TEXT  cpu_utilization = 0.5 ", LoadReport(None, 0.5)),
        (b'JSON {"cpu_utilization": 0.3, "named_metrics": {"inflight": 2}}', LoadReport(2.0, 0.3)),
        (b'JSON {"named_metrics": {"inflight": 0}, "eps": 1}', LoadReport(0.0, None)),
        (b"TEXT cpu_utilization=1.7", LoadReport(None, 1.7)),  # past a soft limit: allowed
    ],
)  # fmt: skip
def test_reports_that_parse(value: bytes, report: LoadReport) -> None:
    assert parse_load_report(value) == report


def test_in_flight_from_several_named_metrics() -> None:
    """A server that counts what runs and what waits apart: both are in flight."""
    value = b"TEXT named_metrics.running=3, named_metrics.waiting=4, named_metrics.other=9"
    names = ("running", "waiting")
    assert parse_load_report(value, names) == LoadReport(7.0, None)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"named_metrics.inflight=7",  # no format
        b"BIN CZqZmZmZmbk/",
        b"TEXT named_metrics.inflight",
        b"TEXT named_metrics.inflight=",
        b"TEXT named_metrics.inflight=seven",
        b"TEXT named_metrics.inflight=nan",
        b"TEXT named_metrics.inflight=inf",
        b"TEXT named_metrics.inflight=-1",
        b"TEXT named_metrics.inflight=1e9",
        b"TEXT named_metrics.inflight=1, named_metrics.inflight=2",
        b"TEXT cpu_utilization=-0.1",
        b"TEXT cpu_utilization=1000",
        b"JSON [1, 2]",
        b"JSON {",
        b'JSON {"named_metrics": {"inflight": "many"}}',
        b'JSON {"named_metrics": {"inflight": true}}',
        b'JSON {"named_metrics": [1]}',
        b"TEXT named_metrics.inflight=\xff",
        b"TEXT " + b"a=1, " * 1000,
    ],
)
def test_reports_refused_whole(value: bytes) -> None:
    with pytest.raises(BadLoadReport):
        parse_load_report(value)


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_are_refused(value: bytes) -> None:
    try:
        report = parse_load_report(value)
    except BadLoadReport:
        return
    for figure in (report.inflight, report.utilization):
        assert figure is None or (math.isfinite(figure) and figure >= 0)
    assert report.inflight is None or report.inflight <= MOST_IN_FLIGHT


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["named_metrics.inflight", "cpu_utilization", "named_metrics.x"]),
            st.floats(allow_nan=True, allow_infinity=True, width=32),
        ),
        max_size=4,
    )
)
def test_text_reports_keep_only_sane_values(items: list[tuple[str, float]]) -> None:
    value = ("TEXT " + ", ".join(f"{name}={number!r}" for name, number in items)).encode()
    try:
        report = parse_load_report(value)
    except BadLoadReport:
        return
    given_inflight = [n for name, n in items if name == "named_metrics.inflight"]
    assert report.inflight == (given_inflight[0] if given_inflight else None)


async def test_the_middleware_reports_what_waits_behind_each_answer() -> None:
    release, all_in = anyio.Event(), anyio.Event()
    inside = 0

    async def app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        nonlocal inside
        inside += 1
        if inside == 3:
            all_in.set()
        if scope["path"] == "/slow":
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]

    middleware = LoadReportMiddleware(app)
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://upstream") as client:
        reports: list[str] = []

        async def slow() -> None:
            reports.append((await client.get("/slow")).headers["endpoint-load-metrics"])

        async with anyio.create_task_group() as group:
            for _ in range(3):
                group.start_soon(slow)
            await all_in.wait()
            fast = await client.get("/fast")
            release.set()
        assert fast.headers["endpoint-load-metrics"] == "TEXT named_metrics.inflight=3"
        assert sorted(reports) == [f"TEXT named_metrics.inflight={n}" for n in (0, 1, 2)]
        after = await client.get("/fast")
    assert after.headers["endpoint-load-metrics"] == "TEXT named_metrics.inflight=0"
    assert middleware.inflight == 0
    assert parse_load_report(after.headers["endpoint-load-metrics"].encode()).inflight == 0


async def test_the_middleware_counts_a_request_that_failed_out() -> None:
    async def broken(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        raise RuntimeError("boom")

    middleware = LoadReportMiddleware(broken, cpu=True)
    with pytest.raises(RuntimeError):
        await middleware({"type": "http", "path": "/"}, None, None)  # type: ignore[arg-type]
    assert middleware.inflight == 0


def test_a_metric_name_that_would_break_the_header_is_refused() -> None:
    with pytest.raises(OptionError):
        LoadReportMiddleware(lambda *a: None, metric="in flight")  # type: ignore[arg-type]


# -- the proxy reading them ----------------------------------------------------------------------


async def reporting_upstream(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
    """Answers with the report its query asks for (``?report=...``), or none."""
    from urllib.parse import parse_qs

    query = parse_qs(scope["query_string"].decode())
    headers = [(b"content-length", b"2")]
    for value in query.get("report", []):
        headers.append((b"Endpoint-Load-Metrics", value.encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]


async def test_a_trusted_upstreams_reports_reach_the_balancer_and_not_the_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from asgi_leasttime import LeastTimeProxy
    from asgi_leasttime.load_reports import LoadReports
    from tests.servers import running

    reports = [
        "TEXT named_metrics.inflight=3",
        'JSON {"named_metrics": {"inflight": 5}}',
        "TEXT named_metrics.inflight=lots",
        "TEXT named_metrics.inflight=-4",
    ]
    async with running(reporting_upstream) as url:
        proxy = LeastTimeProxy(upstreams=[url], load_reports=LoadReports())
        heard: list[float] = []
        real = proxy.balancer.heard_load
        proxy.balancer.heard_load = lambda name, n: (heard.append(n), real(name, n))  # type: ignore[method-assign]
        async with running(proxy) as front, httpx.AsyncClient(base_url=front) as client:
            answers = [await client.get("/", params={"report": r}) for r in reports]
            twice = await client.get("/", params={"report": [reports[0], reports[1]]})
    assert [a.status_code for a in [*answers, twice]] == [200] * 5
    assert all("endpoint-load-metrics" not in a.headers for a in [*answers, twice])
    assert heard == [3.0, 5.0]
    refused = [
        r.getMessage() for r in caplog.records if "load report of upstream" in r.getMessage()
    ]
    assert len(refused) == 1  # one line per upstream per 10 s; the others counted
    assert "not a number" in refused[0]


async def test_an_upstream_not_trusted_keeps_its_report() -> None:
    from asgi_leasttime import LeastTimeProxy, Upstream
    from asgi_leasttime.load_reports import LoadReports
    from tests.servers import running

    async with running(reporting_upstream) as url:
        proxy = LeastTimeProxy(
            upstreams=[Upstream(url, load_reports=False)], load_reports=LoadReports()
        )
        async with running(proxy) as front, httpx.AsyncClient(base_url=front) as client:
            answer = await client.get("/", params={"report": "TEXT named_metrics.inflight=3"})
    assert answer.headers["endpoint-load-metrics"] == "TEXT named_metrics.inflight=3"
    assert proxy.balancer[url]._report is None


async def test_without_trust_no_report_is_read() -> None:
    from asgi_leasttime import LeastTimeProxy
    from tests.servers import running

    async with running(reporting_upstream) as url:
        proxy = LeastTimeProxy(upstreams=[url])
        async with running(proxy) as front, httpx.AsyncClient(base_url=front) as client:
            answer = await client.get("/", params={"report": "TEXT named_metrics.inflight=3"})
    assert answer.headers["endpoint-load-metrics"] == "TEXT named_metrics.inflight=3"
    assert proxy.balancer[url].reported == 0


async def test_reports_written_by_the_middleware_are_read_through_the_proxy() -> None:
    from asgi_leasttime import LeastTimeProxy
    from asgi_leasttime.load_reports import LoadReports
    from tests.servers import UpstreamApp, running

    app = LoadReportMiddleware(UpstreamApp("a"))
    async with running(app) as url:
        proxy = LeastTimeProxy(upstreams=[url], load_reports=LoadReports())
        async with running(proxy) as front, httpx.AsyncClient(base_url=front) as client:
            answers = [await client.get("/") for _ in range(3)]
            report = proxy.balancer[url]._report
    assert all("endpoint-load-metrics" not in a.headers for a in answers)
    assert report is not None  # heard: the usual count of the others set (0 here)
    assert report.usual == 0
