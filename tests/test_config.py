"""The TOML configuration: what it builds, and a message naming the key for every mistake."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asgi_leasttime import (
    DnsResolver,
    HealthCheck,
    LeastTimeProxy,
    PassiveHealthCheck,
    StickyCookie,
    Upstream,
)
from asgi_leasttime.cli import main
from asgi_leasttime.client import limits, timeouts
from asgi_leasttime.config import (
    TABLES,
    AdminOptions,
    ConfigError,
    LogOptions,
    ServerOptions,
    load_config,
    parse_config,
)
from asgi_leasttime.load_reports import LoadReports
from asgi_leasttime.options import OptionError
from asgi_leasttime.redis_state import RedisState
from asgi_leasttime.retry import Retry
from asgi_leasttime.tls import UpstreamTLS

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
    assert config.section("server")["freeze_gc"] is True  # serve's default, not the library's


def test_the_collector_can_be_left_alone() -> None:
    config = parse_config({"server": {"freeze_gc": False}, "upstreams": [{"url": "http://a:1"}]})
    assert config.section("server")["freeze_gc"] is False


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
        ({}, "upstreams: at least one upstream is required: an [[upstreams]] entry with a url"),
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
    page = (EXAMPLE.parent.parent / "docs" / "configuration.md").read_text()
    sections = page.split("\n## ")[1:]
    for name, table in TABLES.items():
        title = "[[upstreams]]" if name == "upstream" else f"[{name}]"
        (section,) = [s for s in sections if s.startswith(title)]
        for key in table.options():
            assert f"| `{key}` |" in section, (name, key)


# -- every option of the file is its constructor's, with the same meaning and the same errors ----

URL = "http://127.0.0.1:9001"


TLS = "<tls>/"
"""Stands for the folder of the ``tls_folder`` fixture in the [tls] samples (see ``located``)."""


@pytest.fixture(scope="module")
def tls_folder() -> Iterator[str]:
    """A CA and a client certificate, as PEM files, for the [tls] samples; removed after."""
    import trustme

    with tempfile.TemporaryDirectory(prefix="asgi-leasttime-tls-") as name:
        folder = Path(name)
        ca = trustme.CA()
        client = ca.issue_cert("client.example")
        ca.cert_pem.write_to_path(str(folder / "ca.pem"))
        client.cert_chain_pems[0].write_to_path(str(folder / "client.pem"))
        client.private_key_pem.write_to_path(str(folder / "client.key"))
        client.private_key_and_cert_chain_pem.write_to_path(str(folder / "client-and-key.pem"))
        yield f"{folder}/"


def located(value: Any, folder: str) -> Any:
    """A sample with the TLS files' folder put in."""
    if isinstance(value, str):
        return value.replace(TLS, folder)
    if isinstance(value, list):
        return [located(item, folder) for item in value]
    return value


