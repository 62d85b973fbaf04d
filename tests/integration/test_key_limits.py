"""Per-key spend limits against a real PostgreSQL (billing/key_limits.py, the hold statements):
a limited key is admitted only while ``spent + reserved + hold <= limit``, one by one, in
batches (both ways a batch is sent) and under concurrency; its window rolls over at each
calendar boundary; settlements and expiry move its sums exactly as the wallet's, and a charge
for a hold of an earlier window does not count in the new one. The audit agrees after each test.

Time moves only through the database here (the statements read ``now()``): a test "moves the
clock" by setting the key's ``window_start``, and its holds' ``limit_window_start``, back by one
window, which is what the database would hold had the requests been made a window ago.
"""

from __future__ import annotations

import asyncio
import datetime as dt

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from billing import api_keys, audit, database, expiry, hold_batches, holds, key_limits, wallets
from legacy_expiry import expire_as_before

pytestmark = pytest.mark.integration

R = holds.RefusalReason
S = holds.Settlement
post = holds.Resolution.post
W = key_limits.Window
TTL_S = 600


@pytest.fixture(autouse=True, params=["pipelined", "set_based"])
def batch_statement(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every batch of two or more as the set-based statement, or none of them."""
    monkeypatch.setattr(hold_batches, "SET_BATCH_MIN", 2 if request.param == "set_based" else 10**9)
    return request.param


async def new_wallet(engine: AsyncEngine, balance_nano: int, keys: int = 2) -> tuple[str, list[str]]:
    async with engine.begin() as conn:
        wallet = await wallets.create_wallet(conn, source="admin", grant_nano=balance_nano)
        issued = [await api_keys.issue_key(conn, wallet_id=wallet.id, source="admin") for _ in range(keys)]
    return wallet.id, [key.key_id for key in issued]


async def set_limit(engine: AsyncEngine, key_id: str, limit_nano: int | None, window: W = W.MONTHLY) -> None:
    async with engine.begin() as conn:
        if limit_nano is None:
            await key_limits.clear_limit(conn, key_id)
        else:
            await key_limits.set_limit(conn, key_id, limit_nano, window)


async def place(
    db: database.Database, wallet_id: str, key_id: str, request_id: str, amount: int, *, strict: bool = True
) -> holds.Refusal | None:
    async with database.acquire(db) as conn:
        return await holds.place(
            conn,
            request_id=request_id,
            wallet_id=wallet_id,
            key_id=key_id,
            model="m",
            amount_nano=amount,
            ttl_s=TTL_S,
            strict=strict,
        )


async def settle(engine: AsyncEngine, request_id: str, resolution: holds.Resolution) -> holds.Settlement:
    async with engine.begin() as conn:
        return await holds.settle(conn, request_id=request_id, resolution=resolution)


async def sums(engine: AsyncEngine, key_id: str) -> tuple[int, int]:
    """(spent, reserved) of record."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sa.text("SELECT spent_nano, reserved_nano FROM api_keys WHERE id = :k"), {"k": key_id}
            )
        ).one()
    return row.spent_nano, row.reserved_nano


async def limit_of(engine: AsyncEngine, key_id: str) -> key_limits.KeyLimit:
    async with engine.connect() as conn:
        limit = await key_limits.limit_of(conn, key_id)
    assert limit is not None
    return limit


async def clean(engine: AsyncEngine) -> None:
    report = await audit.run(engine)
    assert report.findings == []


async def move_back_one_window(engine: AsyncEngine, key_id: str, window: W) -> None:
    """As if every request of the key so far had been made one window earlier."""
    back = {W.DAILY: "1 day", W.WEEKLY: "7 days", W.MONTHLY: "1 month", W.TOTAL: "100 years"}[window]
    async with engine.begin() as conn:
        params = {"k": key_id, "back": back}
        await conn.execute(
            sa.text(
                "UPDATE api_keys SET window_start = window_start - CAST(CAST(:back AS text) AS interval) "
                "WHERE id = :k"
            ),
            params,
        )
        await conn.execute(
            sa.text(
                "UPDATE holds "
                "SET limit_window_start = limit_window_start - CAST(CAST(:back AS text) AS interval) "
                "WHERE key_id = :k AND limit_window_start IS NOT NULL"
            ),
            params,
        )


