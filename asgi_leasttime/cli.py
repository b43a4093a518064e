"""``asgi-leasttime``: serve from a config file or from URLs, check a config file, run the demo."""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from asgi_leasttime import __version__
from asgi_leasttime._extras import MissingExtra, need
from asgi_leasttime._private_store import private_store
from asgi_leasttime.config import (
    ACCESS_LOG_ENV,
    PRIVATE_STATE_ENV,
    Config,
    ConfigError,
    ServerOptions,
    load_config,
    parse_config,
)
from asgi_leasttime.metrics import WORKERS_DIR_ENV
from asgi_leasttime.options import OptionError

if TYPE_CHECKING:
    from asgi_leasttime.proxy import LeastTimeProxy
    from asgi_leasttime.upstream import Upstream

__all__ = ["main"]

# How the serving processes (uvicorn workers) learn what to build.
CONFIG_ENV = "ASGI_LEASTTIME_CONFIG"
DOCUMENT_ENV = "ASGI_LEASTTIME_DOCUMENT"


def _config_from_environment() -> Config:
    if os.environ.get(DOCUMENT_ENV):
        return parse_config(json.loads(os.environ[DOCUMENT_ENV]))
    return load_config(os.environ[CONFIG_ENV])


def _config_path() -> str | None:
    """The file the serving processes read (and read again on SIGHUP); ``None`` when they
    serve ``--upstream`` URLs."""
    if os.environ.get(DOCUMENT_ENV):
        return None
    return os.environ.get(CONFIG_ENV)


def create_app() -> Any:
    """The app each uvicorn worker serves (``uvicorn --factory asgi_leasttime.cli:create_app``)."""
    config = _config_from_environment()
    proxy = config.build_proxy()
    if os.environ.get(WORKERS_DIR_ENV):  # a worker of serve --workers N with an admin app
        from asgi_leasttime.metrics import RequestMetrics

        proxy.observe_requests(RequestMetrics(proxy))
    _reload_on_hangup(proxy, config)
    _access_log_off_the_loop()
    _freeze_heap(config)
    return proxy


def _access_log_off_the_loop() -> None:
    """Once per serving process: the access log's handlers run on a thread of their own, so a
    slow terminal or disk delays the lines, not the requests; stopped (the queue emptied) when
    the process exits."""
    import atexit

    from asgi_leasttime.access_log import log_without_blocking

    stack = contextlib.ExitStack()
    stack.enter_context(log_without_blocking())
    atexit.register(stack.close)


def _reload_on_hangup(proxy: LeastTimeProxy, config: Config) -> None:
    """SIGHUP reloads the file into ``proxy``, on the loop serving it: uvicorn builds the app
    from its factory inside its running loop (a proxy built outside one takes no signal)."""
    import asyncio

    from asgi_leasttime.reload import Reloader

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    Reloader(proxy, _config_path(), config).install(loop)


def _freeze_heap(config: Config) -> None:
    """With ``[server] freeze_gc`` (the default), once per serving process, when its app is
    built: ``gc.collect()`` frees the garbage of start-up, then ``gc.freeze()`` moves everything
    alive (modules, the app, the server) out of the collector's sight, so its full collections,
    which stop every request in flight, scan only what came later. ``serve``'s doing: the
    library leaves the collector alone."""
    if config.section("server")["freeze_gc"]:
        gc.collect()
        gc.freeze()


def _document_from_arguments(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "upstreams": [{"url": url} for url in args.upstream],
        "balancer": {"mode": args.mode},
    }


# The command line's flags for [server] keys (``--cert-file`` is ``cert_file``).
LISTENING = ("host", "port", "workers", "cert_file", "key_file")


