"""Group commit: callers that arrive while the database is busy share the next transaction.

Each Check places one hold and each access-log entry settles one; alone, each is a round trip
and a WAL flush. ``GroupCommit`` runs at most ``lanes`` batches at once; a call that finds a
lane free runs at once, alone (no waiting at low load), and calls that arrive while every lane
is busy wait together and go as the next batch, up to ``batch_max``
(``billing.hold_batches.place_many`` / ``settle_many``: the same statements in one transaction).
The busier the sidecar, the larger the batches, so the database work per request falls as the
load rises, instead of queueing.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class GroupCommit(Generic[Item, Result]):
    def __init__(
        self,
        run_batch: Callable[[list[Item]], Awaitable[list[Result]]],
        *,
        lanes: int,
        batch_max: int,
        abandoned: Callable[[list[tuple[Item, Result]]], Awaitable[None]] | None = None,
    ) -> None:
        """``abandoned``: told (after the batch, in the same lane) of the results nobody waited
        for — the work was done for a caller that had given up while its batch ran."""
        if lanes < 1 or batch_max < 1:
            raise ValueError("a group commit needs at least one lane and one item per batch")
        self._run_batch = run_batch
        self._abandoned = abandoned
        self._lanes = lanes
        self._batch_max = batch_max
        self._waiting: deque[tuple[Item, asyncio.Future[Result]]] = deque()
        self._running: set[asyncio.Task[None]] = set()

    async def submit(self, item: Item) -> Result:
        """``item``'s result, from whichever batch it went with.

        A caller that stops waiting (cancelled: Envoy gave up on the Check) before its batch
        begins is left out of it, so its hold is never placed; once its batch is running the work
        is done, and its result goes to ``abandoned`` instead (the Check voids such a hold).
        """
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        self._start_batches()
        return await future

    def _start_batches(self) -> None:
        while self._waiting and len(self._running) < self._lanes:
            batch: list[tuple[Item, asyncio.Future[Result]]] = []
            while self._waiting and len(batch) < self._batch_max:
                item, future = self._waiting.popleft()
                if not future.done():  # a caller that gave up before its batch began: skip it
                    batch.append((item, future))
            if not batch:
                continue
            task = asyncio.create_task(self._run(batch), name="group-commit")
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._start_batches()

    async def _run(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            results = await self._run_batch([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} came back with {len(results)} results")
        except Exception as exc:  # noqa: BLE001 (every caller of the batch gets it, whatever it is)
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:  # cancelled (shutdown): so are its callers
            for _, future in batch:
                future.cancel()
            raise
        left: list[tuple[Item, Result]] = []
        for (item, future), result in zip(batch, results, strict=True):
            if future.done():
                left.append((item, result))
            else:
                future.set_result(result)
        if left and self._abandoned is not None:
            try:
                await self._abandoned(left)
            except Exception:  # nobody is waiting to be told; say it in the log
                logger.exception("handling %d abandoned results failed", len(left))

    async def close(self) -> None:
        """Wait for the batches already running (on shutdown)."""
        while self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
