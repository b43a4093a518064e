"""The TOML configuration file: read with the standard library, checked key by key.

Every mistake is reported with the key it concerns and what is wrong, all of them at once, so
``asgi-leasttime check lb.toml`` can list them. Option names are Traefik's, in snake case, where
Traefik has one (``pass_host_header``, ``max_age``, ``unhealthy_interval``, ...).
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from asgi_leasttime.health import HealthCheck, PassiveHealthCheck
from asgi_leasttime.proxy import LeastTimeProxy
from asgi_leasttime.sticky import StickyCookie
from asgi_leasttime.upstream import Upstream

__all__ = ["Config", "ConfigError", "load_config", "parse_config"]

DEFAULT_SECRET_ENV = "ASGI_LEASTTIME_SECRET"

Check = Callable[[Any], str | None]  # a message when the value is wrong


class ConfigError(ValueError):
    """A configuration with mistakes: ``errors`` has one message per mistake, naming its key."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def _positive(value: Any) -> str | None:
    return None if value > 0 and math.isfinite(value) else "must be a positive number"


def _not_negative(value: Any) -> str | None:
    return None if value >= 0 and math.isfinite(value) else "must not be negative"


def _port(value: Any) -> str | None:
    return None if 0 < value < 65536 else "must be a TCP port (1-65535)"


def _one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(map(repr, choices))}"

    return check


def _http_url(value: Any) -> str | None:
    try:
        Upstream(value)
    except ValueError as exc:
        return str(exc)
    return None


# section -> key -> (accepted types, default, extra check)
Spec = dict[str, tuple[type | tuple[type, ...], Any, Check | None]]
NUMBER = (int, float)
SCHEMA: dict[str, Spec] = {
    "server": {
        "host": (str, "127.0.0.1", None),
        "port": (int, 8000, _port),
        "workers": (int, 1, _positive),
        "name": (str, "leasttime", None),
        "freeze_gc": (bool, True, None),
    },
    "balancer": {
        "mode": (str, "leasttime", _one_of("leasttime", "traefik")),
        "pass_host_header": (bool, True, None),
        "trusted_proxies": (list, [], None),
    },
    "upstream": {
        "url": (str, None, _http_url),
        "name": (str, None, None),
        "weight": (NUMBER, 1, _not_negative),
        "fenced": (bool, False, None),
    },
    "sticky": {
        "name": (str, None, None),
        "secret_key": ((str, list), None, None),
        "secret_key_env": (str, DEFAULT_SECRET_ENV, None),
        "secure": (bool, False, None),
        "httponly": (bool, False, None),
        "samesite": (str, None, _one_of("none", "lax", "strict", "None", "Lax", "Strict")),
        "max_age": (int, None, _not_negative),
        "path": (str, "/", None),
        "domain": (str, None, None),
        "sliding": (bool, False, None),
    },
    "health_check": {
        "path": (str, "/health", None),
        "scheme": (str, None, _one_of("http", "https")),
        "port": (int, None, _port),
        "method": (str, "GET", None),
        "hostname": (str, None, None),
        "headers": (dict, {}, None),
        "follow_redirects": (bool, True, None),
        "status": (int, 0, None),
        "interval": (NUMBER, 30.0, _positive),
        "timeout": (NUMBER, 5.0, _positive),
        "unhealthy_interval": (NUMBER, None, _positive),
    },
    "passive_health_check": {
        "failure_window": (NUMBER, 10.0, _positive),
        "max_failed_attempts": (int, 1, _positive),
    },
    "timeouts": {
        "connect": (NUMBER, 5.0, _positive),
        "read": (NUMBER, 60.0, _positive),
        "write": (NUMBER, 60.0, _positive),
        "pool": (NUMBER, 10.0, _positive),
    },
    "limits": {
        "max_connections": (int, 512, _positive),
        "max_keepalive_connections": (int, 512, _not_negative),
        "keepalive_expiry": (NUMBER, 4.0, _not_negative),
    },
    "admin": {
        "host": (str, "127.0.0.1", None),
        "port": (int, None, _port),
    },
}
TOP_LEVEL = {*SCHEMA.keys() - {"upstream"}, "upstreams"}
TYPE_NAMES = {str: "a string", bool: "true or false", int: "an integer", float: "a number",
              list: "a list", dict: "a table"}  # fmt: skip


