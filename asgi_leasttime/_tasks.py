"""The proxy's background loops: each one kept running for the lifespan, whatever it meets."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio

__all__ = ["RESTART_AFTER", "keep_running"]

RESTART_AFTER = 1.0
"""Seconds before a loop that stopped on an unexpected error is started again."""


async def keep_running(
    what: str, loop: Callable[[], Awaitable[None]], logger: logging.Logger
) -> None:
    """Run ``loop`` until it returns or the task is cancelled; an unexpected exception is logged
    with its traceback and the loop started again: one fault of ours or of a library must not
    silently end a health check or the following of a shared state for the rest of the run."""
    while True:
        try:
            await loop()
            return
        except Exception:
            logger.exception("%s stopped on an unexpected error; restarting it", what)
        await anyio.sleep(RESTART_AFTER)
