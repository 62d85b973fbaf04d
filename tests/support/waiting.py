"""Waiting on a condition, never on the clock: the one polling loop of the test suite."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def wait_until(
    predicate: Callable[[], Awaitable[T]],
    timeout: float,
    what: str = "the condition",
    *,
    interval: float = 0.02,
) -> T:
    """Poll ``predicate`` (an async callable) until it returns something truthy; return that.

    Raises AssertionError naming ``what`` and the last value seen after ``timeout`` seconds, so a
    test that waits in vain says what it waited for instead of hanging.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s (last value: {last!r})")
        await asyncio.sleep(interval)