# A value other than the default for every key of every table.
SAMPLES: dict[tuple[str, str], Any] = {
    ("server", "host"): "0.0.0.0",
    ("server", "port"): 9000,
    ("server", "workers"): 3,
    ("server", "name"): "shop",
    ("server", "freeze_gc"): False,
    ("server", "cert_file"): TLS + "client-and-key.pem",
    ("server", "key_file"): TLS + "client.key",
    ("server", "watch"): True,
    ("balancer", "mode"): "traefik",
    ("balancer", "pass_host_header"): False,
    ("balancer", "trusted_proxies"): ["10.0.0.0/8", "::1"],
    ("balancer", "pass_server_header"): True,
    ("upstream", "url"): "http://127.0.0.1:9002/base",
    ("upstream", "name"): "named",
    ("upstream", "weight"): 2.5,
    ("upstream", "fenced"): True,
    ("sticky", "secret_key"): ["old", "new"],
    ("sticky", "name"): "lb",
    ("sticky", "secure"): True,
    ("sticky", "httponly"): True,
    ("sticky", "samesite"): "LAX",
    ("sticky", "max_age"): 60,
    ("sticky", "path"): "/app",
    ("sticky", "domain"): "example.com",
    ("sticky", "sliding"): True,
    ("sticky", "secret_key_env"): "MY_SECRETS",
    ("health_check", "path"): "/ping",
    ("health_check", "scheme"): "https",
    ("health_check", "port"): 8443,
    ("health_check", "method"): "HEAD",
    ("health_check", "hostname"): "probe.example",
    ("health_check", "headers"): {"x-probe": "1"},
    ("health_check", "follow_redirects"): False,
    ("health_check", "status"): 204,
    ("health_check", "interval"): 2.5,
    ("health_check", "timeout"): 1,
    ("health_check", "unhealthy_interval"): 0.5,
    ("passive_health_check", "failure_window"): 3,
    ("passive_health_check", "max_failed_attempts"): 2,
    ("passive_health_check", "shared"): True,
    ("timeouts", "connect"): 1,
    ("timeouts", "read"): 2.5,
    ("timeouts", "write"): 3,
    ("timeouts", "pool"): 4,
    ("limits", "max_connections"): 10,
    ("limits", "max_keepalive_connections"): 5,
    ("limits", "keepalive_expiry"): 1.5,
    ("admin", "host"): "0.0.0.0",
    ("admin", "port"): 9100,
    ("admin", "token_env"): "MY_ADMIN_TOKEN",
    ("state", "url"): "redis://127.0.0.1:6390/1",
    ("state", "prefix"): "shop-lb",
    ("state", "password_env"): "MY_STORE_PASSWORD",
    ("state", "report_every"): 0.25,
    ("tls", "root_cas"): [TLS + "ca.pem"],
    ("tls", "cert_file"): TLS + "client-and-key.pem",
    ("tls", "key_file"): TLS + "client.key",
    ("tls", "server_name"): "upstream.internal",
    ("tls", "insecure_skip_verify"): True,
    ("retry", "attempts"): 2,
    ("retry", "budget_ratio"): 0.5,
    ("retry", "budget_window"): 30,
    ("retry", "min_retries_per_second"): 10,
    ("retry", "retry_on_status"): [502, 503],
    ("retry", "per_try_timeout"): 1.5,
    ("retry", "max_body"): 1024,
    ("upstream", "resolve"): True,
    ("upstream", "address"): "10.0.0.7",
    ("dns", "nameservers"): ["127.0.0.1:5353", "[::1]"],
    ("dns", "resolve_every"): 7.5,
    ("dns", "min_resolve_every"): 2.0,
    ("dns", "timeout"): 1.5,
    ("log", "access"): "json",
    ("log", "access_headers"): ["x-request-id"],
    ("log", "traces"): True,
    ("upstream", "load_reports"): True,
    ("load_reports", "inflight_metrics"): ["running", "waiting"],
}

# Values each constructor refuses, for the keys that have a rule beyond their type.
REFUSED: dict[tuple[str, str], Any] = {
    ("server", "port"): 70000,
    ("server", "workers"): 0,
    ("server", "cert_file"): "/nonexistent/server.pem",
    ("server", "key_file"): "/nonexistent/server.key",
    ("balancer", "mode"): "fastest",
    ("balancer", "trusted_proxies"): ["nope"],
    ("upstream", "url"): "ftp://x",
    ("upstream", "weight"): -1,
    ("sticky", "name"): "a b",
    ("sticky", "samesite"): "sideways",
    ("sticky", "max_age"): -1,
    ("sticky", "path"): "/a;b",
    ("health_check", "path"): "ping",
    ("health_check", "scheme"): "ftp",
    ("health_check", "port"): 0,
    ("health_check", "status"): 42,
    ("health_check", "interval"): 0,
    ("passive_health_check", "failure_window"): 0,
    ("passive_health_check", "max_failed_attempts"): 0,
    ("timeouts", "read"): 0,
    ("limits", "max_connections"): 0,
    ("limits", "keepalive_expiry"): -1,
    ("admin", "port"): 70000,
    ("state", "url"): "http://127.0.0.1:6379",
    ("state", "report_every"): 0,
    ("tls", "root_cas"): ["/nonexistent/ca.pem"],
    ("tls", "cert_file"): "/nonexistent/client.pem",
    ("retry", "attempts"): 0,
    ("retry", "budget_ratio"): -0.1,
    ("retry", "retry_on_status"): [404],
    ("retry", "per_try_timeout"): 0,
    ("retry", "max_body"): -1,
    ("upstream", "address"): "api.internal",
    ("dns", "nameservers"): ["dns.internal"],
    ("dns", "resolve_every"): 0,
    ("log", "access"): "xml",
    ("log", "access_headers"): ["Cookie"],
    ("load_reports", "inflight_metrics"): [],
}


