"""The dashboard page of the admin app: one self-contained HTML file, no network at run time.

The page (``dashboard.html`` beside this module) polls ``/status`` every second and calls the
write API with the token its user enters. Its script and style are inline; the Content Security
Policy allows exactly those (by their hashes) and requests to the admin app itself, so an
upstream name that carried markup could neither run nor load anything.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib.resources import files

__all__ = ["page"]


def _hashes(html: str, tag: str) -> str:
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
    return " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(block.encode()).digest()).decode() + "'"
        for block in blocks
    )


@cache
def page() -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The page's body and its response headers."""
    html = files("asgi_leasttime").joinpath("dashboard.html").read_text(encoding="utf-8")
    policy = (
        f"default-src 'none'; script-src {_hashes(html, 'script')}; "
        f"style-src {_hashes(html, 'style')}; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    body = html.encode()
    headers = [
        (b"content-type", b"text/html; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"content-security-policy", policy.encode()),
        (b"cache-control", b"no-store"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
    ]
    return body, headers
