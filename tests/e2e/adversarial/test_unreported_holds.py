"""An attacker with one cheap key against the bounds of the holds, at the SQL level.

Two ways to bend the books without forging a byte:

1. *Spend a lost report's reservation twice.* A hold whose report never comes is charged its
   estimate only after the report grace (docs/decisions/0030-unreported-holds.md). Were its
   reservation released at its TTL, the wallet could spend that money again in between, and the
   charge — or the exact cost of a report arriving late — would then take the wallet below
   −(its overdraft limit), below $0 for a free wallet, and a capped key past its limit. So an
   unreported hold keeps its reservation until it is resolved; many concurrent Checks after the
   TTL find it still reserved, and the books end exact.
2. *A Check that outlives Envoy's patience.* Envoy waits a bounded time for the Check, then
   answers 503 with no metadata and logs that. If the hold commits after Envoy gave up and after
   the report of that 503, the report's void finds nothing and the hold would later be charged
   its estimate for a request never served. The refusal's report wins whatever the order: it
   leaves a void in the request id's place, which the Check's insert meets.
"""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from support.waiting import wait_until

from authz_sidecar.access_log import Settler, finished_request_from_json
from billing import audit, database, expiry, hold_batches, holds, key_limits, pricing, wallets

GRANT_NANO = 10_000_000  # a free wallet's $0.01
MODEL = "gpt-4o-mini"
CHECKS = 40  # the attacker's concurrent Checks after the TTL
HOUR_S = 3600
PRICES = pricing.load(None, Decimal(0))
LOCK_WAIT_S = 10.0


@pytest.fixture
def engine(migrated_engine: AsyncEngine) -> AsyncEngine:
    return migrated_engine


@pytest.fixture
def pool(migrated_pool: asyncpg.Pool) -> asyncpg.Pool:
    return migrated_pool


async def signup(engine: AsyncEngine, email: str, grant_nano: int = GRANT_NANO) -> tuple[str, str]:
    async with engine.begin() as conn:
        owner = await wallets.signup(conn, email=email, grant_nano=grant_nano)
    return owner.wallet.id, owner.key.key_id


async def place(
    pool: asyncpg.Pool, owner: tuple[str, str], request_id: str, amount_nano: int, *, ttl_s: int = 600
) -> holds.Refusal | None:
    async with database.acquire(pool) as conn:
        return await holds.place(
            conn,
            request_id=request_id,
            wallet_id=owner[0],
            key_id=owner[1],
            model=MODEL,
            amount_nano=amount_nano,
            ttl_s=ttl_s,
            strict=False,
        )


async def post(
    pool: asyncpg.Pool, owner: tuple[str, str], request_id: str, cost_nano: int
) -> holds.Settlement:
    async with database.acquire(pool) as conn:
        return await holds.settle(
            conn,
            request_id=request_id,
            resolution=holds.Resolution.post(cost_nano),
            wallet_id=owner[0],
            model=MODEL,
        )


async def fetchrow(pool: asyncpg.Pool, sql: str, *args: object) -> asyncpg.Record:
    async with database.acquire(pool) as conn:
        row = await conn.fetchrow(sql, *args)
    assert row is not None
    return row