@dataclass
class Config:
    """A checked configuration: one dictionary of values per section, defaults filled in."""

    sections: dict[str, dict[str, Any]]
    upstreams: list[dict[str, Any]]
    optional: set[str] = field(default_factory=set)  # optional sections present in the file

    def section(self, name: str) -> dict[str, Any]:
        """The values of a section, defaults included."""
        return self.sections[name]

    def build_proxy(self, environ: Mapping[str, str] | None = None) -> LeastTimeProxy:
        """The :class:`LeastTimeProxy` this configuration describes."""
        environ = os.environ if environ is None else environ
        balancer = self.section("balancer")
        timeouts = self.section("timeouts")
        limits = self.section("limits")
        sticky = None
        if "sticky" in self.optional:
            options = dict(self.section("sticky"))
            keys = _secret_keys(options.pop("secret_key"), options.pop("secret_key_env"), environ)
            sticky = StickyCookie(secret_key=keys, **options)
        health = None
        if "health_check" in self.optional:
            health = HealthCheck(**self.section("health_check"))
        passive = None
        if "passive_health_check" in self.optional:
            passive = PassiveHealthCheck(**self.section("passive_health_check"))
        return LeastTimeProxy(
            upstreams=[Upstream(**u) for u in self.upstreams],
            name=self.section("server")["name"],
            freeze_gc=self.section("server")["freeze_gc"],
            mode=balancer["mode"],
            pass_host_header=balancer["pass_host_header"],
            trusted_proxies=balancer["trusted_proxies"],
            timeout=httpx.Timeout(**timeouts),
            limits=httpx.Limits(**limits),
            sticky=sticky,
            health_check=health,
            passive_health_check=passive,
        )


def _secret_keys(in_file: Any, env_name: str, environ: Mapping[str, str]) -> list[str]:
    if in_file:
        return [in_file] if isinstance(in_file, str) else list(in_file)
    value = environ.get(env_name, "")
    keys = [key.strip() for key in value.split(",") if key.strip()]
    if not keys:
        raise ConfigError(
            [f"sticky.secret_key_env: the environment variable {env_name} is empty or unset"]
        )
    return keys


def _check_section(where: str, values: Any, spec: Spec, errors: list[str]) -> dict[str, Any]:
    if not isinstance(values, dict):
        errors.append(f"{where}: must be a table")
        return {key: default for key, (_, default, _) in spec.items()}
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key not in spec:
            hint = difflib.get_close_matches(key, spec, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            errors.append(f"{where}.{key}: unknown key{suggestion}")
            continue
        types, _, check = spec[key]
        if not _has_type(value, types):
            errors.append(f"{where}.{key}: must be {_type_name(types)}, not {value!r}")
            continue
        message = check(value) if check else None
        if message:
            errors.append(f"{where}.{key}: {message}")
            continue
        checked[key] = value
    for key, (_, default, _) in spec.items():
        checked.setdefault(key, default)
    return checked


def _has_type(value: Any, types: type | tuple[type, ...]) -> bool:
    accepted = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool):
        return bool in accepted
    return isinstance(value, accepted)


def _type_name(types: type | tuple[type, ...]) -> str:
    accepted = types if isinstance(types, tuple) else (types,)
    return " or ".join(TYPE_NAMES.get(t, t.__name__) for t in accepted)


def parse_config(document: dict[str, Any]) -> Config:
    """Check a parsed TOML document; raises :class:`ConfigError` listing every mistake."""
    errors: list[str] = []
    for key in document:
        if key not in TOP_LEVEL:
            hint = difflib.get_close_matches(key, TOP_LEVEL, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            errors.append(f"{key}: unknown section{suggestion}")
    sections = {
        name: _check_section(name, document.get(name, {}), spec, errors)
        for name, spec in SCHEMA.items()
        if name != "upstream"
    }
    raw_upstreams = document.get("upstreams", [])
    upstreams: list[dict[str, Any]] = []
    if not isinstance(raw_upstreams, list) or not raw_upstreams:
        errors.append("upstreams: at least one [[upstreams]] entry with a url is required")
        raw_upstreams = []
    names: set[str] = set()
    for index, raw in enumerate(raw_upstreams):
        where = f"upstreams[{index}]"
        upstream = _check_section(where, raw, SCHEMA["upstream"], errors)
        if upstream["url"] is None:
            if isinstance(raw, dict) and "url" not in raw:
                errors.append(f"{where}.url: required")
            continue
        upstream["name"] = upstream["name"] or upstream["url"]
        if upstream["name"] in names:
            errors.append(f"{where}.name: {upstream['name']!r} is used by another upstream")
        names.add(upstream["name"])
        upstreams.append(upstream)
    for index, proxy in enumerate(sections["balancer"]["trusted_proxies"]):
        try:
            ipaddress.ip_network(proxy, strict=False)
        except (ValueError, TypeError):
            errors.append(
                f"balancer.trusted_proxies[{index}]: {proxy!r} is not an address or network"
            )
    health = sections["health_check"]
    if health["path"] and not health["path"].startswith("/"):
        errors.append("health_check.path: must start with '/'")
    if health["status"] and not 100 <= health["status"] <= 599:
        errors.append("health_check.status: must be 0 or an HTTP status (100-599)")
    if errors:
        raise ConfigError(errors)
    sections_present: set[str] = set(document)
    optional = sections_present & {"sticky", "health_check", "passive_health_check", "admin"}
    return Config(sections, upstreams, optional)


def load_config(path: str | Path) -> Config:
    """Read and check a TOML file; raises :class:`ConfigError` listing every mistake."""
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot be read ({exc.strerror})"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML ({exc})"]) from None
    return parse_config(document)
