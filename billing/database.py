"""Connecting to PostgreSQL and bringing its schema up to date.

Two engines over one URL: a transactional one for multi-statement work (settlements, signups)
and an AUTOCOMMIT one for the Check's single-statement hold, which then costs one round trip.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

_MIGRATIONS = Path(__file__).parent / "migrations"


class DatabaseUrlError(ValueError):
    """DATABASE_URL is not a PostgreSQL URL."""


def async_url(url: str) -> str:
    """``postgresql://…`` (what people write) → ``postgresql+asyncpg://…`` (what SQLAlchemy needs)."""
    for scheme in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+asyncpg://" + url[len(scheme):]
    raise DatabaseUrlError(
        "DATABASE_URL must start with postgresql:// (for example "
        "postgresql://user:password@127.0.0.1:5432/billingproxy)"
    )


def create_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    return create_async_engine(
        async_url(url), pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=False
    )


def autocommit(engine: AsyncEngine) -> AsyncEngine:
    return engine.execution_options(isolation_level="AUTOCOMMIT")


def migrate(url: str, revision: str = "head") -> None:
    """Run Alembic migrations up to ``revision``. Blocking: call it from a thread in async code."""
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, revision)