# --- admission ------------------------------------------------------------------------------------


async def test_a_limited_key_is_refused_past_its_limit_and_the_wallets_other_key_is_not(
    migrated_engine: AsyncEngine,
) -> None:
    wallet_id, (capped, free) = await new_wallet(migrated_engine, 10_000)
    await set_limit(migrated_engine, capped, 1_000, W.MONTHLY)

    assert await place(migrated_engine, wallet_id, capped, "a1", 600) is None
    refusal = await place(migrated_engine, wallet_id, capped, "a2", 401)
    assert refusal is not None and refusal.reason is R.KEY_LIMIT_REACHED
    assert refusal.key_limit is not None
    assert (refusal.key_limit.limit_nano, refusal.key_limit.spent_nano, refusal.key_limit.reserved_nano) == (
        1_000,
        0,
        600,
    )
    assert refusal.key_limit.window is W.MONTHLY
    assert await place(migrated_engine, wallet_id, capped, "a3", 400) is None  # exactly to the limit
    assert await place(migrated_engine, wallet_id, free, "b1", 5_000) is None  # the other key: untouched
    assert await sums(migrated_engine, capped) == (0, 1_000)
    assert await sums(migrated_engine, free) == (0, 0)  # an unlimited key's row is never written

    assert await settle(migrated_engine, "a1", post(250)) is S.POSTED
    assert await sums(migrated_engine, capped) == (250, 400)
    assert await place(migrated_engine, wallet_id, capped, "a4", 350) is None
    refused = await place(migrated_engine, wallet_id, capped, "a5", 1)
    assert refused is not None and refused.reason is R.KEY_LIMIT_REACHED
    await clean(migrated_engine)


async def test_the_key_limit_has_no_overdraft_and_is_refused_before_the_wallets_money(
    migrated_engine: AsyncEngine,
) -> None:
    async with migrated_engine.begin() as conn:
        wallet = await wallets.create_wallet(
            conn, source="admin", grant_nano=100, overdraft_limit_nano=10_000
        )
        key = await api_keys.issue_key(conn, wallet_id=wallet.id, source="admin")
    await set_limit(migrated_engine, key.key_id, 500, W.DAILY)
    # Overdraft mode: the wallet would admit 5 000; the key's limit has no overdraft.
    assert await place(migrated_engine, wallet.id, key.key_id, "o1", 500, strict=False) is None
    refusal = await place(migrated_engine, wallet.id, key.key_id, "o2", 1, strict=False)
    assert refusal is not None and refusal.reason is R.KEY_LIMIT_REACHED
    # Both refuse: the key's limit is named, since a top-up would not help.
    refusal = await place(migrated_engine, wallet.id, key.key_id, "o3", 20_000, strict=False)
    assert refusal is not None and refusal.reason is R.KEY_LIMIT_REACHED
    await clean(migrated_engine)


async def test_a_zero_limit_admits_nothing_that_costs(migrated_engine: AsyncEngine) -> None:
    wallet_id, (key, _) = await new_wallet(migrated_engine, 1_000)
    await set_limit(migrated_engine, key, 0, W.TOTAL)
    refusal = await place(migrated_engine, wallet_id, key, "z1", 1)
    assert refusal is not None and refusal.reason is R.KEY_LIMIT_REACHED
    assert await place(migrated_engine, wallet_id, key, "z0", 0) is None


