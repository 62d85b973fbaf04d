"""PostgreSQL for the operator: one small pool, and "unreachable" told apart from bugs.

Why its own engine rather than :func:`billing.database.create_engine`: an operator runs for
weeks against a database that restarts, so connections are checked before use
(``pool_pre_ping``) and connecting gives up after a few seconds instead of asyncpg's 60, so a
handler answers "DatabaseUnavailable, retrying" quickly instead of hanging.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from billing import database
from billing_operator import errors

CONNECT_TIMEOUT_S = 5.0
COMMAND_TIMEOUT_S = 30.0
POOL_TIMEOUT_S = 10.0

# What "the database is not there right now" looks like from SQLAlchemy over asyncpg.
_UNREACHABLE = (OSError, TimeoutError, sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)


def create_engine(url: str, *, pool_size: int) -> AsyncEngine:
    return create_async_engine(
        database.async_url(url),
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=POOL_TIMEOUT_S,
        pool_pre_ping=True,
        connect_args={"timeout": CONNECT_TIMEOUT_S, "command_timeout": COMMAND_TIMEOUT_S},
    )


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    first_line = (str(cause).splitlines() or [""])[0][:200]
    return f"PostgreSQL is unreachable ({type(cause).__name__}: {first_line}); retrying"


def is_unreachable(exc: BaseException) -> bool:
    if isinstance(exc, _UNREACHABLE):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and bool(exc.connection_invalidated)


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
        if is_unreachable(exc):
            raise errors.DatabaseUnavailable(_describe(exc)) from exc
        raise
