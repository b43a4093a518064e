"""The shared deadline timer: items checked each tick while registered, and only then."""

from __future__ import annotations

import asyncio

import pytest

from asgi_leasttime._sweeper import Sweeper

pytestmark = pytest.mark.anyio


async def test_items_are_checked_each_tick_until_the_check_says_done() -> None:
    seen: list[str] = []
    remaining = {"a": 3, "b": 1}

    def check(item: str, now: float) -> bool:
        seen.append(item)
        remaining[item] -= 1
        return remaining[item] == 0

    sweeper: Sweeper[str] = Sweeper(0.01, check)
    sweeper.add("a", asyncio.get_running_loop())
    sweeper.add("b", asyncio.get_running_loop())
    for _ in range(100):  # at most a second
        if not len(sweeper):
            break
        await asyncio.sleep(0.01)
    assert sorted(seen) == ["a", "a", "a", "b"]
    assert len(sweeper) == 0


async def test_a_discarded_item_is_not_checked_and_an_empty_sweeper_stops_ticking() -> None:
    seen: list[str] = []
    sweeper: Sweeper[str] = Sweeper(0.01, lambda item, now: seen.append(item) is None)
    sweeper.add("gone", asyncio.get_running_loop())
    sweeper.discard("gone")
    await asyncio.sleep(0.05)
    assert seen == []
    assert sweeper._timer is None  # the one tick found nothing and did not repeat


def test_a_sweeper_moved_to_another_loop_forgets_the_old_one() -> None:
    seen: list[str] = []
    sweeper: Sweeper[str] = Sweeper(0.01, lambda item, now: seen.append(item) is None)

    async def add_and_leave(item: str) -> None:
        sweeper.add(item, asyncio.get_running_loop())

    async def add_and_wait(item: str) -> None:
        sweeper.add(item, asyncio.get_running_loop())
        await asyncio.sleep(0.05)

    asyncio.run(add_and_leave("old"))  # its loop closes with the timer pending
    asyncio.run(add_and_wait("new"))
    assert seen == ["new"]


async def test_now_is_read_from_the_clock_given_else_from_the_loop() -> None:
    loop = asyncio.get_running_loop()
    nows: dict[str, float] = {}
    given: Sweeper[str] = Sweeper(
        0.01, lambda item, now: nows.setdefault(item, now) is not None, lambda: -5.0
    )
    own: Sweeper[str] = Sweeper(0.01, lambda item, now: nows.setdefault(item, now) is not None)
    given.add("given", loop)
    own.add("own", loop)
    await asyncio.sleep(0.05)
    assert nows["given"] == -5.0
    assert 0 < loop.time() - nows["own"] < 1
