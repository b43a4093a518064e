"""Load reports: what an upstream says of its own load, in ORCA's ``endpoint-load-metrics``.

ORCA (Open Request Cost Aggregation, the xDS ``OrcaLoadReport``, gRFC A51) carries a server's
load in a response header, as ``TEXT`` (``TEXT cpu_utilization=0.3, named_metrics.inflight=7``)
or ``JSON`` (``JSON {"cpu_utilization": 0.3, "named_metrics": {"inflight": 7}}``); Envoy reads
it, vLLM's OpenAI server writes it. The reading side is :func:`parse_load_report`; the writing
side, for the Starlette and FastAPI apps behind the proxy, is :class:`LoadReportMiddleware`.
(``BIN``, a base64 protobuf, is not read: it needs protobuf; the other two say the same.)

A report is read only from an upstream trusted to report (``load_reports``): a value that does
not parse, or is absurd (negative, not finite, more requests in flight than
:data:`MOST_IN_FLIGHT`), is refused whole.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from asgi_leasttime.options import OptionError, check_fields
from asgi_leasttime.types import (
    ASGIApp,
    Headers,
    Message,
    Opener,
    Receive,
    Scope,
    Send,
    UpstreamResponse,
)

__all__ = [
    "HEADER",
    "MOST_IN_FLIGHT",
    "BadLoadReport",
    "LoadReport",
    "LoadReportMiddleware",
    "LoadReports",
    "parse_load_report",
    "reading_reports",
]

HEADER = b"endpoint-load-metrics"
MOST_IN_FLIGHT = 100_000.0
"""More requests in flight than this on one server is a lie or a fault, not a report."""
MOST_UTILIZATION = 100.0
"""ORCA allows a utilization above 1 (past a soft limit); a hundred times it is absurd."""
LONGEST = 4096  # bytes of header value read at most


class BadLoadReport(ValueError):
    """A report that does not parse, or says something absurd."""


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What one answer's report says: the server's requests in flight (all its clients'), and
    its CPU utilization (a fraction of what it has); ``None`` for what it does not say."""

    inflight: float | None
    utilization: float | None


@dataclass(frozen=True, kw_only=True)
class LoadReports:
    """Read the upstreams' load reports (the default mode; Traefik's ignores them).

    Arguments:
        inflight_metrics: the named metrics whose sum is a server's requests in flight
            (``["inflight"]``, what :class:`LoadReportMiddleware` writes; vLLM's OpenAI server
            reports its queue as ``num_requests_waiting``).

    Given to the proxy, every upstream is trusted to report, except those given with
    ``load_reports=False``; without it, only those given with ``load_reports=True``. A trusted
    upstream's report header is taken off its answers before the client sees them.
    """

    inflight_metrics: Sequence[str] = ("inflight",)

    def __post_init__(self) -> None:
        if isinstance(self.inflight_metrics, str):
            raise OptionError("inflight_metrics", "must be a list of metric names")
        check_fields(self)
        object.__setattr__(self, "inflight_metrics", tuple(self.inflight_metrics))
        if not self.inflight_metrics or not all(self.inflight_metrics):
            raise OptionError("inflight_metrics", "must name at least one metric")


def reading_reports(
    opener: Opener,
    options: LoadReports,
    heard: Callable[[LoadReport], None],
    refused: Callable[[str], None],
) -> Opener:
    """``opener`` for an upstream trusted to report: each answer's report is taken off it and
    handed to ``heard``; one that does not parse, or several, to ``refused`` with why."""
    metrics = options.inflight_metrics

    async def opened(
        method: str, target: bytes, headers: Headers, body: AsyncIterator[bytes] | None
    ) -> UpstreamResponse:
        response = await opener(method, target, headers, body)
        raw = response.raw_headers
        for name, _ in raw:
            if len(name) == len(HEADER) and name.lower() == HEADER:
                break
        else:
            return response
        reports = [value for name, value in raw if name.lower() == HEADER]
        response.raw_headers = [(name, value) for name, value in raw if name.lower() != HEADER]
        if len(reports) > 1:
            refused(f"{len(reports)} reports in one answer")
            return response
        try:
            report = parse_load_report(reports[0], metrics)
        except BadLoadReport as exc:
            refused(str(exc))
        else:
            heard(report)
        return response

    return opened