def direct(table: str, key: str, value: Any, tls_folder: str) -> Any:
    """What the constructor behind ``table`` makes of ``key = value``, called from Python."""
    options = {key: value}
    if key == "key_file":  # [server] and [tls]: a key goes with a certificate
        options["cert_file"] = tls_folder + "client.pem"
    if table == "server":
        return (
            LeastTimeProxy(upstreams=[URL], **options)
            if key == "name"
            else ServerOptions(**options)
        )
    if table == "balancer":
        proxy = LeastTimeProxy(upstreams=[URL], **options)
        return proxy.balancer if key == "mode" else proxy.request_headers
    if table == "upstream":
        return Upstream(**{"url": URL, **options})
    if table == "sticky":
        return StickyCookie(**{"secret_key": "k", **options})
    if table == "state":
        return RedisState(**{"url": "redis://127.0.0.1:6379", **options})
    constructors: dict[str, Any] = {
        "health_check": HealthCheck,
        "passive_health_check": PassiveHealthCheck,
        "timeouts": timeouts,
        "limits": limits,
        "admin": AdminOptions,
        "tls": UpstreamTLS,
        "retry": Retry,
        "dns": DnsResolver,
        "log": LogOptions,
        "load_reports": LoadReports,
    }
    return constructors[table](**options)


def from_file(table: str, key: str, value: Any, tls_folder: str) -> Any:
    """What the configuration file makes of ``key = value`` in ``table``."""
    upstream = {"url": URL, **({key: value} if table == "upstream" else {})}
    document: dict[str, Any] = {"upstreams": [upstream]}
    if table != "upstream":
        document[table] = {key: value}
    if table == "sticky" and key != "secret_key":
        document[table]["secret_key"] = "k"
    if table == "state" and key != "url":
        document[table]["url"] = "redis://127.0.0.1:6379"
    if table == "admin" and key != "port":
        document[table]["port"] = 9100
    if table in ("tls", "server") and key == "key_file":
        document[table]["cert_file"] = tls_folder + "client.pem"
    config = parse_config(document)
    proxy = config.build_proxy({})
    if table == "server":
        section = config.section(table)
        if key == "name":
            return proxy
        return ServerOptions(**{k: v for k, v in section.items() if k != "name"})
    if table == "balancer":
        return proxy.balancer if key == "mode" else proxy.request_headers
    views: dict[str, Any] = {
        "upstream": lambda: next(iter({**proxy.upstreams, **proxy.dns_names}.values())),
        "sticky": lambda: proxy.sticky,
        "health_check": lambda: proxy.health_check,
        "passive_health_check": lambda: proxy.passive_health_check,
        "timeouts": lambda: proxy._timeout,
        "limits": lambda: proxy._limits,
        "admin": lambda: AdminOptions(**config.section(table)),
        "state": lambda: proxy.state,
        "tls": lambda: proxy.tls,
        "retry": lambda: proxy.retry,
        "dns": lambda: proxy.dns,
        "log": lambda: config.log_options({}),
        "load_reports": lambda: proxy.load_reports,
    }
    return views[table]()


