"""The TOML configuration: what it builds, and a message naming the key for every mistake."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from asgi_leasttime.cli import main
from asgi_leasttime.config import ConfigError, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lb.toml"


def errors_of(document: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(document)
    return caught.value.errors


def test_the_example_builds_the_proxy_it_describes() -> None:
    proxy = load_config(EXAMPLE).build_proxy({"ASGI_LEASTTIME_SECRET": "new,old"})
    assert proxy.name == "shop"
    assert list(proxy.upstreams) == ["a", "b"]
    assert proxy.balancer["b"].weight == 2
    assert proxy.sticky is not None
    assert proxy.sticky.name == "lb"
    assert proxy.sticky.max_age == 3600
    assert proxy.health_check is not None
    assert proxy.health_check.interval == 10.0
    assert proxy.passive_health_check is not None
    assert proxy.passive_health_check.max_failed_attempts == 3


def test_defaults_for_a_minimal_file() -> None:
    config = parse_config({"upstreams": [{"url": "http://127.0.0.1:9001"}]})
    proxy = config.build_proxy({})
    assert list(proxy.upstreams) == ["http://127.0.0.1:9001"]
    assert proxy.sticky is None
    assert proxy.health_check is None
    assert config.section("server")["port"] == 8000
    assert proxy.freeze_gc


def test_the_collector_can_be_left_alone() -> None:
    config = parse_config({"server": {"freeze_gc": False}, "upstreams": [{"url": "http://a:1"}]})
    assert not config.build_proxy({}).freeze_gc


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (
            {"upstreams": [{"url": "http://a:1", "wieght": 2}]},
            "upstreams[0].wieght: unknown key (did you mean 'weight'?)",
        ),
        (
            {"upstreams": [{"url": "http://a:1", "weight": "heavy"}]},
            "upstreams[0].weight: must be an integer or a number, not 'heavy'",
        ),
        (
            {"upstreams": [{"url": "ftp://a"}]},
            "upstreams[0].url: upstream URL 'ftp://a' must start",
        ),
        (
            {"upstreams": [{"url": "http://a:1", "name": "x"}, {"url": "http://b:1", "name": "x"}]},
            "upstreams[1].name: 'x' is used by another upstream",
        ),
        (
            {"upstreams": [{"url": "http://a:1"}], "health_check": {"interval": -5}},
            "health_check.interval: must be a positive number",
        ),
        (
            {"upstreams": [{"url": "http://a:1"}], "helth_check": {}},
            "helth_check: unknown section (did you mean 'health_check'?)",
        ),
        ({"upstreams": [{"name": "a"}]}, "upstreams[0].url: required"),
        ({}, "upstreams: at least one [[upstreams]] entry with a url is required"),
        (
            {"upstreams": [{"url": "http://a:1"}], "balancer": {"trusted_proxies": ["nope"]}},
            "balancer.trusted_proxies[0]: 'nope' is not an address or network",
        ),
        (
            {"upstreams": [{"url": "http://a:1"}], "balancer": {"mode": "fastest"}},
            "balancer.mode: must be one of 'leasttime', 'traefik'",
        ),
        (
            {"upstreams": [{"url": "http://a:1"}], "server": {"port": 70000}},
            "server.port: must be a TCP port (1-65535)",
        ),
        (
            {"upstreams": [{"url": "http://a:1", "fenced": "yes"}]},
            "upstreams[0].fenced: must be true or false, not 'yes'",
        ),
        (
            {"upstreams": [{"url": "http://a:1"}], "server": {"workers": True}},
            "server.workers: must be an integer, not True",
        ),
    ],
)
def test_every_mistake_names_its_key(document: dict[str, Any], expected: str) -> None:
    assert any(message.startswith(expected) for message in errors_of(document)), errors_of(document)


def test_all_mistakes_are_reported_at_once() -> None:
    document = {
        "upstreams": [{"url": "ftp://x", "wieght": 1}],
        "timeouts": {"read": 0},
        "bogus": 1,
    }
    assert len(errors_of(document)) == 4


def test_a_missing_sticky_secret_is_named() -> None:
    config = parse_config({"upstreams": [{"url": "http://a:1"}], "sticky": {}})
    with pytest.raises(ConfigError, match="ASGI_LEASTTIME_SECRET is empty or unset"):
        config.build_proxy({})


def test_check_command_lists_the_mistakes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[upstreams]]\nurl = "http://a:1"\nweigth = 2\n[health_check]\ninterval = -1\n')
    assert main(["check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "upstreams[0].weigth: unknown key (did you mean 'weight'?)" in err
    assert "health_check.interval: must be a positive number" in err


def test_check_command_on_a_good_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ASGI_LEASTTIME_SECRET", "a secret")
    assert main(["check", str(EXAMPLE)]) == 0
    assert "ok (2 upstreams: a, b)" in capsys.readouterr().out


def test_invalid_toml_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "broken.toml"
    bad.write_text("[[upstreams]\nurl = ")
    assert main(["check", str(bad)]) == 1
    assert "not valid TOML" in capsys.readouterr().err


def test_every_key_is_documented() -> None:
    from asgi_leasttime.config import SCHEMA

    page = (EXAMPLE.parent.parent / "docs" / "configuration.md").read_text()
    sections = page.split("\n## ")[1:]
    for name, spec in SCHEMA.items():
        title = "[[upstreams]]" if name == "upstream" else f"[{name}]"
        (section,) = [s for s in sections if s.startswith(title)]
        for key in spec:
            assert f"| `{key}` |" in section, (name, key)
