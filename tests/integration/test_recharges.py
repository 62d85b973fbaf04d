"""billing.recharges against a real PostgreSQL: the conditional insert starts one recharge per
wallet however many sweeps race for it (tasks of one pool, two pools), the monthly cap holds and
a failure frees its share, N failures in a row pause the setting and a PUT resumes it, and
Stripe unreachable is retried with the same row (so the same key) without counting."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from billing import alerts, audit, database, ledger, money, payments, recharges, wallets

pytestmark = pytest.mark.integration

USD = money.NANO_PER_USD
SETTING = recharges.Setting(threshold_nano=2 * USD, amount_nano=10 * USD, monthly_cap_nano=None)


async def new_wallet(engine: AsyncEngine, grant_nano: int = USD // 2) -> str:
    async with engine.begin() as conn:
        owner = await wallets.signup(
            conn, email=f"r-{uuid.uuid4().hex[:10]}@example.com", grant_nano=grant_nano
        )
    return owner.wallet.id


async def with_card(engine: AsyncEngine, wallet_id: str, setting: recharges.Setting = SETTING) -> None:
    """Auto-recharge on, with a card saved through a (recorded) setup session."""
    session = f"cs_test_{uuid.uuid4().hex}"
    async with engine.begin() as conn:
        await recharges.put_setting(conn, wallet_id, setting)
        customer = await recharges.record_customer(conn, wallet_id, f"cus_{wallet_id}")
        await recharges.record_setup_session(conn, session_id=session, wallet_id=wallet_id, customer=customer)
        assert await recharges.save_card(conn, session, payment_method="pm_x", brand="visa", last4="4242")
        assert not await recharges.save_card(conn, session, payment_method="pm_y", brand="visa", last4="0002")


async def start(engine: AsyncEngine, now: dt.datetime | None = None) -> list[recharges.Recharge]:
    async with database.acquire(engine) as conn:
        return await recharges.start_due(conn, now=now)


async def move(engine: AsyncEngine, wallet_id: str, nano: int) -> None:
    async with engine.begin() as conn:
        await ledger.post_entry(
            conn,
            wallet_id=wallet_id,
            kind="credit" if nano > 0 else "adjustment",
            amount_nano=nano,
            idempotency_key=f"test:{uuid.uuid4().hex}",
        )


async def status(engine: AsyncEngine, wallet_id: str) -> recharges.Status:
    async with engine.connect() as conn:
        found = await recharges.status(conn, wallet_id)
    assert found is not None
    return found


async def succeed(engine: AsyncEngine, recharge: recharges.Recharge) -> None:
    async with engine.begin() as conn:
        assert await recharges.record_succeeded(conn, recharge, f"pi_{uuid.uuid4().hex}")


async def fail(engine: AsyncEngine, recharge: recharges.Recharge, failures_max: int = 3) -> recharges.Failure:
    async with engine.begin() as conn:
        failure = await recharges.record_failure(
            conn,
            recharge,
            code="card_declined",
            message="declined",
            payment_intent=None,
            failures_max=failures_max,
        )
    assert failure is not None
    return failure


async def test_a_wallet_below_its_threshold_gets_one_recharge_and_no_second_while_in_flight(
    migrated_engine: AsyncEngine,
) -> None:
    wallet = await new_wallet(migrated_engine)
    assert await start(migrated_engine) == [], "no setting: nothing"
    await with_card(migrated_engine, wallet)
    (first,) = await start(migrated_engine)
    assert (first.wallet_id, first.seq, first.amount_nano, first.state) == (wallet, 1, 10 * USD, "creating")
    assert (first.customer, first.payment_method) == (f"cus_{wallet}", "pm_x")
    assert recharges.idempotency_key(wallet, 1) == f"recharge:{wallet}:1"
    assert await start(migrated_engine) == [], "one in flight"
    async with migrated_engine.begin() as conn:
        assert await recharges.record_created(conn, first, "pi_1")
        assert not await recharges.record_created(conn, first, "pi_1")
    assert await start(migrated_engine) == [], "pending is in flight too"
    await succeed(migrated_engine, first)
    assert [r.seq for r in await start(migrated_engine)] == [2], "still below: the next one"


async def test_a_wallet_above_its_threshold_or_off_or_without_a_card_gets_none(
    migrated_engine: AsyncEngine,
) -> None:
    above = await new_wallet(migrated_engine, grant_nano=3 * USD)
    await with_card(migrated_engine, above)
    no_card = await new_wallet(migrated_engine)
    async with migrated_engine.begin() as conn:
        await recharges.put_setting(conn, no_card, SETTING)
    off = await new_wallet(migrated_engine)
    await with_card(migrated_engine, off)
    async with migrated_engine.begin() as conn:
        assert await recharges.disable(conn, off)
        assert not await recharges.disable(conn, off)
    held = await new_wallet(migrated_engine)
    await with_card(migrated_engine, held)
    for flag in ("suspended", "disputed"):
        async with migrated_engine.begin() as conn:
            await conn.execute(sa.text(f"UPDATE wallets SET {flag} = true WHERE id = :w"), {"w": held})
        assert await start(migrated_engine) == [], f"{flag}: its card is not charged"
        async with migrated_engine.begin() as conn:
            await conn.execute(sa.text(f"UPDATE wallets SET {flag} = false WHERE id = :w"), {"w": held})
    (started,) = await start(migrated_engine)
    assert started.wallet_id == held
    assert await start(migrated_engine) == []
    # Reserved money is not available: holds count against the threshold.
    await move(migrated_engine, above, -USD - 1)
    (started,) = await start(migrated_engine)
    assert started.wallet_id == above


@pytest.mark.parametrize("racers", [2, 20])
async def test_sweeps_racing_on_one_pool_start_one_recharge(migrated_url: str, racers: int) -> None:
    pool = await database.create_pool(migrated_url, size=racers)
    engine = database.create_engine(migrated_url, pool_size=2)
    try:
        wallets_ = [await new_wallet(engine) for _ in range(3)]
        for wallet in wallets_:
            await with_card(engine, wallet)

        async def sweep() -> list[recharges.Recharge]:
            async with database.acquire(pool) as conn:
                return await recharges.start_due(conn)

        started = [r for batch in await asyncio.gather(*(sweep() for _ in range(racers))) for r in batch]
        assert sorted((r.wallet_id, r.seq) for r in started) == sorted((w, 1) for w in wallets_)
        for wallet in wallets_:
            assert (await status(engine, wallet)).last.seq == 1  # type: ignore[union-attr]
    finally:
        await pool.close()
        await engine.dispose()


async def test_two_pools_racing_many_rounds_never_have_two_in_flight(migrated_url: str) -> None:
    """Two sidecars' pools sweep together while each recharge completes at once: every round
    starts at most one per wallet, and the seqs are 1, 2, 3 … without a gap or a repeat."""
    pools = [await database.create_pool(migrated_url, size=4) for _ in range(2)]
    engine = database.create_engine(migrated_url, pool_size=2)
    try:
        wallet = await new_wallet(engine)
        await with_card(engine, wallet)
        seqs: list[int] = []
        for _ in range(10):

            async def sweep(pool: asyncpg.Pool) -> list[recharges.Recharge]:
                async with database.acquire(pool) as conn:
                    return await recharges.start_due(conn)

            started = [r for batch in await asyncio.gather(*(sweep(p) for p in pools * 3)) for r in batch]
            assert len(started) == 1
            seqs.append(started[0].seq)
            await fail(engine, started[0], failures_max=100)
        assert seqs == list(range(1, 11))
    finally:
        for pool in pools:
            await pool.close()
        await engine.dispose()


async def test_the_monthly_cap_holds_and_a_failure_frees_its_share(migrated_engine: AsyncEngine) -> None:
    wallet = await new_wallet(migrated_engine)
    await with_card(migrated_engine, wallet, recharges.Setting(2 * USD, 10 * USD, 25 * USD))
    june = dt.datetime(2026, 6, 10, tzinfo=dt.UTC)
    (first,) = await start(migrated_engine, june)
    await succeed(migrated_engine, first)
    (second,) = await start(migrated_engine, june)
    await succeed(migrated_engine, second)
    assert await start(migrated_engine, june) == [], "20 + 10 > 25"
    assert await start(migrated_engine, dt.datetime(2026, 6, 30, 23, 59, tzinfo=dt.UTC)) == []
    # A new calendar month (UTC) has room again.
    (third,) = await start(migrated_engine, dt.datetime(2026, 7, 1, tzinfo=dt.UTC))
    await fail(migrated_engine, third)
    # The failed one frees its share: July has room for one more, and then none.
    (fourth,) = await start(migrated_engine, dt.datetime(2026, 7, 2, tzinfo=dt.UTC))
    await succeed(migrated_engine, fourth)
    (fifth,) = await start(migrated_engine, dt.datetime(2026, 7, 3, tzinfo=dt.UTC))
    await succeed(migrated_engine, fifth)
    assert await start(migrated_engine, dt.datetime(2026, 7, 31, tzinfo=dt.UTC)) == []


async def test_the_cap_holds_under_racing_sweeps(migrated_url: str) -> None:
    pool = await database.create_pool(migrated_url, size=10)
    engine = database.create_engine(migrated_url, pool_size=2)
    try:
        wallet = await new_wallet(engine)
        await with_card(engine, wallet, recharges.Setting(2 * USD, 10 * USD, 30 * USD))
        total = 0
        for _ in range(6):

            async def sweep() -> list[recharges.Recharge]:
                async with database.acquire(pool) as conn:
                    return await recharges.start_due(conn)

            for batch in await asyncio.gather(*(sweep() for _ in range(10))):
                for r in batch:
                    total += r.amount_nano
                    await succeed(engine, r)
        assert total == 30 * USD
        assert (await status(engine, wallet)).month_total_nano == 30 * USD
    finally:
        await pool.close()
        await engine.dispose()


async def test_failures_in_a_row_pause_it_with_alerts_until_a_put(migrated_engine: AsyncEngine) -> None:
    wallet = await new_wallet(migrated_engine)
    await with_card(migrated_engine, wallet)
    async with migrated_engine.begin() as conn:
        await alerts.register(
            conn, wallet, url="https://example.com/hook", thresholds_nano=None, rotate_secret=False
        )
    (first,) = await start(migrated_engine)
    assert await fail(migrated_engine, first) == recharges.Failure(1, paused=False)
    async with migrated_engine.begin() as conn:
        again = await recharges.record_failure(
            conn, first, code="card_declined", message="", payment_intent=None, failures_max=3
        )
    assert again is None, "recorded once, whichever path comes second"
    (second,) = await start(migrated_engine)
    await succeed(migrated_engine, second)
    assert (await status(migrated_engine, wallet)).consecutive_failures == 0, (
        "a success starts the count again"
    )
    for expected in (1, 2, 3):
        (r,) = await start(migrated_engine)
        assert await fail(migrated_engine, r) == recharges.Failure(expected, paused=expected == 3)
    paused = await status(migrated_engine, wallet)
    assert paused.paused_reason is not None and "card_declined" in paused.paused_reason
    assert await start(migrated_engine) == [], "paused"

    async with migrated_engine.connect() as conn:
        events = await alerts.recent_events(conn, wallet, limit=100)
    kinds = sorted(e.type for e in events)
    assert kinds == sorted(
        [alerts.EventType.RECHARGE_FAILED] * 4
        + [alerts.EventType.RECHARGE_PAUSED, alerts.EventType.RECHARGE_SUCCEEDED]
    )
    (paused_event,) = [e for e in events if e.type == alerts.EventType.RECHARGE_PAUSED]
    assert paused_event.id == alerts.event_id_for(
        alerts.EventType.RECHARGE_PAUSED, recharges.occurrence(wallet, 5)
    )

    async with migrated_engine.begin() as conn:
        await recharges.put_setting(conn, wallet, SETTING)
    resumed = await status(migrated_engine, wallet)
    assert (resumed.paused_reason, resumed.consecutive_failures, resumed.enabled) == (None, 0, True)
    assert [r.seq for r in await start(migrated_engine)] == [6]


async def test_stripe_unreachable_retries_the_same_row_later_and_does_not_count(
    migrated_engine: AsyncEngine,
) -> None:
    wallet = await new_wallet(migrated_engine)
    await with_card(migrated_engine, wallet)
    (first,) = await start(migrated_engine)
    async with database.acquire(migrated_engine) as conn:
        assert await recharges.claim_retries(conn) == [], "leased to its starter"
        assert await recharges.record_unreachable(conn, first, "APIConnectionError", retry_base_ms=10)

    async def due() -> list[recharges.Recharge]:
        async with database.acquire(migrated_engine) as conn:
            return await recharges.claim_retries(conn)

    retried: list[recharges.Recharge] = []
    async with asyncio.timeout(10):
        while not retried:
            retried = await due()
    (again,) = retried
    assert (again.wallet_id, again.seq, again.attempts, again.state) == (wallet, 1, 2, "creating")
    assert await due() == [], "leased again"
    assert (await status(migrated_engine, wallet)).consecutive_failures == 0
    assert await start(migrated_engine) == [], "still in flight"


async def test_a_recharge_unreachable_for_too_long_is_given_up_uncounted(
    migrated_engine: AsyncEngine,
) -> None:
    wallet = await new_wallet(migrated_engine)
    await with_card(migrated_engine, wallet)
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=recharges.RETRY_FOR_S + 60)
    (first,) = await start(migrated_engine, long_ago)
    async with database.acquire(migrated_engine) as conn:
        assert not await recharges.record_unreachable(conn, first, "APIConnectionError", retry_base_ms=10)
    now = await status(migrated_engine, wallet)
    assert now.last is not None and (now.last.state, now.last.failure_code) == (
        "failed",
        "stripe_unreachable",
    )
    assert now.consecutive_failures == 0
    # A succeeded PaymentIntent for it after all is still recorded as paid.
    async with migrated_engine.begin() as conn:
        assert await recharges.record_succeeded(conn, first, "pi_late")
        assert not await recharges.record_succeeded(conn, first, "pi_late")
    assert (await status(migrated_engine, wallet)).last.state == "succeeded"  # type: ignore[union-attr]


async def recharge_findings(engine: AsyncEngine) -> list[tuple[str | None, str]]:
    report = await audit.run(engine)
    return sorted((f.wallet_id, f.subject) for f in report.findings if f.check is audit.Check.RECHARGES)


async def test_the_audit_finds_a_recharge_uncredited_two_in_flight_and_a_month_over_its_cap(
    migrated_engine: AsyncEngine,
) -> None:
    wallet = await new_wallet(migrated_engine)
    await with_card(migrated_engine, wallet, recharges.Setting(2 * USD, 10 * USD, 20 * USD))
    (first,) = await start(migrated_engine)
    # Credited by its webhook, as the sidecar does it: clean.
    intent = {
        "id": "pi_audit_1",
        "object": "payment_intent",
        "amount": 1000,
        "currency": "usd",
        "customer": first.customer,
        "status": "succeeded",
        "metadata": {"wallet_id": wallet, "recharge_seq": "1"},
    }
    event = {
        "id": "evt_audit_1",
        "type": "payment_intent.succeeded",
        "created": 1,
        "data": {"object": intent},
    }
    async with migrated_engine.begin() as conn:
        assert (await payments.process_event(conn, event)).outcome == "credited"
    async with migrated_engine.begin() as conn:
        replay = await payments.process_event(conn, {**event, "id": "evt_audit_2"})
    assert replay.outcome == "already_credited"
    assert await recharge_findings(migrated_engine) == []
    assert (await audit.run(migrated_engine)).clean

    await move(migrated_engine, wallet, -10 * USD)
    (second,) = await start(migrated_engine)
    await succeed(migrated_engine, second)  # recorded succeeded, never credited
    assert await recharge_findings(migrated_engine) == [(wallet, "recharge 2")]

    async with migrated_engine.begin() as conn:
        await conn.execute(sa.text("DROP INDEX recharges_one_in_flight"))
        for seq in (3, 4):
            await conn.execute(
                sa.text(
                    "INSERT INTO recharges (wallet_id, seq, amount_nano, monthly_cap_nano, customer, "
                    "payment_method) VALUES (:w, :s, :a, :c, 'cus', 'pm')"
                ),
                {"w": wallet, "s": seq, "a": 10 * USD, "c": 20 * USD},
            )
    assert await recharge_findings(migrated_engine) == [
        (wallet, "recharge 2"),
        (wallet, "recharge 3"),
        (wallet, "recharge 4"),
        (wallet, f"wallet {wallet}"),
    ]
