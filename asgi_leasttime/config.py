"""The TOML configuration file: read with the standard library, checked key by key.

Nothing here declares an option. Each table of the file is the keyword parameters of the
constructors it feeds (``[health_check]`` is :class:`HealthCheck`'s, ``[[upstreams]]`` is
:class:`Upstream`'s, ...): the keys, their types and their defaults are read from the signatures,
and the values are judged by building what they describe, so the constructor's own checks
(:class:`~asgi_leasttime.options.OptionError`) speak for the key at fault.

The configuration file is the command line's; reading and checking it needs no extra (a
``[state]`` URL is judged as far as it can be without the ``state`` extra's Redis client).
Every mistake is reported with the key it concerns and what is wrong, all of them at once,
every refused value of a table included, so ``asgi-leasttime check lb.toml`` can list them.
Option names are Traefik's, in snake case, where Traefik has one (``pass_host_header``,
``max_age``, ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import os
import ssl
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from asgi_leasttime._extras import MissingExtra
from asgi_leasttime._headers import RequestHeaders
from asgi_leasttime.access_log import AccessLog
from asgi_leasttime.admin import check_token
from asgi_leasttime.balancer import Balancer
from asgi_leasttime.client import limits, timeouts
from asgi_leasttime.discovery import DnsResolver
from asgi_leasttime.health import HealthCheck, PassiveHealthCheck
from asgi_leasttime.load_reports import LoadReports
from asgi_leasttime.options import OptionError, check_fields, check_port, check_positive
from asgi_leasttime.proxy import LeastTimeProxy
from asgi_leasttime.redis_state import RedisState
from asgi_leasttime.retry import Retry
from asgi_leasttime.state import StateStore
from asgi_leasttime.sticky import StickyCookie
from asgi_leasttime.tls import UpstreamTLS
from asgi_leasttime.tracing import Tracing
from asgi_leasttime.upstream import NO_UPSTREAMS, Upstream

__all__ = [
    "AdminOptions",
    "Config",
    "ConfigError",
    "LogOptions",
    "ServerOptions",
    "load_config",
    "parse_config",
]

DEFAULT_SECRET_ENV = "ASGI_LEASTTIME_SECRET"


class ConfigError(ValueError):
    """A configuration with mistakes: ``errors`` has one message per mistake, naming its key."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


# -- the options of the file's own: where the command line listens --------------------------------


@dataclass(frozen=True)
class ServerOptions:
    """How ``asgi-leasttime serve`` runs (``[server]``, with the proxy's ``name``): where it
    listens, how many workers, and whether each process freezes its heap out of the garbage
    collector's way once the proxy is built (``freeze_gc``: ``gc.collect()`` then
    ``gc.freeze()``; the serving process's choice, not the library's).

    ``cert_file`` (a PEM certificate chain) turns HTTPS on: ``serve`` terminates TLS itself, as
    Traefik's entrypoints do (uvicorn's ``ssl_certfile``); ``key_file`` is its private key if not
    in the same file (``ssl_keyfile``). Both are loaded here, so a file that is missing,
    unreadable or not a certificate and its key is refused when the file is checked.

    ``watch``: reload the file when it changes (looked at about once a second), as ``kill
    -HUP`` does (see :mod:`asgi_leasttime.reload`)."""

    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    freeze_gc: bool = True
    cert_file: str | None = None
    key_file: str | None = None
    watch: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        check_port("port", self.port)
        check_positive("workers", self.workers)
        if self.key_file is not None and self.cert_file is None:
            raise OptionError("key_file", "needs a cert_file")
        if self.cert_file is not None:
            _check_certificate(self.cert_file, self.key_file)


def _check_certificate(cert_file: str, key_file: str | None) -> None:
    """Load a server certificate and its key as uvicorn will (:class:`OptionError` if not)."""
    for option, path in (("cert_file", cert_file), ("key_file", key_file)):
        if path is None:
            continue
        if not path:
            raise OptionError(option, "must name a file, not be empty")
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise OptionError(option, f"cannot read {path!r} ({exc.strerror})") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            if key_file is None:
                reason = "its private key does not match its certificate"
                raise OptionError("cert_file", reason) from None
            reason = f"is not the private key of the certificate in {cert_file!r}"
            raise OptionError("key_file", reason) from None
        if key_file is None:
            raise OptionError(
                "cert_file",
                f"cannot load {cert_file!r}: not a PEM certificate followed by its private key "
                "(give the key in key_file if it is apart)",
            ) from None
        raise OptionError(
            "cert_file",
            f"cannot load {cert_file!r} with the key {key_file!r}: not a PEM certificate and key",
        ) from None


