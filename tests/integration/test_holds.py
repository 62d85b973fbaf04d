"""billing.holds against a real PostgreSQL: each way a hold ends, reservation accounting,
duplicate Checks, settlements racing each other and the estimate's charge, holds past their
expiry keeping their reservations, and admission under 200 concurrent Checks on one wallet.

The functions take an asyncpg connection, as the sidecar runs them. ``Account`` gets one the way
the sidecar's key cache does without a pool (an AUTOCOMMIT SQLAlchemy connection's own); the
concurrency tests use an asyncpg pool made exactly like the sidecar's (``database.create_pool``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billing import api_keys, audit, database, expiry, hold_batches, holds, ledger, tables, wallets
from legacy_expiry import expire_as_before
from row_locks import blocked_on_a_row_lock

pytestmark = pytest.mark.integration

ADMITTED = None  # what holds.place answers when it placed the hold: no refusal
S = holds.Settlement
VOID, ESTIMATE, post = holds.Resolution.VOID, holds.Resolution.POST_ESTIMATE, holds.Resolution.post


@dataclasses.dataclass
class Account:
    engine: AsyncEngine
    wallet_id: str
    key_id: str
    # Where place and settle get their connection: the sidecar's kind of pool, or the engine.
    pool: asyncpg.Pool | None = None

    @property
    def db(self) -> database.Database:
        return self.engine if self.pool is None else self.pool

    async def place(
        self, request_id: str, amount_nano: int, *, strict: bool = False, ttl_s: int = 600
    ) -> holds.Refusal | None:
        async with database.acquire(self.db) as conn:
            return await holds.place(
                conn,
                request_id=request_id,
                wallet_id=self.wallet_id,
                key_id=self.key_id,
                model="gpt-4o-mini",
                amount_nano=amount_nano,
                ttl_s=ttl_s,
                strict=strict,
            )

    async def settle(self, request_id: str, resolution: holds.Resolution) -> holds.Settlement:
        async with database.acquire(self.db) as conn:
            return await holds.settle(conn, request_id=request_id, resolution=resolution)

    async def wallet(self) -> wallets.Wallet:
        async with self.engine.connect() as conn:
            wallet = await wallets.get_wallet(conn, self.wallet_id)
        assert wallet is not None
        return wallet

    async def money(self) -> tuple[int, int]:
        """(balance, reserved) of record."""
        wallet = await self.wallet()
        return wallet.balance_nano, wallet.reserved_nano

    async def pending_sum(self) -> int:
        h = tables.holds
        async with self.engine.connect() as conn:
            return (
                await conn.execute(
                    sa.select(sa.func.coalesce(sa.func.sum(h.c.amount_nano), 0)).where(
                        h.c.wallet_id == self.wallet_id, h.c.state == "pending"
                    )
                )
            ).scalar_one()

    async def hold(self, request_id: str) -> sa.Row:
        h = tables.holds
        async with self.engine.connect() as conn:
            return (await conn.execute(sa.select(h).where(h.c.request_id == request_id))).one()

    async def usage_entries(self) -> list[ledger.Entry]:
        async with self.engine.connect() as conn:
            return [e for e in await ledger.entries(conn, self.wallet_id, limit=1000) if e.kind == "usage"]


async def open_account(
    engine: AsyncEngine, balance_nano: int, pool: asyncpg.Pool | None = None, *, limit_nano: int = 0
) -> Account:
    async with engine.begin() as conn:
        wallet = await wallets.create_wallet(
            conn, source="admin", grant_nano=balance_nano, overdraft_limit_nano=limit_nano
        )
        key = await api_keys.issue_key(conn, wallet_id=wallet.id, source="admin")
    return Account(engine, wallet.id, key.key_id, pool)


async def books_balance(engine: AsyncEngine) -> None:
    assert (await audit.run(engine)).findings == []


async def charge_unreported(engine: AsyncEngine, *, report_grace_s: int = 0) -> int:
    """The sweep's charge of holds unreported ``report_grace_s`` after their expiry."""
    async with engine.begin() as conn:
        return await expiry.charge_unreported(conn, report_grace_s=report_grace_s)


# --- how a hold ends ----------------------------------------------------------------------------


async def test_post_charges_the_actual_cost_and_releases_the_hold(migrated_engine: AsyncEngine) -> None:
    acct = await open_account(migrated_engine, 1_000_000)
    assert await acct.place("r1", 300_000) is ADMITTED
    assert await acct.money() == (1_000_000, 300_000)
    assert (await acct.hold("r1")).state == "pending"

    async with migrated_engine.begin() as conn:
        outcome = await holds.settle(
            conn, request_id="r1", resolution=post(123_456), details={"prompt_tokens": 7}
        )
    assert outcome is S.POSTED
    assert await acct.money() == (1_000_000 - 123_456, 0)
    hold = await acct.hold("r1")
    assert (hold.state, hold.posted_nano, hold.amount_nano) == ("posted", 123_456, 300_000)
    assert hold.resolved_at is not None
    (entry,) = await acct.usage_entries()
    assert entry.idempotency_key == "usage:r1"
    assert entry.amount_nano == -123_456
    assert entry.balance_after_nano == 1_000_000 - 123_456
    assert entry.details == {
        "model": "gpt-4o-mini",
        "key_id": acct.key_id,
        "request_id": "r1",
        "prompt_tokens": 7,
    }

    # A second settlement of any kind changes nothing.
    for again in (post(123_456), post(999), VOID, ESTIMATE):
        assert await acct.settle("r1", again) is S.ALREADY_POSTED
    assert await acct.money() == (1_000_000 - 123_456, 0)
    assert len(await acct.usage_entries()) == 1
    await books_balance(migrated_engine)


