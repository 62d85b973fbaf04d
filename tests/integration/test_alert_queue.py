"""billing.alerts against a real PostgreSQL: one event per crossing, re-armed by a rise, the
defaults follow the last top-up, concurrent sweeps make one event, and the delivery queue leases,
backs off and gives up as documented."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from billing import alerts, database, ledger, money, wallets

pytestmark = pytest.mark.integration

USD = money.NANO_PER_USD
GRANT_NANO = USD // 2


async def new_wallet(engine: AsyncEngine) -> str:
    async with engine.begin() as conn:
        owner = await wallets.signup(
            conn, email=f"a-{uuid.uuid4().hex[:10]}@example.com", grant_nano=GRANT_NANO
        )
    return owner.wallet.id


async def move(engine: AsyncEngine, wallet_id: str, nano: int) -> None:
    """Change the balance as an operator's credit (up) or adjustment (down) would."""
    async with engine.begin() as conn:
        await ledger.post_entry(
            conn,
            wallet_id=wallet_id,
            kind="credit" if nano > 0 else "adjustment",
            amount_nano=nano,
            idempotency_key=f"test:{uuid.uuid4().hex}",
        )


async def register(engine: AsyncEngine, wallet_id: str, thresholds: list[int] | None) -> str | None:
    async with engine.begin() as conn:
        _, secret = await alerts.register(
            conn, wallet_id, url="https://example.com/hook", thresholds_nano=thresholds, rotate_secret=False
        )
    return secret


async def sweep(engine: AsyncEngine) -> int:
    async with engine.begin() as conn:
        return await alerts.sweep(conn)


async def events(engine: AsyncEngine, wallet_id: str) -> list[tuple[str, int | None]]:
    async with engine.connect() as conn:
        recent = await alerts.recent_events(conn, wallet_id, limit=100)
    return sorted((e.type, e.threshold_nano) for e in recent)