@dataclass(frozen=True)
class LogOptions:
    """What ``serve`` logs and traces besides uvicorn's lines (``[log]``).

    ``access``: ``"text"`` or ``"json"`` for an access log of the proxy's own (see
    :mod:`asgi_leasttime.access_log`), which then replaces uvicorn's; ``"off"`` by default.
    ``access_headers``: request headers whose values the access log adds, by name.
    ``traces``: an OpenTelemetry client span for every attempt at an upstream
    (:class:`~asgi_leasttime.tracing.Tracing`, the ``otel`` extra), to the global tracer
    provider (``opentelemetry-instrument asgi-leasttime serve ...`` sets one up)."""

    access: Literal["off", "text", "json"] = "off"
    access_headers: Sequence[str] = ()
    traces: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.access_headers, str):
            raise OptionError("access_headers", f"must be a list, not {self.access_headers!r}")
        check_fields(self)
        if self.access not in ("off", "text", "json"):
            raise OptionError("access", f"must be 'off', 'text' or 'json', not {self.access!r}")
        try:
            AccessLog(headers=self.access_headers)
        except OptionError as exc:
            raise OptionError("access_headers", exc.reason) from None

    def access_log(self) -> AccessLog | None:
        """The access log these options ask for, or ``None``."""
        if self.access == "off":
            return None
        return AccessLog(self.access, self.access_headers)


@dataclass(frozen=True)
class AdminOptions:
    """Where the admin app listens (``[admin]``); present, it turns the admin app on, and then
    ``port`` is required. Its write API takes the token in the environment variable
    ``token_env`` names (off when unset)."""

    host: str = "127.0.0.1"
    port: int | None = None
    token_env: str = "ASGI_LEASTTIME_ADMIN_TOKEN"

    def __post_init__(self) -> None:
        check_fields(self)
        check_port("port", self.port)


PRIVATE_STATE_ENV = "ASGI_LEASTTIME_STATE_URL"
ACCESS_LOG_ENV = "ASGI_LEASTTIME_ACCESS_LOG"
"""``serve --access-log``'s choice, for every serving process."""
"""Where ``serve --workers N`` tells its workers the URL of the private store it started."""


def _state_options(*, url: str | None = None, password_env: str = "", **options: Any) -> None:
    """Judge ``[state]``: a URL the Redis client takes, and RedisState's other options."""
    if url is None:
        raise OptionError("url", "required: redis://, rediss:// or unix://")
    # Without the state extra, what can be judged without the Redis client was, before the
    # client was needed.
    with contextlib.suppress(MissingExtra):
        RedisState(url, **options)


def _balancer_options(
    *,
    mode: Any = "leasttime",
    pass_host_header: Any = True,
    trusted_proxies: Any = (),
    pass_server_header: Any = False,
) -> None:
    """Judge ``[balancer]`` with the parts its keys configure (their defaults are the proxy's)."""
    Balancer(mode=mode)
    RequestHeaders(
        pass_host_header=pass_host_header,
        trusted_proxies=trusted_proxies,
        pass_server_header=pass_server_header,
    )


def _any_value(**options: Any) -> None:
    """Options that take any value of their type (the proxy's ``name``)."""


def _sticky_options(
    *, secret_key: str | Sequence[str] | None = None, secret_key_env: str = "", **options: Any
) -> StickyCookie:
    # The keys usually come from the environment, read when the proxy is built; keys in the file
    # are judged as they are (an empty one is refused).
    return StickyCookie(secret_key="placeholder" if secret_key is None else secret_key, **options)


# -- reading the declarations ---------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """One key of a table: the TOML types it accepts and its default."""

    types: tuple[type, ...]
    default: Any


