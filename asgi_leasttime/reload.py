"""A new configuration file applied to a running proxy (``kill -HUP``, or ``[server] watch``).

The new file is checked in full first, as ``serve`` checks it at start (every key, and what
the environment gives: the sticky keys, the admin token); a file with a mistake changes
nothing, and the refusal is logged with every mistake. A good file applies at once to what can
change under traffic: the upstreams (:meth:`LeastTimeProxy.reconcile_upstreams
<asgi_leasttime.proxy.LeastTimeProxy.reconcile_upstreams>`) and the options of new requests
(:meth:`LeastTimeProxy.reconfigure <asgi_leasttime.proxy.LeastTimeProxy.reconfigure>`). What
was bound when the process started (where it listens, the balancer's mode, the state store,
TLS, pools, headers, the admin app) is named in one log line and left as it was until a restart.

Each process applies its own file: nothing goes through the shared state store, which carries
changes to upstreams but no options (sticky keys, checks), and whose processes may run on
machines with files of their own.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from asgi_leasttime.client import timeouts
from asgi_leasttime.config import OPTIONAL, TABLES, Config, ConfigError, load_config
from asgi_leasttime.health import HealthCheck, PassiveHealthCheck
from asgi_leasttime.options import OptionError
from asgi_leasttime.retry import Retry
from asgi_leasttime.sticky import StickyCookie
from asgi_leasttime.upstream import Upstream

if TYPE_CHECKING:
    import asyncio

    from asgi_leasttime.proxy import LeastTimeProxy

__all__ = [
    "LIVE",
    "NOTHING_TO_RELOAD",
    "LiveOptions",
    "Reloader",
    "check_file",
    "not_applied",
    "reload_file",
    "watch_file",
]

logger = logging.getLogger("asgi_leasttime.reload")

NOTHING_TO_RELOAD = "SIGHUP: nothing to reload (serving --upstream URLs, no file)"

LIVE = frozenset({"sticky", "health_check", "passive_health_check", "retry", "timeouts"})
"""The tables that apply to new requests on a reload, besides ``[[upstreams]]``; every other
table waits for a restart."""

WATCH_EVERY = 1.0
"""Seconds between two looks at the file with ``[server] watch``."""


@dataclass(frozen=True)
class LiveOptions:
    """What a file gives a running proxy: its upstreams and the options of new requests."""

    upstreams: list[Upstream]
    sticky: StickyCookie | None
    health_check: HealthCheck | None
    passive_health_check: PassiveHealthCheck | None
    retry: Retry
    timeout: httpx.Timeout

    @classmethod
    def of(cls, config: Config, environ: Mapping[str, str] | None = None) -> LiveOptions:
        """Built as :meth:`Config.build_proxy <asgi_leasttime.config.Config.build_proxy>`
        builds them; raises :class:`~asgi_leasttime.config.ConfigError` (the sticky keys'
        environment variable empty, say)."""
        sticky = None
        if "sticky" in config.optional:
            options = dict(config.section("sticky"))
            del options["secret_key"], options["secret_key_env"]
            keys = config.secret_keys(environ)
            try:
                sticky = StickyCookie(secret_key=keys, **options)
            except OptionError as exc:
                raise ConfigError([f"sticky.{exc.option}: {exc.reason}"]) from None
        health = None
        if "health_check" in config.optional:
            health = HealthCheck(**config.section("health_check"))
        passive = None
        if "passive_health_check" in config.optional:
            passive = PassiveHealthCheck(**config.section("passive_health_check"))
        return cls(
            upstreams=[Upstream(**u) for u in config.upstreams],
            sticky=sticky,
            health_check=health,
            passive_health_check=passive,
            retry=Retry(**config.section("retry")),
            timeout=timeouts(**config.section("timeouts")),
        )


def check_file(
    path: str | Path, environ: Mapping[str, str] | None = None
) -> tuple[Config, LiveOptions] | None:
    """The file read and checked as ``serve`` checks it at start, and what it gives a running
    proxy; ``None`` if refused, the refusal logged (WARNING) with every mistake."""
    try:
        config = load_config(path)
        if "admin" in config.optional:
            config.admin_token(environ)
        live = LiveOptions.of(config, environ)
    except ConfigError as exc:
        logger.warning(
            "%s refused, nothing changed (%d problem(s)): %s",
            path,
            len(exc.errors),
            "; ".join(exc.errors),
        )
        return None
    return config, live


def not_applied(current: Config, new: Config) -> list[str]:
    """What differs between the running configuration and a new file in tables that only a
    restart applies: a table added or removed (``[admin]``), else each key (``server.port``)."""
    names = []
    for table in TABLES:
        if table == "upstream" or table in LIVE:
            continue
        if table in OPTIONAL and (table in current.optional) != (table in new.optional):
            names.append(f"[{table}]")
            continue
        old, now = current.section(table), new.section(table)
        names += [f"{table}.{key}" for key in old if old[key] != now.get(key)]
    return names


def _applied(current: Config, new: Config) -> Config:
    """The configuration in force once ``new`` is applied: its live tables and upstreams, the
    running one's other tables (named again by the next reload until a restart)."""
    sections = {
        table: new.sections[table] if table in LIVE else current.sections[table]
        for table in current.sections
    }
    optional = {t for t in new.optional if t in LIVE}
    optional |= {t for t in current.optional if t not in LIVE}
    return Config(sections, new.upstreams, optional)