def test_every_option_has_a_sample() -> None:
    options = {(name, key) for name, table in TABLES.items() for key in table.options()}
    assert set(SAMPLES) == options
    assert set(REFUSED) <= options


FILE_ONLY = {("sticky", "secret_key_env"), ("state", "password_env")}  # tested on their own
PRIVATE_NAMES = {"secret_key": "_signer", "prefix": "_prefix"}  # where the value is kept


@pytest.mark.parametrize(("table", "key"), [k for k in SAMPLES if k not in FILE_ONLY])
def test_an_option_means_in_the_file_what_it_means_to_its_constructor(
    table: str, key: str, tls_folder: str
) -> None:
    value = located(SAMPLES[table, key], tls_folder)
    made, read = direct(table, key, value, tls_folder), from_file(table, key, value, tls_folder)
    attribute = PRIVATE_NAMES.get(key, key)
    if key == "secret_key":
        assert read._signer.secret_keys == made._signer.secret_keys
    else:
        assert getattr(read, attribute) == getattr(made, attribute)
    default = TABLES[table].options()[key].default
    assert getattr(read, attribute) != default or key == "secret_key"


def test_the_store_password_comes_from_the_variable_the_file_names() -> None:
    document = {
        "upstreams": [{"url": URL}],
        "state": {"url": "redis://127.0.0.1:6379", "password_env": "MY_STORE_PASSWORD"},
    }
    proxy = parse_config(document).build_proxy({"MY_STORE_PASSWORD": "s3cret"})
    assert isinstance(proxy.state, RedisState)
    assert proxy.state._client.connection_pool.connection_kwargs["password"] == "s3cret"


def test_the_sticky_keys_come_from_the_variable_the_file_names() -> None:
    document = {"upstreams": [{"url": URL}], "sticky": {"secret_key_env": "MY_SECRETS"}}
    proxy = parse_config(document).build_proxy({"MY_SECRETS": "old, new"})
    assert proxy.sticky is not None
    assert proxy.sticky._signer.secret_keys == [b"old", b"new"]


@pytest.mark.parametrize(("table", "key"), list(REFUSED))
def test_an_option_is_refused_in_the_file_as_by_its_constructor(
    table: str, key: str, tls_folder: str
) -> None:
    value = REFUSED[table, key]
    with pytest.raises(OptionError) as refused:
        direct(table, key, value, tls_folder)
    where = "upstreams[0]" if table == "upstream" else table
    with pytest.raises(ConfigError) as reported:
        from_file(table, key, value, tls_folder)
    assert reported.value.errors == [f"{where}.{refused.value.option}: {refused.value.reason}"]


# -- check reports what serve refuses, all of it at once ------------------------------------------


