"""Connecting to PostgreSQL and bringing its schema up to date.

Two ways in over one URL:

- **SQLAlchemy engines** for the HTTP API, the CLI, the operator and the tests: a transactional
  one for multi-statement work (signups, top-ups) and its AUTOCOMMIT variant.
- **An asyncpg pool** for the sidecar's hot path: the Check's key look-up and hold, the access
  log's settlement (and the key cache's refresher and the expiry sweep). Each is one statement,
  which asyncpg prepares once per connection (its statement cache) and then runs in one round
  trip without SQLAlchemy's per-call machinery.

The hot path's SQL lives beside its rule (``billing.holds``, ``billing.api_keys.find_keys``) and
takes an asyncpg connection. SQLAlchemy callers hand theirs over with :func:`driver_connection`
(same connection, same transaction), so tests and the CLI run exactly the sidecar's statements.

Whether a failure means "the database cannot serve us right now" (answer 503, retry, tell the
person to start it) rather than a bug is decided once, by :func:`is_unreachable`, for both ways
in. Sharp edge: it counts every ``OSError`` that names no file (that is how a refused, reset or
timed-out connection reaches us), so call it only on what a database call raised.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TypeAlias

import asyncpg
from alembic import command
from alembic.config import Config
from asyncpg.pool import PoolConnectionProxy
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from billing import errors

_MIGRATIONS = Path(__file__).parent / "migrations"

# An asyncpg connection: a plain one, or one borrowed from a pool.
Connection: TypeAlias = asyncpg.Connection | PoolConnectionProxy
# Where the hot path gets connections: the sidecar's asyncpg pool, or (tests, tools) an engine.
Database: TypeAlias = asyncpg.Pool | AsyncEngine

_SCHEMES = ("postgresql+asyncpg://", "postgresql://", "postgres://")
# Connecting gives up after this instead of asyncpg's 60 s, so a caller answers "unavailable"
# quickly instead of hanging while the database is away.
CONNECT_TIMEOUT_S = 5

# Failures that say the database is away, whichever driver layer raised them: the socket
# (refused, reset, timed out, no route), asyncpg's connection closing under a call, and
# SQLAlchemy's connection and pool failures.
_UNREACHABLE_TYPES = (
    OSError,
    asyncpg.InterfaceError,
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,
)
# SQLSTATE classes the server answers with when it cannot serve now, or not us: 08 connection
# exception, 28 invalid authorization (a wrong password), 40 transaction rollback (a
# serialization failure or deadlock: retry), 53 insufficient resources (too many connections),
# 57 operator intervention (shutting down, starting up); and 3D000, no such database.
_UNREACHABLE_SQLSTATE_CLASSES = ("08", "28", "40", "53", "57")
_UNREACHABLE_SQLSTATES = ("3D000",)


class DatabaseUrlError(errors.UserFacingError, ValueError):
    """DATABASE_URL is not a PostgreSQL URL."""


def _rest(url: str) -> str:
    for scheme in _SCHEMES:
        if url.startswith(scheme):
            return url[len(scheme) :]
    raise DatabaseUrlError(
        "DATABASE_URL must start with postgresql:// (for example "
        "postgresql://user:password@127.0.0.1:5432/billingproxy)"
    )


def async_url(url: str) -> str:
    """``postgresql://…`` (what people write) → ``postgresql+asyncpg://…`` (what SQLAlchemy needs)."""
    return "postgresql+asyncpg://" + _rest(url)


def driver_url(url: str) -> str:
    """The same URL as asyncpg takes it (``postgresql://…``)."""
    return "postgresql://" + _rest(url)


