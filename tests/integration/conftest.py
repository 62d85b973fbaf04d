"""Fixtures for tests against a real PostgreSQL: a fresh database with the schema migrated."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from billing import database


@pytest.fixture
async def migrated_engine(migrated_url: str) -> AsyncIterator[AsyncEngine]:
    """The transactional engine the services use, over a migrated database."""
    engine = database.create_engine(migrated_url)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def migrated_pool(migrated_url: str) -> AsyncIterator[asyncpg.Pool]:
    """The hot path's asyncpg pool over a migrated database (enough connections for races)."""
    pool = await database.create_pool(migrated_url, size=8)
    try:
        yield pool
    finally:
        await pool.close()