@dataclass(frozen=True)
class Part:
    """Keys taken from a constructor's keyword parameters (``only`` those, or all but
    ``leave_out``); ``judge`` builds from them (the constructor itself by default)."""

    source: Callable[..., Any]
    only: tuple[str, ...] = ()
    leave_out: tuple[str, ...] = ()
    judge: Callable[..., Any] | None = None

    def options(self) -> dict[str, Key]:
        source = self.source
        signature = inspect.signature(source)
        # A dataclass's fields and a function's parameters carry the annotations; a class's
        # __init__ does.
        plain_class = inspect.isclass(source) and not dataclasses.is_dataclass(source)
        hints = typing.get_type_hints(source.__init__ if plain_class else source)
        factories = {  # a dataclass field's default_factory makes its default
            f.name: f.default_factory()
            for f in (dataclasses.fields(source) if dataclasses.is_dataclass(source) else ())
            if f.default_factory is not dataclasses.MISSING
        }
        keys = {}
        for name, parameter in signature.parameters.items():
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                continue
            if (self.only and name not in self.only) or name in self.leave_out:
                continue
            default = None if parameter.default is parameter.empty else parameter.default
            keys[name] = Key(_toml_types(hints[name]), _as_toml(factories.get(name, default)))
        return keys


@dataclass(frozen=True)
class Table:
    """A table of the file, made of parts, and keys of the file's own."""

    parts: tuple[Part, ...]
    own: Mapping[str, Key] = field(default_factory=dict)

    def options(self) -> dict[str, Key]:
        keys: dict[str, Key] = {}
        for part in self.parts:
            keys.update(part.options())
        keys.update(self.own)
        return keys


TABLES: dict[str, Table] = {
    "server": Table(
        (
            Part(ServerOptions),
            Part(LeastTimeProxy, only=("name",), judge=_any_value),
        ),
    ),
    "balancer": Table(
        (
            Part(
                LeastTimeProxy,
                only=("mode", "pass_host_header", "trusted_proxies", "pass_server_header"),
                judge=_balancer_options,
            ),
        )
    ),
    "upstream": Table((Part(Upstream, leave_out=("app",)),)),
    "sticky": Table(
        (Part(StickyCookie, judge=_sticky_options),),
        own={"secret_key_env": Key((str,), DEFAULT_SECRET_ENV)},
    ),
    "health_check": Table((Part(HealthCheck),)),
    "passive_health_check": Table((Part(PassiveHealthCheck),)),
    "tls": Table((Part(UpstreamTLS),)),
    "retry": Table((Part(Retry),)),
    "dns": Table((Part(DnsResolver),)),
    "load_reports": Table((Part(LoadReports),)),
    "timeouts": Table((Part(timeouts),)),
    "limits": Table((Part(limits),)),
    "admin": Table((Part(AdminOptions),)),
    "log": Table((Part(LogOptions),)),
    "state": Table(
        (Part(RedisState, leave_out=("password",), judge=_state_options),),
        own={"password_env": Key((str,), "ASGI_LEASTTIME_STATE_PASSWORD")},
    ),
}
"""Every table of the file (``upstream`` is one entry of ``[[upstreams]]``)."""

OPTIONAL = frozenset(
    {"sticky", "health_check", "passive_health_check", "admin", "state", "tls", "load_reports"}
)
"""Tables that turn their feature on by being present."""

TOP_LEVEL = {*TABLES.keys() - {"upstream"}, "upstreams"}
TYPE_NAMES = {str: "a string", bool: "true or false", int: "an integer", float: "a number",
              list: "a list", dict: "a table"}  # fmt: skip


def _toml_types(annotation: Any) -> tuple[type, ...]:
    """The TOML value types a parameter's annotation accepts."""
    if annotation in (str, bytes):
        return (str,)
    if annotation is float:
        return (int, float)
    if annotation in (int, bool):
        return (annotation,)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        found: list[type] = []
        for argument in typing.get_args(annotation):
            if argument is not type(None):
                found += [t for t in _toml_types(argument) if t not in found]
        return tuple(found)
    if origin is typing.Literal:
        return (str,)
    if origin in (list, tuple, Sequence, Iterable):
        return (list,)
    if origin in (dict, Mapping):
        return (dict,)
    raise TypeError(f"no TOML type for {annotation!r}")


def _as_toml(default: Any) -> Any:
    """A default as the file would write it (a tuple is a list)."""
    return list(default) if isinstance(default, tuple) else default


# -- checking a document --------------------------------------------------------------------------


