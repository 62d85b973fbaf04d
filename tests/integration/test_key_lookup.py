"""The sidecar's key cache (authz_sidecar/key_lookup.py) against a real PostgreSQL: a key in use
is answered from memory and kept fresh in the background, and a revoked key is refused within the
TTL whether or not the refresher keeps up.

Time is the test's (support.manual_time): the cache's clock and its refresher's sleep move only
when a test advances them, so each bound is asserted on the cache's own clock, whatever the
machine's speed; only the database round trips take real time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from support.manual_time import ManualTime

from authz_sidecar import api_errors
from authz_sidecar.key_lookup import RECENT_S, KeyLookup
from billing import api_keys, database, key_format, wallets

pytestmark = pytest.mark.integration

# Binary fractions of a second, so that the hand-moved clock stays exact: the refresher runs
# every third of the TTL (0.125 s), and the tests step by a sixth (0.0625 s).
TTL_MS = 375
TTL_S = TTL_MS / 1000
STEP_S = TTL_S / 6


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
    time = ManualTime()
    lookup = KeyLookup(pool, TTL_MS, clock=time, sleep=time.sleep)
    lookup.start()
    try:
        await time.until_sleeping()  # the refresher's first round: nothing in use yet
        assert await refused(lookup, authorization) is None
        assert lookup.lookups == 1
        # Keep using the key for three TTLs: the refresher re-reads it every third of one.
        for _ in range(18):
            await time.advance(STEP_S)
            assert await refused(lookup, authorization) is None
        assert lookup.refreshes == 9
        assert lookup.lookups == 1, "a Check waited for the database although the key was in use"
    finally:
        await lookup.close()


async def test_a_revoked_key_in_use_is_refused_within_the_ttl(
    migrated_engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    authorization, key_id = await new_key(migrated_engine)
    time = ManualTime()
    lookup = KeyLookup(pool, TTL_MS, clock=time, sleep=time.sleep)
    lookup.start()
    try:
        await time.until_sleeping()
        for _ in range(4):  # the key is cached and refreshed twice
            assert await refused(lookup, authorization) is None
            await time.advance(STEP_S)
        assert lookup.refreshes == 2
        await revoke(migrated_engine, key_id)
        revoked_at = time()
        while await refused(lookup, authorization) is None:
            assert time() - revoked_at < TTL_S, "the revoked key is still accepted a TTL later"
            await time.advance(STEP_S)
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
    time = ManualTime()
    lookup = KeyLookup(pool, TTL_MS, clock=time, sleep=time.sleep)
    assert await refused(lookup, authorization) is None
    await revoke(migrated_engine, key_id)
    await time.advance(TTL_S - 2**-10)
    assert await refused(lookup, authorization) is None  # still the cached answer
    assert lookup.lookups == 1
    await time.advance(2**-10)  # a TTL after the look-up began
    assert await refused(lookup, authorization) == "revoked_api_key"
    assert lookup.lookups == 2


async def test_a_refresh_rereads_the_keys_in_use_and_forgets_the_idle_ones(
    migrated_engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    busy, busy_id = await new_key(migrated_engine)
    idle, _ = await new_key(migrated_engine)
    unknown = "Bearer " + key_format.generate().plaintext  # well-formed, never stored
    time = ManualTime()
    lookup = KeyLookup(pool, TTL_MS, clock=time, sleep=time.sleep)
    for authorization in (busy, idle, unknown):
        await refused(lookup, authorization)
    assert await refused(lookup, unknown) == "invalid_api_key"
    assert lookup.lookups == 3  # the unknown key's answer is cached too

    # Later, only `busy` is still in use, and it is revoked; one refresh sees it.
    await time.advance(RECENT_S)
    await lookup.refresh()  # nothing in use: no query
    assert lookup.refreshes == 0
    await lookup.authenticate(busy)
    assert lookup.lookups == 4
    await revoke(migrated_engine, busy_id)
    await time.advance(TTL_S / 2)
    await lookup.refresh()
    assert lookup.refreshes == 1
    await time.advance(TTL_S / 2)  # older than a TTL since the Check's own look-up
    assert await refused(lookup, busy) == "revoked_api_key"
    assert lookup.lookups == 4  # answered by the refresh, not by the database

    # The idle key and the unknown one were forgotten by the first refresh: looked up again.
    assert await refused(lookup, idle) is None
    assert await refused(lookup, unknown) == "invalid_api_key"
    assert lookup.lookups == 6
