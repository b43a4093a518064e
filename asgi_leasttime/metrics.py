"""The admin app: Prometheus metrics at ``/metrics`` and the upstreams' status at ``/status``.

Mount it apart from the proxied paths (or serve it on its own port, as the CLI does with an
``[admin]`` section): nothing here should be reachable through the proxy. The metric names follow
Traefik's (``..._service_requests_total``, ``..._service_request_duration_seconds``,
``..._service_retries_total``, ``..._service_server_up``) and add what Traefik does not expose: each
upstream's average TTFB, requests in flight and score. prometheus-client is an optional extra
(``asgi-leasttime[metrics]``); without it ``/metrics`` says how to enable it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from asgi_leasttime._paths import path_below_root
from asgi_leasttime.admin import WRITES, check_token, write
from asgi_leasttime.records import RequestRecord
from asgi_leasttime.state import Fleet, fleet_totals
from asgi_leasttime.types import Receive, Scope, Send

if TYPE_CHECKING:
    from asgi_leasttime.proxy import LeastTimeProxy
    from asgi_leasttime.status import UpstreamStatus

__all__ = ["AdminApp", "RequestMetrics"]

PREFIX = "asgi_leasttime"
WORKERS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus-client's own switch to its multiprocess mode: where each process writes its
counters. ``serve --workers N`` sets it for its workers when it serves an admin app."""
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
UPSTREAM_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                    2.5, 5, 10, 30, 60)  # fmt: skip
"""Sub-millisecond (a loopback upstream) to a minute (a long poll, a model's answer)."""


def _relays_only(proxy: LeastTimeProxy) -> bool:
    """Whether ``proxy`` shares a state it makes no reports to: a process that serves no traffic
    and only relays changes, as ``serve --workers N``'s admin app in the supervisor (built with
    ``Config.build_proxy(relay_only=True)``). Its own figures are not the traffic's."""
    return getattr(proxy.state, "report_every", 1.0) is None


def _shown_statuses(proxy: LeastTimeProxy, fleet: Fleet | None) -> list[UpstreamStatus]:
    """The upstreams as ``/status`` and ``/metrics`` show them: the proxy's own figures, or,
    for a proxy that :func:`_relays_only`, the fleet's (every reporting process's and its own:
    counts added up, TTFB the requests-weighted mean, the score made from those)."""
    statuses = proxy.upstream_status()
    if fleet is None or not _relays_only(proxy):
        return statuses
    own = {
        status.name: {
            "inflight": float(status.inflight),
            "requests": float(status.requests),
            "failures": float(status.failures),
            "average_ttfb": status.average_ttfb,
        }
        for status in statuses
    }
    totals = fleet_totals({**fleet, "(this process)": own})
    return [status.with_figures(totals[status.name]) for status in statuses]


