"""billing.expiry against a real PostgreSQL: a hold no access log reports keeps its reservation
past its expiry and, after the grace period, is charged its estimate once — never twice, never
when a report came first, and a report that comes later changes nothing."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from billing import audit, database, expiry, holds, wallets
from legacy_expiry import expire_as_before

pytestmark = pytest.mark.integration

GRANT_NANO = 500_000_000
HOLD_NANO = 3_000_000
HOUR_S = 3600


@pytest.fixture
async def pool(migrated_url: str):
    pool = await database.create_pool(migrated_url, size=8)
    try:
        yield pool
    finally:
        await pool.close()


async def new_wallet(engine: AsyncEngine, email: str) -> tuple[str, str]:
    async with engine.begin() as conn:
        owner = await wallets.signup(conn, email=email, grant_nano=GRANT_NANO)
    return owner.wallet.id, owner.key.key_id


async def place(pool: asyncpg.Pool, wallet: tuple[str, str], request_id: str, *, ttl_s: int = 0) -> None:
    async with database.acquire(pool) as conn:
        refusal = await holds.place(
            conn,
            request_id=request_id,
            wallet_id=wallet[0],
            key_id=wallet[1],
            model="gpt-4o-mini",
            amount_nano=HOLD_NANO,
            ttl_s=ttl_s,
            strict=False,
        )
    assert refusal is None


async def row(pool: asyncpg.Pool, sql: str, *args: object) -> asyncpg.Record:
    async with database.acquire(pool) as conn:
        found = await conn.fetchrow(sql, *args)
    assert found is not None
    return found


async def test_an_unreported_hold_keeps_its_reservation_then_is_charged_its_estimate_once(
    migrated_engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    wallet = await new_wallet(migrated_engine, "unreported@example.com")
    await place(pool, wallet, "never-reported")
    await place(pool, wallet, "still-running", ttl_s=600)
    async with database.acquire(pool) as conn:
        # Past its expiry, nothing charged yet (a report may still come), its reservation kept.
        assert await expiry.sweep(conn, report_grace_s=HOUR_S) == expiry.Sweep(charged=0)
    hold = await row(pool, "SELECT state FROM holds WHERE request_id = 'never-reported'")
    assert hold["state"] == "pending"
    wallet_row = await row(pool, "SELECT balance_nano, reserved_nano FROM wallets WHERE id = $1", wallet[0])
    assert (wallet_row["balance_nano"], wallet_row["reserved_nano"]) == (GRANT_NANO, 2 * HOLD_NANO)

    async with database.acquire(pool) as conn:
        assert await expiry.sweep(conn, report_grace_s=0) == expiry.Sweep(charged=1)
        assert await expiry.sweep(conn, report_grace_s=0) == expiry.Sweep(charged=0)
    hold = await row(pool, "SELECT state, posted_nano FROM holds WHERE request_id = 'never-reported'")
    assert (hold["state"], hold["posted_nano"]) == ("posted", HOLD_NANO)
    entry = await row(
        pool, "SELECT amount_nano, details FROM ledger_entries WHERE idempotency_key = 'usage:never-reported'"
    )
    assert entry["amount_nano"] == -HOLD_NANO
    assert '"unfinished": "no_access_log_report"' in entry["details"]
    wallet_row = await row(pool, "SELECT balance_nano, reserved_nano FROM wallets WHERE id = $1", wallet[0])
    # The reservation left is the pending hold's; the balance lost the estimate, once.
    assert (wallet_row["balance_nano"], wallet_row["reserved_nano"]) == (GRANT_NANO - HOLD_NANO, HOLD_NANO)

    # The report arrives after all: the charge stands (it is at least the actual cost).
    async with database.acquire(pool) as conn:
        late = await holds.settle(conn, request_id="never-reported", resolution=holds.Resolution.post(1))
    assert late is holds.Settlement.ALREADY_POSTED
    assert (await audit.run(migrated_engine)).findings == []


async def test_a_report_inside_the_grace_period_wins(
    migrated_engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    wallet = await new_wallet(migrated_engine, "late-report@example.com")
    await place(pool, wallet, "late-exact")
    await place(pool, wallet, "late-void")
    async with database.acquire(pool) as conn:
        await expiry.sweep(conn, report_grace_s=HOUR_S)
        assert (
            await holds.settle(conn, request_id="late-exact", resolution=holds.Resolution.post(1234))
            is holds.Settlement.POSTED_AFTER_EXPIRY
        )
        assert (
            await holds.settle(conn, request_id="late-void", resolution=holds.Resolution.VOID)
            is holds.Settlement.VOIDED_AFTER_EXPIRY
        )
        assert await expiry.sweep(conn, report_grace_s=0) == expiry.Sweep(charged=0)
    wallet_row = await row(pool, "SELECT balance_nano, reserved_nano FROM wallets WHERE id = $1", wallet[0])
    assert (wallet_row["balance_nano"], wallet_row["reserved_nano"]) == (GRANT_NANO - 1234, 0)


async def test_sweeps_of_several_sidecars_at_once_charge_each_hold_once(
    migrated_engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    """Every replica's sidecar sweeps; 40 unreported holds on 4 wallets, 6 sweeps at once."""
    owners = [await new_wallet(migrated_engine, f"sweep-{n}@example.com") for n in range(4)]
    ids = [f"u-{n:02d}" for n in range(40)]
    for n, request_id in enumerate(ids):
        await place(pool, owners[n % 4], request_id)

    async def one_sweep() -> expiry.Sweep:
        async with database.acquire(pool) as conn:
            return await expiry.sweep(conn, report_grace_s=0)

    sweeps = await asyncio.gather(*(one_sweep() for _ in range(6)))
    async with database.acquire(pool) as conn:
        rest = await expiry.sweep(conn, report_grace_s=0)
    assert sum(s.charged for s in sweeps) + rest.charged == 40
    for owner in owners:
        balance = await row(pool, "SELECT balance_nano, reserved_nano FROM wallets WHERE id = $1", owner[0])
        assert (balance["balance_nano"], balance["reserved_nano"]) == (GRANT_NANO - 10 * HOLD_NANO, 0)
    assert (await audit.run(migrated_engine)).findings == []


async def test_holds_an_earlier_version_expired_are_charged_once_without_a_second_release(
    migrated_engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    """An earlier version released each hold's reservation at its expiry (state ``expired``):
    the sweep charges such a hold its estimate the grace after that expiry, and leaves the
    reservations of the holds still pending alone."""
    wallet = await new_wallet(migrated_engine, "legacy@example.com")
    await place(pool, wallet, "expired-before")
    assert await expire_as_before(migrated_engine) == 1
    await place(pool, wallet, "pending-now", ttl_s=600)
    async with database.acquire(pool) as conn:
        assert await expiry.sweep(conn, report_grace_s=HOUR_S) == expiry.Sweep(charged=0)
        assert await expiry.sweep(conn, report_grace_s=0) == expiry.Sweep(charged=1)
    wallet_row = await row(pool, "SELECT balance_nano, reserved_nano FROM wallets WHERE id = $1", wallet[0])
    assert (wallet_row["balance_nano"], wallet_row["reserved_nano"]) == (GRANT_NANO - HOLD_NANO, HOLD_NANO)
    assert (await audit.run(migrated_engine)).findings == []
