"""What the benchmarks share: nginx upstreams, proxies under uvicorn, wrk, and peak RSS.

Everything listens on 127.0.0.1. Nothing is installed here: a missing tool is named and the run
stops.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def require(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        sys.exit(f"missing: {', '.join(missing)} (Debian: apt-get install nginx-light wrk)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {limit} s")


@contextlib.contextmanager
def nginx(config_body: str, workers: int = 1) -> Iterator[Path]:
    """Run an nginx with its own config, pid file and temp dirs; yields its directory."""
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as directory:
        path = Path(directory)
        (path / "nginx.conf").write_text(
            f"""
worker_processes {workers};
pid {path}/nginx.pid;
error_log {path}/error.log error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {path}/body;
    proxy_temp_path {path}/proxy;
    fastcgi_temp_path {path}/fastcgi;
    uwsgi_temp_path {path}/uwsgi;
    scgi_temp_path {path}/scgi;
    keepalive_requests 1000000;
    {config_body}
}}
"""
        )
        process = subprocess.Popen(
            ["nginx", "-p", str(path), "-c", str(path / "nginx.conf"), "-g", "daemon off;"]
        )
        try:
            yield path
        finally:
            process.terminate()
            process.wait(10)


def nginx_upstreams(ports: list[int], files: Path | None = None) -> str:
    """Server blocks answering ``ok`` (and serving ``files`` under /files/, for streaming)."""
    root = f"location /files/ {{ alias {files}/; sendfile on; }}" if files else ""
    return "\n".join(
        f'server {{ listen 127.0.0.1:{port}; {root} location / {{ return 200 "ok"; }} }}'
        for port in ports
    )


def start_upstreams(stack: contextlib.ExitStack, count: int = 3) -> list[int]:
    """``count`` nginx upstreams answering ``ok``, one worker each, until ``stack`` closes;
    returns their ports once they listen."""
    ports = [free_port() for _ in range(count)]
    for port in ports:
        stack.enter_context(nginx(nginx_upstreams([port])))
    for port in ports:
        wait_for_port(port)
    return ports


@contextlib.contextmanager
def uvicorn_app(
    factory: str,
    upstreams: list[str],
    port: int,
    extra_env: dict[str, str] | None = None,
    root: Path = ROOT,
    http: str = "auto",
    workers: int = 1,
) -> Iterator[int]:
    """uvicorn (uvloop, and httptools where installed unless ``http`` says h11) serving an app
    factory from the source tree ``root`` with ``workers`` worker processes; yields its pid
    (with several workers, the supervisor's: see :func:`worker_pids`)."""
    env = dict(os.environ, BENCH_UPSTREAMS=",".join(upstreams), PYTHONPATH=str(root))
    env.update(extra_env or {})
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        factory,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
        "--timeout-keep-alive",
        "30",
        "--http",
        http,
    ]
    if workers > 1:
        command += ["--workers", str(workers)]
    process = subprocess.Popen(command, env=env, cwd=root)
    try:
        wait_for_port(port)
        yield process.pid
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_pids(pid: int) -> list[int]:
    """The worker processes under a uvicorn supervisor (``pid`` itself with one worker)."""
    children = [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]
    workers = [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    return workers or [pid]


def peak_rss_mib(pid: int) -> float:
    """The process's high-water resident memory (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(text)
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk(url: str, connections: int, seconds: float) -> WrkResult:
    threads = min(2, connections)
    output = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p50_match = re.search(r"^\s+50%\s+([\d.]+(?:us|ms|s))$", output, re.M)
    p99_match = re.search(r"^\s+99%\s+([\d.]+(?:us|ms|s))$", output, re.M)
    if p50_match is None or p99_match is None:  # no request completed
        print(output, file=sys.stderr)
        return WrkResult(rps, float("nan"), float("nan"), 1)
    p50, p99 = _ms(p50_match.group(1)), _ms(p99_match.group(1))
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return WrkResult(rps, p50, p99, errors + (int(non_2xx.group(1)) if non_2xx else 0))


def median_result(results: list[WrkResult]) -> WrkResult:
    return WrkResult(
        statistics.median(r.rps for r in results),
        statistics.median(r.p50_ms for r in results),
        statistics.median(r.p99_ms for r in results),
        sum(r.errors for r in results),
    )


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores, {cpu}, Python {sys.version.split()[0]}"


def selected(names: dict[str, object], only: str | None) -> list[str]:
    """The names matching any comma-separated part of ``--only`` (all of them without it): a
    part that is a whole name selects that name only, any other part every name containing it."""
    if not only:
        return list(names)
    parts = only.split(",")
    return [
        name
        for name in names
        if any(part == name or (part not in names and part in name) for part in parts)
    ]