class RequestMetrics:
    """Per-request counters of one proxy, in a registry of its own (needs prometheus-client).

    Under ``serve --workers N`` each worker keeps them in prometheus-client's multiprocess files
    (:data:`WORKERS_DIR_ENV` names their directory) and the supervisor's admin app adds them up.
    """

    def __init__(self, proxy: LeastTimeProxy) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("code", "method", "protocol", "service")
        self.requests = Counter(
            f"{PREFIX}_service_requests_total",
            "Requests answered, by status code, method and protocol.",
            labels,
            registry=self.registry,
        )
        self.duration = Histogram(
            f"{PREFIX}_service_request_duration_seconds",
            "Time from the request's arrival to the end of its response.",
            labels,
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.retries = Counter(
            f"{PREFIX}_service_retries_total",
            "Attempts after the first, sent to another upstream (see ..._retries_total).",
            ("service",),
            registry=self.registry,
        )
        self.outcomes = Counter(
            f"{PREFIX}_retries",
            "Failed attempts by reason (refused, reset, no_response, timeout, status) and what "
            "came of them (retried, or not: attempts, budget, no_upstream).",
            ("service", "reason", "outcome"),
            registry=self.registry,
        )
        upstream_labels = ("service", "server")
        self.ttfb = Histogram(
            f"{PREFIX}_server_ttfb_seconds",
            "Time from sending a request to the upstream to its response head.",
            upstream_labels,
            buckets=UPSTREAM_BUCKETS,
            registry=self.registry,
        )
        self.upstream_duration = Histogram(
            f"{PREFIX}_server_request_duration_seconds",
            "Arrival to end of response of the requests an upstream answered, by status class.",
            (*upstream_labels, "code_class"),
            buckets=UPSTREAM_BUCKETS,
            registry=self.registry,
        )
        self.attempts = Histogram(
            f"{PREFIX}_service_attempts",
            "Attempts made for one request (1: no retry; 0: no upstream to try).",
            ("service",),
            buckets=(0, 1, 2, 3, 4, 5),
            registry=self.registry,
        )
        self.service = proxy.name
        for (reason, outcome), count in proxy.retry_counts.items():  # those before these metrics
            self.outcomes.labels(self.service, reason, outcome).inc(count)

    def finished(self, record: RequestRecord) -> None:
        """Count one finished request."""
        service = self.service
        labels = (str(record.status), record.method, record.protocol, service)
        self.requests.labels(*labels).inc()
        self.duration.labels(*labels).observe(record.duration)
        self.attempts.labels(service).observe(record.attempts)
        if record.attempts > 1:
            self.retries.labels(service).inc(record.attempts - 1)
        for _, reason, outcome in record.failed_attempts:
            self.outcomes.labels(service, reason, outcome).inc()
        upstream = record.upstream
        if upstream is not None and record.upstream_status is not None:
            if record.ttfb is not None:
                self.ttfb.labels(service, upstream).observe(record.ttfb)
            code_class = f"{record.status // 100}xx"
            self.upstream_duration.labels(service, upstream, code_class).observe(record.duration)


def workers_registry(directory: str) -> Any:
    """A registry of what every worker counted in ``directory`` (prometheus-client's
    multiprocess files), for the admin app of a supervisor that serves no traffic itself."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return registry


class _UpstreamCollector:
    """Reads the balancer's state at scrape time: no work on the request path."""

    def __init__(self, proxy: LeastTimeProxy) -> None:
        self.proxy = proxy
        self.fleet: Fleet | None = None  # every process's figures, gathered for this scrape

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        service = self.proxy.name
        up = GaugeMetricFamily(
            f"{PREFIX}_service_server_up", "1 if the upstream is up.", labels=("service", "url")
        )
        labels = ("service", "server")
        ttfb = GaugeMetricFamily(
            f"{PREFIX}_server_average_ttfb_seconds",
            "Average time to first byte over the last 100 samples.",
            labels=labels,
        )
        inflight = GaugeMetricFamily(
            f"{PREFIX}_server_inflight_requests", "Requests in flight.", labels=labels
        )
        score = GaugeMetricFamily(
            f"{PREFIX}_server_score_seconds",
            "Least-time score: average TTFB x (1 + in flight) / weight; lowest wins.",
            labels=labels,
        )
        fenced = GaugeMetricFamily(f"{PREFIX}_server_fenced", "1 if draining.", labels=labels)
        weight = GaugeMetricFamily(f"{PREFIX}_server_weight", "The weight.", labels=labels)
        requests = CounterMetricFamily(
            f"{PREFIX}_server_requests", "Requests sent to the upstream.", labels=labels
        )
        failures = CounterMetricFamily(
            f"{PREFIX}_server_failures", "Failures recorded for the upstream.", labels=labels
        )
        down = GaugeMetricFamily(
            f"{PREFIX}_server_down_seconds",
            "Seconds a source (manual, active, passive, parent) has said the upstream is down.",
            labels=(*labels, "source"),
        )
        joined = GaugeMetricFamily(
            f"{PREFIX}_server_joined_timestamp_seconds",
            "When the upstream joined the proxy, and where from (config, api, dns).",
            labels=(*labels, "origin"),
        )
        for status in _shown_statuses(self.proxy, self.fleet):
            joined.add_metric((service, status.name, status.origin), status.since)
            for source, seconds in status.down.items():
                down.add_metric((service, status.name, source), seconds)
            up.add_metric((service, status.url or status.name), 1.0 if status.up else 0.0)
            key = (service, status.name)
            ttfb.add_metric(key, status.average_ttfb)
            inflight.add_metric(key, status.inflight)
            score.add_metric(key, status.score)
            fenced.add_metric(key, 1.0 if status.fenced else 0.0)
            weight.add_metric(key, status.weight)
            requests.add_metric(key, status.requests)
            failures.add_metric(key, status.failures)
        yield from (up, down, ttfb, inflight, score, fenced, weight, requests, failures, joined)
        if self.fleet is not None:
            yield from self._fleet_families(self.fleet)

    def _fleet_families(self, fleet: Fleet) -> Iterator[Any]:
        """Every process sharing the state, added up: one scrape of any of them sees all."""
        from prometheus_client.core import GaugeMetricFamily

        service, labels = self.proxy.name, ("service", "server")
        processes = GaugeMetricFamily(
            f"{PREFIX}_fleet_processes", "Processes reporting through the shared state.",
            labels=("service",),
        )  # fmt: skip
        processes.add_metric((service,), len(fleet))
        families = {
            key: GaugeMetricFamily(f"{PREFIX}_fleet_server_{key}", text, labels=labels)
            for key, text in (
                ("inflight", "Requests in flight on the upstream, all processes."),
                ("requests", "Requests sent to the upstream, all processes."),
                ("failures", "Failures recorded for the upstream, all processes."),
            )
        }
        families["average_ttfb"] = GaugeMetricFamily(
            f"{PREFIX}_fleet_server_average_ttfb_seconds",
            "Average TTFB of the upstream, all processes: their averages weighted by requests.",
            labels=labels,
        )
        for name, total in fleet_totals(fleet).items():
            for key, family in families.items():
                family.add_metric((service, name), total[key])
        yield processes
        yield from families.values()


class AdminApp:
    """ASGI app with ``/metrics`` (Prometheus text) and ``/status`` (JSON) for one proxy, a live
    dashboard at ``/`` (and ``/dashboard``), and, given a ``token``, the write API under
    ``/upstreams/`` (see :mod:`asgi_leasttime.admin`), which the dashboard's controls call.

    Creating it turns on the proxy's per-request counters when prometheus-client is installed.
    In the supervisor of ``serve --workers N`` (a proxy that :func:`_relays_only`, with
    :data:`WORKERS_DIR_ENV` set), ``/metrics`` shows the workers' counters instead, added up.
    """

    def __init__(self, proxy: LeastTimeProxy, *, token: str | None = None) -> None:
        check_token(token)
        self.proxy = proxy
        self.token = token
        self.metrics: RequestMetrics | None = None
        self.registry: Any = None  # what /metrics shows; None without prometheus-client
        self._upstreams = _UpstreamCollector(proxy)
        workers = os.environ.get(WORKERS_DIR_ENV)
        try:
            if workers and _relays_only(proxy):
                self.registry = workers_registry(workers)  # the workers count; this one serves none
            else:
                self.metrics = RequestMetrics(proxy)
                self.registry = self.metrics.registry
        except ImportError:
            pass
        else:
            self.registry.register(self._upstreams)
        if self.metrics is not None:
            proxy.observe_requests(self.metrics)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = path_below_root(scope)
        raw_path: bytes = scope.get("raw_path") or path.encode()
        if scope["method"] in WRITES or path.startswith("/upstreams/"):
            name = raw_path.decode("latin-1").rpartition("/upstreams/")[2]
            if scope["method"] not in WRITES or not path.startswith("/upstreams/") or not name:
                status, document = 405, {"error": "the write API is POST, PUT and DELETE"}
            else:
                status, document = await write(self.proxy, self.token, scope, receive, name)
            body = json.dumps(document).encode()
            headers = [(b"content-type", b"application/json"),
                       (b"content-length", str(len(body)).encode())]  # fmt: skip
            if status == 401:
                headers.append((b"www-authenticate", b"Bearer"))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        if path in ("/", "/dashboard") and scope["method"] in ("GET", "HEAD"):
            from asgi_leasttime.dashboard import page

            body, headers = page()
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        if path == "/metrics":
            status, content_type, body = self.render_metrics(await self.proxy.state.fleet())
        elif path == "/status":
            body = self.render_status(await self.proxy.state.fleet())
            status, content_type = 200, b"application/json"
        else:
            status, content_type, body = 404, b"text/plain; charset=utf-8", b"not found"
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def render_metrics(self, fleet: Fleet | None = None) -> tuple[int, bytes, bytes]:
        """Status, content type and body of ``/metrics``; with ``fleet``, the figures of every
        process sharing the state too."""
        if self.registry is None:
            text = b"metrics need prometheus-client: pip install 'asgi-leasttime[metrics]'\n"
            return 501, b"text/plain; charset=utf-8", text
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self._upstreams.fleet = fleet
        return 200, CONTENT_TYPE_LATEST.encode(), generate_latest(self.registry)

    def render_status(self, fleet: Fleet | None = None) -> bytes:
        """The body of ``/status``: the proxy and every upstream, as JSON; with ``fleet``, the
        number of processes sharing the state and, per upstream, their figures added up (and,
        on a proxy that :func:`_relays_only`, those figures in place of its own)."""
        upstreams = [status.as_json() for status in _shown_statuses(self.proxy, fleet)]
        document: dict[str, Any] = {
            "service": self.proxy.name,
            "mode": self.proxy.balancer.mode,
            "up": self.proxy.balancer.up,
            "upstreams": upstreams,
            "retries": self._retries(),
            "budget": self.proxy.retry_budget_json(),
        }
        if fleet is not None:
            totals = fleet_totals(fleet)
            document["processes"] = len(fleet)
            for upstream in upstreams:
                upstream["fleet"] = totals.get(upstream["name"], {})
        return json.dumps(document).encode()

    def _retries(self) -> dict[str, dict[str, int]]:
        """``/status``'s retries by reason and outcome: this proxy's, or in a supervisor, the
        workers' (read from their counters)."""
        if self.metrics is not None or self.registry is None:
            return self.proxy.retry_counts.as_json()
        document: dict[str, dict[str, int]] = {}
        for family in self.registry.collect():
            if family.name != f"{PREFIX}_retries":
                continue
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels["service"] == self.proxy.name:
                    reasons = document.setdefault(sample.labels["reason"], {})
                    reasons[sample.labels["outcome"]] = int(sample.value)
        return document
