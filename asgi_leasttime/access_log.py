"""The access log: one line per proxied request, with what the upstream did.

NGINX's combined format with the upstream's fields appended (``$upstream_addr``,
``$upstream_status``, ``$upstream_header_time``), or JSON with Traefik's field names where they
mean the same (``ClientHost``, ``RequestMethod``, ``DownstreamStatus``, ``ServiceName``,
``ServiceAddr``, ``OriginStatus``, ``OriginDuration``, ``RetryAttempts``, ``Duration``). Lines go
to the ``asgi_leasttime.access`` logger at INFO; :func:`log_without_blocking` puts a queue
between that logger and its handlers so that a slow disk never holds up the event loop.

What a client sends is escaped before it is written (control characters as ``\\xNN``, the
quote and the backslash too): no client can forge a line. Header values are logged only when
asked for by name, and never ``Cookie``, ``Authorization`` or ``Proxy-Authorization``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import queue
import re
import time
from collections.abc import Iterator, Sequence
from typing import Literal

from asgi_leasttime.options import OptionError
from asgi_leasttime.records import RequestRecord

__all__ = ["NEVER_LOGGED", "AccessLog", "log_without_blocking"]

logger = logging.getLogger("asgi_leasttime.access")

NEVER_LOGGED = frozenset({"cookie", "authorization", "proxy-authorization", "set-cookie"})
"""Headers whose values no access log writes, even when asked to."""

_UNSAFE = re.compile(r'[\x00-\x1f\x7f-\x9f"\\\u2028\u2029]')  # the last two: line ends too


def _escaped(text: str) -> str:
    """``text`` with control characters, the quote and the backslash as ``\\xNN`` (the line
    and paragraph separators as ``\\u2028`` and ``\\u2029``)."""
    return _UNSAFE.sub(_escape, text)


def _escape(found: re.Match[str]) -> str:
    code = ord(found.group())
    return f"\\u{code:04x}" if code > 0xFF else f"\\x{code:02x}"


def _seconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.3f}"


class _Clock:
    """A time format, made once a second rather than once a line."""

    def __init__(self, format: str) -> None:
        self.format = format
        self.second = -1
        self.text = ""

    def __call__(self, when: float) -> str:
        second = int(when)
        if second != self.second:
            self.second, self.text = second, time.strftime(self.format, time.localtime(second))
        return self.text


class AccessLog:
    """An observer of a proxy's requests that logs one line per request.

    Arguments:
        format: ``"text"`` (NGINX's combined format, the upstream's fields appended) or
            ``"json"`` (one object a line, Traefik's field names).
        headers: request headers whose values are logged too, by name (never ``Cookie``,
            ``Authorization`` or ``Proxy-Authorization``).
    """

    def __init__(
        self, format: Literal["text", "json"] = "text", headers: Sequence[str] = ()
    ) -> None:
        if format not in ("text", "json"):
            raise OptionError("format", f"must be 'text' or 'json', not {format!r}")
        if isinstance(headers, str):
            raise OptionError("headers", f"must be a list of header names, not {headers!r}")
        names = [name.lower() for name in headers]
        refused = sorted(set(names) & NEVER_LOGGED)
        if refused:
            raise OptionError("headers", f"{', '.join(refused)} never go to the access log")
        self.format = format
        self.headers = tuple(names)
        self._wanted = {name.encode("latin-1"): name for name in names}
        self._line = self._json if format == "json" else self._text
        self._clock = _Clock("%Y-%m-%dT%H:%M:%S%z" if format == "json" else "%d/%b/%Y:%H:%M:%S %z")

    def finished(self, record: RequestRecord) -> None:
        """Log one request (the proxy calls this when it is over)."""
        if logger.isEnabledFor(logging.INFO):
            # logger.info() less its look for the caller's frame: the place is always this one.
            line = self._line(record)
            logger.handle(logger.makeRecord(logger.name, logging.INFO, __file__, 0, line, (), None))

    def _header_values(self, record: RequestRecord) -> dict[str, str]:
        found: dict[str, str] = {}
        if self._wanted:
            for name, value in record.scope.get("headers", ()):
                wanted = self._wanted.get(name)
                if wanted is not None:
                    found[wanted] = value.decode("latin-1")
        return found

    def _target(self, record: RequestRecord) -> str:
        query = record.query.decode("latin-1")
        return record.path + ("?" + query if query else "")

    def _text(self, record: RequestRecord) -> str:
        headers = dict(record.scope.get("headers", ()))
        referer = headers.get(b"referer", b"-").decode("latin-1")
        agent = headers.get(b"user-agent", b"-").decode("latin-1")
        when = self._clock(record.started)
        scheme = "WS" if record.protocol == "websocket" else "HTTP"
        request = f"{record.method} {self._target(record)} {scheme}/{record.http_version}"
        failed = ",".join(f"{name}:{reason}" for name, reason, _ in record.failed_attempts)
        fields = [
            f"{_escaped(record.client or '-')} - - [{when}]",
            f'"{_escaped(request)}" {record.status} {record.bytes_sent}',
            f'"{_escaped(referer)}" "{_escaped(agent)}"',
            f"rt={record.duration:.3f}",
            f'upstream="{_escaped(record.upstream or "-")}"',
            f"upstream_addr={record.address or '-'}",
            f"upstream_status={record.upstream_status or '-'}",
            f"upstream_header_time={_seconds(record.ttfb)}",
            f"attempts={record.attempts}",
            f'failed="{_escaped(failed)}"' if failed else "failed=-",
            f"sticky={record.sticky or '-'}",
        ]
        for name, value in self._header_values(record).items():
            fields.append(f'{name}="{_escaped(value)}"')
        return " ".join(fields)

    def _json(self, record: RequestRecord) -> str:
        document: dict[str, object] = {
            "time": self._clock(record.started),
            "ClientHost": record.client,
            "RequestMethod": record.method,
            "RequestPath": self._target(record),
            "RequestProtocol": f"{'WS' if record.protocol == 'websocket' else 'HTTP'}/"
            f"{record.http_version}",
            "DownstreamStatus": record.status,
            "DownstreamContentSize": record.bytes_sent,
            "Duration": record.duration,
            "ServiceName": record.upstream,
            "ServiceAddr": record.address,
            "OriginStatus": record.upstream_status,
            "OriginDuration": record.ttfb,
            "RetryAttempts": max(0, record.attempts - 1),
            "FailedAttempts": [
                {"upstream": name, "reason": reason, "outcome": outcome}
                for name, reason, outcome in record.failed_attempts
            ],
            "Sticky": record.sticky,
        }
        for name, value in self._header_values(record).items():
            document[f"request_{name}"] = value
        # json escapes every control character: a value cannot end the line.
        return json.dumps(document, ensure_ascii=True)


class _Handover(logging.handlers.QueueHandler):
    """A queue handler that hands each record over as it is: the listener's handlers format it
    (the standard one formats and copies every record first, on the event loop's time)."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if record.exc_info or record.args:  # not the access log's own: as the standard does
            prepared: logging.LogRecord = super().prepare(record)
            return prepared
        return record


@contextlib.contextmanager
def log_without_blocking(target: logging.Logger = logger) -> Iterator[None]:
    """While inside, ``target``'s handlers run on a thread of their own, behind a queue: the
    event loop only puts records on the queue (the standard library's ``QueueHandler`` and
    ``QueueListener``)."""
    handlers = list(target.handlers)
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, *handlers, respect_handler_level=True)
    front = _Handover(records)
    for handler in handlers:
        target.removeHandler(handler)
    target.addHandler(front)
    listener.start()
    try:
        yield
    finally:
        listener.stop()
        target.removeHandler(front)
        for handler in handlers:
            target.addHandler(handler)
