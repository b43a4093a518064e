"""Log lines that repeat per request, rate-limited per key.

A dead upstream behind a busy proxy fails every request sent to it: a WARNING per failure would
write a thousand lines a second at a thousand requests a second. :class:`RateLimitedLog` writes
the first line for a key (an upstream), then at most one line per ``every`` seconds for that key;
the line after a quiet spell says how many were folded into it::

    upstream b failed: ConnectError(...) (and 953 more like it in the last 10 s)

It is only called where something went wrong, so the success path pays nothing for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """Writes to ``logger`` at most one line per ``every`` seconds per key.

    The first line for a key is written at once. Lines for that key in the next ``every``
    seconds are counted, not written; the first line after them carries the count
    (``"... (and 953 more like it in the last 10 s)"``). ``clock`` (seconds, monotonic) is
    injectable for tests. Lines the logger would drop at their level are not counted.
    """

    __slots__ = ("_keys", "clock", "every", "logger")

    def __init__(
        self,
        logger: logging.Logger,
        every: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if every < 0:
            raise ValueError("every must be zero or more seconds")
        self.logger = logger
        self.every = every
        self.clock = clock
        # key -> [when its last line was written, lines folded since]
        self._keys: dict[Hashable, list[float]] = {}

    def warning(self, key: Hashable, msg: str, *args: object, exc_info: bool = False) -> bool:
        """:meth:`log` at WARNING."""
        return self._log(logging.WARNING, key, msg, args, exc_info)

    def error(self, key: Hashable, msg: str, *args: object, exc_info: bool = False) -> bool:
        """:meth:`log` at ERROR."""
        return self._log(logging.ERROR, key, msg, args, exc_info)

    def log(
        self, level: int, key: Hashable, msg: str, *args: object, exc_info: bool = False
    ) -> bool:
        """Write ``msg % args`` at ``level`` unless a line for ``key`` was written less than
        ``every`` seconds ago (then count it); true when written."""
        return self._log(level, key, msg, args, exc_info)

    def forget(self, key: Hashable) -> None:
        """Drop what is kept for ``key`` (an upstream removed): its next line is a first."""
        self._keys.pop(key, None)

    def clear(self) -> None:
        """Forget every key."""
        self._keys.clear()

    def __len__(self) -> int:
        """How many keys are kept."""
        return len(self._keys)

    def _log(
        self, level: int, key: Hashable, msg: str, args: tuple[object, ...], exc_info: bool
    ) -> bool:
        if not self.logger.isEnabledFor(level):
            return False
        now = self.clock()
        kept = self._keys.get(key)
        if kept is not None:
            last, folded = kept
            if now - last < self.every:
                kept[1] = folded + 1
                return False
            if folded:
                msg += " (and %d more like it in the last %.3g s)"
                args = (*args, int(folded), now - last)
        self._prune(now)
        self._keys[key] = [now, 0]
        # stacklevel 3: the line of the caller of warning() / log(), not this one
        self.logger.log(level, msg, *args, exc_info=exc_info, stacklevel=3)
        return True

    def _prune(self, now: float) -> None:
        """Forget the keys whose window is over with nothing folded: for them the next line is
        written as a first line anyway. Runs only when a line is written, at most once per
        ``every`` per key, so keys of upstreams long gone do not pile up."""
        every = self.every
        stale = [
            k for k, (last, folded) in self._keys.items() if not folded and now - last >= every
        ]
        for key in stale:
            del self._keys[key]