async def test_void_charges_nothing(migrated_engine: AsyncEngine) -> None:
    acct = await open_account(migrated_engine, 1_000_000)
    assert await acct.place("r1", 300_000) is ADMITTED
    assert await acct.settle("r1", VOID) is S.VOIDED
    assert await acct.money() == (1_000_000, 0)
    hold = await acct.hold("r1")
    assert (hold.state, hold.posted_nano) == ("voided", None)
    for again in (VOID, post(5), ESTIMATE):
        assert await acct.settle("r1", again) is S.ALREADY_VOIDED
    assert await acct.money() == (1_000_000, 0)
    assert await acct.usage_entries() == []
    await books_balance(migrated_engine)


async def test_post_estimate_posts_the_holds_own_amount(migrated_engine: AsyncEngine) -> None:
    acct = await open_account(migrated_engine, 1_000_000)
    assert await acct.place("r1", 300_000) is ADMITTED
    assert await acct.settle("r1", ESTIMATE) is S.POSTED
    assert await acct.money() == (700_000, 0)
    assert (await acct.hold("r1")).posted_nano == 300_000
    assert [e.amount_nano for e in await acct.usage_entries()] == [-300_000]
    # An actual cost above the estimate is capped at the hold: the hold is what admitted the
    # request against the wallet's overdraft limit, so the bound holds whatever the estimate missed.
    assert await acct.place("r2", 1_000) is ADMITTED
    assert await acct.settle("r2", post(5_000)) is S.POSTED
    assert await acct.money() == (699_000, 0)
    assert (await acct.hold("r2")).posted_nano == 1_000
    await books_balance(migrated_engine)


async def test_unknown_hold_and_unknown_wallet(migrated_engine: AsyncEngine) -> None:
    acct = await open_account(migrated_engine, 1_000)
    assert await acct.settle("never-placed", post(5)) is S.UNKNOWN_HOLD
    assert await acct.settle("never-placed", VOID) is S.UNKNOWN_HOLD
    assert await acct.money() == (1_000, 0)
    ghost = dataclasses.replace(acct, wallet_id="wal_ghost")
    refusal = await ghost.place("r1", 1)
    assert isinstance(refusal, holds.Refusal) and refusal.reason is holds.RefusalReason.WALLET_NOT_FOUND


async def test_a_hold_past_its_expiry_keeps_its_reservation_and_a_late_log_still_charges(
    migrated_engine: AsyncEngine,
) -> None:
    acct = await open_account(migrated_engine, 1_000_000)
    assert await acct.place("due", 300_000, ttl_s=0) is ADMITTED
    assert await acct.place("later", 200_000, ttl_s=600) is ADMITTED
    assert await acct.money() == (1_000_000, 500_000)

    # Past its expiry, within the report grace: the sweep charges nothing and releases nothing.
    assert await charge_unreported(migrated_engine, report_grace_s=3600) == 0
    assert (await acct.hold("due")).state == "pending"
    assert await acct.money() == (1_000_000, 500_000)
    await books_balance(migrated_engine)

    # The access log arrives late: the cost is posted and the reservation released, once.
    assert await acct.settle("due", post(70_000)) is S.POSTED_AFTER_EXPIRY
    assert await acct.money() == (930_000, 200_000)
    hold = await acct.hold("due")
    assert (hold.state, hold.posted_nano) == ("posted", 70_000)
    assert await acct.settle("due", post(70_000)) is S.ALREADY_POSTED
    assert await acct.money() == (930_000, 200_000)
    await books_balance(migrated_engine)


async def test_a_hold_past_its_expiry_voided_late_or_charged_its_amount(migrated_engine: AsyncEngine) -> None:
    acct = await open_account(migrated_engine, 1_000_000)
    assert await acct.place("void-me", 100_000, ttl_s=0) is ADMITTED
    assert await acct.place("charge-me", 250_000, ttl_s=0) is ADMITTED
    assert await acct.money() == (1_000_000, 350_000)
    assert await acct.settle("void-me", VOID) is S.VOIDED_AFTER_EXPIRY
    assert await acct.money() == (1_000_000, 250_000)
    assert await acct.settle("void-me", post(5)) is S.ALREADY_VOIDED
    assert await acct.settle("charge-me", ESTIMATE) is S.POSTED_AFTER_EXPIRY
    assert await acct.money() == (750_000, 0)
    await books_balance(migrated_engine)


async def test_holds_an_earlier_version_expired_settle_without_a_second_release(
    migrated_engine: AsyncEngine,
) -> None:
    """An earlier version released a hold's reservation at its expiry (state ``expired``): such a
    hold, still in the database, is posted, voided or charged its estimate without releasing its
    amount again, and other wallets are left alone."""
    a = await open_account(migrated_engine, 1_000_000)
    b = await open_account(migrated_engine, 1_000_000)
    c = await open_account(migrated_engine, 1_000_000)
    assert await a.place("a1", 10, ttl_s=0) is ADMITTED
    assert await a.place("a2", 20, ttl_s=0) is ADMITTED
    assert await b.place("b1", 40, ttl_s=0) is ADMITTED
    assert await c.place("c1", 80, ttl_s=600) is ADMITTED
    assert await expire_as_before(migrated_engine) == 3
    assert [await x.money() for x in (a, b, c)] == [(1_000_000, 0), (1_000_000, 0), (1_000_000, 80)]
    await books_balance(migrated_engine)

    assert await a.settle("a1", post(5)) is S.POSTED_AFTER_EXPIRY
    assert await a.settle("a2", VOID) is S.VOIDED_AFTER_EXPIRY
    assert await charge_unreported(migrated_engine) == 1  # b1, expired a grace of 0 ago
    assert [await x.money() for x in (a, b, c)] == [(999_995, 0), (999_960, 0), (1_000_000, 80)]
    async with migrated_engine.connect() as conn:
        assert await holds.outstanding(conn) == 1
    await books_balance(migrated_engine)


# --- agreement with the hold ---------------------------------------------------------------------


