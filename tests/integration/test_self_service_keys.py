"""billing.key_management against a real PostgreSQL: the rules the HTTP tests cannot reach.

Only *usable* keys count, for the cap and for "a wallet keeps one active key": an expired or a
suspended key would not let its owner in, so it neither fills the cap nor stands in for the last
key. "Spend" is exactly the ledger's sum of the key's usage entries (a voided request is a use but
costs nothing), and the list's query can walk the index migration 0006 adds.
"""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billing import api_keys, holds, key_format, key_management, wallets

pytestmark = pytest.mark.integration

PAST = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)


async def wallet_with_unusable_keys(conn: AsyncConnection) -> tuple[str, str]:
    """A self-service wallet with its signup key, an expired key and a suspended key."""
    signup = await wallets.signup(conn, email="keys@example.com", grant_nano=10**9)
    wallet_id = signup.wallet.id
    await api_keys.issue_key(conn, wallet_id=wallet_id, source="signup", expires_at=PAST)
    await api_keys.record_key(
        conn, issued=key_format.generate(), wallet_id=wallet_id, source="signup", suspended=True
    )
    return wallet_id, signup.key.key_id


async def test_unusable_keys_neither_fill_the_cap_nor_stand_in_for_the_last_key(
    migrated_engine: AsyncEngine,
) -> None:
    async with migrated_engine.begin() as conn:
        wallet_id, own = await wallet_with_unusable_keys(conn)
        with pytest.raises(key_management.LastKey):
            await key_management.revoke_key(conn, wallet_id=wallet_id, requester_id=own, key_id=own)
        _, view = await key_management.create_key(conn, wallet_id=wallet_id, requester_id=own, cap=2)
        with pytest.raises(key_management.TooManyKeys):
            await key_management.create_key(conn, wallet_id=wallet_id, requester_id=own, cap=2)
        listed = await key_management.list_keys(conn, wallet_id)
    now = dt.datetime.now(dt.UTC)
    assert sorted(v.state(now) for v in listed) == ["active", "active", "expired", "suspended"]
    assert view.record.id in {v.record.id for v in listed}


async def test_spend_is_the_sum_of_the_keys_usage_entries(migrated_engine: AsyncEngine) -> None:
    async with migrated_engine.begin() as conn:
        signup = await wallets.signup(conn, email="spender@example.com", grant_nano=10**9)
        wallet_id, key_id = signup.wallet.id, signup.key.key_id
        other = await api_keys.issue_key(conn, wallet_id=wallet_id, source="signup")
    # Two posted requests, one voided (a use that costs nothing), one of the other key.
    plan = [("r1", key_id, holds.Resolution.post(1_234)), ("r2", key_id, holds.Resolution.post(5))]
    plan += [("r3", key_id, holds.Resolution.VOID), ("r4", other.key_id, holds.Resolution.post(777))]
    for request_id, key, resolution in plan:
        async with migrated_engine.begin() as conn:
            refused = await holds.place(
                conn,
                request_id=request_id,
                wallet_id=wallet_id,
                key_id=key,
                model="gpt-4o-mini",
                amount_nano=10_000,
                ttl_s=60,
                strict=False,
            )
            assert refused is None
            await holds.settle(conn, request_id=request_id, resolution=resolution)
    async with migrated_engine.connect() as conn:
        views = {v.record.id: v for v in await key_management.list_keys(conn, wallet_id)}
        ledger_sum = (
            await conn.execute(
                sa.text(
                    "SELECT -sum(amount_nano) FROM ledger_entries"
                    " WHERE kind = 'usage' AND details->>'key_id' = :k"
                ),
                {"k": key_id},
            )
        ).scalar_one()
        newest = (
            await conn.execute(sa.text("SELECT created_at FROM holds WHERE request_id = 'r3'"))
        ).scalar_one()
    assert views[key_id].spend_nano == ledger_sum == 1_239
    assert views[other.key_id].spend_nano == 777
    assert views[key_id].last_used_at == newest  # the voided request was the last use
    assert views[key_id].limit is None


async def test_the_list_can_walk_the_holds_by_key_index(migrated_engine: AsyncEngine) -> None:
    """With sequential scans priced out, the plan uses holds_by_key: the index exists and fits."""
    async with migrated_engine.begin() as conn:
        await conn.execute(sa.text("SET LOCAL enable_seqscan = off"))
        plan = (
            await conn.execute(
                sa.text("EXPLAIN " + key_management.VIEWS_SQL),
                {"wallet_id": "wal_x", "key_id": None, "include_revoked": False},
            )
        ).scalars()
        assert "holds_by_key" in "\n".join(plan)