@dataclass
class Config:
    """A checked configuration: one dictionary of values per table, defaults filled in."""

    sections: dict[str, dict[str, Any]]
    upstreams: list[dict[str, Any]]
    optional: set[str] = field(default_factory=set)  # optional tables present in the file

    def section(self, name: str) -> dict[str, Any]:
        """The values of a table, defaults included."""
        return self.sections[name]

    def build_proxy(
        self, environ: Mapping[str, str] | None = None, *, relay_only: bool = False
    ) -> LeastTimeProxy:
        """The :class:`LeastTimeProxy` this configuration describes. ``relay_only``: for a
        process that serves no traffic and only relays changes (``serve --workers N``'s admin
        app in the supervisor): no health checks (the workers probe), no reports."""
        server, balancer = self.section("server"), self.section("balancer")
        sticky = None
        if "sticky" in self.optional:
            options = dict(self.section("sticky"))
            del options["secret_key"], options["secret_key_env"]
            sticky = StickyCookie(secret_key=self.secret_keys(environ), **options)
        health = None
        if "health_check" in self.optional and not relay_only:
            health = HealthCheck(**self.section("health_check"))
        passive = None
        if "passive_health_check" in self.optional:
            passive = PassiveHealthCheck(**self.section("passive_health_check"))
        tls = UpstreamTLS(**self.section("tls")) if "tls" in self.optional else None
        state = self.state_store(environ)
        if relay_only and isinstance(state, RedisState):
            state = RedisState(**{**state.options(), "report_every": None})
        proxy = LeastTimeProxy(
            state=state,
            tls=tls,
            upstreams=[Upstream(**u) for u in self.upstreams],
            name=server["name"],
            mode=balancer["mode"],
            pass_host_header=balancer["pass_host_header"],
            trusted_proxies=balancer["trusted_proxies"],
            pass_server_header=balancer["pass_server_header"],
            timeout=timeouts(**self.section("timeouts")),
            limits=limits(**self.section("limits")),
            sticky=sticky,
            health_check=health,
            passive_health_check=passive,
            retry=Retry(**self.section("retry")),
            dns=DnsResolver(**self.section("dns")),
            tracing=self.tracing() if not relay_only else None,
            load_reports=LoadReports(**self.section("load_reports"))
            if "load_reports" in self.optional
            else None,
        )
        access_log = self.log_options(environ).access_log()
        if access_log is not None and not relay_only:
            proxy.observe_requests(access_log)
        return proxy

    def log_options(self, environ: Mapping[str, str] | None = None) -> LogOptions:
        """``[log]``, with ``serve --access-log``'s choice (:data:`ACCESS_LOG_ENV`) first."""
        environ = os.environ if environ is None else environ
        log = LogOptions(**self.section("log"))
        given = environ.get(ACCESS_LOG_ENV)
        if given:
            log = dataclasses.replace(log, access=given)  # type: ignore[arg-type]
        return log

    def tracing(self) -> Tracing | None:
        """The ``[log] traces`` tracing, or ``None``; :class:`ConfigError` without its extra."""
        if not self.section("log")["traces"]:
            return None
        try:
            return Tracing()
        except MissingExtra as exc:
            raise ConfigError([f"log.traces: {exc}"]) from None

    def state_store(self, environ: Mapping[str, str] | None = None) -> StateStore | None:
        """The ``[state]`` store, or the private one ``serve --workers N`` started; ``None``
        for one process on its own."""
        environ = os.environ if environ is None else environ
        if "state" in self.optional:
            options = dict(self.section("state"))
            password = environ.get(options.pop("password_env")) or None
            return RedisState(options.pop("url"), password=password, **options)
        if environ.get(PRIVATE_STATE_ENV):
            return RedisState(environ[PRIVATE_STATE_ENV])
        return None

    def secret_keys(self, environ: Mapping[str, str] | None = None) -> list[str]:
        """The sticky keys: from the file, or from the environment variable it names."""
        environ = os.environ if environ is None else environ
        sticky = self.section("sticky")
        in_file = sticky["secret_key"]
        if in_file is not None:  # judged when the file was read: not empty
            return [in_file] if isinstance(in_file, str) else list(in_file)
        name = sticky["secret_key_env"]
        keys = [key.strip() for key in environ.get(name, "").split(",") if key.strip()]
        if not keys:
            raise ConfigError(
                [f"sticky.secret_key_env: the environment variable {name} is empty or unset"]
            )
        return keys

    def admin_token(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The admin write API's token, from the environment variable ``[admin] token_env``
        names; ``None`` when it is unset (the write API is off). A token the admin app would
        refuse is a :class:`ConfigError`."""
        environ = os.environ if environ is None else environ
        name = self.section("admin")["token_env"]
        token = environ.get(name)
        try:
            check_token(token)
        except OptionError as exc:
            raise ConfigError([f"admin.token_env: the token in {name} {exc.reason}"]) from None
        return token


def _check_table(where: str, values: Any, table: Table, errors: list[str]) -> dict[str, Any]:
    """The values of one table with defaults filled in; each mistake appended to ``errors``."""
    keys = table.options()
    checked = {name: key.default for name, key in keys.items()}
    if not isinstance(values, dict):
        errors.append(f"{where}: must be a table")
        return checked
    typed: dict[str, Any] = {}
    for name, value in values.items():
        if name not in keys:
            hint = difflib.get_close_matches(name, keys, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            errors.append(f"{where}.{name}: unknown key{suggestion}")
        elif not _has_type(value, keys[name].types):
            errors.append(f"{where}.{name}: must be {_type_name(keys[name].types)}, not {value!r}")
        else:
            typed[name] = value
    for part in table.parts:
        _judge(where, part, typed, errors)
    checked.update(typed)
    return checked


def _judge(where: str, part: Part, typed: dict[str, Any], errors: list[str]) -> None:
    """Build what ``part`` describes from the values it takes; a refused value is reported,
    left out, and the rest judged again, until every refused value is named."""
    judge = part.judge or part.source
    keys = part.options()
    taken_out: list[str] = []
    while True:
        given = {name: value for name, value in typed.items() if name in keys}
        try:
            judge(**_complete(part, given, typed))
        except OptionError as exc:
            key = exc.option.split("[")[0]
            if key in taken_out or any(name in exc.reason for name in taken_out):
                return  # a consequence of a value taken out (a required url), not news
            errors.append(f"{where}.{exc.option}: {exc.reason}")
            if key not in given:
                return  # refused for a value the file did not give: nothing left to take out
            del typed[key]
            taken_out.append(key)
        else:
            return


def _complete(part: Part, given: dict[str, Any], typed: dict[str, Any]) -> dict[str, Any]:
    """What a part's judge is called with: its given values, and the file's own keys that it
    takes (the sticky table's ``secret_key_env``)."""
    judge = part.judge
    if judge is None:
        return given
    parameters = inspect.signature(judge).parameters
    extra = {name: typed[name] for name in typed if name in parameters and name not in given}
    return {**given, **extra}


def _has_type(value: Any, accepted: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in accepted
    return isinstance(value, accepted)


def _type_name(accepted: tuple[type, ...]) -> str:
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
        name: _check_table(name, document[name], table, errors)
        if name in document
        else {key: option.default for key, option in table.options().items()}
        for name, table in TABLES.items()
        if name != "upstream"
    }
    admin = document.get("admin")
    if isinstance(admin, dict) and "port" not in admin:
        errors.append("admin.port: required to serve the admin app")
    raw_upstreams = document.get("upstreams", [])
    upstreams: list[dict[str, Any]] = []
    if not isinstance(raw_upstreams, list) or not raw_upstreams:
        errors.append(f"upstreams: {NO_UPSTREAMS}: an [[upstreams]] entry with a url")
        raw_upstreams = []
    names: set[str] = set()
    for index, raw in enumerate(raw_upstreams):
        where = f"upstreams[{index}]"
        if isinstance(raw, dict) and "url" not in raw:
            errors.append(f"{where}.url: required")
            continue
        before = len(errors)
        upstream = _check_table(where, raw, TABLES["upstream"], errors)
        if len(errors) > before:
            continue
        upstream["name"] = upstream["name"] or upstream["url"]
        if upstream["name"] in names:
            errors.append(f"{where}.name: {upstream['name']!r} is used by another upstream")
        names.add(upstream["name"])
        upstreams.append(upstream)
    if errors:
        raise ConfigError(errors)
    return Config(sections, upstreams, set(document) & OPTIONAL)


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