def parse_load_report(value: bytes, inflight_metrics: Sequence[str] = ("inflight",)) -> LoadReport:
    """The report in one ``endpoint-load-metrics`` value; the requests in flight are the sum of
    the named metrics ``inflight_metrics`` (a server may count what runs and what waits
    apart). Raises :class:`BadLoadReport`."""
    if len(value) > LONGEST:
        raise BadLoadReport(f"longer than {LONGEST} bytes")
    try:
        text = value.decode("ascii").strip()
    except UnicodeDecodeError:
        raise BadLoadReport("not ASCII") from None
    kind, _, rest = text.partition(" ")
    if kind == "TEXT":
        fields = _text_fields(rest)
    elif kind == "JSON":
        fields = _json_fields(rest)
    elif kind == "BIN":
        raise BadLoadReport("BIN reports are not read: send TEXT or JSON")
    else:
        raise BadLoadReport(f"no TEXT or JSON before the report ({kind[:16]!r})")
    named = [
        fields[f"named_metrics.{n}"] for n in inflight_metrics if f"named_metrics.{n}" in fields
    ]
    if any(count < 0 for count in named):
        raise BadLoadReport("a negative count of requests")
    inflight = math.fsum(named) if named else None
    utilization = fields.get("cpu_utilization")
    if inflight is not None and not 0 <= inflight <= MOST_IN_FLIGHT:
        raise BadLoadReport(f"{inflight!r} requests in flight")
    if utilization is not None and not 0 <= utilization <= MOST_UTILIZATION:
        raise BadLoadReport(f"a CPU utilization of {utilization!r}")
    return LoadReport(inflight, utilization)


def _number(name: str, raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise BadLoadReport(f"{name} is not a number")
    try:
        number = float(raw)
    except ValueError:
        raise BadLoadReport(f"{name} is not a number") from None
    if not math.isfinite(number):
        raise BadLoadReport(f"{name} is not finite")
    return number


def _text_fields(rest: str) -> dict[str, float]:
    fields: dict[str, float] = {}
    for item in rest.split(","):
        name, equals, raw = item.strip().partition("=")
        name = name.strip()
        if not equals or not name or not raw.strip():
            raise BadLoadReport(f"{item.strip()[:32]!r} is not name=value")
        if name in fields:
            raise BadLoadReport(f"{name} given twice")
        fields[name] = _number(name, raw.strip())
    return fields


def _json_fields(rest: str) -> dict[str, float]:
    try:
        document = json.loads(rest)
    except ValueError:
        raise BadLoadReport("not JSON") from None
    if not isinstance(document, dict):
        raise BadLoadReport("not a JSON object")
    fields: dict[str, float] = {}
    for name, raw in document.items():
        if name == "named_metrics":
            if not isinstance(raw, dict):
                raise BadLoadReport("named_metrics is not an object")
            for metric, number in raw.items():
                fields[f"named_metrics.{metric}"] = _number(str(metric), number)
        elif name in ("cpu_utilization", "mem_utilization", "application_utilization",
                      "rps_fractional", "eps"):  # fmt: skip
            fields[name] = _number(name, raw)
    return fields


class LoadReportMiddleware:
    """For the apps behind the proxy: counts the app's requests in flight and adds an
    ``endpoint-load-metrics`` report to every HTTP answer.

    Arguments:
        app: the ASGI app.
        metric: the named metric that carries the count (the proxy's ``inflight`` by default).
        cpu: add the process's CPU utilization (``cpu_utilization``, over the last second or
            more: CPU seconds of this process per second, so one busy core is 1.0).

    The count is this process's: with several workers on one port, each reports its own, as
    each answers its own requests.
    """

    def __init__(self, app: ASGIApp, *, metric: str = "inflight", cpu: bool = False) -> None:
        if not metric or any(c in metric for c in ' ,="\\'):
            raise OptionError("metric", f"{metric!r} cannot be a metric's name")
        self.app = app
        self.inflight = 0
        self._prefix = f"TEXT named_metrics.{metric}=".encode("ascii")
        self._cpu = _CpuUtilization() if cpu else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.inflight += 1
        counted = True

        async def reporting_send(message: Message) -> None:
            nonlocal counted
            if message["type"] == "http.response.start":
                # The count as the answer leaves, without this request: what waits behind it.
                report = self._prefix + b"%d" % (self.inflight - 1)
                if self._cpu is not None:
                    report += b", cpu_utilization=%.3f" % self._cpu.now()
                headers = [*message.get("headers", ()), (HEADER, report)]
                message = {**message, "headers": headers}
            elif not message.get("more_body", False) and counted:
                counted = False
                self.inflight -= 1
            await send(message)

        try:
            await self.app(scope, receive, reporting_send)
        finally:
            if counted:
                self.inflight -= 1


class _CpuUtilization:
    """This process's CPU seconds per second, measured over at least a second."""

    def __init__(self) -> None:
        self._wall, self._cpu = time.monotonic(), time.process_time()
        self._value = 0.0

    def now(self) -> float:
        wall = time.monotonic()
        if wall - self._wall >= 1.0:
            cpu = time.process_time()
            self._value = (cpu - self._cpu) / (wall - self._wall)
            self._wall, self._cpu = wall, cpu
        return self._value
