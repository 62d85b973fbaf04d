"""authz_sidecar.group_commit: who goes in which batch, and what each caller gets back.

Batches are held open with events, so every test decides exactly when a batch ends.
"""

from __future__ import annotations

import asyncio

import pytest

from authz_sidecar.group_commit import GroupCommit


class Recorder:
    """A batch runner that records its batches and waits for the test to release each one."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release: list[asyncio.Event] = []
        self.running = 0
        self.most_running = 0
        self.fail_with: Exception | None = None
        self.started = asyncio.Condition()

    async def run(self, batch: list[int]) -> list[int]:
        gate = asyncio.Event()
        async with self.started:
            self.batches.append(batch)
            self.release.append(gate)
            self.started.notify_all()
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await gate.wait()
        finally:
            self.running -= 1
        if self.fail_with is not None:
            raise self.fail_with
        return [item * 10 for item in batch]

    async def wait_batches(self, n: int) -> None:
        async with self.started:
            await asyncio.wait_for(self.started.wait_for(lambda: len(self.batches) >= n), timeout=5)


async def test_a_call_that_finds_a_lane_free_runs_at_once_alone() -> None:
    recorder = Recorder()
    group = GroupCommit(recorder.run, lanes=2, batch_max=10)
    call = asyncio.ensure_future(group.submit(7))
    await recorder.wait_batches(1)
    assert recorder.batches == [[7]]
    recorder.release[0].set()
    assert await call == 70


async def test_calls_arriving_while_every_lane_is_busy_go_together_in_order() -> None:
    recorder = Recorder()
    group = GroupCommit(recorder.run, lanes=1, batch_max=3)
    first = asyncio.ensure_future(group.submit(1))
    await recorder.wait_batches(1)
    waiting = [asyncio.ensure_future(group.submit(n)) for n in (2, 3, 4, 5)]
    await asyncio.sleep(0)  # let them queue (no batch may start: the only lane is busy)
    assert recorder.batches == [[1]]
    recorder.release[0].set()
    assert await first == 10
    await recorder.wait_batches(2)
    assert recorder.batches[1] == [2, 3, 4]  # batch_max
    recorder.release[1].set()
    await recorder.wait_batches(3)
    assert recorder.batches[2] == [5]
    recorder.release[2].set()
    assert await asyncio.gather(*waiting) == [20, 30, 40, 50]
    assert recorder.most_running == 1


async def test_no_more_batches_run_at_once_than_lanes() -> None:
    recorder = Recorder()
    group = GroupCommit(recorder.run, lanes=3, batch_max=1)
    calls = [asyncio.ensure_future(group.submit(n)) for n in range(10)]
    await recorder.wait_batches(3)
    await asyncio.sleep(0)
    assert len(recorder.batches) == 3 and recorder.running == 3
    for n in range(10):
        await recorder.wait_batches(n + 1)
        recorder.release[n].set()
    assert await asyncio.gather(*calls) == [n * 10 for n in range(10)]
    assert recorder.most_running == 3


async def test_a_failed_batch_fails_each_of_its_callers_and_the_next_batch_still_runs() -> None:
    recorder = Recorder()
    group = GroupCommit(recorder.run, lanes=1, batch_max=5)
    first = asyncio.ensure_future(group.submit(1))
    await recorder.wait_batches(1)
    second = [asyncio.ensure_future(group.submit(n)) for n in (2, 3)]
    recorder.fail_with = ConnectionError("database went away")
    recorder.release[0].set()
    with pytest.raises(ConnectionError):
        await first
    await recorder.wait_batches(2)
    recorder.fail_with = None
    recorder.release[1].set()
    assert await asyncio.gather(*second) == [20, 30]


async def test_a_caller_that_stops_waiting_leaves_the_others_their_results() -> None:
    recorder = Recorder()
    abandoned: list[list[tuple[int, int]]] = []

    async def tell(results: list[tuple[int, int]]) -> None:
        abandoned.append(results)

    group = GroupCommit(recorder.run, lanes=1, batch_max=5, abandoned=tell)
    first = asyncio.ensure_future(group.submit(1))
    await recorder.wait_batches(1)
    quitter, stayer = asyncio.ensure_future(group.submit(2)), asyncio.ensure_future(group.submit(3))
    recorder.release[0].set()
    await first
    await recorder.wait_batches(2)
    quitter.cancel()
    recorder.release[1].set()
    assert await stayer == 30
    assert recorder.batches[1] == [2, 3]  # the work was done…
    with pytest.raises(asyncio.CancelledError):
        await quitter
    await group.close()
    assert abandoned == [[(2, 20)]]  # …and its result handed to `abandoned`, the stayer's not


async def test_a_caller_that_gave_up_before_its_batch_began_is_left_out() -> None:
    recorder = Recorder()
    group = GroupCommit(recorder.run, lanes=1, batch_max=5)
    first = asyncio.ensure_future(group.submit(1))
    await recorder.wait_batches(1)
    quitter, stayer = asyncio.ensure_future(group.submit(2)), asyncio.ensure_future(group.submit(3))
    await asyncio.sleep(0)  # both are queued behind the running batch
    quitter.cancel()
    recorder.release[0].set()
    await first
    await recorder.wait_batches(2)
    assert recorder.batches[1] == [3]
    recorder.release[1].set()
    assert await stayer == 30


async def test_a_batch_with_the_wrong_number_of_results_fails_its_callers() -> None:
    async def short(batch: list[int]) -> list[int]:
        return batch[:-1]

    group = GroupCommit(short, lanes=1, batch_max=5)
    results = await asyncio.gather(group.submit(1), group.submit(2), return_exceptions=True)
    # The first ran alone and got nothing back; so did the batch after it.
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_close_waits_for_running_batches() -> None:
    recorder = Recorder()
    group = GroupCommit(recorder.run, lanes=1, batch_max=5)
    call = asyncio.ensure_future(group.submit(4))
    await recorder.wait_batches(1)
    closing = asyncio.ensure_future(group.close())
    await asyncio.sleep(0)
    assert not closing.done()
    recorder.release[0].set()
    await asyncio.wait_for(closing, timeout=5)
    assert call.done() and call.result() == 40


def test_lanes_and_batch_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        GroupCommit(lambda batch: batch, lanes=0, batch_max=1)
    with pytest.raises(ValueError):
        GroupCommit(lambda batch: batch, lanes=1, batch_max=0)