async def test_one_event_per_crossing_and_a_rise_rearms(migrated_engine: AsyncEngine) -> None:
    wallet = await new_wallet(migrated_engine)
    secret = await register(migrated_engine, wallet, [USD // 4])
    assert secret is not None and secret.startswith("whsec_")
    assert await register(migrated_engine, wallet, [USD // 4]) is None, "the secret is shown once"

    await move(migrated_engine, wallet, -USD // 8)  # 0.375: above
    assert await sweep(migrated_engine) == 0
    await move(migrated_engine, wallet, -USD // 8)  # 0.25: at the threshold counts as crossed
    assert await sweep(migrated_engine) == 1
    await move(migrated_engine, wallet, -USD // 16)  # still below: no second event
    assert await sweep(migrated_engine) == 0
    assert await sweep(migrated_engine) == 0
    await move(migrated_engine, wallet, USD)  # re-armed
    assert await sweep(migrated_engine) == 0
    await move(migrated_engine, wallet, -USD)
    assert await sweep(migrated_engine) == 1
    assert await events(migrated_engine, wallet) == [("wallet.balance_low", USD // 4)] * 2


async def test_the_defaults_follow_the_last_top_up_and_zero(migrated_engine: AsyncEngine) -> None:
    wallet = await new_wallet(migrated_engine)  # $0.50, no top-up: the low default is $1
    await register(migrated_engine, wallet, None)
    async with migrated_engine.connect() as conn:
        endpoint = await alerts.endpoint(conn, wallet)
    assert endpoint is not None and endpoint.effective_thresholds_nano == [0, USD]

    await move(migrated_engine, wallet, 10 * USD)  # $10.50; the low default becomes 20 % of $10
    assert await sweep(migrated_engine) == 0
    async with migrated_engine.connect() as conn:
        endpoint = await alerts.endpoint(conn, wallet)
    assert endpoint is not None and endpoint.low_default_nano == 2 * USD

    await move(migrated_engine, wallet, -9 * USD)  # $1.50: below $2
    await move(migrated_engine, wallet, -USD - USD // 2)  # then $0 in the same sweep: both crossed
    assert await sweep(migrated_engine) == 2
    assert await events(migrated_engine, wallet) == [
        ("wallet.balance_low", 0),
        ("wallet.balance_low", 2 * USD),
    ]


async def test_a_wallet_already_below_does_not_fire(migrated_engine: AsyncEngine) -> None:
    wallet = await new_wallet(migrated_engine)
    await register(migrated_engine, wallet, [USD])
    await move(migrated_engine, wallet, -USD // 4)
    assert await sweep(migrated_engine) == 0
    assert await events(migrated_engine, wallet) == []


async def test_concurrent_sweeps_make_one_event_per_crossing(
    migrated_engine: AsyncEngine, migrated_pool
) -> None:
    wallet_ids = [await new_wallet(migrated_engine) for _ in range(20)]
    for wallet in wallet_ids:
        await register(migrated_engine, wallet, [USD // 4])
        await move(migrated_engine, wallet, -USD // 2)

    async def one_sweep() -> int:
        async with database.acquire(migrated_pool) as conn:
            return await alerts.sweep(conn, batch_max=7)

    made = 0
    for _ in range(5):  # rounds of 8 racing sweeps, each taking at most 7 wallets
        made += sum(await asyncio.gather(*(one_sweep() for _ in range(8))))
    assert made == len(wallet_ids)
    for wallet in wallet_ids:
        assert await events(migrated_engine, wallet) == [("wallet.balance_low", USD // 4)]


async def test_the_queue_leases_backs_off_and_gives_up(migrated_engine: AsyncEngine, migrated_pool) -> None:
    wallet = await new_wallet(migrated_engine)
    await register(migrated_engine, wallet, None)
    async with database.acquire(migrated_pool) as conn:
        first = await alerts.queue_test_event(conn, wallet)
        claimed = await alerts.claim_due(conn)
        assert [d.event_id for d in claimed] == [first] and claimed[0].attempt == 1
        assert await alerts.claim_due(conn) == [], "a leased event is not claimed twice"
        assert claimed[0].payload() == claimed[0].payload()

        gave_up = await alerts.record_failed(conn, first, "503", retry_base_ms=3_600_000, retry_for_s=86_400)
        assert not gave_up
        delay = await conn.fetchval(
            "SELECT extract(epoch FROM next_attempt_at - now()) FROM alert_events WHERE id = $1", first
        )
        assert 3590 < delay <= 3600, "attempt 2 waits the base"
        await conn.execute("UPDATE alert_events SET next_attempt_at = now() WHERE id = $1", first)
        [retried] = await alerts.claim_due(conn)
        assert (retried.event_id, retried.attempt, retried.payload()) == (first, 2, claimed[0].payload())
        await alerts.record_failed(conn, first, "503", retry_base_ms=3_600_000, retry_for_s=86_400)
        delay = await conn.fetchval(
            "SELECT extract(epoch FROM next_attempt_at - now()) FROM alert_events WHERE id = $1", first
        )
        assert 7190 < delay <= 7200, "attempt 3 waits twice as long"

        second = await alerts.queue_test_event(conn, wallet)
        [delivery] = await alerts.claim_due(conn)
        assert delivery.event_id == second
        assert await alerts.record_failed(conn, second, "timeout", retry_base_ms=1000, retry_for_s=0)
        assert await alerts.claim_due(conn) == [], "a given-up event is never claimed again"

        third = await alerts.queue_test_event(conn, wallet)
        [delivery] = await alerts.claim_due(conn)
        await alerts.record_delivered(conn, third)
        assert await alerts.pending(conn) == 1  # the first, waiting for its second attempt
    async with migrated_engine.connect() as conn:
        states = {e.id: e.state for e in await alerts.recent_events(conn, wallet, limit=10)}
    assert states == {first: "pending", second: "gave_up", third: "delivered"}


async def test_test_events_are_bounded_and_need_an_endpoint(
    migrated_engine: AsyncEngine, migrated_pool
) -> None:
    wallet = await new_wallet(migrated_engine)
    async with database.acquire(migrated_pool) as conn:
        with pytest.raises(alerts.NotConfigured):
            await alerts.queue_test_event(conn, wallet)
    await register(migrated_engine, wallet, None)
    async with database.acquire(migrated_pool) as conn:
        for _ in range(alerts.TEST_EVENTS_PENDING_MAX):
            await alerts.queue_test_event(conn, wallet)
        with pytest.raises(alerts.TooManyTestEvents):
            await alerts.queue_test_event(conn, wallet)


async def test_removing_the_endpoint_gives_up_its_undelivered_events(migrated_engine: AsyncEngine) -> None:
    wallet = await new_wallet(migrated_engine)
    await register(migrated_engine, wallet, None)
    async with migrated_engine.begin() as conn:
        await alerts.queue_test_event(conn, wallet)
        assert await alerts.remove(conn, wallet)
        assert not await alerts.remove(conn, wallet)
        assert await alerts.pending(conn) == 0
        assert await alerts.claim_due(conn) == []
        [event] = await alerts.recent_events(conn, wallet, limit=10)
    assert (event.state, event.last_error) == ("gave_up", "the webhook was removed")


async def test_an_event_about_an_occurrence_is_queued_once_with_its_data(
    migrated_engine: AsyncEngine,
) -> None:
    bare = await new_wallet(migrated_engine)
    async with migrated_engine.begin() as conn:
        unwatched = await alerts.queue_event(
            conn, bare, alerts.EventType.RECHARGE_FAILED, occurrence="r1", data={"code": "card_declined"}
        )
        [event] = await alerts.recent_events(conn, bare, limit=10)
    # Recorded (the mail and Kubernetes channels take it), its webhook delivery given up: none.
    assert unwatched is not None and event.id == unwatched and event.state == "gave_up"

    wallet = await new_wallet(migrated_engine)
    await register(migrated_engine, wallet, None)
    queued = []
    for _ in range(2):  # a retried sweep, a second sidecar
        async with migrated_engine.begin() as conn:
            queued.append(
                await alerts.queue_event(
                    conn,
                    wallet,
                    alerts.EventType.RECHARGE_FAILED,
                    occurrence=f"{wallet}:1",
                    data={"code": "card_declined", "amount_usd": "10"},
                )
            )
    assert queued[0] == alerts.event_id_for(alerts.EventType.RECHARGE_FAILED, f"{wallet}:1")
    assert queued[1] is None
    async with migrated_engine.begin() as conn:
        claimed = [d for d in await alerts.claim_due(conn, limit=100) if d.wallet_id == wallet]
    assert [d.event_id for d in claimed] == [queued[0]]
    sent = json.loads(claimed[0].payload())
    assert sent["type"] == "auto_recharge.failed"
    assert sent["data"] == {
        "code": "card_declined",
        "amount_usd": "10",
        "wallet_id": wallet,
        "balance_usd": money.format_usd(GRANT_NANO),
    }


async def test_concurrent_operators_take_each_kubernetes_event_once(
    migrated_engine: AsyncEngine, migrated_pool
) -> None:
    """What the ticks of two operator replicas (or more) on one Wallet do at once."""
    external_id = str(uuid.uuid4())
    async with migrated_engine.begin() as conn:
        wallet, _ = await wallets.ensure_owned_wallet(
            conn, source="kubernetes", external_id=external_id, grant_nano=USD, email=None
        )
        assert await alerts.enrol(conn, mail=False) == 1
        made = [
            await alerts.queue_event(
                conn, wallet.id, alerts.EventType.KEY_LIMIT_REACHED, occurrence=f"key:{n}", data={}
            )
            for n in range(30)
        ]

    async def tick() -> list[str]:
        async with database.acquire(migrated_pool) as conn, conn.transaction():
            taken = await alerts.take_announcements(
                conn, external_id, types=[alerts.EventType.KEY_LIMIT_REACHED], limit=7
            )
        return [a.event_id for a in taken]

    taken: list[str] = []
    for _ in range(6):
        for batch in await asyncio.gather(*(tick() for _ in range(8))):
            taken += batch
    assert sorted(taken) == sorted(made), "each event taken by exactly one tick"


async def test_a_wallet_watched_for_its_mail_can_add_and_remove_a_webhook(
    migrated_engine: AsyncEngine, migrated_pool
) -> None:
    wallet = await new_wallet(migrated_engine)
    async with database.acquire(migrated_pool) as conn:
        assert await alerts.enrol(conn, mail=False) == 0, "a signup wallet is watched only while mail is on"
        assert await alerts.enrol(conn, mail=True) == 1
        assert await alerts.enrol(conn, mail=True) == 0
        assert await alerts.endpoint(conn, wallet) is None, "no webhook: the API says not configured"
        with pytest.raises(alerts.NotConfigured):
            await alerts.queue_test_event(conn, wallet)
        assert not await alerts.remove(conn, wallet)
    await move(migrated_engine, wallet, -USD // 2)  # $0: crosses $0 (the default $1 was not armed)
    assert await sweep(migrated_engine) == 1
    [event] = await events_of(migrated_engine, wallet)
    assert (event.state, event.last_error) == ("gave_up", "no webhook was registered")

    secret = await register(migrated_engine, wallet, None)
    assert secret is not None and secret.startswith("whsec_"), "the first webhook gets a new secret"
    assert await register(migrated_engine, wallet, None) is None
    async with database.acquire(migrated_pool) as conn:
        assert await alerts.claim_due(conn) == [], "the event made before the webhook is not posted"
        assert await alerts.remove(conn, wallet)
        assert await alerts.enrol(conn, mail=True) == 1, "watched again for its mail"


async def events_of(engine: AsyncEngine, wallet_id: str) -> list[alerts.EventRecord]:
    async with engine.connect() as conn:
        return await alerts.recent_events(conn, wallet_id, limit=100)
