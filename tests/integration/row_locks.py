"""Waiting for PostgreSQL row locks in tests: a race put exactly where it matters, no fixed sleep."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from support.waiting import wait_until


async def blocked_on_a_row_lock(engine: AsyncEngine, timeout: float = 10.0) -> None:
    """Wait until some session of this database waits for a row lock (no fixed sleep)."""

    async def a_session_waits_for_a_lock() -> int:
        async with engine.connect() as conn:
            waiting: int = (
                await conn.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    )
                )
            ).scalar_one()
        return waiting

    await wait_until(a_session_waits_for_a_lock, timeout, "a session waiting for the lock", interval=0.005)
