from __future__ import annotations

import asyncio
import io
import os
import sys
import threading
from collections.abc import Iterator

import pytest

# Seconds; pytest's faulthandler_timeout (120 s) dumps the threads after.
STUCK_AFTER = float(os.environ.get("ASGI_LEASTTIME_STUCK_AFTER", "100"))


_report_to: list[int] = []  # a copy of stderr taken before the tests' output is captured


def pytest_configure(config: pytest.Config) -> None:
    _report_to.append(os.dup(2))  # as pytest's faulthandler plugin does for its dumps


@pytest.fixture
def anyio_backend() -> str:
    # uvicorn serves on asyncio only, so the whole suite runs there.
    return "asyncio"


@pytest.fixture(autouse=True)
def _first_failures_logged() -> None:
    """The warnings about failed requests are rate-limited per upstream for the whole process,
    and upstream names (ports among them) repeat between tests: each test starts afresh."""
    from asgi_leasttime import _forwarding, _websocket

    _forwarding._failures.clear()
    _websocket._refusals.clear()


@pytest.fixture(autouse=True)
def _dump_tasks_when_stuck(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test still running after STUCK_AFTER seconds prints the stack of every asyncio task,
    which a thread dump does not show: the await a hang waits on is in one of them."""
    finished = threading.Event()

    def dump() -> None:
        if finished.wait(STUCK_AFTER):
            return
        out = io.StringIO()
        print(f"\n=== {request.node.nodeid} still running: asyncio tasks", file=out)
        for loop in _running_loops():

            def show(loop: asyncio.AbstractEventLoop = loop) -> None:
                for task in asyncio.all_tasks(loop):
                    print(f"--- {task!r}", file=out)
                    task.print_stack(limit=20, file=out)
                os.write(_report_to[0], out.getvalue().encode(errors="replace"))

            loop.call_soon_threadsafe(show)

    threading.Thread(target=dump, daemon=True, name="stuck-test-watch").start()
    yield
    finished.set()


def _running_loops() -> set[asyncio.AbstractEventLoop]:
    """The event loops the main thread is running, found in its frames (a loop made before a
    proxy's start-up froze the heap is out of gc's sight)."""
    found = set()
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, asyncio.AbstractEventLoop) and candidate.is_running():
            found.add(candidate)
        frame = frame.f_back
    return found
