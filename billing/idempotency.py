"""Insert once, else read the first: the shape every idempotent write of the core takes.

A ledger entry (by its idempotency key), a Stripe event (by its id) and an API key (by its id)
are each written by whoever names them first; a replay, a retry after a lost reply or a
concurrent duplicate must find that first row and change nothing. :func:`insert_once` is that
step, so each caller only decides what a replay that differs from the first means (the ledger's
``IdempotencyConflict``, the API keys' ``KeyConflict``).

Sharp edge: ``INSERT … ON CONFLICT DO NOTHING`` waits for a concurrent insert of the same key to
commit or roll back, then does nothing; the read that follows, a new statement, sees the committed
row. That takes READ COMMITTED, PostgreSQL's default, which every caller here runs at. The rows
are never deleted, so the first row is always there to read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection


async def insert_once(
    conn: AsyncConnection, table: sa.Table, values: Mapping[str, Any], *, key: str
) -> tuple[sa.Row[Any], bool]:
    """``(row, True)`` if this call inserted ``values``; else ``(first row with that key, False)``.

    ``key`` names the column of the unique index the row is known by.
    """
    inserted = (
        await conn.execute(
            pg_insert(table).values(**values).on_conflict_do_nothing(index_elements=[key]).returning(table)
        )
    ).first()
    if inserted is not None:
        return inserted, True
    first = (await conn.execute(sa.select(table).where(table.c[key] == values[key]))).first()
    assert first is not None, f"the {table.name} row that conflicted vanished: these rows are never deleted"
    return first, False
