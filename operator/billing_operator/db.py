"""PostgreSQL for the operator: one small pool, and "unreachable" told apart from bugs.

An operator runs for weeks against a database that restarts, so its engine
(:func:`billing.database.create_engine`: connections checked before use, connecting given up
after a few seconds) is a small fixed pool with short waits, and a transaction that meets an
unreachable database (:func:`billing.database.is_unreachable`) raises
:class:`errors.DatabaseUnavailable`, which a handler reports as "retrying" instead of a bug.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billing import database
from billing_operator import errors

COMMAND_TIMEOUT_S = 30
POOL_TIMEOUT_S = 10


def create_engine(url: str, *, pool_size: int) -> AsyncEngine:
    return database.create_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout_s=POOL_TIMEOUT_S,
        command_timeout_s=COMMAND_TIMEOUT_S,
    )


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    first_line = (str(cause).splitlines() or [""])[0][:200]
    return f"PostgreSQL is unreachable ({type(cause).__name__}: {first_line}); retrying"


@contextlib.asynccontextmanager
async def transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A transaction; an unreachable database surfaces as :class:`errors.DatabaseUnavailable`.

    Keep Kubernetes calls out of the body: an ``OSError`` raised in it would be taken for the
    database's.
    """
    try:
        async with engine.begin() as conn:
            yield conn
    except errors.ReconcileError:
        raise
    except Exception as exc:
        if database.is_unreachable(exc):
            raise errors.DatabaseUnavailable(_describe(exc)) from exc
        raise