async def assert_books_clean(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        report = await audit.check(conn, report_grace_s=HOUR_S)
    assert report.clean, "\n".join(map(str, report.findings))


async def lose_a_report(pool: asyncpg.Pool, owner: tuple[str, str], amount_nano: int) -> None:
    """A request admitted for ``amount_nano`` whose report never comes, swept past its TTL."""
    assert await place(pool, owner, "lost-report", amount_nano, ttl_s=0) is None
    async with database.acquire(pool) as conn:
        assert await expiry.sweep(conn, report_grace_s=HOUR_S) == expiry.Sweep(charged=0)


async def attack(pool: asyncpg.Pool, owner: tuple[str, str], amount_nano: int) -> list[holds.Refusal | None]:
    """CHECKS concurrent Checks of ``amount_nano``; each admitted one is served and reports its
    full cost (the attacker spends all it is let)."""
    outcomes = await asyncio.gather(*(place(pool, owner, f"attack-{n}", amount_nano) for n in range(CHECKS)))
    for n, refusal in enumerate(outcomes):
        if refusal is None:
            assert await post(pool, owner, f"attack-{n}", amount_nano) is holds.Settlement.POSTED
    return list(outcomes)


async def resolve_the_lost_hold(
    pool: asyncpg.Pool, owner: tuple[str, str], how: str, amount_nano: int
) -> None:
    """The lost request's charge: its estimate after the grace, or its exact cost reported late."""
    if how == "estimate":
        async with database.acquire(pool) as conn:
            assert await expiry.sweep(conn, report_grace_s=0) == expiry.Sweep(charged=1)
    else:
        assert await post(pool, owner, "lost-report", amount_nano - 1) is holds.Settlement.POSTED_AFTER_EXPIRY


@pytest.mark.parametrize("how", ["estimate", "late_report"])
@pytest.mark.parametrize("overdraft_nano", [0, GRANT_NANO // 2])
async def test_a_lost_reports_reservation_cannot_be_spent_again(
    engine: AsyncEngine, pool: asyncpg.Pool, how: str, overdraft_nano: int
) -> None:
    owner = await signup(engine, f"lost-{how}-{overdraft_nano}@example.com")
    async with engine.begin() as conn:
        await wallets.set_overdraft_limit(conn, owner[0], overdraft_nano)
    spendable = GRANT_NANO + overdraft_nano
    await lose_a_report(pool, owner, spendable)

    outcomes = await attack(pool, owner, spendable // 10)
    await resolve_the_lost_hold(pool, owner, how, spendable)

    lowest = await fetchrow(
        pool, "SELECT min(balance_after_nano) AS lowest FROM ledger_entries WHERE wallet_id = $1", owner[0]
    )
    assert lowest["lowest"] >= -overdraft_nano
    wallet = await fetchrow(pool, "SELECT balance_nano, reserved_nano FROM wallets WHERE id = $1", owner[0])
    charged = spendable if how == "estimate" else spendable - 1
    assert (wallet["balance_nano"], wallet["reserved_nano"]) == (GRANT_NANO - charged, 0)
    # Every Check after the TTL met the lost hold's reservation still standing.
    assert [refusal and refusal.reason for refusal in outcomes] == [
        holds.RefusalReason.FUNDS_RESERVED
    ] * CHECKS
    await assert_books_clean(engine)


@pytest.mark.parametrize("how", ["estimate", "late_report"])
async def test_a_lost_reports_reservation_cannot_be_spent_again_under_a_key_limit(
    engine: AsyncEngine, pool: asyncpg.Pool, how: str
) -> None:
    # Money enough in the wallet: only the key's limit bounds this key.
    owner = await signup(engine, f"capped-{how}@example.com", grant_nano=100 * GRANT_NANO)
    async with engine.begin() as conn:
        await key_limits.set_limit(conn, owner[1], GRANT_NANO, key_limits.Window.TOTAL)
    await lose_a_report(pool, owner, GRANT_NANO)

    outcomes = await attack(pool, owner, GRANT_NANO // 10)
    await resolve_the_lost_hold(pool, owner, how, GRANT_NANO)

    key = await fetchrow(
        pool, "SELECT limit_nano, spent_nano, reserved_nano FROM api_keys WHERE id = $1", owner[1]
    )
    assert key["spent_nano"] <= key["limit_nano"]
    charged = GRANT_NANO if how == "estimate" else GRANT_NANO - 1
    assert (key["spent_nano"], key["reserved_nano"]) == (charged, 0)
    assert [refusal and refusal.reason for refusal in outcomes] == [
        holds.RefusalReason.KEY_LIMIT_REACHED
    ] * CHECKS
    await assert_books_clean(engine)


async def test_the_lost_hold_is_resolved_once_however_its_charges_race(
    engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    """The estimate's charge from several sweeps and the late report at once: one charge, and
    the attacker's Checks in the same moment see the reservation until that charge commits."""
    owner = await signup(engine, "lost-race@example.com")
    await lose_a_report(pool, owner, GRANT_NANO)

    async def sweep() -> int:
        async with database.acquire(pool) as conn:
            return (await expiry.sweep(conn, report_grace_s=0)).charged

    results = await asyncio.gather(
        *(sweep() for _ in range(4)),
        post(pool, owner, "lost-report", GRANT_NANO - 1),
        *(place(pool, owner, f"racing-{n}", GRANT_NANO // 10) for n in range(CHECKS)),
    )
    sweeps, late, checks = results[:4], results[4], results[5:]
    assert sum(sweeps) + (late is holds.Settlement.POSTED_AFTER_EXPIRY) == 1
    for n, refusal in enumerate(checks):
        if refusal is None:
            assert await post(pool, owner, f"racing-{n}", GRANT_NANO // 10) is holds.Settlement.POSTED
    wallet = await fetchrow(pool, "SELECT balance_nano, reserved_nano FROM wallets WHERE id = $1", owner[0])
    assert wallet["reserved_nano"] == 0
    assert wallet["balance_nano"] >= 0
    await assert_books_clean(engine)


# --- 2. the Check that commits after Envoy gave up -------------------------------------------------


def check_failed(request_id: str) -> dict[str, object]:
    """The JSON access-log line of a request Envoy answered 503 because its Check did not answer
    in time: no authz metadata, no upstream."""
    return {"request_id": request_id, "status": 503, "upstream": None}


async def report(pool: asyncpg.Pool, *request_ids: str) -> list[holds.Settlement]:
    finished = [finished_request_from_json(check_failed(request_id)) for request_id in request_ids]
    assert all(done is not None for done in finished)
    return await Settler(pool, PRICES).settle([done for done in finished if done is not None])


async def assert_nothing_held_or_charged(
    engine: AsyncEngine, pool: asyncpg.Pool, owner: tuple[str, str]
) -> None:
    """The wallet as granted, nothing reserved, no hold left to charge, even after the grace."""
    async with database.acquire(pool) as conn:
        await expiry.sweep(conn, report_grace_s=0)
    wallet = await fetchrow(pool, "SELECT balance_nano, reserved_nano FROM wallets WHERE id = $1", owner[0])
    assert (wallet["balance_nano"], wallet["reserved_nano"]) == (GRANT_NANO, 0)
    unresolved = await fetchrow(
        pool, "SELECT count(*) AS n FROM holds WHERE state IN ('pending', 'expired', 'posted')"
    )
    assert unresolved["n"] == 0
    await assert_books_clean(engine)


async def test_the_refusals_report_first_then_the_late_check(engine: AsyncEngine, pool: asyncpg.Pool) -> None:
    owner = await signup(engine, "report-first@example.com")
    assert await report(pool, "late-check") == [holds.Settlement.VOIDED_BEFORE_HOLD]
    refusal = await place(pool, owner, "late-check", GRANT_NANO // 10)
    assert refusal is not None and refusal.reason is holds.RefusalReason.DUPLICATE_REQUEST
    # Delivered again (the gRPC log and the file both report it): still nothing to do.
    assert await report(pool, "late-check") == [holds.Settlement.ALREADY_VOIDED]
    await assert_nothing_held_or_charged(engine, pool, owner)


async def test_the_check_first_then_the_refusals_report(engine: AsyncEngine, pool: asyncpg.Pool) -> None:
    owner = await signup(engine, "check-first@example.com")
    assert await place(pool, owner, "slow-check", GRANT_NANO // 10) is None
    assert await report(pool, "slow-check") == [holds.Settlement.VOIDED]
    await assert_nothing_held_or_charged(engine, pool, owner)


async def lock_waiters(pool: asyncpg.Pool) -> int:
    row = await fetchrow(
        pool,
        "SELECT count(*) AS n FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    return int(row["n"])


@pytest.mark.parametrize("check_commits", [True, False])
async def test_the_refusals_report_while_the_checks_insert_is_in_flight(
    engine: AsyncEngine, pool: asyncpg.Pool, migrated_url: str, check_commits: bool
) -> None:
    """The report arrives while the Check's hold is inserted and not yet committed: it waits for
    that insert and then voids the hold (committed) or takes the id (rolled back)."""
    owner = await signup(engine, f"in-flight-{check_commits}@example.com")
    check_conn = await asyncpg.connect(database.driver_url(migrated_url))
    try:
        transaction = check_conn.transaction()
        await transaction.start()
        assert (
            await holds.place(
                check_conn,
                request_id="in-flight",
                wallet_id=owner[0],
                key_id=owner[1],
                model=MODEL,
                amount_nano=GRANT_NANO // 10,
                ttl_s=600,
                strict=False,
            )
            is None
        )
        reported = asyncio.create_task(report(pool, "in-flight"))
        await wait_until(lambda: lock_waiters(pool), LOCK_WAIT_S, "the report to wait for the Check's insert")
        if check_commits:
            await transaction.commit()
        else:
            await transaction.rollback()
        outcome = await reported
    finally:
        await check_conn.close()
    assert outcome == [holds.Settlement.VOIDED if check_commits else holds.Settlement.VOIDED_BEFORE_HOLD]
    refusal = await place(pool, owner, "in-flight", GRANT_NANO // 10)
    assert refusal is not None and refusal.reason is holds.RefusalReason.DUPLICATE_REQUEST
    await assert_nothing_held_or_charged(engine, pool, owner)


@pytest.mark.parametrize("batch", [1, hold_batches.SET_BATCH_MIN - 1, 16])
async def test_refusals_reports_and_late_checks_race_in_any_order(
    engine: AsyncEngine, pool: asyncpg.Pool, batch: int
) -> None:
    """Many timed-out Checks and their refusals' reports, in batches as the sidecar groups them,
    in a random order and at once: not one hold survives, and no money moves."""
    owner = await signup(engine, f"race-{batch}@example.com", grant_nano=GRANT_NANO)
    ids = [f"timed-out-{batch}-{n}" for n in range(64)]
    rng = random.Random(batch)

    async def checks(chunk: list[str]) -> None:
        async with database.acquire(pool) as conn:
            await hold_batches.place_many(
                conn,
                [
                    hold_batches.HoldRequest(rid, owner[0], owner[1], MODEL, GRANT_NANO // 100)
                    for rid in chunk
                ],
                ttl_s=600,
                strict=False,
            )

    def chunks(order: list[str]) -> list[list[str]]:
        return [order[n : n + batch] for n in range(0, len(order), batch)]

    check_order, report_order = rng.sample(ids, len(ids)), rng.sample(ids, len(ids))
    await asyncio.gather(
        *(checks(chunk) for chunk in chunks(check_order)),
        *(report(pool, *chunk) for chunk in chunks(report_order)),
    )
    states = await fetchrow(
        pool,
        "SELECT array_agg(DISTINCT state) AS states, count(*) AS n FROM holds WHERE request_id = ANY($1)",
        ids,
    )
    assert (states["states"], states["n"]) == (["voided"], len(ids))
    async with engine.connect() as conn:
        voids = (
            await conn.execute(sa.text("SELECT count(*) FROM ledger_entries WHERE kind = 'usage'"))
        ).scalar_one()
    assert voids == 0
    await assert_nothing_held_or_charged(engine, pool, owner)


async def test_a_refusals_report_settles_beside_other_reports_in_one_batch(
    engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    """The access log's worker settles whatever arrived together: a refusal's report (no hold
    yet), another whose hold exists, and an ordinary failed request, each as alone."""
    owner = await signup(engine, "mixed-batch@example.com")
    assert await place(pool, owner, "held-then-refused", GRANT_NANO // 10) is None
    assert await place(pool, owner, "backend-failed", GRANT_NANO // 10) is None
    backend_failed = finished_request_from_json(
        {
            "request_id": "backend-failed",
            "status": 500,
            "upstream": "10.0.0.1:80",
            "authz": {
                "x-billingproxy-hold-id": "backend-failed",
                "x-billingproxy-wallet-id": owner[0],
                "x-billingproxy-key-id": owner[1],
                "x-billingproxy-model": MODEL,
            },
        }
    )
    refusals = [finished_request_from_json(check_failed(rid)) for rid in ("no-hold-yet", "held-then-refused")]
    batch = [done for done in (refusals[0], backend_failed, refusals[1]) if done is not None]
    assert len(batch) == 3
    assert await Settler(pool, PRICES).settle(batch) == [
        holds.Settlement.VOIDED_BEFORE_HOLD,
        holds.Settlement.VOIDED,
        holds.Settlement.VOIDED,
    ]
    refusal = await place(pool, owner, "no-hold-yet", GRANT_NANO // 10)
    assert refusal is not None and refusal.reason is holds.RefusalReason.DUPLICATE_REQUEST
    await assert_nothing_held_or_charged(engine, pool, owner)
