"""support.manual_time, the hand-moved time the key cache's tests run on: sleepers wake at their
deadlines, in order, each seeing the clock at its own deadline, and nothing moves unless told."""

from __future__ import annotations

import asyncio

import pytest
from support.manual_time import ManualTime


async def test_a_periodic_sleeper_wakes_at_each_of_its_deadlines_within_one_advance() -> None:
    time = ManualTime(start=0.0)
    woke_at: list[float] = []

    async def every_quarter() -> None:
        while True:
            await time.sleep(0.25)
            woke_at.append(time())

    task = asyncio.create_task(every_quarter())
    try:
        await time.until_sleeping()
        await time.advance(0.125)
        assert woke_at == []
        await time.advance(1.0)
        assert woke_at == [0.25, 0.5, 0.75, 1.0]
        assert time() == 1.125
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert time.sleeping == 0


async def test_sleepers_wake_in_deadline_order_and_a_finished_one_is_not_waited_for() -> None:
    time = ManualTime(start=0.0)
    order: list[str] = []

    async def sleeper(name: str, delay: float) -> None:
        await time.sleep(delay)
        order.append(name)

    tasks = [asyncio.create_task(sleeper(name, delay)) for name, delay in (("late", 2.0), ("early", 1.0))]
    await time.until_sleeping(2)
    await time.advance(3.0)
    assert order == ["early", "late"]
    assert all(task.done() for task in tasks)


async def test_nothing_moves_by_itself_and_time_never_goes_back() -> None:
    time = ManualTime(start=5.0)
    await asyncio.sleep(0)
    assert time() == 5.0
    with pytest.raises(ValueError):
        await time.advance(-1.0)