def _listening(args: argparse.Namespace) -> dict[str, Any]:
    """``--host``, ``--port``, ``--workers``, ``--cert-file`` and ``--key-file`` as given,
    judged by :class:`ServerOptions` as the file's ``[server]`` keys are (raises
    :class:`OptionError`); the certificate's pair is judged again with the file's."""
    given = {name: getattr(args, name) for name in LISTENING}
    given = {name: value for name, value in given.items() if value is not None}
    ServerOptions(**{**given, "key_file": None} if "cert_file" not in given else given)
    return given


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def _serve(args: argparse.Namespace) -> int:
    need("uvicorn", "cli", "asgi-leasttime serve")
    import uvicorn

    try:
        given = _listening(args)
    except OptionError as exc:
        print(f"{_flag(exc.option)}: {exc.reason}", file=sys.stderr)
        return 2
    if args.config and args.upstream:
        print("give a config file or --upstream URLs, not both", file=sys.stderr)
        return 2
    if not args.config and not args.upstream:
        print("give a config file or at least one --upstream URL", file=sys.stderr)
        return 2
    if args.access_log is not None:  # for every serving process, as [log] access would say
        os.environ[ACCESS_LOG_ENV] = args.access_log
    try:
        if args.config:
            config = load_config(args.config)
            os.environ[CONFIG_ENV] = os.path.abspath(args.config)
        else:
            document = _document_from_arguments(args)
            config = parse_config(document)
            os.environ[DOCUMENT_ENV] = json.dumps(document)
        config.build_proxy()  # fail here, with the message, rather than in every worker
        admin = config.section("admin") if "admin" in config.optional else None
        token = config.admin_token() if admin is not None else None
    except ConfigError as exc:
        _print_errors(args.config or "--upstream", exc)
        return 1
    server = config.section("server")
    try:
        listen = dataclasses.replace(
            ServerOptions(**{key: value for key, value in server.items() if key != "name"}),
            **given,
        )
    except OptionError as exc:  # --key-file with the file's cert_file, or the reverse
        print(f"{_flag(exc.option)}: {exc.reason}", file=sys.stderr)
        return 2
    host, port, workers = listen.host, listen.port, listen.workers
    # SIGHUP ends a process by default: ignored until the serving loop (or uvicorn's
    # supervisor of several workers) takes it over and reloads the file.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    watched = _config_path() if listen.watch else None
    passed = config.section("balancer")["pass_server_header"]
    options = uvicorn_options(
        host,
        port,
        args.log_level,
        args.http,
        server_header=not passed,
        cert_file=listen.cert_file,
        key_file=listen.key_file,
        access_log=config.log_options().access == "off",
    )
    if workers == 1:
        if watched is not None:
            _watch(watched)
        if admin is None:
            uvicorn.run("asgi_leasttime.cli:create_app", **options)
            return 0
        return _serve_with_admin(config, options, admin, token)
    with contextlib.ExitStack() as stack:
        if "state" not in config.optional:
            # One state for every worker, out of the box: a private server for this run.
            os.environ[PRIVATE_STATE_ENV] = stack.enter_context(private_store())
        relay = None
        if admin is not None:
            # The workers count their requests in files the supervisor's admin app adds up:
            # set before prometheus-client is first imported here or in a worker.
            counters = stack.enter_context(tempfile.TemporaryDirectory(prefix="asgi-leasttime-"))
            os.environ[WORKERS_DIR_ENV] = counters
            relay = stack.enter_context(_admin_beside_workers(config, admin, token, args.log_level))
        _supervise(workers, options, relay, watched)
    return 0


def _watch(path: str) -> None:
    from asgi_leasttime.reload import watch_file

    watch_file(path)


