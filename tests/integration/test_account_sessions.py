"""billing.account_sessions against a real PostgreSQL: a session lives while it is used, ends
after its idle or absolute lifetime, at sign-out and when its key stops working, and only the
token's hash is stored."""

from __future__ import annotations

import hashlib
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from billing import account_sessions, api_keys, wallets

pytestmark = pytest.mark.integration


async def new_key(engine: AsyncEngine) -> api_keys.KeyRecord:
    async with engine.begin() as conn:
        owner = await wallets.signup(conn, email=f"s-{uuid.uuid4().hex[:10]}@example.com", grant_nano=0)
        record = await api_keys.get_key(conn, owner.key.key_id)
    assert record is not None
    return record


async def start(engine: AsyncEngine, key: api_keys.KeyRecord) -> account_sessions.Started:
    async with engine.begin() as conn:
        started = await account_sessions.start(conn, key)
    assert started is not None
    return started


async def use(engine: AsyncEngine, token: str | None) -> account_sessions.Session | None:
    async with engine.begin() as conn:
        return await account_sessions.use(conn, token)


async def test_only_the_hash_is_stored_and_each_use_renews_the_idle_end(migrated_engine: AsyncEngine) -> None:
    key = await new_key(migrated_engine)
    started = await start(migrated_engine, key)
    async with migrated_engine.connect() as conn:
        stored = (await conn.execute(sa.text("SELECT token_hash FROM account_sessions"))).scalars().all()
    assert hashlib.sha256(started.token.encode()).digest() in [bytes(h) for h in stored]
    assert started.token.encode() not in [bytes(h) for h in stored]

    async with migrated_engine.begin() as conn:  # nearly idle for 30 minutes
        await conn.execute(
            sa.text(
                "UPDATE account_sessions SET expires_at = now() + interval '1 second' WHERE token_hash = :h"
            ),
            {"h": account_sessions.token_hash(started.token)},
        )
    session = await use(migrated_engine, started.token)
    assert session is not None and session.wallet_id == key.wallet_id
    assert (session.expires_at - started.session.expires_at).total_seconds() > -5, "renewed"


@pytest.mark.parametrize("column", ["expires_at", "ends_at"])
async def test_an_idle_or_old_session_is_refused_and_deleted(
    migrated_engine: AsyncEngine, column: str
) -> None:
    key = await new_key(migrated_engine)
    started = await start(migrated_engine, key)
    async with migrated_engine.begin() as conn:
        await conn.execute(
            sa.text(
                f"UPDATE account_sessions SET {column} = now() - interval '1 second' WHERE token_hash = :h"
            ),
            {"h": account_sessions.token_hash(started.token)},
        )
    assert await use(migrated_engine, started.token) is None
    async with migrated_engine.connect() as conn:
        left = await conn.scalar(
            sa.text("SELECT count(*) FROM account_sessions WHERE token_hash = :h"),
            {"h": account_sessions.token_hash(started.token)},
        )
    assert left == 0


async def test_a_revoked_key_starts_no_session_and_ends_its_sessions(migrated_engine: AsyncEngine) -> None:
    key = await new_key(migrated_engine)
    started = await start(migrated_engine, key)
    async with migrated_engine.begin() as conn:
        await api_keys.revoke_key(conn, key.id)
    assert await use(migrated_engine, started.token) is None
    async with migrated_engine.begin() as conn:
        assert await account_sessions.start(conn, key) is None


async def test_sign_out_ends_it_and_junk_tokens_are_refused_without_a_query_error(
    migrated_engine: AsyncEngine,
) -> None:
    key = await new_key(migrated_engine)
    started = await start(migrated_engine, key)
    async with migrated_engine.begin() as conn:
        assert await account_sessions.end(conn, started.token) is True
        assert await account_sessions.end(conn, started.token) is False
    assert await use(migrated_engine, started.token) is None
    for junk in (None, "", "x" * 65, "\x00", "é" * 10, started.token + "x"):
        assert await use(migrated_engine, junk) is None


async def test_the_csrf_token_is_compared_exactly(migrated_engine: AsyncEngine) -> None:
    started = await start(migrated_engine, await new_key(migrated_engine))
    session = started.session
    assert account_sessions.csrf_matches(session, session.csrf_token)
    for wrong in (None, "", session.csrf_token[:-1], session.csrf_token + "a", "é"):
        assert not account_sessions.csrf_matches(session, wrong)


async def test_prune_deletes_only_ended_sessions(migrated_engine: AsyncEngine) -> None:
    live = await start(migrated_engine, await new_key(migrated_engine))
    ended = await start(migrated_engine, await new_key(migrated_engine))
    async with migrated_engine.begin() as conn:
        await conn.execute(
            sa.text(
                "UPDATE account_sessions SET expires_at = now() - interval '1 second' WHERE token_hash = :h"
            ),
            {"h": account_sessions.token_hash(ended.token)},
        )
        assert await account_sessions.prune(conn) == 1
        assert await account_sessions.prune(conn) == 0
    assert await use(migrated_engine, live.token) is not None