def check(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``asgi-leasttime check`` on a file holding ``text``: its exit status and stderr."""
    path = tmp_path / "lb.toml"
    path.write_text('[[upstreams]]\nurl = "http://127.0.0.1:9001"\n' + text)
    status = main(["check", str(path)])
    return status, capsys.readouterr().err


def test_check_refuses_an_admin_table_without_a_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, err = check(tmp_path, '[admin]\nhost = "127.0.0.1"\n', capsys)
    assert status == 1
    assert "admin.port: required to serve the admin app" in err


def test_check_refuses_a_short_admin_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MY_ADMIN_TOKEN", "short")
    status, err = check(tmp_path, '[admin]\nport = 9100\ntoken_env = "MY_ADMIN_TOKEN"\n', capsys)
    assert status == 1
    assert "admin.token_env: the token in MY_ADMIN_TOKEN must be at least 16 characters" in err
    monkeypatch.setenv("MY_ADMIN_TOKEN", "long enough to be a token")
    assert check(tmp_path, '[admin]\nport = 9100\ntoken_env = "MY_ADMIN_TOKEN"\n', capsys)[0] == 0


def test_every_refused_value_of_a_table_is_reported() -> None:
    document = {
        "upstreams": [{"url": URL}],
        "health_check": {"interval": 0, "status": 999, "path": "health"},
    }
    assert sorted(errors_of(document)) == [
        "health_check.interval: must be a positive number",
        "health_check.path: must start with '/', not 'health'",
        "health_check.status: must be 0 or an HTTP status (100-599)",
    ]


def test_an_empty_secret_key_in_the_file_is_the_file_s_mistake() -> None:
    assert errors_of({"upstreams": [{"url": URL}], "sticky": {"secret_key": ""}}) == [
        "sticky.secret_key: must be a non-empty key or list of keys"
    ]


def test_check_needs_no_secret_and_says_serve_does(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ASGI_LEASTTIME_SECRET", raising=False)
    assert main(["check", str(EXAMPLE)]) == 0
    out, err = capsys.readouterr()
    assert "ok (2 upstreams: a, b)" in out
    assert "note: sticky.secret_key_env: the environment variable ASGI_LEASTTIME_SECRET" in err


def test_the_example_s_admin_port_is_the_docs() -> None:
    config = load_config(EXAMPLE)
    assert config.section("admin")["port"] == 9100
    for page in ("admin.md", "dashboard.md"):
        text = (EXAMPLE.parent.parent / "docs" / page).read_text()
        assert ":9100" in text, page
        assert ":9090" not in text, page


def test_importing_these_tests_leaves_no_temporary_directory(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-c", "import tests.test_config"]
    environ = {**os.environ, "TMPDIR": str(scratch)}
    subprocess.run(command, cwd=root, env=environ, check=True, timeout=60)
    assert list(scratch.iterdir()) == []


def test_check_refuses_server_certificates_serve_could_not_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``[server] cert_file``/``key_file``: missing, a directory, a key without a certificate,
    a certificate without its key, a key of another certificate: each named, as serve would."""
    import trustme

    ca = trustme.CA()
    served, other = ca.issue_cert("127.0.0.1"), ca.issue_cert("127.0.0.1")
    served.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    served.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    other.private_key_pem.write_to_path(str(tmp_path / "other.key"))
    cases = {
        '[server]\ncert_file = "/nonexistent/cert.pem"\n': (
            "server.cert_file: cannot read '/nonexistent/cert.pem' (No such file or directory)"
        ),
        f'[server]\ncert_file = "{tmp_path}"\n': (
            f"server.cert_file: cannot read '{tmp_path}' (Is a directory)"
        ),
        f'[server]\ncert_file = "{tmp_path}/cert.pem"\nkey_file = "/nonexistent/key.pem"\n': (
            "server.key_file: cannot read '/nonexistent/key.pem' (No such file or directory)"
        ),
        f'[server]\nkey_file = "{tmp_path}/key.pem"\n': "server.key_file: needs a cert_file",
        f'[server]\ncert_file = "{tmp_path}/cert.pem"\n': (
            f"server.cert_file: cannot load '{tmp_path}/cert.pem': not a PEM certificate "
            "followed by its private key (give the key in key_file if it is apart)"
        ),
        f'[server]\ncert_file = "{tmp_path}/cert.pem"\nkey_file = "{tmp_path}/other.key"\n': (
            f"server.key_file: is not the private key of the certificate in '{tmp_path}/cert.pem'"
        ),
    }
    for text, expected in cases.items():
        status, err = check(tmp_path, text, capsys)
        assert status == 1, text
        assert err.splitlines()[1:] == [f"  {expected}"], err
    good = f'[server]\ncert_file = "{tmp_path}/cert.pem"\nkey_file = "{tmp_path}/key.pem"\n'
    assert check(tmp_path, good, capsys)[0] == 0