async def test_a_batch_admits_exactly_what_the_requests_one_by_one_would(
    migrated_engine: AsyncEngine,
) -> None:
    """Two wallets, each with a limited and an unlimited key, the same requests one by one and
    as one batch: the same outcomes, the same sums."""
    results = []
    for run in ("single", "batch"):
        wallet_id, (capped, free) = await new_wallet(migrated_engine, 3_000)
        await set_limit(migrated_engine, capped, 1_000, W.WEEKLY)
        plan = [
            (capped, 400),
            (free, 500),
            (capped, 700),  # refused by the key: 400 + 700 > 1 000
            (free, 800),  # still admitted (the key's refusal took nothing of the wallet)
            (capped, 600),
            (free, 700),
            (free, 900),  # refused by the wallet: 400 + 500 + 800 + 600 + 700 = 3 000 already
            (capped, 1),  # refused by the key
        ]
        # As the sidecar sends them: only the capped key is known to be limited.
        requests = [
            hold_batches.HoldRequest(f"{run}-{i}", wallet_id, key, "m", amount, limited=key == capped)
            for i, (key, amount) in enumerate(plan)
        ]
        async with migrated_engine.begin() as conn:
            if run == "single":
                outcomes = [
                    await holds.place(
                        conn,
                        request_id=r.request_id,
                        wallet_id=r.wallet_id,
                        key_id=r.key_id,
                        model=r.model,
                        amount_nano=r.amount_nano,
                        ttl_s=TTL_S,
                        strict=True,
                        limited=r.limited,
                    )
                    for r in requests
                ]
            else:
                outcomes = await hold_batches.place_many(conn, requests, ttl_s=TTL_S, strict=True)
        results.append(
            (
                [None if o is None else o.reason for o in outcomes],
                await sums(migrated_engine, capped),
                await sums(migrated_engine, free),
            )
        )
    assert results[0] == results[1]
    assert results[0][0] == [
        None,
        None,
        R.KEY_LIMIT_REACHED,
        None,
        None,
        None,
        R.FUNDS_RESERVED,
        R.KEY_LIMIT_REACHED,
    ]
    assert results[0][1] == (0, 1_000)
    await clean(migrated_engine)


async def test_batched_settlements_move_the_key_as_single_ones(migrated_engine: AsyncEngine) -> None:
    wallet_id, (capped, free) = await new_wallet(migrated_engine, 100_000)
    await set_limit(migrated_engine, capped, 50_000, W.MONTHLY)
    for i in range(6):
        assert await place(migrated_engine, wallet_id, capped if i % 2 else free, f"s{i}", 5_000) is None
    async with migrated_engine.begin() as conn:
        outcomes = await hold_batches.settle_many(
            conn,
            [
                hold_batches.SettleRequest(f"s{i}", post(1_000 * i) if i < 5 else holds.Resolution.VOID)
                for i in range(6)
            ],
        )
    assert outcomes == [S.POSTED] * 5 + [S.VOIDED]
    assert await sums(migrated_engine, capped) == (1_000 + 3_000, 0)  # s1, s3 posted; s5 voided
    await clean(migrated_engine)


async def test_a_hold_placed_as_for_an_unlimited_key_counts_nowhere_and_the_sums_stay_exact(
    migrated_engine: AsyncEngine,
) -> None:
    """The sidecar's key cache may still say "no limit" for up to its TTL after a limit is set:
    such a hold takes the statement that never reads the key, and neither reserves on the key nor
    counts in its spend when settled."""
    wallet_id, (key, _) = await new_wallet(migrated_engine, 10_000)
    await set_limit(migrated_engine, key, 1_000, W.DAILY)
    async with migrated_engine.begin() as conn:
        stale = await holds.place(
            conn,
            request_id="s1",
            wallet_id=wallet_id,
            key_id=key,
            model="m",
            amount_nano=5_000,
            ttl_s=TTL_S,
            strict=True,
            limited=False,
        )
    assert stale is None
    assert await sums(migrated_engine, key) == (0, 0)
    assert await place(migrated_engine, wallet_id, key, "s2", 1_000) is None  # the limit, whole
    assert await settle(migrated_engine, "s1", post(5_000)) is S.POSTED
    assert await sums(migrated_engine, key) == (0, 1_000)
    await clean(migrated_engine)


