"""An upstream in a process of its own, so that a test can kill it (SIGKILL), stop it gracefully
(SIGTERM) or freeze it (SIGSTOP): ``python -m uvicorn tests.upstream_process:app``.

Every answer carries ``x-upstream`` (``UPSTREAM_NAME``); ``/?delay=0.2`` waits before answering,
and a request's body is echoed.
"""

from __future__ import annotations

import os

from tests.servers import UpstreamApp

app = UpstreamApp(os.environ.get("UPSTREAM_NAME", "process"))