def _supervise(
    workers: int,
    options: dict[str, Any],
    relay: Callable[[Sequence[Upstream]], None] | None,
    watched: str | None,
) -> None:
    """``uvicorn.run(..., workers=N)``, but SIGHUP reloads the file in each worker in place
    rather than replacing the workers (see :class:`ReloadingSupervisor`): the file is checked
    once here, and the admin app's proxy in this process (``relay``) takes its upstreams."""
    import uvicorn

    from asgi_leasttime._serving import ReloadingSupervisor
    from asgi_leasttime.reload import NOTHING_TO_RELOAD, check_file

    path = _config_path()

    def on_hangup() -> bool:
        if path is None:
            logging.getLogger("asgi_leasttime.reload").info(NOTHING_TO_RELOAD)
            return False
        checked = check_file(path)
        if checked is None:
            return False
        if relay is not None:
            relay(checked[1].upstreams)
        return True

    config = uvicorn.Config("asgi_leasttime.cli:create_app", workers=workers, **options)
    supervisor = ReloadingSupervisor(config, [config.bind_socket()], on_hangup)
    if watched is not None:
        _watch(watched)  # once the supervisor takes SIGHUP
    with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run()
        supervisor.run()


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging set-up with the time and the process on every line, and the proxy's
    own logger (upstreams going down and coming back) through the same handler at ``level``."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    for formatter in config["formatters"].values():  # uvicorn's lines and its access lines
        formatter["fmt"] = "%(asctime)s [%(process)d] " + formatter["fmt"]
    config["loggers"]["asgi_leasttime"] = {
        "handlers": ["default"],
        "level": level.upper(),
        "propagate": False,
    }
    # The access log's lines carry their own time, and go where uvicorn's access lines go.
    config["formatters"]["leasttime_access"] = {"format": "%(message)s"}
    config["handlers"]["leasttime_access"] = {
        "formatter": "leasttime_access",
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stdout",
    }
    config["loggers"]["asgi_leasttime.access"] = {
        "handlers": ["leasttime_access"],
        "level": "INFO",
        "propagate": False,
    }
    return config


def uvicorn_options(
    host: str,
    port: int,
    log_level: str,
    http: str,
    *,
    server_header: bool = True,
    cert_file: str | None = None,
    key_file: str | None = None,
    access_log: bool = True,
) -> dict[str, Any]:
    """How ``serve`` runs uvicorn. ``server_header``: uvicorn sends its ``Date`` and ``Server``
    (the proxy drops the upstream's); off when the proxy passes the upstream's instead
    (``[balancer] pass_server_header``), so that the client gets one of each either way.
    ``cert_file`` (and ``key_file``): uvicorn terminates TLS with them (``[server]``'s keys),
    in each worker."""
    tls = {"ssl_certfile": cert_file, "ssl_keyfile": key_file} if cert_file is not None else {}
    return {
        **tls,
        "host": host,
        "port": port,
        "factory": True,
        "lifespan": "on",
        # The proxy decides which X-Forwarded-For to trust (balancer.trusted_proxies); uvicorn
        # must not rewrite the client address from it first.
        "proxy_headers": False,
        "server_header": server_header,
        "date_header": server_header,
        "http": http,
        "log_level": log_level,
        "log_config": log_config(log_level),
        "access_log": access_log,  # off when the proxy's own access log is on: one line each
    }


def _serve_with_admin(
    config: Config, options: dict[str, Any], admin: dict[str, Any], token: str | None
) -> int:
    """One process: the proxy and its admin app side by side, on one event loop."""
    import asyncio

    import uvicorn

    from asgi_leasttime._serving import SaidOnce, uvicorn_lines
    from asgi_leasttime.metrics import AdminApp

    proxy = config.build_proxy()
    options = {**options, "factory": False}
    main = uvicorn.Server(uvicorn.Config(proxy, **options))
    server = _admin_server(AdminApp(proxy, token=token), admin, options["log_level"])
    uvicorn_lines().addFilter(SaidOnce("Started server process", "Finished"))
    _access_log_off_the_loop()
    _freeze_heap(config)

    async def both() -> None:
        _reload_on_hangup(proxy, config)
        task = asyncio.create_task(server.serve())
        await main.serve()
        server.should_exit = True
        await task

    # uvicorn raises the signal that stopped it again once it has shut down; uvicorn.run()
    # swallows the KeyboardInterrupt that makes, and so does this.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(both())
    return 0


def _admin_server(app: Any, admin: dict[str, Any], log_level: str) -> Any:
    """The admin app's uvicorn server: the proxy's server owns the signals and the lifespan,
    and both log alike (a second uvicorn config would set uvicorn's bare format again)."""
    import uvicorn

    from asgi_leasttime._serving import QuietServer

    return QuietServer(
        uvicorn.Config(
            app,
            host=admin["host"],
            port=admin["port"],
            log_level=log_level,
            log_config=log_config(log_level),
            lifespan="off",
        )
    )


