"""Waiting on a condition, never on the clock: the one polling loop of the test suite, and the
one way a test asserts a time bound (on when each try began, never on how long it took)."""

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


async def wait_until_within(
    predicate: Callable[[], Awaitable[T]],
    *,
    since: float,
    bound_s: float,
    what: str,
    timeout: float = 10.0,
    interval: float = 0.02,
) -> T:
    """``wait_until`` for a promise "from ``since`` (a ``time.monotonic()``), within ``bound_s``":
    fails as soon as a call of ``predicate`` *begun* ``bound_s`` or more after ``since`` still
    returns something falsy.

    Only when a call began counts, never how long it took, so a slow machine answers later but
    cannot fail the test; a gateway that breaks the bound fails it on the first call begun past
    the bound. ``timeout`` is the give-up for a change that never comes.
    """

    async def checked() -> T:
        begun = time.monotonic()
        result = await predicate()
        if not result and begun - since >= bound_s:
            raise AssertionError(
                f"{what} did not happen within {bound_s} s: a call begun {begun - since:.3f} s after "
                f"the start still returned {result!r}"
            )
        return result

    return await wait_until(checked, timeout, what, interval=interval)