# --- windows --------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [W.DAILY, W.WEEKLY, W.MONTHLY])
async def test_each_window_resets_at_its_calendar_boundary(migrated_engine: AsyncEngine, window: W) -> None:
    wallet_id, (key, _) = await new_wallet(migrated_engine, 100_000)
    await set_limit(migrated_engine, key, 1_000, window)
    assert await place(migrated_engine, wallet_id, key, "w1", 1_000) is None
    assert await settle(migrated_engine, "w1", post(700)) is S.POSTED
    assert await place(migrated_engine, wallet_id, key, "w2", 300) is None  # pending, across the boundary
    refusal = await place(migrated_engine, wallet_id, key, "w3", 1)
    assert refusal is not None and refusal.reason is R.KEY_LIMIT_REACHED

    await move_back_one_window(migrated_engine, key, window)
    limit = await limit_of(migrated_engine, key)
    # Read now, the window has rolled over: nothing spent yet, the pending hold still reserved.
    assert (limit.spent_nano, limit.reserved_nano) == (0, 300)
    assert limit.window_start == key_limits.calendar_start(window, dt.datetime.now(dt.UTC))
    assert await place(migrated_engine, wallet_id, key, "w4", 700) is None
    assert await sums(migrated_engine, key) == (0, 1_000)
    # The old window's hold is charged now: released here, counted in the window it was placed in.
    assert await settle(migrated_engine, "w2", post(300)) is S.POSTED
    assert await sums(migrated_engine, key) == (0, 700)
    assert await settle(migrated_engine, "w4", post(100)) is S.POSTED
    assert await sums(migrated_engine, key) == (100, 0)
    await clean(migrated_engine)


async def test_a_total_limit_never_resets(migrated_engine: AsyncEngine) -> None:
    wallet_id, (key, _) = await new_wallet(migrated_engine, 100_000)
    await set_limit(migrated_engine, key, 1_000, W.TOTAL)
    assert await place(migrated_engine, wallet_id, key, "t1", 1_000) is None
    assert await settle(migrated_engine, "t1", post(1_000)) is S.POSTED
    limit = await limit_of(migrated_engine, key)
    assert (limit.window_start, limit.resets_at, limit.spent_nano) == (key_limits.TOTAL_START, None, 1_000)
    refusal = await place(migrated_engine, wallet_id, key, "t2", 1)
    assert refusal is not None and refusal.reason is R.KEY_LIMIT_REACHED
    await clean(migrated_engine)


@pytest.mark.parametrize(
    ("at", "window"),
    [
        ("2026-12-31 23:59:59.999999+00", W.DAILY),
        ("2027-01-01 00:00:00+00", W.DAILY),
        ("2026-11-30 00:00:00+00", W.WEEKLY),  # a Monday
        ("2026-12-06 23:59:59+00", W.WEEKLY),  # a Sunday
        ("2026-12-31 23:59:59+00", W.MONTHLY),
        ("2027-01-01 00:00:00+00", W.MONTHLY),
        ("2024-02-29 12:00:00+00", W.MONTHLY),
        ("2026-12-02 12:00:00+05", W.DAILY),  # another time zone, the UTC day
        ("2026-12-02 12:00:00+00", W.TOTAL),
    ],
)
async def test_the_statements_calendar_is_the_pythons(
    migrated_engine: AsyncEngine, at: str, window: W
) -> None:
    sql = key_limits.calendar_sql("CAST(:window AS text)", "CAST(CAST(:at AS text) AS timestamptz)")
    async with migrated_engine.connect() as conn:
        # The session's time zone must not matter: the windows are UTC.
        await conn.execute(sa.text("SET TIME ZONE 'America/Los_Angeles'"))
        start, moment = (
            await conn.execute(
                sa.text(f"SELECT {sql}, CAST(CAST(:at AS text) AS timestamptz)"),
                {"window": window.value, "at": at},
            )
        ).one()
    assert start == key_limits.calendar_start(window, moment)


