"""The sidecar's key cache (authz_sidecar/key_lookup.py) against a real PostgreSQL: a key in use
is answered from memory and kept fresh in the background, and a revoked key is refused within the
TTL whether or not the refresher keeps up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from authz_sidecar import api_errors
from authz_sidecar.key_lookup import RECENT_S, KeyLookup
from billing import api_keys, database, key_format, wallets

pytestmark = pytest.mark.integration

TTL_MS = 250  # a binary fraction of a second: the hand-moved clock stays exact
# A refresher that has not run this long after start is broken (it runs every TTL/3).
REFRESH_WAIT_S = 10.0


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def pool(migrated_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await database.create_pool(migrated_url, size=2)
    try:
        yield pool
    finally:
        await pool.close()


async def new_key(engine: AsyncEngine) -> tuple[str, str]:
    """A fresh wallet's key: (``Authorization`` value, key id)."""
    async with engine.begin() as conn:
        wallet = await wallets.create_wallet(conn, source="admin", grant_nano=1_000)
        key = await api_keys.issue_key(conn, wallet_id=wallet.id, source="admin")
    return f"Bearer {key.plaintext}", key.key_id


async def revoke(engine: AsyncEngine, key_id: str) -> None:
    async with engine.begin() as conn:
        await api_keys.revoke_key(conn, key_id)


async def refused(lookup: KeyLookup, authorization: str) -> str | None:
    """The refusal's code, or None if the key is accepted."""
    try:
        await lookup.authenticate(authorization)
    except api_errors.ApiError as error:
        return error.code
    return None


async def test_a_key_in_use_is_answered_from_memory_across_many_ttls(
    migrated_engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    authorization, _ = await new_key(migrated_engine)
    lookup = KeyLookup(pool, TTL_MS)
    lookup.start()
    try:
        assert await refused(lookup, authorization) is None
        assert lookup.lookups == 1
        started = time.monotonic()
        # Keep using the key until the refresher has re-read it five times (well over a TTL).
        while lookup.refreshes < 5:
            assert time.monotonic() - started < REFRESH_WAIT_S, "the refresher did not run"
            assert await refused(lookup, authorization) is None
            await asyncio.sleep(0.005)
        assert time.monotonic() - started > TTL_MS / 1000
        assert lookup.lookups == 1, "a Check waited for the database although the key was in use"
    finally:
        await lookup.close()


async def test_a_revoked_key_in_use_is_refused_within_the_ttl(
    migrated_engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    authorization, key_id = await new_key(migrated_engine)
    lookup = KeyLookup(pool, TTL_MS)
    lookup.start()
    try:
        started = time.monotonic()
        while lookup.refreshes < 2:  # the key is cached and being refreshed
            assert time.monotonic() - started < REFRESH_WAIT_S, "the refresher did not run"
            assert await refused(lookup, authorization) is None
            await asyncio.sleep(0.005)
        await revoke(migrated_engine, key_id)
        revoked_at = time.monotonic()
        while await refused(lookup, authorization) is None:
            assert time.monotonic() - revoked_at < TTL_MS / 1000, "the revoked key is still accepted"
            await asyncio.sleep(0.005)
        assert await refused(lookup, authorization) == "revoked_api_key"
        assert lookup.lookups == 1  # the refresher saw the revocation, not a Check
    finally:
        await lookup.close()


async def test_without_refreshes_an_answer_is_used_only_while_younger_than_the_ttl(
    migrated_engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    """The bound does not depend on the refresher: stalled (here: never started), the Check looks
    the key up itself once its answer is a TTL old."""
    authorization, key_id = await new_key(migrated_engine)
    clock = Clock()
    read_at = clock.now
    lookup = KeyLookup(pool, TTL_MS, clock=clock)
    assert await refused(lookup, authorization) is None
    await revoke(migrated_engine, key_id)
    clock.now = read_at + TTL_MS / 1000 - 0.001
    assert await refused(lookup, authorization) is None  # still the cached answer
    assert lookup.lookups == 1
    clock.now = read_at + TTL_MS / 1000
    assert await refused(lookup, authorization) == "revoked_api_key"
    assert lookup.lookups == 2


async def test_a_refresh_rereads_the_keys_in_use_and_forgets_the_idle_ones(
    migrated_engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    busy, busy_id = await new_key(migrated_engine)
    idle, _ = await new_key(migrated_engine)
    unknown = "Bearer " + key_format.generate().plaintext  # well-formed, never stored
    clock = Clock()
    lookup = KeyLookup(pool, TTL_MS, clock=clock)
    for authorization in (busy, idle, unknown):
        await refused(lookup, authorization)
    assert await refused(lookup, unknown) == "invalid_api_key"
    assert lookup.lookups == 3  # the unknown key's answer is cached too

    # Later, only `busy` is still in use, and it is revoked; one refresh sees it.
    clock.now += RECENT_S
    await lookup.refresh()  # nothing in use: no query
    assert lookup.refreshes == 0
    await lookup.authenticate(busy)
    assert lookup.lookups == 4
    await revoke(migrated_engine, busy_id)
    clock.now += TTL_MS / 1000 / 2
    await lookup.refresh()
    assert lookup.refreshes == 1
    clock.now += TTL_MS / 1000 / 2  # older than a TTL since the Check's own look-up
    assert await refused(lookup, busy) == "revoked_api_key"
    assert lookup.lookups == 4  # answered by the refresh, not by the database

    # The idle key and the unknown one were forgotten by the first refresh: looked up again.
    assert await refused(lookup, idle) is None
    assert await refused(lookup, unknown) == "invalid_api_key"
    assert lookup.lookups == 6
