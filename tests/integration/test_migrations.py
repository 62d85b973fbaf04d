"""The Alembic migrations build exactly the schema ``billing/tables.py`` declares.

Why: the services query through ``billing.tables`` (and the hot path's hand-written SQL names
its columns), while the database is made by the migrations alone. A column added to one and not
the other would only show in production; Alembic's own autogenerate comparison finds it here.
"""

from __future__ import annotations

from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import AsyncEngine

from billing import tables

pytestmark = pytest.mark.integration


def _differences(connection: Any) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "compare_server_default": False}
    )
    return compare_metadata(context, tables.metadata)


async def test_the_migrations_build_exactly_the_declared_tables(migrated_engine: AsyncEngine) -> None:
    async with migrated_engine.connect() as conn:
        differences = await conn.run_sync(_differences)
    # alembic_version is the migrations' own bookkeeping, not part of the declared schema.
    differences = [d for d in differences if not (d[0] == "remove_table" and d[1].name == "alembic_version")]
    assert [(d[0], getattr(d[1], "name", d)) for d in differences] == []
