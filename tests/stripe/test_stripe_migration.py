"""Migration 0003 (the Stripe tables and ``wallets.disputed``) goes down and up again cleanly, and
matches what billing.tables declares."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from billing import database, tables
from stripe_testkit import Db

STRIPE_TABLES = {"stripe_events", "stripe_checkout_sessions", "stripe_payments", "stripe_disputes"}


def _alembic(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(database._MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


async def table_columns(db: Db) -> dict[str, set[str]]:
    async with db.engine.connect() as conn:
        rows = await conn.execute(
            sa.text(
                "SELECT table_name, column_name FROM information_schema.columns WHERE table_name LIKE "
                "'stripe_%'"
            )
        )
        found: dict[str, set[str]] = {}
        for table, column in rows:
            found.setdefault(table, set()).add(column)
        return found


async def disputed_column(db: Db) -> tuple[str, str, str | None] | None:
    """(type, nullable, default) of wallets.disputed, or None without it."""
    async with db.engine.connect() as conn:
        row = (
            await conn.execute(
                sa.text(
                    "SELECT data_type, is_nullable, column_default FROM information_schema.columns"
                    " WHERE table_name = 'wallets' AND column_name = 'disputed'"
                )
            )
        ).first()
        return None if row is None else tuple(row)


async def test_0003_downgrades_and_upgrades_and_matches_the_declared_tables(db: Db) -> None:
    declared = {
        t.name: {c.name for c in t.columns}
        for t in (
            tables.stripe_events,
            tables.stripe_checkout_sessions,
            tables.stripe_payments,
            tables.stripe_disputes,
        )
    }
    assert set(declared) == STRIPE_TABLES
    assert await table_columns(db) == declared
    assert "disputed" in tables.wallets.c and not tables.wallets.c.disputed.nullable
    assert await disputed_column(db) == ("boolean", "NO", "false")

    await asyncio.to_thread(command.downgrade, _alembic(db.url), "0003-1")
    assert await table_columns(db) == {}
    assert await disputed_column(db) is None
    await asyncio.to_thread(command.upgrade, _alembic(db.url), "head")
    assert await table_columns(db) == declared
    assert await disputed_column(db) == ("boolean", "NO", "false")
