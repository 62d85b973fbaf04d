"""Alembic environment: runs migrations over asyncpg (the only PostgreSQL driver we ship).

Two guards, because the chart runs this as a Helm hook Job that is retried and that two releases
may start at once (docs/decisions/0024-migrations-as-a-hook-job.md):

- The connection is ``database.create_engine``'s, with its connect timeout: a database that never
  answers fails the run within seconds with the CLI's "cannot reach the database" line, instead
  of asyncpg's 60 s per try outlasting Helm's hook timeout.
- Every run holds the PostgreSQL advisory lock :data:`MIGRATION_LOCK_KEY` (session level, so the
  migrations that build an index ``CONCURRENTLY`` outside their transaction keep it): a second run
  waits for the first (:func:`_lock`), then finds the schema at the head revision and changes
  nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time

from alembic import context
from sqlalchemy import Connection, text

from billing import database, tables

target_metadata = tables.metadata
logger = logging.getLogger(__name__)

#: The advisory lock key of ``billingproxy migrate``: the bytes "billprox" as a signed 64-bit
#: integer, 7091318301270372216, fixed so that every version of the command agrees on it (an
#: operator sees it in ``pg_locks`` as an ``advisory`` lock while a run holds it).
MIGRATION_LOCK_KEY = int.from_bytes(b"billprox", "big", signed=True)
LOCK_RETRY_S = 0.5


def _lock(connection: Connection) -> None:
    """Take :data:`MIGRATION_LOCK_KEY`, trying every :data:`LOCK_RETRY_S` between transactions.

    Not a blocking ``pg_advisory_lock``: a run blocked in it holds a snapshot, which the holder's
    ``CREATE INDEX CONCURRENTLY`` waits for, and PostgreSQL ends the pair as a deadlock. Between
    tries this session is idle, outside any transaction, and the index build does not wait for it.
    """
    lock = {"key": MIGRATION_LOCK_KEY}
    waiting = False
    while True:
        taken = connection.execute(text("SELECT pg_try_advisory_lock(:key)"), lock).scalar_one()
        connection.commit()  # a session lock outlives the transaction that took it
        if taken:
            return
        if not waiting:
            logger.info("another migration run holds the lock (%d): waiting for it", MIGRATION_LOCK_KEY)
            waiting = True
        time.sleep(LOCK_RETRY_S)


def _run(connection: Connection) -> None:
    _lock(connection)
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()
    # On a failure the lock goes with the connection, which the engine's disposal closes.
    connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})


async def _run_online() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    assert url is not None  # database.migrate sets it
    engine = database.create_engine(url, pool_size=1)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=context.config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_online())
