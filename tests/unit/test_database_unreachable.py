"""billing.database.is_unreachable: one answer to "is the database away, or is this a bug?" for
the HTTP API (503 or 500), the access log (retry or give up), the operator (DatabaseUnavailable)
and the CLI (one line or a traceback), whichever driver layer raised it."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from sqlalchemy import exc as sa_exc

from billing import database


def through_sqlalchemy(driver_error: BaseException, *, invalidated: bool = False) -> sa_exc.DBAPIError:
    """As SQLAlchemy's asyncpg dialect raises a driver error: wrapped, with the original as cause."""
    wrapped = sa_exc.DBAPIError("SELECT 1", None, driver_error, connection_invalidated=invalidated)
    wrapped.__cause__ = driver_error
    return wrapped


UNREACHABLE = {
    "refused": ConnectionRefusedError(111, "Connection refused"),
    "reset": ConnectionResetError(104, "Connection reset by peer"),
    "timed out": TimeoutError(),
    "a missing Unix socket": FileNotFoundError(2, "No such file or directory"),
    "asyncpg: the connection closed": asyncpg.InterfaceError("connection is closed"),
    "asyncpg: connection lost": asyncpg.ConnectionDoesNotExistError("connection was closed"),
    "server starting up": asyncpg.CannotConnectNowError("the database system is starting up"),
    "server shutting down": asyncpg.AdminShutdownError("terminating connection"),
    "too many connections": asyncpg.TooManyConnectionsError("too many clients"),
    "wrong password": asyncpg.InvalidPasswordError("password authentication failed"),
    "no such database": asyncpg.InvalidCatalogNameError('database "x" does not exist'),
    "a deadlock (retry)": asyncpg.DeadlockDetectedError("deadlock detected"),
    "SQLAlchemy: operational": sa_exc.OperationalError("SELECT 1", None, Exception("gone")),
    "SQLAlchemy: interface": sa_exc.InterfaceError("SELECT 1", None, Exception("closed")),
    "SQLAlchemy: pool timeout": sa_exc.TimeoutError("QueuePool limit reached"),
    "SQLAlchemy: invalidated": through_sqlalchemy(
        Exception("server closed the connection"), invalidated=True
    ),
    "SQLAlchemy over asyncpg: starting up": through_sqlalchemy(asyncpg.CannotConnectNowError("starting up")),
    "SQLAlchemy over a refused socket": through_sqlalchemy(ConnectionRefusedError(111, "refused")),
}

BUGS = {
    "a unique violation": asyncpg.UniqueViolationError("duplicate key"),
    "a syntax error": asyncpg.PostgresSyntaxError("syntax error"),
    "SQLAlchemy over a unique violation": through_sqlalchemy(asyncpg.UniqueViolationError("duplicate key")),
    "SQLAlchemy: integrity": sa_exc.IntegrityError("INSERT", None, Exception("duplicate key")),
    "a price file that is missing": FileNotFoundError(2, "No such file or directory", "prices.yaml"),
    "a data folder we may not write": PermissionError(13, "Permission denied", "/data"),
    "a plain bug": ValueError("bug"),
    "a key error": KeyError("wallet_id"),
}


@pytest.mark.parametrize("exc", UNREACHABLE.values(), ids=UNREACHABLE.keys())
def test_the_database_away_is_unreachable(exc: BaseException) -> None:
    assert database.is_unreachable(exc)


@pytest.mark.parametrize("exc", BUGS.values(), ids=BUGS.keys())
def test_a_bug_is_not(exc: BaseException) -> None:
    assert not database.is_unreachable(exc)


def test_a_cycle_of_causes_ends() -> None:
    first, second = ValueError("a"), ValueError("b")
    first.__cause__, second.__cause__ = second, first
    assert not database.is_unreachable(first)


def test_the_engine_factory_checks_connections_and_gives_up_connecting_soon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[dict[str, Any]] = []
    monkeypatch.setattr(database, "create_async_engine", lambda url, **options: made.append(options))
    database.create_engine("postgresql://u:p@db/x", pool_size=3)
    database.create_engine(
        "postgresql://u:p@db/x", pool_size=2, max_overflow=0, pool_timeout_s=10, command_timeout_s=30
    )
    default, bounded = made
    for options in made:
        assert options["pool_pre_ping"] is True
        assert options["connect_args"]["timeout"] == database.CONNECT_TIMEOUT_S
    assert (default["pool_size"], default["max_overflow"]) == (3, 3)
    assert "command_timeout" not in default["connect_args"]
    assert (bounded["pool_size"], bounded["max_overflow"], bounded["pool_timeout"]) == (2, 0, 10.0)
    assert bounded["connect_args"]["command_timeout"] == 30.0
