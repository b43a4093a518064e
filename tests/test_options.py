"""Python API mistakes are OptionErrors that name the option and say what is wrong, as the
configuration file's are: never a TypeError or an AttributeError from somewhere inside."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from starlette.applications import Starlette

from asgi_leasttime import (
    HealthCheck,
    LeastTimeMiddleware,
    LeastTimeProxy,
    PassiveHealthCheck,
    StickyCookie,
)
from asgi_leasttime.config import ConfigError, parse_config
from asgi_leasttime.options import OptionError

URL = "http://127.0.0.1:9001"
UNSET = "ASGI_LEASTTIME_TEST_NEVER_SET"


def proxy(**options: Any) -> Callable[[], object]:
    return lambda: LeastTimeProxy(**{"upstreams": [URL], **options})


def middleware(**options: Any) -> Callable[[], object]:
    return lambda: LeastTimeMiddleware(Starlette(), **{"paths": ["/api"], **options})


CASES: list[tuple[str, Callable[[], object], str, str]] = [
    (
        "a secret key read from an unset variable",
        lambda: StickyCookie(secret_key=os.environ.get(UNSET)),  # type: ignore[arg-type]
        "secret_key",
        "must be a non-empty key or list of keys, not None",
    ),
    ("sticky=True", proxy(sticky=True), "sticky", "must be a StickyCookie or None, not True"),
    (
        "health_check=True",
        proxy(health_check=True),
        "health_check",
        "must be a HealthCheck or None, not True",
    ),
    ("an interval as a string", lambda: HealthCheck(interval="10"), "interval", "not '10'"),  # type: ignore[arg-type]
    (
        "a failure count as a string",
        lambda: PassiveHealthCheck(max_failed_attempts="3"),  # type: ignore[arg-type]
        "max_failed_attempts",
        "must be an integer, not '3'",
    ),
    (
        "one URL for the list",
        proxy(upstreams=URL),
        "upstreams",
        f"must be a list of URLs or Upstreams, not {URL!r}",
    ),
    (
        "one URL for the middleware's list",
        middleware(upstreams=URL),
        "upstreams",
        f"must be a list of URLs or Upstreams, not {URL!r}",
    ),
    ("no upstream", proxy(upstreams=[]), "upstreams", "at least one upstream is required"),
    (
        "no upstream in the middleware",
        middleware(upstreams=[]),
        "upstreams",
        "at least one upstream is required",
    ),
    ("a number among the URLs", proxy(upstreams=[URL, 9002]), "upstreams[1]", "not 9002"),
    (
        "a misspelt upstreams in the middleware",
        middleware(uptreams=[URL]),
        "uptreams",
        "unknown option (did you mean 'upstreams'?)",
    ),
    (
        "a misspelt proxy option in the middleware",
        middleware(upstreams=[URL], stiky=None),
        "stiky",
        "unknown option (did you mean 'sticky'?)",
    ),
]


@pytest.mark.parametrize(
    ("build", "option", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_a_mistake_is_an_option_error_naming_its_option(
    build: Callable[[], object], option: str, reason: str
) -> None:
    with pytest.raises(OptionError) as refused:
        build()
    assert refused.value.option == option
    assert reason in refused.value.reason, refused.value.reason


def test_no_upstream_is_refused_in_the_same_words_as_in_the_file() -> None:
    with pytest.raises(OptionError) as refused:
        LeastTimeProxy(upstreams=[])
    with pytest.raises(ConfigError) as reported:
        parse_config({"upstreams": []})
    (message,) = reported.value.errors
    assert message.startswith(f"upstreams: {refused.value.reason}")