def _what_changed(current: Config, new: Config) -> str:
    old = {u["name"]: u for u in current.upstreams}
    now = {u["name"]: u for u in new.upstreams}
    parts = []
    for word, names in (
        ("added", [n for n in now if n not in old]),
        ("removed", [n for n in old if n not in now]),
        ("changed", [n for n in now if n in old and old[n] != now[n]]),
    ):
        if names:
            parts.append(f"upstreams {word}: {', '.join(names)}")
    options = sorted(
        table
        for table in LIVE
        if (table in current.optional) != (table in new.optional)
        or current.section(table) != new.section(table)
    )
    if options:
        parts.append(f"options changed: {', '.join(options)}")
    return "; ".join(parts) or "no change"


def reload_file(
    proxy: LeastTimeProxy,
    path: str | Path,
    current: Config,
    environ: Mapping[str, str] | None = None,
) -> Config | None:
    """Apply the file at ``path`` to ``proxy``, which runs with ``current``: checked in full
    first (:func:`check_file`), then the options of new requests and the upstreams applied,
    and what only a restart applies named in one WARNING. Returns the configuration now in
    force (the new file's live tables and upstreams, ``current``'s other tables), or ``None``
    if the file was refused and nothing changed. Call it on the proxy's event loop."""
    checked = check_file(path, environ)
    if checked is None:
        return None
    new, live = checked
    try:  # checked whole before anything moves: a list that cannot apply changes nothing
        proxy.reconcile_upstreams(live.upstreams, [Upstream(**u) for u in current.upstreams])
    except (ValueError, OptionError) as exc:
        logger.warning("%s refused, nothing changed: %s", path, exc)
        return None
    proxy.reconfigure(
        sticky=live.sticky,
        health_check=live.health_check,
        passive_health_check=live.passive_health_check,
        retry=live.retry,
        timeout=live.timeout,
    )
    logger.info("reloaded %s: %s", path, _what_changed(current, new))
    waiting = not_applied(current, new)
    if waiting:
        logger.warning("%s changed in the file: not applied until a restart", ", ".join(waiting))
    return _applied(current, new)


class Reloader:
    """What SIGHUP does in a serving process: reload ``path`` into ``proxy`` (``current`` is
    the configuration it runs with); with no file (``serve --upstream URL``), nothing."""

    def __init__(self, proxy: LeastTimeProxy, path: str | None, current: Config) -> None:
        self.proxy = proxy
        self.path = path
        self.current = current

    def reload(self) -> None:
        """Reload the file once (on the proxy's event loop)."""
        if self.path is None:
            logger.info(NOTHING_TO_RELOAD)
            return
        try:
            applied = reload_file(self.proxy, self.path, self.current)
        except Exception:  # a fault of ours: logged, and the process serves on
            logger.exception("reloading %s failed", self.path)
            return
        if applied is not None:
            self.current = applied

    def install(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Reload on SIGHUP in ``loop`` (running in the main thread); ``False`` where signals
        cannot be handled there (another thread, no Unix signals)."""
        try:
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        except (RuntimeError, ValueError, NotImplementedError, AttributeError):
            return False
        return True


def watch_file(path: str | Path, interval: float = WATCH_EVERY) -> threading.Thread:
    """Raise SIGHUP in this process whenever the file's contents change, looked at every
    ``interval`` seconds from a daemon thread; returns the thread, started."""
    # The thread only raises the signal: a change takes the one path `kill -HUP` takes (the
    # serving loop's handler, or the supervisor's, which tells each worker), and no thread but
    # the event loop's touches the proxy. Polling the path's stat, rather than inotify, follows
    # editors that save by writing a new file and renaming it over the old one (the watched
    # inode is then gone), and needs no dependency; a change of stat alone (touch) is not one.
    target = Path(path)
    seen, contents = _stat(target), _read(target)

    def watch() -> None:
        nonlocal seen, contents
        while True:
            time.sleep(interval)
            stat = _stat(target)
            if stat is None or stat == seen:  # None: gone for a moment while an editor saves
                continue
            seen, now = stat, _read(target)
            if now is None or now == contents:
                continue
            contents = now
            os.kill(os.getpid(), signal.SIGHUP)

    thread = threading.Thread(target=watch, name="asgi-leasttime-watch", daemon=True)
    thread.start()
    return thread


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None
