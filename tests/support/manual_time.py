"""Time that moves only when the test says: a monotonic clock and the sleep that goes with it.

Code that takes ``clock=`` and ``sleep=`` (the sidecar's key cache) is given one ``ManualTime``
for both, and the test moves time with ``await time.advance(seconds)``. What the test then
asserts depends on the order of events alone, never on how fast the machine is; a database
round trip inside a woken task still takes real time, but no fake time passes during it.

Sharp edges:
- ``advance`` steps from one sleeper's deadline to the next, as real time would pass, and after
  waking a sleeper waits until that task sleeps again or ends: a task woken by it that instead
  blocks on something else (a lock, a queue) makes ``advance`` give up after ``SETTLE_MAX_S`` of
  real time with an AssertionError, rather than hang.
- A sleep of zero or less does not wait for the clock (it yields once, like ``asyncio.sleep(0)``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable

# How long (real seconds) a woken task may take to sleep again before `advance` gives up.
SETTLE_MAX_S = 10.0


class ManualTime:
    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start
        # (deadline, order of arrival, the sleeper's wake-up, the sleeping task)
        self._sleepers: list[tuple[float, int, asyncio.Future[None], asyncio.Task[object]]] = []
        self._arrivals = itertools.count()
        self._changed = asyncio.Event()

    def __call__(self) -> float:
        """The clock: seconds, as ``time.monotonic`` would give them."""
        return self.now

    @property
    def sleeping(self) -> int:
        """How many tasks wait for the clock."""
        return len(self._sleepers)

    async def sleep(self, delay: float) -> None:
        """Return once the clock has been moved ``delay`` seconds past now."""
        if delay <= 0:
            await asyncio.sleep(0)
            return
        task = asyncio.current_task()
        assert task is not None, "sleep() is awaited from a task"
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (self.now + delay, next(self._arrivals), wake, task)
        heapq.heappush(self._sleepers, entry)
        task.add_done_callback(lambda _: self._changed.set())
        self._changed.set()
        try:
            await wake
        finally:
            if entry in self._sleepers:  # cancelled while asleep
                self._sleepers.remove(entry)
                heapq.heapify(self._sleepers)
                self._changed.set()

    async def until_sleeping(self, count: int = 1) -> None:
        """Wait until ``count`` tasks sleep on this clock (a task just started reaches its sleep)."""
        await self._settle(lambda: self.sleeping >= count, f"{count} sleeping task(s)")

    async def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` on, waking each sleeper at its deadline, in order, and
        letting it run until it sleeps again or ends before the clock moves further."""
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        target = self.now + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline = self._sleepers[0][0]
            self.now = max(self.now, deadline)
            woken: list[asyncio.Task[object]] = []
            while self._sleepers and self._sleepers[0][0] <= self.now:
                _, _, wake, task = heapq.heappop(self._sleepers)
                wake.set_result(None)
                woken.append(task)
            await self._settle(
                lambda woken=woken: all(t.done() or self._is_sleeping(t) for t in woken),
                "the woken task(s) sleeping again or ending",
            )
        self.now = target

    def _is_sleeping(self, task: asyncio.Task[object]) -> bool:
        return any(sleeper is task for _, _, _, sleeper in self._sleepers)

    async def _settle(self, done: Callable[[], bool], what: str) -> None:
        async def wait() -> None:
            while not done():
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(wait(), SETTLE_MAX_S)
        except TimeoutError:
            raise AssertionError(f"manual time: {what} did not happen within {SETTLE_MAX_S} s") from None
