"""``billingproxy key limit`` (billingproxy/admin_commands.py) against a real PostgreSQL: it sets,
shows and clears a key's limit, refuses bad amounts and windows with a message and no change,
and leaves a key an ApiKey resource owns to its resource."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from billing import api_keys, key_limits, wallets
from billingproxy import admin_commands

pytestmark = pytest.mark.integration


async def new_key(engine: AsyncEngine, source: str = "admin") -> tuple[str, str]:
    async with engine.begin() as conn:
        wallet = await wallets.create_wallet(conn, source=source, grant_nano=1_000)
        key = await api_keys.issue_key(conn, wallet_id=wallet.id, source=source)
    return wallet.id, key.key_id


async def run(engine: AsyncEngine, *args: object) -> str:
    async with engine.begin() as conn:
        return await admin_commands.key_limit(conn, *args)  # type: ignore[arg-type]


async def test_a_limit_is_set_shown_and_cleared(migrated_engine: AsyncEngine) -> None:
    wallet_id, key_id = await new_key(migrated_engine)
    said = await run(migrated_engine, key_id, "5.00", "weekly")
    assert said.startswith(f"{key_id}: 0.000000/5.000000 weekly, resets ")
    async with migrated_engine.connect() as conn:
        limit = await key_limits.limit_of(conn, key_id)
        shown = await admin_commands.wallet_show(conn, wallet_id)
    assert limit is not None and (limit.limit_nano, limit.window) == (5_000_000_000, key_limits.Window.WEEKLY)
    assert "0.000000/5.000000 weekly, resets" in shown
    assert await run(migrated_engine, key_id, None, "monthly") == f"{key_id}: no spend limit"
    async with migrated_engine.connect() as conn:
        assert await key_limits.limit_of(conn, key_id) is None


@pytest.mark.parametrize(
    ("usd", "window"), [("-1", "daily"), ("1e3", "daily"), ("5", "hourly"), ("5.0.0", "total")]
)
async def test_bad_input_is_a_message_and_changes_nothing(
    migrated_engine: AsyncEngine, usd: str, window: str
) -> None:
    _, key_id = await new_key(migrated_engine)
    with pytest.raises(admin_commands.AdminError):
        await run(migrated_engine, key_id, usd, window)
    async with migrated_engine.connect() as conn:
        assert await key_limits.limit_of(conn, key_id) is None


async def test_unknown_and_resource_owned_keys_are_refused(migrated_engine: AsyncEngine) -> None:
    with pytest.raises(admin_commands.AdminError, match="no key"):
        await run(migrated_engine, "key_nope", "1", "daily")
    _, key_id = await new_key(migrated_engine, source="kubernetes")
    with pytest.raises(admin_commands.AdminError, match="spec.spendLimit"):
        await run(migrated_engine, key_id, "1", "daily")
    async with migrated_engine.connect() as conn:
        limit = (
            await conn.execute(sa.text("SELECT limit_nano FROM api_keys WHERE id = :k"), {"k": key_id})
        ).scalar()
    assert limit is None