@contextlib.contextmanager
def _admin_beside_workers(
    config: Config, admin: dict[str, Any], token: str | None, log_level: str
) -> Iterator[Callable[[Sequence[Upstream]], None]]:
    """Several workers: the admin app runs in the supervisor, on a proxy of its own that serves
    no traffic and probes nothing, and reaches the workers through the shared state. Yields
    how a reloaded file's upstreams reach that proxy (its loop runs in another thread)."""
    import asyncio
    import threading

    from asgi_leasttime.metrics import AdminApp

    proxy = config.build_proxy(relay_only=True)
    server = _admin_server(AdminApp(proxy, token=token), admin, log_level)
    loops: list[asyncio.AbstractEventLoop] = []
    started = threading.Event()

    async def serve() -> None:
        loops.append(asyncio.get_running_loop())
        started.set()
        async with proxy.lifespan():
            await server.serve()

    def relay(upstreams: Sequence[Upstream]) -> None:
        if started.wait(10):
            with contextlib.suppress(RuntimeError):  # the loop has closed: shutting down
                loops[0].call_soon_threadsafe(proxy.reconcile_upstreams, upstreams)

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    try:
        yield relay
    finally:
        server.should_exit = True
        thread.join(10)


def _print_errors(source: str, error: ConfigError) -> None:
    print(f"{source}: {len(error.errors)} problem(s)", file=sys.stderr)
    for message in error.errors:
        print(f"  {message}", file=sys.stderr)


def _check(args: argparse.Namespace) -> int:
    """What ``serve`` would refuse: the file's mistakes, all of them, an admin token it
    names that is too short, and traces asked for without their extra. The sticky keys are
    the environment's at serving time: unset here, they are a note, not a mistake."""
    try:
        config = load_config(args.config)
        if "admin" in config.optional:
            config.admin_token()
        config.tracing()  # [log] traces without the otel extra
    except ConfigError as exc:
        _print_errors(args.config, exc)
        return 1
    names = ", ".join(u["name"] for u in config.upstreams)
    print(f"{args.config}: ok ({len(config.upstreams)} upstreams: {names})")
    if "sticky" in config.optional:
        try:
            config.secret_keys()
        except ConfigError as exc:
            for message in exc.errors:
                print(f"  note: {message} here; serve needs it", file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from asgi_leasttime.demo import run_demo

    return run_demo(seconds=args.seconds)


def build_parser() -> argparse.ArgumentParser:
    """The command line, for ``main`` and for the docs."""
    parser = argparse.ArgumentParser(
        prog="asgi-leasttime", description="Traefik's least-time load balancer as an ASGI app."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the proxy under uvicorn")
    serve.add_argument("config", nargs="?", help="a TOML configuration file")
    serve.add_argument("--upstream", action="append", default=[], metavar="URL",
                       help="an upstream URL (repeat for more); no file needed")  # fmt: skip
    serve.add_argument("--mode", choices=("leasttime", "traefik"), default="leasttime")
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8000)")
    serve.add_argument("--workers", type=int, help="uvicorn worker processes (default 1)")
    serve.add_argument("--cert-file", metavar="PEM",
                       help="serve HTTPS with this certificate chain (key included or "
                       "--key-file)")  # fmt: skip
    serve.add_argument("--key-file", metavar="PEM",
                       help="the certificate's private key, if not in --cert-file")  # fmt: skip
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--http", choices=("httptools", "h11"), default="httptools",
                       help="uvicorn's HTTP parser: httptools (default, faster) or h11 (forwards "
                       "any method token; answers HTTP/1.0 clients without chunks)")  # fmt: skip
    serve.add_argument("--access-log", choices=("text", "json", "off"),
                       help="the proxy's access log, one line per request with the upstream's "
                       "fields, in place of uvicorn's (default: [log] access, off)")  # fmt: skip
    serve.set_defaults(run=_serve)

    check = commands.add_parser("check", help="check a configuration file and exit")
    check.add_argument("config", help="a TOML configuration file")
    check.set_defaults(run=_check)

    demo = commands.add_parser("demo", help="three local upstreams, one slows down and recovers")
    demo.add_argument("--seconds", type=float, default=20.0, help="how long to run (default 20)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``asgi-leasttime``."""
    args = build_parser().parse_args(argv)
    try:
        result: int = args.run(args)
    except MissingExtra as exc:
        print(exc, file=sys.stderr)  # one line naming the extra, no traceback
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