# --- expiry ---------------------------------------------------------------------------------------


async def test_a_hold_past_its_expiry_keeps_the_keys_reservation_until_charged_in_its_window(
    migrated_engine: AsyncEngine,
) -> None:
    wallet_id, (key, _) = await new_wallet(migrated_engine, 100_000)
    await set_limit(migrated_engine, key, 1_000, W.DAILY)
    for request_id in ("e1", "e2"):
        assert await place(migrated_engine, wallet_id, key, request_id, 400) is None
    async with migrated_engine.begin() as conn:
        await conn.execute(sa.text("UPDATE holds SET expires_at = now() - interval '1 minute'"))
        # Within the report grace: nothing charged, the key's reservation kept.
        assert await expiry.charge_unreported(conn, report_grace_s=3600) == 0
    assert await sums(migrated_engine, key) == (0, 800)
    refusal = await place(migrated_engine, wallet_id, key, "e3", 201)
    assert refusal is not None and refusal.reason is R.KEY_LIMIT_REACHED
    # A late report posts e1; the grace's sweep charges e2 its estimate: both count in the window.
    assert await settle(migrated_engine, "e1", post(100)) is S.POSTED_AFTER_EXPIRY
    assert await sums(migrated_engine, key) == (100, 400)
    async with migrated_engine.begin() as conn:
        assert await expiry.charge_unreported(conn, report_grace_s=30) == 1
    assert await sums(migrated_engine, key) == (500, 0)
    await clean(migrated_engine)


async def test_holds_an_earlier_version_expired_count_in_the_keys_window_without_a_second_release(
    migrated_engine: AsyncEngine,
) -> None:
    wallet_id, (key, _) = await new_wallet(migrated_engine, 100_000)
    await set_limit(migrated_engine, key, 1_000, W.DAILY)
    for request_id in ("e1", "e2"):
        assert await place(migrated_engine, wallet_id, key, request_id, 400) is None
    async with migrated_engine.begin() as conn:
        await conn.execute(sa.text("UPDATE holds SET expires_at = now() - interval '1 hour'"))
    assert await expire_as_before(migrated_engine) == 2
    assert await sums(migrated_engine, key) == (0, 0)
    assert await settle(migrated_engine, "e1", post(100)) is S.POSTED_AFTER_EXPIRY
    async with migrated_engine.begin() as conn:
        await conn.execute(
            sa.text("UPDATE holds SET resolved_at = now() - interval '1 day' WHERE request_id = 'e2'")
        )
    async with migrated_engine.begin() as conn:
        assert await expiry.charge_unreported(conn, report_grace_s=60) == 1
    assert await sums(migrated_engine, key) == (500, 0)
    await clean(migrated_engine)


# --- setting and clearing -------------------------------------------------------------------------


async def test_changing_a_limit_keeps_its_windows_count_and_clearing_keeps_the_sums_exact(
    migrated_engine: AsyncEngine,
) -> None:
    wallet_id, (key, _) = await new_wallet(migrated_engine, 100_000)
    await set_limit(migrated_engine, key, 1_000, W.MONTHLY)
    assert await place(migrated_engine, wallet_id, key, "c1", 600) is None
    assert await settle(migrated_engine, "c1", post(600)) is S.POSTED
    await set_limit(migrated_engine, key, 700, W.MONTHLY)  # lowered: the month's 600 still counts
    refusal = await place(migrated_engine, wallet_id, key, "c2", 101)
    assert refusal is not None and refusal.reason is R.KEY_LIMIT_REACHED
    assert await place(migrated_engine, wallet_id, key, "c3", 100) is None

    await set_limit(migrated_engine, key, None)  # cleared with c3 pending
    assert await place(migrated_engine, wallet_id, key, "c4", 50_000) is None
    assert await sums(migrated_engine, key) == (600, 100)  # c4 did not count
    assert await settle(migrated_engine, "c3", post(100)) is S.POSTED
    assert await settle(migrated_engine, "c4", post(50_000)) is S.POSTED
    assert await sums(migrated_engine, key) == (700, 0)
    await clean(migrated_engine)

    # A window that began no later than the count did keeps counting from there: the month's 700.
    await set_limit(migrated_engine, key, 1_000, W.TOTAL)
    assert (await limit_of(migrated_engine, key)).spent_nano == 700
    # One that began later (today, unless today is the 1st) cannot tell today's spend apart: from zero.
    await set_limit(migrated_engine, key, 1_000, W.DAILY)
    limit = await limit_of(migrated_engine, key)
    today = key_limits.calendar_start(W.DAILY, dt.datetime.now(dt.UTC))
    month = key_limits.calendar_start(W.MONTHLY, today)
    assert (limit.spent_nano, limit.window_start) == (700 if today == month else 0, today)
    assert await place(migrated_engine, wallet_id, key, "c5", 300) is None
    await clean(migrated_engine)


