"""The upstream of ``churn.py``: answers every request 200 after reading its body, and notes in
the file ``CHURN_NOTES`` each request id it received (``in ID``) and answered (``out ID``), so the
run can count what reached the upstreams, retries included."""

from __future__ import annotations

import os
from typing import Any

NOTES = open(os.environ["CHURN_NOTES"], "a", buffering=1)  # noqa: SIM115 - for the process's life


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    request_id = dict(scope["headers"]).get(b"x-request-id", b"-").decode()
    NOTES.write(f"in {request_id}\n")
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    body = b"ok"
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    NOTES.write(f"out {request_id}\n")