async def test_a_settlement_that_disagrees_with_its_hold_changes_nothing(
    migrated_engine: AsyncEngine,
) -> None:
    """Issue 10, finding 1: an access-log entry naming o1-pro and 10M + 10M tokens was priced as
    o1-pro and posted on whatever hold its request id named. A settlement that names another
    model or wallet than the hold's row now resolves nothing, in every state of the hold."""
    acct = await open_account(migrated_engine, 1_000_000)
    other = await open_account(migrated_engine, 1_000_000)
    assert await acct.place("r1", 300_000) is ADMITTED
    forged = 7_500 * 10**9  # what o1-pro would have cost

    async def settle(
        resolution: holds.Resolution, *, wallet_id: str = "", model: str = ""
    ) -> holds.Settlement:
        async with database.acquire(migrated_engine) as conn:
            return await holds.settle(
                conn, request_id="r1", resolution=resolution, wallet_id=wallet_id, model=model
            )

    for resolution in (post(forged), ESTIMATE, VOID):
        assert await settle(resolution, wallet_id=acct.wallet_id, model="o1-pro") is S.REFUSED_MISMATCH
        assert await settle(resolution, wallet_id=other.wallet_id, model="gpt-4o-mini") is S.REFUSED_MISMATCH
        assert await settle(resolution, model="o1-pro") is S.REFUSED_MISMATCH  # one claim, and it is wrong
        assert await settle(resolution, wallet_id=other.wallet_id) is S.REFUSED_MISMATCH
    assert await acct.money() == (1_000_000, 300_000)
    assert await other.money() == (1_000_000, 0)
    hold = await acct.hold("r1")
    assert (hold.state, hold.posted_nano, hold.resolved_at) == ("pending", None, None)
    assert await acct.usage_entries() == []

    # The true report settles it, charging the hold's wallet and key under the hold's model.
    assert await settle(post(12_345), wallet_id=acct.wallet_id, model="gpt-4o-mini") is S.POSTED
    (entry,) = await acct.usage_entries()
    assert (entry.amount_nano, entry.details["model"], entry.details["key_id"]) == (
        -12_345,
        "gpt-4o-mini",
        acct.key_id,
    )
    # Once settled, a disagreeing report is still refused as such, not taken for a replay.
    assert await settle(post(forged), wallet_id=acct.wallet_id, model="o1-pro") is S.REFUSED_MISMATCH
    assert await settle(post(12_345), wallet_id=acct.wallet_id, model="gpt-4o-mini") is S.ALREADY_POSTED
    assert await acct.money() == (1_000_000 - 12_345, 0)

    # A hold past its expiry likewise.
    assert await acct.place("late", 50_000, ttl_s=0) is ADMITTED
    async with database.acquire(migrated_engine) as conn:
        assert (
            await holds.settle(
                conn, request_id="late", resolution=post(forged), wallet_id=acct.wallet_id, model="o1-pro"
            )
            is S.REFUSED_MISMATCH
        )
        assert (await acct.hold("late")).state == "pending"
        assert (
            await holds.settle(
                conn, request_id="late", resolution=VOID, wallet_id=acct.wallet_id, model="gpt-4o-mini"
            )
            is S.VOIDED_AFTER_EXPIRY
        )
    assert await acct.money() == (1_000_000 - 12_345, 0)
    await books_balance(migrated_engine)


