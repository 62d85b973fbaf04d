"""Fixtures for tests against a real PostgreSQL: a fresh database with the schema migrated."""

from __future__ import annotations

from collections.abc import AsyncIterator

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
