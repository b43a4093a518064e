"""The requests the differential suite sends: what real clients send to real servers, and what
only crafted requests carry. ``fast`` ones run in make test; all of them in make conformance."""

from __future__ import annotations

from tests.differential.harness import Case

BIG = b"x" * 10_000_000
GZIP = [("Accept-Encoding", "gzip")]
JSON = [("Content-Type", "application/json")]

HTTPBIN = [
    Case("get", "httpbin", "GET", "/get", fast=True, echo=True),
    Case("get-repeated-query", "httpbin", "GET", "/get?a=1&a=2&b=%2F&c=+", fast=True, echo=True),
    Case("head", "httpbin", "HEAD", "/get", fast=True, echo=True),
    Case("options", "httpbin", "OPTIONS", "/get", echo=True),
    Case("post-json", "httpbin", "POST", "/post", JSON, b'{"k": "v"}', fast=True, echo=True),
    Case(
        "post-form",
        "httpbin",
        "POST",
        "/post",
        [("Content-Type", "application/x-www-form-urlencoded")],
        b"a=1&a=2&b=%20",
        echo=True,
    ),
    Case("post-empty", "httpbin", "POST", "/post", fast=True, echo=True),
    Case("put", "httpbin", "PUT", "/put", JSON, b"[1, 2]", echo=True),
    Case("patch", "httpbin", "PATCH", "/patch", JSON, b"{}", echo=True),
    Case("delete", "httpbin", "DELETE", "/delete", echo=True),
    Case("post-1mb", "httpbin", "POST", "/anything", [], b"y" * 1_000_000, echo=True),
    Case("status-200", "httpbin", "GET", "/status/200"),
    Case("status-204", "httpbin", "GET", "/status/204", fast=True),
    Case("status-304", "httpbin", "GET", "/status/304", fast=True),
    Case("status-401-big-body", "httpbin", "POST", "/status/401", [], BIG, fast=True),
    Case("status-413-big-body", "httpbin", "PUT", "/status/413", [], BIG),
    Case("status-404", "httpbin", "GET", "/status/404"),
    Case("status-418", "httpbin", "GET", "/status/418"),
    Case("status-500", "httpbin", "GET", "/status/500", fast=True),
    Case("status-503", "httpbin", "GET", "/status/503"),
    Case("redirect", "httpbin", "GET", "/redirect/2", fast=True),
    Case(
        "redirect-to", "httpbin", "GET", "/redirect-to?url=http%3A%2F%2Fexample.com%2F", echo=True
    ),
    Case("absolute-redirect", "httpbin", "GET", "/absolute-redirect/1"),
    Case("set-cookies", "httpbin", "GET", "/cookies/set?a=1&b=2", fast=True),
    Case(
        "two-set-cookie",
        "httpbin",
        "GET",
        "/response-headers?Set-Cookie=a%3D1&Set-Cookie=b%3D2",
        fast=True,
    ),
    Case("cookies-sent", "httpbin", "GET", "/cookies", [("Cookie", "a=1; b=2")], echo=True),
    Case("gzip", "httpbin", "GET", "/gzip", GZIP, fast=True, echo=True),
    Case("deflate", "httpbin", "GET", "/deflate", echo=True),
    Case("brotli", "httpbin", "GET", "/brotli", echo=True),
    Case("stream", "httpbin", "GET", "/stream/20", fast=True, echo=True),
    Case("stream-bytes", "httpbin", "GET", "/stream-bytes/200000?seed=1&chunk_size=1000"),
    Case("bytes", "httpbin", "GET", "/bytes/100000?seed=7"),
    Case("range", "httpbin", "GET", "/range/10000", [("Range", "bytes=100-199")]),
    Case("drip", "httpbin", "GET", "/drip?duration=0.3&numbytes=5&code=200&delay=0"),
    Case("delay", "httpbin", "GET", "/delay/0.2", echo=True),
    Case("etag-match", "httpbin", "GET", "/etag/abc", [("If-None-Match", '"abc"')], fast=True),
    Case("etag-miss", "httpbin", "GET", "/etag/abc", [("If-None-Match", '"xyz"')], echo=True),
    Case(
        "cache-304",
        "httpbin",
        "GET",
        "/cache",
        [("If-Modified-Since", "Sat, 01 Jan 2000 00:00:00 GMT")],
        echo=True,
    ),
    Case(
        "basic-auth-ok",
        "httpbin",
        "GET",
        "/basic-auth/u/p",
        [("Authorization", "Basic dTpw")],
        echo=True,
    ),
    Case("basic-auth-missing", "httpbin", "GET", "/basic-auth/u/p"),
    Case("bearer", "httpbin", "GET", "/bearer", [("Authorization", "Bearer t")], echo=True),
    Case("user-agent", "httpbin", "GET", "/user-agent", echo=True),
    Case(
        "headers-duplicated",
        "httpbin",
        "GET",
        "/headers",
        [("X-Dup", "one"), ("X-Dup", "two")],
        fast=True,
        echo=True,
    ),
    Case(
        "header-trailing-space", "httpbin", "GET", "/headers", [("X-Spaced", "value ")], echo=True
    ),
    Case("html", "httpbin", "GET", "/html"),
    Case("xml", "httpbin", "GET", "/xml"),
    Case("image", "httpbin", "GET", "/image/png"),
    Case("encoding-utf8", "httpbin", "GET", "/encoding/utf8"),
    Case("anything-encoded-path", "httpbin", "GET", "/anything/a%2Fb/%7Bc%7D/caf%C3%A9", echo=True),
    Case("anything-dot-segment", "httpbin", "GET", "/anything/../get", fast=True, echo=True),
    Case("robots", "httpbin", "GET", "/robots.txt"),
    Case("json", "httpbin", "GET", "/json"),
    Case("not-found", "httpbin", "GET", "/no/such/route"),
    Case("method-not-allowed", "httpbin", "POST", "/get", [], b"x", echo=True),
]

NGINX = [
    Case("file", "nginx", "GET", "/index.txt", fast=True),
    Case("file-head", "nginx", "HEAD", "/big.txt"),
    Case("file-gzip", "nginx", "GET", "/big.txt", GZIP, fast=True),
    Case("json-gzip", "nginx", "GET", "/data.json", GZIP),
    Case("file-range", "nginx", "GET", "/big.txt", [("Range", "bytes=0-99")], fast=True),
    Case("file-ranges", "nginx", "GET", "/big.txt", [("Range", "bytes=0-9,20-29")]),
    Case(
        "file-304",
        "nginx",
        "GET",
        "/big.txt",
        [("If-Modified-Since", "Tue, 14 Nov 2023 22:13:20 GMT")],
        fast=True,
    ),
    Case(
        "file-412",
        "nginx",
        "GET",
        "/big.txt",
        [("If-Unmodified-Since", "Sat, 01 Jan 2000 00:00:00 GMT")],
    ),
    Case("directory-redirect", "nginx", "GET", "/sub"),
    Case("sub-page", "nginx", "GET", "/sub/page.txt"),
    Case("missing", "nginx", "GET", "/missing.txt", fast=True),
    Case("post-static", "nginx", "POST", "/index.txt", [], b"body"),
    Case("escape-dotdot", "nginx", "GET", "/../secret.txt", fast=True),
    Case("escape-encoded", "nginx", "GET", "/%2e%2e/secret.txt", fast=True),
    Case("escape-slash-encoded", "nginx", "GET", "/..%2fsecret.txt"),
    Case("escape-deeper", "nginx", "GET", "/sub/../../secret.txt"),
]

ALL = HTTPBIN + NGINX
