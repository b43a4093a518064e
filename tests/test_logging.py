"""Logging: a logger per module under ``asgi_leasttime``, and the warnings about failed requests
rate-limited per upstream, with the number of lines folded into the next one."""

from __future__ import annotations

import ast
import importlib
import logging
from pathlib import Path

import anyio
import httpx
import pytest

import asgi_leasttime
from asgi_leasttime import LeastTimeProxy, _forwarding
from asgi_leasttime._logging import RateLimitedLog
from tests.servers import free_port, running

LOGGER = "asgi_leasttime.test"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def log(clock: Clock) -> RateLimitedLog:
    return RateLimitedLog(logging.getLogger(LOGGER), 10.0, clock=clock)


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_the_first_line_then_one_per_window_saying_how_many_were_folded(
    log: RateLimitedLog, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    assert log.warning("b", "upstream %s failed: %s", "b", "refused")
    for _ in range(953):
        clock.now += 0.005
        assert not log.warning("b", "upstream %s failed: %s", "b", "refused")
    assert lines(caplog) == ["upstream b failed: refused"]
    clock.now = 1010.0  # ten seconds after the first line
    assert log.warning("b", "upstream %s failed: %s", "b", "reset")
    assert lines(caplog)[1] == "upstream b failed: reset (and 953 more like it in the last 10 s)"
    clock.now += 30  # a quiet spell: the next line is plain
    log.warning("b", "upstream %s failed: %s", "b", "refused")
    assert lines(caplog)[2] == "upstream b failed: refused"


def test_each_key_has_its_own_window(
    log: RateLimitedLog, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    for _ in range(3):
        log.warning("a", "a failed")
        log.warning("b", "b failed")
    assert lines(caplog) == ["a failed", "b failed"]
    clock.now += 10.5
    log.warning("a", "a failed")
    assert lines(caplog)[2] == "a failed (and 2 more like it in the last 10.5 s)"


def test_the_record_names_the_callers_line_and_keeps_the_traceback(
    log: RateLimitedLog, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    try:
        raise RuntimeError("inside")
    except RuntimeError:
        log.error("k", "went wrong", exc_info=True)
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    assert record.funcName == "test_the_record_names_the_callers_line_and_keeps_the_traceback"
    assert "RuntimeError: inside" in caplog.text


def test_lines_below_the_loggers_level_are_neither_written_nor_counted(
    log: RateLimitedLog, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger=LOGGER)
    assert not log.warning("k", "dropped")
    assert len(log) == 0
    caplog.set_level(logging.WARNING, logger=LOGGER)
    assert log.warning("k", "written")
    assert lines(caplog) == ["written"]


def test_keys_gone_quiet_are_forgotten(log: RateLimitedLog, clock: Clock) -> None:
    for name in ("a", "b", "c"):
        log.warning(name, "failed")
    log.forget("c")
    assert len(log) == 2
    clock.now += 11
    log.warning("d", "failed")  # a line written prunes the keys whose window is over
    assert len(log) == 1
    log.warning("d", "again")  # folded: kept until its count is told
    clock.now += 11
    log.warning("e", "failed")
    assert len(log) == 2


def test_a_dead_upstream_is_one_warning_per_window_not_one_per_request(
    clock: Clock, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    limited = RateLimitedLog(logging.getLogger("asgi_leasttime.forwarding"), 10.0, clock=clock)
    monkeypatch.setattr(_forwarding, "_failures", limited, raising=False)
    dead = f"http://127.0.0.1:{free_port()}"
    proxy = LeastTimeProxy(upstreams=[dead])

    async def requests(count: int) -> list[int]:
        async with (
            running(proxy, lifespan="on") as url,
            httpx.AsyncClient(base_url=url) as client,
        ):
            return [(await client.get("/x")).status_code for _ in range(count)]

    caplog.set_level(logging.WARNING, logger="asgi_leasttime")
    assert anyio.run(requests, 20) == [502] * 20
    failures = [r for r in caplog.records if r.getMessage().startswith(f"upstream {dead} failed")]
    assert [r.name for r in failures] == ["asgi_leasttime.forwarding"]
    # The proxy says once that the upstream refused and is out of the picks.
    assert sum("refused a connection" in r.getMessage() for r in caplog.records) == 1
    assert failures[0].getMessage().startswith(f"upstream {dead} failed: ")
    clock.now += 10
    assert anyio.run(requests, 1) == [502]
    messages = [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith(f"upstream {dead} failed")
    ]
    assert len(messages) == 2
    assert messages[1].endswith("(and 19 more like it in the last 10 s)")


# -- one logger per module ----------------------------------------------------------------------

LOGGERS = {
    "_forwarding": "asgi_leasttime.forwarding",
    "_websocket": "asgi_leasttime.websocket",
    "balancer": "asgi_leasttime.balancer",
    "health": "asgi_leasttime.health",
    "proxy": "asgi_leasttime.proxy",
    "state": "asgi_leasttime.state",
    "redis_state": "asgi_leasttime.state",  # the store, whichever it is
}
"""The names docs/reliability.md lists: what to turn up or down in a logging config."""


@pytest.mark.parametrize(("module", "name"), LOGGERS.items())
def test_each_module_logs_under_a_name_of_its_own(module: str, name: str) -> None:
    logger = importlib.import_module(f"asgi_leasttime.{module}").logger
    assert logger.name == name


def test_no_module_logs_under_the_bare_package_name() -> None:
    """Every getLogger("asgi_leasttime.<part>") in the package: none bare, none of
    ``__name__`` (``asgi_leasttime._forwarding`` is no name to configure)."""
    package = Path(asgi_leasttime.__file__).parent
    found: dict[str, str] = {}
    for source in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "getLogger":
                (argument,) = node.args
                assert isinstance(argument, ast.Constant), f"{source.name}: a literal name"
                assert isinstance(argument.value, str), source.name
                found[source.name] = argument.value
    assert found
    for module, name in found.items():
        assert name.startswith("asgi_leasttime."), (module, name)
        assert "._" not in name, (module, name)
    docs = (package.parent / "docs" / "reliability.md").read_text()
    assert all(f"`{name}`" in docs for name in found.values())
