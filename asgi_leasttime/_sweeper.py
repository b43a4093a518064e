"""One repeating timer that checks many deadlines.

An event-loop timer made and cancelled for every request costs about 3 us here, as much as the
balancer's whole pick. Waits that need a deadline register in a :class:`Sweeper` instead (a set
insert); one timer ticks while anything is registered and checks them all, so a deadline fires
up to one ``interval`` late.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Sweeper"]

T = TypeVar("T")


class Sweeper(Generic[T]):
    """Calls ``check(item, now)`` for every registered item each ``interval`` seconds (``now``
    from ``clock``, the loop's own by default); an item for which it returns true is dropped."""

    __slots__ = ("_check", "_clock", "_interval", "_items", "_loop", "_timer")

    def __init__(
        self,
        interval: float,
        check: Callable[[T, float], bool],
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._interval = interval
        self._check = check
        self._clock = clock
        self._items: set[T] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def add(self, item: T, loop: asyncio.AbstractEventLoop) -> None:
        """Check ``item`` from the next tick on; ``loop`` is the running loop (the callers
        have it at hand already)."""
        self._items.add(item)
        if self._timer is None:
            self._start(loop)
        elif self._loop is not loop:
            # Used from another loop than before (tests run one app in several): the items
            # and the timer of the old loop are of no use any more.
            self._timer.cancel()
            self._items = {item}
            self._start(loop)

    def discard(self, item: T) -> None:
        """Stop checking ``item``."""
        self._items.discard(item)

    def __len__(self) -> int:
        return len(self._items)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._timer = loop.call_later(self._interval, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        assert self._loop is not None
        now = self._loop.time() if self._clock is None else self._clock()
        check = self._check
        done = [item for item in list(self._items) if check(item, now)]
        self._items.difference_update(done)
        if self._items:
            self._start(self._loop)
