"""Waiting for PostgreSQL row locks in tests: a race put exactly where it matters, no fixed sleep."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine


async def blocked_on_a_row_lock(engine: AsyncEngine, timeout: float = 10.0) -> None:
    """Wait until some session of this database waits for a row lock (no fixed sleep)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        async with engine.connect() as conn:
            waiting = (
                await conn.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    )
                )
            ).scalar_one()
        if waiting:
            return
        assert asyncio.get_running_loop().time() < deadline, "no session waited for the lock"
        await asyncio.sleep(0.005)
