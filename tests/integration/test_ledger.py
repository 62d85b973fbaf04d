"""billing.ledger and billing.wallets against a real PostgreSQL: idempotency, immutability,
all-or-nothing signup, and the books balancing after a mix of them (tests/integration/test_audit.py
breaks the books on purpose)."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billing import api_keys, audit, database, expiry, holds, ledger, tables, wallets

pytestmark = pytest.mark.integration


async def new_wallet(engine: AsyncEngine, grant_nano: int) -> str:
    async with engine.begin() as conn:
        return (await wallets.create_wallet(conn, source="admin", grant_nano=grant_nano)).id


async def balance_of(engine: AsyncEngine, wallet_id: str) -> int:
    async with engine.connect() as conn:
        w = tables.wallets
        return (await conn.execute(sa.select(w.c.balance_nano).where(w.c.id == wallet_id))).scalar_one()


async def count(conn: AsyncConnection, table: sa.Table) -> int:
    return (await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar_one()


async def row_counts(engine: AsyncEngine) -> dict[str, int]:
    async with engine.connect() as conn:
        return {
            t.name: await count(conn, t)
            for t in (tables.wallets, tables.api_keys, tables.ledger_entries, tables.holds)
        }


async def post(engine: AsyncEngine, **kwargs: object) -> ledger.Entry:
    async with engine.begin() as conn:
        return await ledger.post_entry(conn, **kwargs)


# --- idempotency --------------------------------------------------------------------------------


async def test_post_moves_the_balance_and_records_it(migrated_engine: AsyncEngine) -> None:
    wallet_id = await new_wallet(migrated_engine, 1_000)
    entry = await post(
        migrated_engine,
        wallet_id=wallet_id,
        kind="topup",
        amount_nano=10_000_000_000,
        idempotency_key="stripe:pi_1",
        details={"payment_intent": "pi_1"},
    )
    assert entry.created
    assert entry.amount_nano == 10_000_000_000
    assert entry.balance_after_nano == 10_000_001_000
    assert entry.details == {"payment_intent": "pi_1"}
    assert await balance_of(migrated_engine, wallet_id) == 10_000_001_000

    spent = await post(
        migrated_engine, wallet_id=wallet_id, kind="usage", amount_nano=-1_500, idempotency_key="usage:r1"
    )
    assert spent.balance_after_nano == 10_000_001_000 - 1_500
    assert await balance_of(migrated_engine, wallet_id) == 9_999_999_500


async def test_replay_returns_the_first_entry_and_changes_nothing(migrated_engine: AsyncEngine) -> None:
    wallet_id = await new_wallet(migrated_engine, 1_000)
    first = await post(
        migrated_engine, wallet_id=wallet_id, kind="topup", amount_nano=500, idempotency_key="stripe:pi_2"
    )
    counts = await row_counts(migrated_engine)
    for _ in range(3):
        replay = await post(
            migrated_engine, wallet_id=wallet_id, kind="topup", amount_nano=500, idempotency_key="stripe:pi_2"
        )
        assert replay.created is False
        assert (replay.id, replay.balance_after_nano, replay.created_at) == (
            first.id,
            first.balance_after_nano,
            first.created_at,
        )
        assert replay.balance_after_nano == 1_500
    assert await balance_of(migrated_engine, wallet_id) == 1_500
    assert await row_counts(migrated_engine) == counts


async def test_same_key_with_different_contents_is_a_conflict(migrated_engine: AsyncEngine) -> None:
    wallet_id = await new_wallet(migrated_engine, 1_000)
    other_id = await new_wallet(migrated_engine, 7)
    first = await post(
        migrated_engine, wallet_id=wallet_id, kind="topup", amount_nano=500, idempotency_key="stripe:pi_3"
    )
    counts = await row_counts(migrated_engine)
    same = {"wallet_id": wallet_id, "kind": "topup", "amount_nano": 500, "idempotency_key": "stripe:pi_3"}
    for change in ({"amount_nano": 501}, {"amount_nano": -500}, {"kind": "credit"}, {"wallet_id": other_id}):
        with pytest.raises(ledger.IdempotencyConflict) as caught:
            await post(migrated_engine, **{**same, **change})
        assert caught.value.key == "stripe:pi_3"
        assert caught.value.first.id == first.id
        assert caught.value.first.amount_nano == 500
    assert await balance_of(migrated_engine, wallet_id) == 1_500
    assert await balance_of(migrated_engine, other_id) == 7
    assert await row_counts(migrated_engine) == counts


async def test_concurrent_posts_of_one_key_credit_once(migrated_url: str) -> None:
    writers = 24
    engine = database.create_engine(migrated_url, pool_size=writers)
    try:
        wallet_id = await new_wallet(engine, 1_000)
        # Every writer opens its transaction, then all post at once.
        barrier = asyncio.Barrier(writers)

        async def one() -> ledger.Entry:
            async with engine.begin() as conn:
                await conn.execute(sa.text("SELECT 1"))
                await barrier.wait()
                return await ledger.post_entry(
                    conn,
                    wallet_id=wallet_id,
                    kind="credit",
                    amount_nano=10_000,
                    idempotency_key="credit:race",
                )

        results = await asyncio.gather(*(one() for _ in range(writers)))
        assert sum(r.created for r in results) == 1
        assert {r.id for r in results} == {results[0].id}
        assert {r.balance_after_nano for r in results} == {11_000}
        assert await balance_of(engine, wallet_id) == 11_000
        async with engine.connect() as conn:
            assert await count(conn, tables.ledger_entries) == 2  # the grant and one credit
        assert (await audit.run(engine)).findings == []
    finally:
        await engine.dispose()


async def test_concurrent_posts_of_one_key_to_different_wallets_conflict(migrated_url: str) -> None:
    writers = 12
    engine = database.create_engine(migrated_url, pool_size=writers)
    try:
        wallet_ids = [await new_wallet(engine, 0) for _ in range(writers)]
        barrier = asyncio.Barrier(writers)

        async def one(wallet_id: str) -> ledger.Entry | ledger.IdempotencyConflict:
            try:
                async with engine.begin() as conn:
                    await conn.execute(sa.text("SELECT 1"))
                    await barrier.wait()
                    return await ledger.post_entry(
                        conn, wallet_id=wallet_id, kind="credit", amount_nano=5, idempotency_key="credit:once"
                    )
            except ledger.IdempotencyConflict as exc:
                return exc

        results = await asyncio.gather(*(one(w) for w in wallet_ids))
        winners = [r for r in results if isinstance(r, ledger.Entry)]
        assert len(winners) == 1 and winners[0].created
        assert all(isinstance(r, ledger.IdempotencyConflict) for r in results if r is not winners[0])
        balances = [await balance_of(engine, w) for w in wallet_ids]
        assert sorted(balances) == [0] * (writers - 1) + [5]
    finally:
        await engine.dispose()


async def test_concurrent_posts_of_different_keys_all_count(migrated_url: str) -> None:
    writers = 24
    engine = database.create_engine(migrated_url, pool_size=writers)
    try:
        wallet_id = await new_wallet(engine, 0)
        barrier = asyncio.Barrier(writers)

        async def one(i: int) -> ledger.Entry:
            async with engine.begin() as conn:
                await conn.execute(sa.text("SELECT 1"))
                await barrier.wait()
                return await ledger.post_entry(
                    conn, wallet_id=wallet_id, kind="credit", amount_nano=2**i, idempotency_key=f"credit:{i}"
                )

        results = await asyncio.gather(*(one(i) for i in range(writers)))
        assert await balance_of(engine, wallet_id) == 2**writers - 1
        # Each entry's balance_after is the running balance in commit order: no two writers
        # read the same starting balance.
        by_id = sorted(results, key=lambda e: e.id)
        running = 0
        for entry in by_id:
            running += entry.amount_nano
            assert entry.balance_after_nano == running
    finally:
        await engine.dispose()


async def test_bad_posts_are_refused(migrated_engine: AsyncEngine) -> None:
    wallet_id = await new_wallet(migrated_engine, 0)
    with pytest.raises(ledger.WalletNotFound):
        await post(
            migrated_engine, wallet_id="wal_missing", kind="credit", amount_nano=1, idempotency_key="k1"
        )
    with pytest.raises(ValueError, match="kind"):
        await post(migrated_engine, wallet_id=wallet_id, kind="gift", amount_nano=1, idempotency_key="k2")
    for amount in (1.0, True, "1"):
        with pytest.raises(TypeError):
            await post(
                migrated_engine, wallet_id=wallet_id, kind="credit", amount_nano=amount, idempotency_key="k3"
            )
    assert (await row_counts(migrated_engine))["ledger_entries"] == 0


async def test_entries_are_paged_newest_first(migrated_engine: AsyncEngine) -> None:
    wallet_id = await new_wallet(migrated_engine, 0)
    for i in range(5):
        await post(
            migrated_engine, wallet_id=wallet_id, kind="credit", amount_nano=i + 1, idempotency_key=f"c{i}"
        )
    async with migrated_engine.connect() as conn:
        page = await ledger.entries(conn, wallet_id, limit=3)
        assert [e.amount_nano for e in page] == [5, 4, 3]
        rest = await ledger.entries(conn, wallet_id, limit=3, before_id=page[-1].id)
        assert [e.amount_nano for e in rest] == [2, 1]
        assert [e.balance_after_nano for e in page + rest] == [15, 10, 6, 3, 1]


# --- immutability -------------------------------------------------------------------------------


async def test_ledger_entries_cannot_be_changed(migrated_engine: AsyncEngine) -> None:
    wallet_id = await new_wallet(migrated_engine, 1_000)
    async with migrated_engine.connect() as conn:
        before = (await conn.execute(sa.select(tables.ledger_entries))).all()
    assert len(before) == 1 and before[0].wallet_id == wallet_id
    for statement in (
        "UPDATE ledger_entries SET amount_nano = 0",
        "UPDATE ledger_entries SET details = '{\"edited\": true}'",
        "DELETE FROM ledger_entries",
        "TRUNCATE ledger_entries CASCADE",
    ):
        with pytest.raises(sa.exc.DBAPIError, match="immutable"):
            async with migrated_engine.begin() as conn:
                await conn.execute(sa.text(statement))
    async with migrated_engine.connect() as conn:
        assert (await conn.execute(sa.select(tables.ledger_entries))).all() == before


# --- signup -------------------------------------------------------------------------------------


async def test_signup_writes_wallet_grant_and_key(migrated_engine: AsyncEngine) -> None:
    async with migrated_engine.begin() as conn:
        result = await wallets.signup(conn, email="  Alice@Example.com ", grant_nano=500_000_000)
    assert await row_counts(migrated_engine) == {"wallets": 1, "api_keys": 1, "ledger_entries": 1, "holds": 0}
    assert result.wallet.email == "alice@example.com"
    assert result.wallet.source == "signup"
    assert result.wallet.balance_nano == 500_000_000
    assert result.wallet.id.startswith("wal_")
    async with migrated_engine.connect() as conn:
        (grant,) = await ledger.entries(conn, result.wallet.id, limit=10)
        assert (grant.kind, grant.amount_nano, grant.balance_after_nano) == (
            "grant",
            500_000_000,
            500_000_000,
        )
        # One free grant per mailbox (billing/emails.py): the grant's key is the mailbox's hash.
        assert grant.idempotency_key == f"grant:signup:{wallets.signup_grant_identity('alice@example.com')}"
        stored = await api_keys.find_key(conn, hashlib.sha256(result.key.plaintext.encode()).digest())
        assert stored is not None
        assert stored.id == result.key.key_id
        assert stored.wallet_id == result.wallet.id
        assert stored.display_prefix == result.key.plaintext[:17]
        # Only the hash is stored: no column holds the plaintext.
        row = (await conn.execute(sa.select(tables.api_keys))).one()
        assert result.key.plaintext not in [str(v) for v in row]
        found = await wallets.find_wallet(conn, "ALICE@example.com")
        assert found is not None and found.id == result.wallet.id


async def test_email_taken_leaves_nothing_written(migrated_engine: AsyncEngine) -> None:
    async with migrated_engine.begin() as conn:
        await wallets.signup(conn, email="bob@example.com", grant_nano=500_000_000)
    before = await row_counts(migrated_engine)
    with pytest.raises(wallets.EmailTaken):
        async with migrated_engine.begin() as conn:
            await wallets.signup(conn, email="BOB@example.com", grant_nano=500_000_000)
    assert (
        await row_counts(migrated_engine)
        == before
        == {
            "wallets": 1,
            "api_keys": 1,
            "ledger_entries": 1,
            "holds": 0,
        }
    )


async def test_signup_is_all_or_nothing(
    migrated_engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def key_insert_fails(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the key insert failed")

    monkeypatch.setattr(api_keys, "issue_key", key_insert_fails)
    with pytest.raises(RuntimeError):
        async with migrated_engine.begin() as conn:
            await wallets.signup(conn, email="carol@example.com", grant_nano=500_000_000)
    assert await row_counts(migrated_engine) == {"wallets": 0, "api_keys": 0, "ledger_entries": 0, "holds": 0}


async def test_bad_email_writes_nothing(migrated_engine: AsyncEngine) -> None:
    for email in ["", "   ", "no-at-sign", "a@b", "a@@b.com", "a b@c.com", "x" * 250 + "@e.com", None, 42]:
        with pytest.raises(wallets.EmailInvalid):
            async with migrated_engine.begin() as conn:
                await wallets.signup(conn, email=email, grant_nano=500_000_000)  # None and 42 on purpose
    assert await row_counts(migrated_engine) == {"wallets": 0, "api_keys": 0, "ledger_entries": 0, "holds": 0}


async def test_signup_with_no_grant_posts_no_entry(migrated_engine: AsyncEngine) -> None:
    async with migrated_engine.begin() as conn:
        result = await wallets.signup(conn, email="dan@example.com", grant_nano=0)
    assert result.wallet.balance_nano == 0
    assert (await row_counts(migrated_engine))["ledger_entries"] == 0


# --- the books balance --------------------------------------------------------------------------


async def test_the_audit_finds_nothing_after_a_mix_of_operations(migrated_engine: AsyncEngine) -> None:
    ac = database.autocommit(migrated_engine)
    async with migrated_engine.begin() as conn:
        alice = await wallets.signup(conn, email="alice@example.com", grant_nano=500_000_000)
        bob = await wallets.signup(conn, email="bob@example.com", grant_nano=500_000_000)
    await post(
        migrated_engine,
        wallet_id=alice.wallet.id,
        kind="credit",
        amount_nano=10_000_000_000,
        idempotency_key="credit:ticket-a",
    )
    await post(
        migrated_engine,
        wallet_id=alice.wallet.id,
        kind="credit",
        amount_nano=10_000_000_000,
        idempotency_key="credit:ticket-a",
    )  # the same credit, run again
    await post(
        migrated_engine,
        wallet_id=bob.wallet.id,
        kind="adjustment",
        amount_nano=-100_000_000,
        idempotency_key="adjustment:ticket-b",
    )
    for i, (wallet, key) in enumerate(
        [(alice.wallet.id, alice.key.key_id), (bob.wallet.id, bob.key.key_id)] * 3
    ):
        async with ac.connect() as conn:
            refusal = await holds.place(
                conn,
                request_id=f"r{i}",
                wallet_id=wallet,
                key_id=key,
                model="gpt-4o-mini",
                amount_nano=1_000_000,
                ttl_s=0 if i == 5 else 600,
                strict=False,
            )
            assert refusal is None
    charge, settled = holds.Resolution.post, holds.Settlement
    async with migrated_engine.begin() as conn:
        assert await holds.settle(conn, request_id="r0", resolution=charge(123_456)) is settled.POSTED
        assert await holds.settle(conn, request_id="r1", resolution=holds.Resolution.VOID) is settled.VOIDED
        assert (
            await holds.settle(conn, request_id="r2", resolution=holds.Resolution.POST_ESTIMATE)
            is settled.POSTED
        )
    async with migrated_engine.begin() as conn:
        # r5 is past its expiry, within the report grace: nothing to charge yet.
        assert await expiry.charge_unreported(conn, report_grace_s=3600) == 0
    async with migrated_engine.begin() as conn:
        assert await holds.settle(conn, request_id="r0", resolution=charge(123_456)) is settled.ALREADY_POSTED
    # r3, r4 and r5 stay pending: their reservations count too.
    assert (await audit.run(migrated_engine)).findings == []
    async with migrated_engine.connect() as conn:
        assert await holds.outstanding(conn) == 3
    assert (
        await balance_of(migrated_engine, alice.wallet.id)
        == 500_000_000 + 10_000_000_000 - 123_456 - 1_000_000
    )
    assert await balance_of(migrated_engine, bob.wallet.id) == 500_000_000 - 100_000_000
