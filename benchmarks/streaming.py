"""Streaming through each Python proxy: 1 GiB down, 256 MiB up; MB/s and the proxy's peak RSS.

    python benchmarks/streaming.py [--down-mib 1024] [--up-mib 256]

An nginx upstream serves a sparse file for the download and discards the upload; curl is the
client (``curl -T`` streams the file with its Content-Length). Each proxy runs in a fresh uvicorn
process, so its high-water RSS (VmHWM) is that of the transfer. Needs nginx and curl.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import tempfile
from pathlib import Path

from harness import (
    free_port,
    machine,
    nginx,
    peak_rss_mib,
    require,
    selected,
    uvicorn_app,
    wait_for_port,
)

PROXIES = {
    "asgi-leasttime": ("benchmarks.apps:ours", True),
    "asgi-leasttime on httpx": ("benchmarks.apps:ours_on_httpx", True),
    "asgiproxy 0.2 (aiohttp)": ("benchmarks.apps:asgiproxy_app", True),
    "fastapi-proxy-lib 0.3 (httpx)": ("benchmarks.apps:fastapi_proxy_lib_app", True),
    "minimal raw-ASGI proxy on aiohttp": ("benchmarks.apps:minimal_aiohttp", False),
    "minimal raw-ASGI proxy on httpx": ("benchmarks.apps:minimal_httpx", False),
}


def curl(args: list[str]) -> tuple[float, int, int]:
    """(MB/s, bytes, HTTP status) of one curl transfer."""
    out = subprocess.run(
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "--max-time",
            "600",
            "-w",
            "%{speed_download} %{speed_upload} %{size_download} %{size_upload} %{http_code}",
            *args,
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    down, up, size_down, size_up, status = (
        float(out[0]),
        float(out[1]),
        int(out[2]),
        int(out[3]),
        int(out[4]),
    )
    speed, size = (up, size_up) if up > down else (down, size_down)
    return speed / 1e6, size, status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--down-mib", type=int, default=1024)
    parser.add_argument("--up-mib", type=int, default=256)
    parser.add_argument("--only", help="comma-separated names of Python proxies to run")
    args = parser.parse_args()
    require("nginx", "curl")
    with tempfile.TemporaryDirectory(prefix="bench-files-") as directory:
        files = Path(directory)
        files.chmod(0o755)  # nginx's workers are not root
        down_file, up_file = files / "down.bin", files / "up.bin"
        with down_file.open("wb") as f:
            f.truncate(args.down_mib * 1024 * 1024)
        with up_file.open("wb") as f:
            f.truncate(args.up_mib * 1024 * 1024)
        port = free_port()
        server = (
            f"server {{ listen 127.0.0.1:{port}; client_max_body_size 0;"
            f" location /files/ {{ alias {files}/; sendfile on; }}"
            ' location /upload { return 200 "stored"; } }'
        )
        rows = []
        with nginx(server):
            wait_for_port(port)
            upstream = f"http://127.0.0.1:{port}"
            down = curl([f"{upstream}/files/down.bin"])
            up = curl(["-T", str(up_file), "-X", "POST", f"{upstream}/upload"])
            rows.append(("direct to nginx", down, up, None))
            for name in selected(PROXIES, args.only):
                factory, uploads = PROXIES[name]
                proxy_port = free_port()
                with uvicorn_app(factory, [upstream], proxy_port) as pid:
                    base = f"http://127.0.0.1:{proxy_port}"
                    down = curl([f"{base}/files/down.bin"])
                    up = (
                        curl(["-T", str(up_file), "-X", "POST", f"{base}/upload"])
                        if uploads
                        else None
                    )
                    rows.append((name, down, up, peak_rss_mib(pid)))
                print(f"  {name}: done", flush=True)
    print(f"\n## Streaming, {datetime.date.today().isoformat()}\n")
    print(f"{machine()}; {args.down_mib} MiB down, {args.up_mib} MiB up, one transfer each.\n")
    print("| target | down MB/s | down bytes ok | up MB/s | up status | proxy peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for name, down, up, rss in rows:
        up_text = f"{up[0]:,.0f} | {up[2]}" if up else "n/a (no request bodies) | -"
        rss_text = f"{rss:.0f}" if rss is not None else "-"
        ok = (
            "yes"
            if down[1] == args.down_mib * 1024 * 1024 and down[2] == 200
            else f"NO ({down[1]})"
        )
        print(f"| {name} | {down[0]:,.0f} | {ok} | {up_text} | {rss_text} |")


if __name__ == "__main__":
    main()