async def test_the_audit_finds_a_keys_sums_out_of_step(migrated_engine: AsyncEngine) -> None:
    wallet_id, (key, _) = await new_wallet(migrated_engine, 100_000)
    await set_limit(migrated_engine, key, 1_000, W.MONTHLY)
    assert await place(migrated_engine, wallet_id, key, "x1", 300) is None
    async with migrated_engine.begin() as conn:
        await conn.execute(sa.text("UPDATE api_keys SET spent_nano = 5 WHERE id = :k"), {"k": key})
    [finding] = (await audit.run(migrated_engine)).findings
    assert (finding.check, finding.subject) == (audit.Check.KEY_LIMITS, f"key {key}")
    assert finding.expected == "reserved 0.0000003 USD, spent 0.000000 USD (its holds)"


# --- concurrency ----------------------------------------------------------------------------------


async def test_concurrent_requests_on_one_limited_key_never_overrun_it(
    migrated_engine: AsyncEngine, migrated_pool: asyncpg.Pool
) -> None:
    """60 requests at once on one key, half through batches and half one by one, while the
    wallet's other key spends too and earlier holds settle: exactly as many as the limit allows."""
    wallet_id, (key, other) = await new_wallet(migrated_engine, 10_000_000)
    await set_limit(migrated_engine, key, 10 * 1_000, W.DAILY)
    for i in range(4):
        assert await place(migrated_pool, wallet_id, key, f"pre{i}", 1_000) is None

    async def one(i: int) -> bool:
        return await place(migrated_pool, wallet_id, key if i % 3 else other, f"c{i}", 1_000) is None

    async def batch(i: int) -> list[bool]:
        requests = [
            hold_batches.HoldRequest(f"b{i}-{j}", wallet_id, key if j % 2 else other, "m", 1_000)
            for j in range(6)
        ]
        async with database.acquire(migrated_pool) as conn, conn.transaction():
            outcomes = await hold_batches.place_many(conn, requests, ttl_s=TTL_S, strict=True)
        return [o is None for o, r in zip(outcomes, requests, strict=True) if r.key_id == key]

    async def settle_pre(i: int) -> None:
        async with database.acquire(migrated_pool) as conn:
            await holds.settle(conn, request_id=f"pre{i}", resolution=post(1_000))

    results = await asyncio.gather(
        *(one(i) for i in range(30)), *(batch(i) for i in range(5)), *(settle_pre(i) for i in range(4))
    )
    spent, reserved = await sums(migrated_engine, key)
    admitted_on_key = sum(r for i, r in enumerate(results[:30]) if i % 3) + sum(
        sum(r)
        for r in results[30:35]  # type: ignore[arg-type]
    )
    assert spent + reserved == 4_000 + 1_000 * admitted_on_key
    assert spent + reserved == 10_000  # 4 before + 6 of the 35 asked: never more, and no false refusal
    await clean(migrated_engine)