@pytest.mark.parametrize("way", ["pipelined", "set_based"])
async def test_settle_many_refuses_only_the_requests_that_disagree(
    migrated_engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    """In a batch (both ways one is sent, ``hold_batches.SET_BATCH_MIN``) a disagreeing request is
    left alone and the others settle, exactly as one by one."""
    monkeypatch.setattr(hold_batches, "SET_BATCH_MIN", 2 if way == "set_based" else 10**9)
    a = await open_account(migrated_engine, 1_000_000)
    b = await open_account(migrated_engine, 1_000_000)
    for request_id in ("a-ok", "a-model", "a-wallet", "a-void"):
        assert await a.place(request_id, 100_000) is ADMITTED
    assert await b.place("b-ok", 100_000) is ADMITTED
    batch = [
        hold_batches.SettleRequest("a-ok", post(1_000), wallet_id=a.wallet_id, model="gpt-4o-mini"),
        hold_batches.SettleRequest("a-model", post(10**12), wallet_id=a.wallet_id, model="o1-pro"),
        hold_batches.SettleRequest("a-wallet", post(1_000), wallet_id=b.wallet_id, model="gpt-4o-mini"),
        hold_batches.SettleRequest("a-void", VOID, wallet_id=a.wallet_id, model="gpt-4o-mini"),
        hold_batches.SettleRequest("b-ok", ESTIMATE, wallet_id=b.wallet_id, model="gpt-4o-mini"),
    ]
    async with database.acquire(migrated_engine) as conn:
        outcomes = await hold_batches.settle_many(conn, batch)
    assert outcomes == [S.POSTED, S.REFUSED_MISMATCH, S.REFUSED_MISMATCH, S.VOIDED, S.POSTED]
    assert await a.money() == (1_000_000 - 1_000, 200_000)
    assert await b.money() == (1_000_000 - 100_000, 0)
    assert {r: (await a.hold(r)).state for r in ("a-model", "a-wallet")} == {
        "a-model": "pending",
        "a-wallet": "pending",
    }
    assert [e.idempotency_key for e in await a.usage_entries()] == ["usage:a-ok"]
    await books_balance(migrated_engine)


# --- reservations -------------------------------------------------------------------------------


async def test_reserved_is_the_sum_of_pending_holds_at_every_step(migrated_engine: AsyncEngine) -> None:
    acct = await open_account(migrated_engine, 10_000_000)

    async def expect(balance: int, reserved: int) -> None:
        assert await acct.money() == (balance, reserved)
        assert await acct.pending_sum() == reserved

    await expect(10_000_000, 0)
    assert await acct.place("a", 100_000) is ADMITTED
    await expect(10_000_000, 100_000)
    assert await acct.place("b", 200_000) is ADMITTED
    await expect(10_000_000, 300_000)
    assert await acct.place("c", 400_000, ttl_s=0) is ADMITTED
    await expect(10_000_000, 700_000)
    assert await acct.settle("a", post(50_000)) is S.POSTED
    await expect(9_950_000, 600_000)
    assert await acct.settle("b", VOID) is S.VOIDED
    await expect(9_950_000, 400_000)
    assert await charge_unreported(migrated_engine, report_grace_s=3600) == 0  # c: past its expiry
    await expect(9_950_000, 400_000)
    assert await acct.place("d", 1_000) is ADMITTED
    await expect(9_950_000, 401_000)
    assert await acct.settle("c", post(30_000)) is S.POSTED_AFTER_EXPIRY
    await expect(9_920_000, 1_000)
    assert await acct.settle("d", post(1_000)) is S.POSTED
    await expect(9_919_000, 0)
    await books_balance(migrated_engine)


async def test_a_repeated_check_reserves_once(migrated_engine: AsyncEngine) -> None:
    acct = await open_account(migrated_engine, 1_000_000)
    for _ in range(3):
        assert await acct.place("same", 300_000) is ADMITTED
    assert await acct.money() == (1_000_000, 300_000)
    assert await acct.pending_sum() == 300_000
    assert await acct.settle("same", post(300_000)) is S.POSTED
    assert await acct.money() == (700_000, 0)
    await books_balance(migrated_engine)


async def test_a_request_id_of_another_wallet_or_a_settled_hold_is_refused(
    migrated_engine: AsyncEngine,
) -> None:
    alice = await open_account(migrated_engine, 1_000_000)
    bob = await open_account(migrated_engine, 1_000_000)
    assert await alice.place("shared", 300_000) is ADMITTED
    refusal = await bob.place("shared", 300_000)
    assert isinstance(refusal, holds.Refusal) and refusal.reason is holds.RefusalReason.DUPLICATE_REQUEST
    assert await bob.money() == (1_000_000, 0)
    assert await alice.settle("shared", post(100_000)) is S.POSTED
    replay = await alice.place("shared", 300_000)
    assert isinstance(replay, holds.Refusal) and replay.reason is holds.RefusalReason.DUPLICATE_REQUEST
    assert await alice.money() == (900_000, 0)
    await books_balance(migrated_engine)


async def test_a_negative_cost_is_refused_and_changes_nothing(migrated_engine: AsyncEngine) -> None:
    acct = await open_account(migrated_engine, 1_000_000)
    assert await acct.place("r", 300_000) is ADMITTED
    with pytest.raises(ValueError, match="negative"):
        await acct.settle("r", post(-5))
    assert await acct.money() == (1_000_000, 300_000)
    assert (await acct.hold("r")).state == "pending"


async def test_a_repeated_check_is_admitted_when_its_own_hold_took_all_the_money(
    migrated_engine: AsyncEngine,
) -> None:
    # The first Check reserved every nano. Its retry is the same request, already paid for:
    # refusing it (funds_reserved) would block a request over its own reservation.
    for strict in (False, True):
        acct = await open_account(migrated_engine, 1_000_000)
        assert await acct.place(f"same-{strict}", 1_000_000, strict=strict) is ADMITTED
        assert await acct.place(f"same-{strict}", 1_000_000, strict=strict) is ADMITTED
        assert await acct.money() == (1_000_000, 1_000_000)
        # A different request is still refused.
        refusal = await acct.place(f"other-{strict}", 1, strict=strict)
        assert refusal == holds.Refusal(
            holds.RefusalReason.FUNDS_RESERVED, 1_000_000, 1_000_000, amount_nano=1
        )
    await books_balance(migrated_engine)


async def test_concurrent_repeats_of_one_check_reserve_once(migrated_url: str) -> None:
    engine = database.create_engine(migrated_url, pool_size=10)
    pool = await database.create_pool(migrated_url, size=10)
    try:
        acct = await open_account(engine, 1_000_000, pool)
        results = await asyncio.gather(*(acct.place("same", 250_000) for _ in range(20)))
        assert results == [ADMITTED] * 20
        assert await acct.money() == (1_000_000, 250_000)
        await books_balance(engine)
    finally:
        await pool.close()
        await engine.dispose()


# --- settlement is one statement -----------------------------------------------------------------


async def in_open_transaction(engine: AsyncEngine, work, then_racing):
    """Run ``work(conn)`` in a transaction left open while ``then_racing()`` starts and blocks on
    its locks; commit; return (work's result, the racer's result)."""
    async with engine.connect() as conn:
        async with conn.begin():
            first = await work(conn)
            racer = asyncio.create_task(then_racing())
            await blocked_on_a_row_lock(engine)
            assert not racer.done()
        return first, await racer


async def test_a_settlement_racing_another_waits_for_it_and_changes_nothing(
    migrated_engine: AsyncEngine,
) -> None:
    acct = await open_account(migrated_engine, 1_000_000)
    for request_id, second in (("post-then-void", VOID), ("post-then-post", post(999))):
        assert await acct.place(request_id, 300_000) is ADMITTED

        async def post_first(conn: AsyncConnection, request_id: str = request_id) -> holds.Settlement:
            return await holds.settle(conn, request_id=request_id, resolution=post(100_000))

        async def then_second(
            request_id: str = request_id, resolution: holds.Resolution = second
        ) -> holds.Settlement:
            return await acct.settle(request_id, resolution)

        assert await in_open_transaction(migrated_engine, post_first, then_second) == (
            S.POSTED,
            S.ALREADY_POSTED,
        )
    assert await acct.money() == (800_000, 0)
    assert [e.amount_nano for e in await acct.usage_entries()] == [-100_000, -100_000]
    await books_balance(migrated_engine)


async def test_a_late_report_racing_the_estimates_charge_charges_and_releases_once(
    migrated_engine: AsyncEngine,
) -> None:
    acct = await open_account(migrated_engine, 1_000_000)
    # The charge goes first: the late report waits for it, then finds the hold already posted.
    assert await acct.place("charged-first", 300_000, ttl_s=0) is ADMITTED

    async def charge(conn: AsyncConnection) -> int:
        return await expiry.charge_unreported(conn, report_grace_s=0)

    async def report_charged() -> holds.Settlement:
        return await acct.settle("charged-first", post(70_000))

    assert await in_open_transaction(migrated_engine, charge, report_charged) == (1, S.ALREADY_POSTED)
    assert await acct.money() == (700_000, 0)

    # The report goes first: the charge waits for it, then finds the hold posted and charges nothing.
    assert await acct.place("reported-first", 200_000, ttl_s=0) is ADMITTED

    async def report(conn: AsyncConnection) -> holds.Settlement:
        return await holds.settle(conn, request_id="reported-first", resolution=post(50_000))

    assert await in_open_transaction(migrated_engine, report, lambda: charge_unreported(migrated_engine)) == (
        S.POSTED_AFTER_EXPIRY,
        0,
    )
    assert await acct.money() == (650_000, 0)
    assert (await acct.hold("reported-first")).posted_nano == 50_000
    await books_balance(migrated_engine)


async def test_an_existing_usage_entry_aborts_the_whole_settlement(migrated_engine: AsyncEngine) -> None:
    """``usage:<request id>`` written some other way: the settlement's insert violates the unique
    key, so its hold and wallet updates are undone with it (no money moves without an entry)."""
    acct = await open_account(migrated_engine, 1_000_000)
    assert await acct.place("r", 300_000) is ADMITTED
    async with migrated_engine.begin() as conn:
        await ledger.post_entry(
            conn, wallet_id=acct.wallet_id, kind="usage", amount_nano=-5, idempotency_key="usage:r"
        )
    assert await acct.settle("r", post(100_000)) is S.ALREADY_POSTED
    assert await acct.money() == (999_995, 300_000)
    hold = await acct.hold("r")
    assert (hold.state, hold.posted_nano, hold.resolved_at) == ("pending", None, None)
    assert [e.amount_nano for e in await acct.usage_entries()] == [-5]
    # The books balance; only the audit's usage check names the entry no settlement wrote.
    findings = (await audit.run(migrated_engine)).findings
    assert [(f.check, f.subject, f.found) for f in findings] == [
        (audit.Check.USAGE, f"entry {(await acct.usage_entries())[0].id} (usage:r)", "its hold pending")
    ]


async def test_settling_inside_a_callers_transaction_is_undone_with_it(migrated_engine: AsyncEngine) -> None:
    acct = await open_account(migrated_engine, 1_000_000)
    assert await acct.place("r", 300_000) is ADMITTED
    async with migrated_engine.connect() as conn:
        transaction = await conn.begin()
        assert await holds.settle(conn, request_id="r", resolution=post(100_000)) is S.POSTED
        await transaction.rollback()
    assert await acct.money() == (1_000_000, 300_000)
    assert (await acct.hold("r")).state == "pending"
    assert await acct.usage_entries() == []
    assert await acct.settle("r", post(100_000)) is S.POSTED
    await books_balance(migrated_engine)


# --- admission ----------------------------------------------------------------------------------
#
# The rule: admit only while balance − reserved − hold ≥ −limit (the wallet's overdraft limit;
# 0 for every wallet in strict mode). Refused: FUNDS_RESERVED when the hold would fit with every
# reservation released, else INSUFFICIENT_FUNDS — wallet_empty when balance + limit ≤ 0,
# request_too_large otherwise.

INSUFFICIENT, RESERVED = holds.RefusalReason.INSUFFICIENT_FUNDS, holds.RefusalReason.FUNDS_RESERVED
EMPTY, TOO_LARGE = holds.Shortfall.WALLET_EMPTY, holds.Shortfall.REQUEST_TOO_LARGE


def refusal(
    reason: holds.RefusalReason,
    balance: int,
    reserved: int,
    limit: int,
    amount: int,
    shortfall: holds.Shortfall | None = None,
) -> holds.Refusal:
    return holds.Refusal(reason, balance, reserved, limit, amount, shortfall)


async def no_hold_left_by_refusals(engine: AsyncEngine, admitted: int) -> None:
    async with engine.connect() as conn:
        count = (await conn.execute(sa.select(sa.func.count()).select_from(tables.holds))).scalar_one()
    assert count == admitted, "a refusal left a hold behind"


@pytest.mark.parametrize("strict", [False, True], ids=["overdraft", "strict"])
async def test_a_wallet_without_overdraft_admits_only_what_its_balance_covers(
    migrated_engine: AsyncEngine, strict: bool
) -> None:
    acct = await open_account(migrated_engine, 1_000)
    # More than the whole balance: no amount of waiting helps; a smaller request would fit.
    assert await acct.place("huge", 1_001, strict=strict) == refusal(
        INSUFFICIENT, 1_000, 0, 0, 1_001, TOO_LARGE
    )
    assert await acct.place("all", 1_000, strict=strict) is ADMITTED  # exactly the balance
    assert await acct.place("more", 1, strict=strict) == refusal(RESERVED, 1_000, 1_000, 0, 1)
    assert await acct.settle("all", post(1_000)) is S.POSTED
    assert await acct.money() == (0, 0)
    assert await acct.place("after", 1, strict=strict) == refusal(INSUFFICIENT, 0, 0, 0, 1, EMPTY)
    assert await acct.money() == (0, 0)
    await no_hold_left_by_refusals(migrated_engine, 1)
    await books_balance(migrated_engine)


async def test_the_overdraft_limit_bounds_how_far_below_zero_the_balance_goes(
    migrated_engine: AsyncEngine,
) -> None:
    acct = await open_account(migrated_engine, 100, limit_nano=400)
    assert await acct.place("big", 500) is ADMITTED  # 100 − 500 = −400 ≥ −400
    assert await acct.place("next", 1) == refusal(RESERVED, 100, 500, 400, 1)
    assert await acct.settle("big", post(500)) is S.POSTED
    assert await acct.money() == (-400, 0)
    # Exactly at −limit: nothing more fits, whatever its size.
    assert await acct.place("next", 1) == refusal(INSUFFICIENT, -400, 0, 400, 1, EMPTY)
    # Strict mode takes every limit as 0.
    assert await acct.place("strict", 1, strict=True) == refusal(INSUFFICIENT, -400, 0, 0, 1, EMPTY)

    # The limit is raised by an operator: the next Check uses it.
    async with migrated_engine.begin() as conn:
        wallet = await wallets.set_overdraft_limit(conn, acct.wallet_id, 500)
    assert wallet is not None and wallet.overdraft_limit_nano == 500
    assert await acct.place("too-big", 101) == refusal(INSUFFICIENT, -400, 0, 500, 101, TOO_LARGE)
    assert await acct.place("fits", 100) is ADMITTED
    assert await acct.settle("fits", post(100)) is S.POSTED
    assert await acct.money() == (-500, 0)
    assert await acct.place("last", 1) == refusal(INSUFFICIENT, -500, 0, 500, 1, EMPTY)
    await no_hold_left_by_refusals(migrated_engine, 2)
    await books_balance(migrated_engine)


async def test_an_overdraft_limit_is_never_negative(migrated_engine: AsyncEngine) -> None:
    acct = await open_account(migrated_engine, 100)
    async with migrated_engine.begin() as conn:
        with pytest.raises(wallets.OverdraftLimitInvalid):
            await wallets.set_overdraft_limit(conn, acct.wallet_id, -1)
        with pytest.raises(wallets.OverdraftLimitInvalid):
            await wallets.create_wallet(conn, source="admin", grant_nano=0, overdraft_limit_nano=-1)
    # And the database refuses it whoever writes it (CHECK constraint).
    with pytest.raises(sa.exc.IntegrityError, match="wallets_overdraft_limit_not_negative"):
        async with migrated_engine.begin() as conn:
            w = tables.wallets
            await conn.execute(sa.update(w).where(w.c.id == acct.wallet_id).values(overdraft_limit_nano=-1))
    assert (await acct.wallet()).overdraft_limit_nano == 0


@pytest.mark.parametrize("strict", [False, True], ids=["overdraft", "strict"])
async def test_fully_reserved_wallet_is_funds_reserved_not_insufficient(
    migrated_engine: AsyncEngine, strict: bool
) -> None:
    acct = await open_account(migrated_engine, 1_000)
    assert await acct.place("a", 600, strict=strict) is ADMITTED
    # Covered by the balance but not by what is left: wait for the other request.
    assert await acct.place("b", 600, strict=strict) == refusal(RESERVED, 1_000, 600, 0, 600)
    assert await acct.place("c", 400, strict=strict) is ADMITTED  # exactly what is left
    assert await acct.money() == (1_000, 1_000)
    assert await acct.place("d", 1, strict=strict) == refusal(RESERVED, 1_000, 1_000, 0, 1)
    # Larger than the balance: waiting would not help, so it is not a 429.
    assert await acct.place("e", 1_001, strict=strict) == refusal(
        INSUFFICIENT, 1_000, 1_000, 0, 1_001, TOO_LARGE
    )
    # Money comes back when a hold is settled: admitted again.
    assert await acct.settle("a", VOID) is S.VOIDED
    assert await acct.place("d", 1, strict=strict) is ADMITTED
    for request_id in ("c", "d"):
        assert await acct.settle(request_id, VOID) is S.VOIDED
    await books_balance(migrated_engine)


async def test_strict_mode_ignores_the_wallets_limit(migrated_engine: AsyncEngine) -> None:
    acct = await open_account(migrated_engine, 1_000, limit_nano=5_000)
    assert await acct.place("strict", 1_001, strict=True) == refusal(
        INSUFFICIENT, 1_000, 0, 0, 1_001, TOO_LARGE
    )
    assert await acct.place("overdraft", 1_001) is ADMITTED
    # The balance covers it once the other request's hold is released: wait.
    assert await acct.place("strict-2", 1, strict=True) == refusal(RESERVED, 1_000, 1_001, 0, 1)
    assert await acct.settle("overdraft", post(1_001)) is S.POSTED
    assert await acct.place("strict-3", 1, strict=True) == refusal(INSUFFICIENT, -1, 0, 0, 1, EMPTY)
    assert await acct.place("overdraft-2", 4_999) is ADMITTED
    assert await acct.settle("overdraft-2", VOID) is S.VOIDED
    await books_balance(migrated_engine)


async def test_the_statement_and_the_named_refusal_agree_everywhere(migrated_engine: AsyncEngine) -> None:
    """Every combination of balance, reservations, limit, hold and mode around the edges: the
    statement admits exactly when ``holds.refusal_of`` says so, and a refusal is the one it names."""
    acct = await open_account(migrated_engine, 0)
    w = tables.wallets
    n = 0
    for balance in (-300, 0, 300):
        for reserved in (0, 200):
            for limit in (0, 250):
                for amount in (0, 1, 49, 50, 51, 99, 100, 101, 299, 300, 301, 550, 551):
                    for strict in (False, True):
                        n += 1
                        async with migrated_engine.begin() as conn:
                            await conn.execute(
                                sa.update(w)
                                .where(w.c.id == acct.wallet_id)
                                .values(
                                    balance_nano=balance, reserved_nano=reserved, overdraft_limit_nano=limit
                                )
                            )
                        expected = holds.refusal_of(
                            balance_nano=balance,
                            reserved_nano=reserved,
                            overdraft_limit_nano=0 if strict else limit,
                            amount_nano=amount,
                        )
                        outcome = await acct.place(f"r{n}", amount, strict=strict)
                        case = (balance, reserved, limit, amount, strict)
                        assert outcome == (ADMITTED if expected is None else expected), case
                        admits = balance - reserved - amount >= -(0 if strict else limit)
                        assert (outcome is ADMITTED) is admits, case
                        if outcome is not ADMITTED:
                            assert outcome.headroom_nano == max(
                                0, balance - reserved + (0 if strict else limit)
                            )
                            assert (outcome.shortfall is EMPTY) is (
                                outcome.reason is INSUFFICIENT and balance + outcome.overdraft_limit_nano <= 0
                            )


async def test_suspended_wallet_is_refused_whatever_its_balance(migrated_engine: AsyncEngine) -> None:
    acct = await open_account(migrated_engine, 1_000_000, limit_nano=7)
    async with migrated_engine.begin() as conn:
        w = tables.wallets
        await conn.execute(sa.update(w).where(w.c.id == acct.wallet_id).values(suspended=True))
    for strict in (False, True):
        refused = await acct.place(f"r-{strict}", 1, strict=strict)
        assert refused == refusal(holds.RefusalReason.WALLET_SUSPENDED, 1_000_000, 0, 0 if strict else 7, 1)
    assert await acct.money() == (1_000_000, 0)


async def set_wallet_flags(engine: AsyncEngine, wallet_id: str, **flags: bool) -> None:
    async with engine.begin() as conn:
        w = tables.wallets
        await conn.execute(sa.update(w).where(w.c.id == wallet_id).values(**flags))


@pytest.mark.parametrize("balance_nano", [1_000_000, 0, -5_000], ids=["funded", "empty", "overdrawn"])
async def test_disputed_wallet_is_refused_whatever_its_balance_until_disputed_is_cleared(
    migrated_engine: AsyncEngine, balance_nano: int
) -> None:
    acct = await open_account(migrated_engine, max(balance_nano, 0))
    if balance_nano < 0:
        async with migrated_engine.begin() as conn:
            await ledger.post_entry(
                conn,
                wallet_id=acct.wallet_id,
                kind="adjustment",
                amount_nano=balance_nano,
                idempotency_key=f"adjustment:{acct.wallet_id}",
            )
    await set_wallet_flags(migrated_engine, acct.wallet_id, disputed=True)
    disputed = refusal(holds.RefusalReason.PAYMENT_DISPUTED, balance_nano, 0, 0, 1)
    for strict in (False, True):
        assert await acct.place(f"r-{strict}", 1, strict=strict) == disputed
    # Both flags: the operator's suspension is the one reported.
    await set_wallet_flags(migrated_engine, acct.wallet_id, suspended=True)
    assert await acct.place("both", 1) == refusal(holds.RefusalReason.WALLET_SUSPENDED, balance_nano, 0, 0, 1)
    # Lifting the operator's switch does not lift the dispute's hold.
    await set_wallet_flags(migrated_engine, acct.wallet_id, suspended=False)
    assert await acct.place("held", 1) == disputed
    assert await acct.money() == (balance_nano, 0)
    assert await acct.pending_sum() == 0

    await set_wallet_flags(migrated_engine, acct.wallet_id, disputed=False)
    if balance_nano > 0:
        assert await acct.place("after", 1_000) is ADMITTED
        assert await acct.money() == (balance_nano, 1_000)
    else:
        assert await acct.place("after", 1_000) == refusal(INSUFFICIENT, balance_nano, 0, 0, 1_000, EMPTY)
    await books_balance(migrated_engine)


# --- admission under concurrency ----------------------------------------------------------------

CHECKS = 200
LIMIT_NANO = 300_000


@pytest.mark.parametrize("strict", [False, True], ids=["overdraft", "strict"])
async def test_200_concurrent_requests_on_one_wallet(migrated_url: str, strict: bool) -> None:
    """Place, then settle at cost, 200 requests at once against a wallet that covers ~a tenth.

    The balance never goes below −limit (overdraft mode) or 0 (strict mode), at any point.
    Each request is charged exactly its cost, once.
    """
    rng = random.Random(7)
    costs = {f"req-{i:03d}": rng.randint(10_000, 90_000) for i in range(CHECKS)}
    start_balance = 1_000_000  # ~20 of the 200 requests' worth
    engine = database.create_engine(migrated_url, pool_size=2)
    pool = await database.create_pool(migrated_url, size=20)
    try:
        acct = await open_account(engine, start_balance, pool, limit_nano=LIMIT_NANO)

        async def request(request_id: str) -> holds.Refusal | None:
            refusal = await acct.place(request_id, costs[request_id], strict=strict)
            if refusal is None:
                assert await acct.settle(request_id, post(costs[request_id])) is S.POSTED
            return refusal

        outcomes = dict(zip(costs, await asyncio.gather(*(request(r) for r in costs)), strict=True))
        admitted = [r for r, o in outcomes.items() if o is ADMITTED]
        refused = [o for o in outcomes.values() if o is not ADMITTED]
        assert admitted and refused, "the wallet must cover some requests and refuse others"
        assert {o.reason for o in refused} <= {INSUFFICIENT, RESERVED}

        balance, reserved = await acct.money()
        charged = sum(costs[r] for r in admitted)
        assert reserved == 0
        assert start_balance - balance == charged
        usage = await acct.usage_entries()
        assert sorted(e.idempotency_key for e in usage) == sorted(f"usage:{r}" for r in admitted)
        assert -sum(e.amount_nano for e in usage) == charged
        floor = 0 if strict else -LIMIT_NANO
        assert balance >= floor
        assert all(e.balance_after_nano >= floor for e in usage)
        if not strict:
            assert charged > start_balance, "the limit was never used: the test proves nothing"
        await books_balance(engine)
    finally:
        await pool.close()
        await engine.dispose()


@pytest.mark.parametrize("strict", [False, True], ids=["overdraft", "strict"])
async def test_200_concurrent_checks_before_any_settles(migrated_url: str, strict: bool) -> None:
    """All 200 holds are placed while none has settled: they fit within balance + limit (strict:
    the balance), and the wallet is used up — what is left fits none of the refused requests."""
    rng = random.Random(11)
    amounts = {f"req-{i:03d}": rng.randint(10_000, 90_000) for i in range(CHECKS)}
    start_balance = 1_000_000
    engine = database.create_engine(migrated_url, pool_size=2)
    pool = await database.create_pool(migrated_url, size=20)
    try:
        acct = await open_account(engine, start_balance, pool, limit_nano=LIMIT_NANO)
        outcomes = await asyncio.gather(*(acct.place(r, a, strict=strict) for r, a in amounts.items()))
        admitted = [r for r, o in zip(amounts, outcomes, strict=True) if o is ADMITTED]
        refusals = [o for o in outcomes if o is not ADMITTED]
        total = sum(amounts[r] for r in admitted)
        balance, reserved = await acct.money()
        assert (balance, reserved) == (start_balance, total)
        # Every refused hold would fit once the others are settled: a 429, never a 403.
        assert refusals and all(o.reason is RESERVED for o in refusals)
        spendable = start_balance + (0 if strict else LIMIT_NANO)
        assert total <= spendable
        # No false block: whatever was left could not cover any refused request.
        refused_amounts = [amounts[r] for r, o in zip(amounts, outcomes, strict=True) if o is not ADMITTED]
        assert spendable - total < min(refused_amounts)
        # Settle every one at its full amount, all at once.
        settled = await asyncio.gather(*(acct.settle(r, ESTIMATE) for r in admitted))
        assert settled == [S.POSTED] * len(admitted)
        assert await acct.money() == (start_balance - total, 0)
        assert start_balance - total >= (0 if strict else -LIMIT_NANO)
        await books_balance(engine)
    finally:
        await pool.close()
        await engine.dispose()


@pytest.mark.parametrize("strict", [False, True], ids=["overdraft", "strict"])
async def test_200_concurrent_holds_of_every_size_single_and_batched_never_pass_the_limit(
    migrated_url: str, strict: bool
) -> None:
    """The adversary's version: 200 requests at once, from a few nano-USD to three times what the
    wallet may spend, half placed alone (``place``) and half in batches (``place_many``, as the
    sidecar does), each settled right after at a random cost up to its hold while the others are
    still being placed. The balance is never below −limit (strict: 0) at any point."""
    rng = random.Random(13)
    start_balance, limit = 500_000, 200_000
    spendable = start_balance + (0 if strict else limit)
    amounts = {
        f"req-{i:03d}": rng.choice(
            [rng.randint(1, 5_000), rng.randint(5_000, 100_000), rng.randint(spendable, 3 * spendable)]
        )
        for i in range(CHECKS)
    }
    engine = database.create_engine(migrated_url, pool_size=2)
    pool = await database.create_pool(migrated_url, size=20)
    try:
        acct = await open_account(engine, start_balance, pool, limit_nano=limit)
        ids = list(amounts)
        singles, batched = ids[0::2], ids[1::2]
        batches: list[list[str]] = []
        while batched:  # batches of 1, 2, 3, 5 and 8 requests: pipelined and set-based statements
            size = [1, 2, 3, 5, 8][len(batches) % 5]
            batches.append(batched[:size])
            batched = batched[size:]
        costs: dict[str, int] = {}

        async def settle(request_id: str) -> None:
            costs[request_id] = rng.randint(0, amounts[request_id])
            assert await acct.settle(request_id, post(costs[request_id])) is S.POSTED

        async def single(request_id: str) -> tuple[str, holds.Refusal | None]:
            outcome = await acct.place(request_id, amounts[request_id], strict=strict)
            if outcome is ADMITTED:
                await settle(request_id)
            return request_id, outcome

        async def batch(request_ids: list[str]) -> list[tuple[str, holds.Refusal | None]]:
            requests = [
                hold_batches.HoldRequest(r, acct.wallet_id, acct.key_id, "gpt-4o-mini", amounts[r])
                for r in request_ids
            ]
            async with pool.acquire() as conn:
                outcomes = await hold_batches.place_many(conn, requests, ttl_s=600, strict=strict)
            for request_id, outcome in zip(request_ids, outcomes, strict=True):
                if outcome is ADMITTED:
                    await settle(request_id)
            return list(zip(request_ids, outcomes, strict=True))

        results = await asyncio.gather(*(single(r) for r in singles), *(batch(b) for b in batches))
        outcomes = dict(
            pair for result in results for pair in (result if isinstance(result, list) else [result])
        )
        assert sorted(outcomes) == sorted(ids)
        admitted = [r for r, o in outcomes.items() if o is ADMITTED]
        refused = {r: o for r, o in outcomes.items() if o is not ADMITTED}
        assert admitted and refused
        # A hold larger than everything the wallet may spend is always refused as too large.
        for r, o in refused.items():
            if amounts[r] > spendable:
                assert (o.reason, o.shortfall) == (INSUFFICIENT, TOO_LARGE), (r, o)
            else:
                assert o.reason in (INSUFFICIENT, RESERVED), (r, o)
        assert all(amounts[r] <= spendable for r in admitted)

        balance, reserved = await acct.money()
        floor = 0 if strict else -limit
        assert reserved == 0
        assert balance == start_balance - sum(costs[r] for r in admitted) >= floor
        usage = await acct.usage_entries()
        assert len(usage) == len(admitted)
        assert all(e.balance_after_nano >= floor for e in usage), sorted(e.balance_after_nano for e in usage)[
            :3
        ]
        await no_hold_left_by_refusals(engine, len(admitted))
        await books_balance(engine)
    finally:
        await pool.close()
        await engine.dispose()
