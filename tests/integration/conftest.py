"""Fixtures for tests against a real PostgreSQL: a fresh database with the schema migrated."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from billing import database


@pytest.fixture
async def migrated_url(fresh_database_url: str) -> str:
    """A new database brought to the head revision by the real Alembic migrations."""
    # migrate() is blocking and runs its own event loop, hence the thread.
    await asyncio.to_thread(database.migrate, fresh_database_url)
    return fresh_database_url


@pytest.fixture
async def migrated_engine(migrated_url: str) -> AsyncIterator[AsyncEngine]:
    """The transactional engine the services use, over a migrated database."""
    engine = database.create_engine(migrated_url)
    try:
        yield engine
    finally:
        await engine.dispose()