def create_engine(
    url: str,
    *,
    pool_size: int = 10,
    max_overflow: int | None = None,
    pool_timeout_s: int = 30,
    command_timeout_s: int | None = None,
) -> AsyncEngine:
    """A SQLAlchemy engine over ``url``, for the HTTP API, the CLI and the operator (never the
    Check's hot path: that is the asyncpg pool).

    ``pool_pre_ping``: a pooled connection is tested (one round trip) before each use and
    replaced if the server closed it. Without it the first call after a database restart or
    failover got a dead connection and the caller answered 503. Connecting gives up after
    :data:`CONNECT_TIMEOUT_S`. ``max_overflow``: connections beyond ``pool_size`` while busy
    (``pool_size`` more unless told); ``command_timeout_s``: asyncpg's limit per statement.
    The engines serve the HTTP API, the CLI and the operator, never the Check's hot path (that is
    the asyncpg pool).
    """
    connect_args: dict[str, int] = {"timeout": CONNECT_TIMEOUT_S}
    if command_timeout_s is not None:
        connect_args["command_timeout"] = command_timeout_s
    return create_async_engine(
        async_url(url),
        pool_size=pool_size,
        max_overflow=pool_size if max_overflow is None else max_overflow,
        pool_timeout=pool_timeout_s,
        pool_pre_ping=True,
        connect_args=connect_args,
    )


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc``, raised by a database call through asyncpg or SQLAlchemy, means that
    PostgreSQL cannot serve us right now (away, restarting, full, refusing our credentials)
    rather than a bug. SQLAlchemy wraps the driver's error, so the causes are read too."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        # An OSError that names a file is about that file (a price list, a data folder), not a
        # connection: socket errors name none, a missing Unix socket included.
        if isinstance(current, _UNREACHABLE_TYPES) and not (
            isinstance(current, OSError) and current.filename is not None
        ):
            return True
        if isinstance(current, sa_exc.DBAPIError) and current.connection_invalidated:
            return True
        sqlstate = getattr(current, "sqlstate", None)
        if isinstance(sqlstate, str) and (
            sqlstate[:2] in _UNREACHABLE_SQLSTATE_CLASSES or sqlstate in _UNREACHABLE_SQLSTATES
        ):
            return True
        orig = current.orig if isinstance(current, sa_exc.DBAPIError) else None
        current = current.__cause__ or (orig if isinstance(orig, BaseException) else None)
    return False


def autocommit(engine: AsyncEngine) -> AsyncEngine:
    return engine.execution_options(isolation_level="AUTOCOMMIT")


async def create_pool(url: str, *, size: int = 10) -> asyncpg.Pool:
    """The hot path's pool: ``size`` connections, opened now and kept (their prepared statements
    with them). Connections are in autocommit: each hot-path call is one statement."""
    return await asyncpg.create_pool(
        driver_url(url), min_size=size, max_size=size, reset=_keep_session, max_inactive_connection_lifetime=0
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's reset query on release (a round trip per use: ``RESET ALL``, ``UNLISTEN``…).

    The hot path leaves no session state behind: no SET, LISTEN, advisory lock or cursor. An open
    transaction is still rolled back on release; asyncpg does that before calling this.
    """


async def driver_connection(conn: AsyncConnection | Connection) -> Connection:
    """The asyncpg connection under ``conn``, inside ``conn``'s transaction if it has one.

    An asyncpg connection is returned as it is. SQLAlchemy sends BEGIN lazily, with its first
    statement; a connection that has not sent one yet is made to, so that what the caller runs
    on the returned connection belongs to the transaction SQLAlchemy commits or rolls back.
    """
    if not isinstance(conn, AsyncConnection):
        return conn
    fairy = await conn.get_raw_connection()
    driver: Connection | None = fairy.driver_connection
    assert fairy.dbapi_connection is not None and driver is not None  # a checked-out connection
    if not fairy.dbapi_connection.autocommit and not driver.is_in_transaction():
        await conn.exec_driver_sql("SELECT 1")
    return driver


@contextlib.asynccontextmanager
async def acquire(db: Database) -> AsyncIterator[Connection]:
    """An autocommit asyncpg connection for one hot-path call, from a pool or an engine."""
    if isinstance(db, AsyncEngine):
        async with autocommit(db).connect() as conn:
            yield await driver_connection(conn)
    else:
        async with db.acquire() as conn:
            yield conn


def migrate(url: str, revision: str = "head") -> None:
    """Run Alembic migrations up to ``revision``. Blocking: call it from a thread in async code."""
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, revision)
