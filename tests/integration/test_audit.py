"""billing.audit against a real PostgreSQL: a ledger written by the real code (grants, credits,
holds in every state, Stripe payments with a refund and disputes) passes every check; each check
fails, naming the wallet and the row, on a copy broken by hand the way a bug or a person would
break it; and the audit is one read-only snapshot that writers do not wait for."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine

from billing import audit, database, expiry, holds, ledger, payments, topups, wallets
from legacy_expiry import expire_as_before

pytestmark = pytest.mark.integration

CENT = 10**7
GRANT_NANO = 1_000_000_000


@dataclasses.dataclass(frozen=True)
class Books:
    """Who is who in the populated ledger."""

    alice: str  # grant, a manual credit, a hold in every state
    bob: str  # a Stripe top-up, partly refunded, and a dispute that was won
    carol: str  # a Stripe top-up under an open dispute (so ``disputed``)


async def _settle(engine: AsyncEngine, request_id: str, resolution: holds.Resolution) -> holds.Settlement:
    async with engine.begin() as conn:
        return await holds.settle(conn, request_id=request_id, resolution=resolution)


async def _stripe(engine: AsyncEngine, event_type: str, obj: dict[str, Any], created: int) -> str:
    """Apply a Stripe event of the shape billing.payments reads; its outcome."""
    event = {
        "id": f"evt_{obj['id']}_{created}",
        "type": event_type,
        "created": created,
        "data": {"object": obj},
    }
    async with engine.begin() as conn:
        return (await payments.process_event(conn, event)).outcome


async def _top_up(engine: AsyncEngine, wallet_id: str, name: str, cents: int) -> None:
    """A top-up as the gateway makes it: the session recorded, then Stripe's paid checkout."""
    async with engine.begin() as conn:
        await topups.record_checkout_session(
            conn, session_id=f"cs_{name}", wallet_id=wallet_id, amount_nano=cents * CENT, expires_at=None
        )
    session = {
        "object": "checkout.session",
        "id": f"cs_{name}",
        "mode": "payment",
        "status": "complete",
        "payment_status": "paid",
        "payment_intent": f"pi_{name}",
        "amount_total": cents,
        "currency": "usd",
    }
    assert await _stripe(engine, "checkout.session.completed", session, 1) == "credited"


def _dispute(name: str, payment: str, cents: int, status: str) -> dict[str, Any]:
    return {
        "object": "dispute",
        "id": f"dp_{name}",
        "payment_intent": f"pi_{payment}",
        "charge": f"ch_{payment}",
        "amount": cents,
        "status": status,
        "currency": "usd",
    }


async def populate(engine: AsyncEngine) -> Books:
    ac = database.autocommit(engine)
    async with engine.begin() as conn:
        alice = await wallets.signup(conn, email="alice@example.com", grant_nano=GRANT_NANO)
        bob = await wallets.create_wallet(conn, source="admin", grant_nano=0)
        carol = await wallets.create_wallet(conn, source="admin", grant_nano=0)
        await ledger.post_entry(
            conn, wallet_id=alice.wallet.id, kind="credit", amount_nano=5 * CENT, idempotency_key="credit:t-1"
        )
    for request_id, amount_nano, ttl_s in [
        ("posted", 1_000_000, 600),
        ("estimate", 1_000_000, 600),
        ("voided", 1_000_000, 600),
        ("expired", 1_000_000, 0),
        ("late", 2_000_000, 0),
        ("pending", 2_000_000, 600),
    ]:
        async with ac.connect() as conn:
            refusal = await holds.place(
                conn,
                request_id=request_id,
                wallet_id=alice.wallet.id,
                key_id=alice.key.key_id,
                model="gpt-4o-mini",
                amount_nano=amount_nano,
                ttl_s=ttl_s,
                strict=False,
            )
            assert refusal is None
    # "expired" and "late" were expired by an earlier version, which released their reservations.
    assert await expire_as_before(engine) == 2
    async with ac.connect() as conn:
        # Past its expiry, unreported and within the grace: still pending, still reserved.
        refusal = await holds.place(
            conn,
            request_id="overdue",
            wallet_id=alice.wallet.id,
            key_id=alice.key.key_id,
            model="gpt-4o-mini",
            amount_nano=1_000_000,
            ttl_s=0,
            strict=False,
        )
        assert refusal is None
        # A refused Check's report that came before any hold: a void in its request id's place.
        assert await holds.void_before_hold(conn, "refused-check")
    assert await _settle(engine, "posted", holds.Resolution.post(123_456)) is holds.Settlement.POSTED
    assert await _settle(engine, "estimate", holds.Resolution.POST_ESTIMATE) is holds.Settlement.POSTED
    assert await _settle(engine, "voided", holds.Resolution.VOID) is holds.Settlement.VOIDED
    late = await _settle(engine, "late", holds.Resolution.post(7_000))
    assert late is holds.Settlement.POSTED_AFTER_EXPIRY

    await _top_up(engine, bob.id, "bob", 1_000)
    refund = {
        "object": "charge",
        "id": "ch_bob",
        "payment_intent": "pi_bob",
        "amount_refunded": 100,
        "currency": "usd",
    }
    assert await _stripe(engine, "charge.refunded", refund, 2) == "refund_debited"
    assert await _stripe(
        engine, "charge.dispute.created", _dispute("won", "bob", 200, "needs_response"), 3
    ) == ("dispute_debited")
    assert await _stripe(engine, "charge.dispute.closed", _dispute("won", "bob", 200, "won"), 4) == (
        "dispute_reversed"
    )
    await _top_up(engine, carol.id, "carol", 500)
    assert await _stripe(
        engine, "charge.dispute.created", _dispute("open", "carol", 500, "needs_response"), 5
    ) == ("dispute_debited")
    # A refund of a payment never credited here: kept as a fact, no entry.
    stray = {
        "object": "charge",
        "id": "ch_x",
        "payment_intent": "pi_x",
        "amount_refunded": 300,
        "currency": "usd",
    }
    assert await _stripe(engine, "charge.refunded", stray, 6) == "pending_payment"
    return Books(alice.wallet.id, bob.id, carol.id)


@pytest.fixture
async def books(migrated_engine: AsyncEngine) -> Books:
    return await populate(migrated_engine)


async def execute(engine: AsyncEngine, sql: str, **params: Any) -> None:
    async with engine.begin() as conn:
        await conn.execute(sa.text(sql), params)


async def delete_entry(engine: AsyncEngine, idempotency_key: str) -> None:
    """What no code path can do (the table's trigger forbids it): only a person by hand."""
    async with engine.begin() as conn:
        await conn.execute(sa.text("ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_immutable"))
        await conn.execute(
            sa.text("DELETE FROM ledger_entries WHERE idempotency_key = :k"), {"k": idempotency_key}
        )
        await conn.execute(sa.text("ALTER TABLE ledger_entries ENABLE TRIGGER ledger_entries_immutable"))


async def entry_id(engine: AsyncEngine, idempotency_key: str) -> int:
    async with engine.connect() as conn:
        return (
            await conn.execute(
                sa.text("SELECT id FROM ledger_entries WHERE idempotency_key = :k"), {"k": idempotency_key}
            )
        ).scalar_one()


async def findings(engine: AsyncEngine) -> set[tuple[str, str | None, str]]:
    """(check, wallet, subject) of every finding; the report's counts agree with the list."""
    report = await audit.run(engine)
    for result in report.results:
        assert result.mismatches == len(result.findings), result
    return {(f.check.label, f.wallet_id, f.subject) for f in report.findings}


# --- a clean ledger ------------------------------------------------------------------------------


async def test_a_ledger_written_by_the_code_passes_every_check(
    migrated_engine: AsyncEngine, books: Books
) -> None:
    report = await audit.run(migrated_engine)
    assert report.findings == [] and report.clean
    checked = {r.check: r.checked for r in report.results}
    assert list(checked) == list(audit.Check)
    assert checked == {
        audit.Check.BALANCE: 3,
        # alice: grant, credit, three charges; bob: top-up, refund, dispute, reversal; carol: top-up, dispute
        audit.Check.BALANCE_AFTER: 11,
        audit.Check.RESERVED: 3,
        audit.Check.KEY_LIMITS: 0,  # no key has a limit
        audit.Check.OVERDUE_HOLDS: 2,  # "pending", "overdue"
        audit.Check.UNREPORTED_HOLDS: 1,  # "expired", released and not yet past the grace
        audit.Check.USAGE: 8 + 3,
        audit.Check.STRIPE: 3 + 2,  # pi_bob, pi_carol, pi_x; dp_won, dp_open
        audit.Check.RECHARGES: 0,
    }


async def test_an_empty_database_is_clean(migrated_engine: AsyncEngine) -> None:
    report = await audit.run(migrated_engine)
    assert report.clean and {r.checked for r in report.results} == {0}


# --- each check, broken by hand ------------------------------------------------------------------


async def test_a_balance_that_is_not_the_sum_of_its_entries(
    migrated_engine: AsyncEngine, books: Books
) -> None:
    await execute(
        migrated_engine, "UPDATE wallets SET balance_nano = balance_nano + 1 WHERE id = :id", id=books.bob
    )
    assert await findings(migrated_engine) == {("balance", books.bob, "wallet")}
    [finding] = (await audit.run(migrated_engine)).findings
    # $10.00 top-up, $1.00 refunded, $2.00 disputed and given back.
    assert (finding.expected, finding.found) == (
        "balance 9.000000 USD (Σ of its 4 entries)",
        "balance 9.000000001 USD",
    )


async def test_a_deleted_entry_breaks_the_balance_and_the_entry_after_it(
    migrated_engine: AsyncEngine, books: Books
) -> None:
    await delete_entry(migrated_engine, "credit:t-1")
    usage = await entry_id(migrated_engine, "usage:posted")
    assert await findings(migrated_engine) == {
        ("balance", books.alice, "wallet"),
        ("balance_after", books.alice, f"entry {usage} (usage:posted)"),
    }


async def test_a_reservation_that_is_not_the_sum_of_pending_holds(
    migrated_engine: AsyncEngine, books: Books
) -> None:
    await execute(migrated_engine, "UPDATE wallets SET reserved_nano = 0 WHERE id = :id", id=books.alice)
    assert await findings(migrated_engine) == {("reserved", books.alice, "wallet")}
    [finding] = (await audit.run(migrated_engine)).findings
    assert (finding.expected, finding.found) == (
        "reserved 0.003000 USD (Σ of its 2 pending holds)",
        "reserved 0.000000 USD",
    )


async def test_a_pending_hold_left_past_its_expiry_and_the_report_grace(
    migrated_engine: AsyncEngine, books: Books
) -> None:
    """Past ``expires_at`` and the report grace by less than the allowance, the sweep may just
    not have charged it yet; by more, no sweep is running."""
    due_s = audit.DEFAULT_REPORT_GRACE_S + audit.OVERDUE_ALLOWANCE_S
    await execute(
        migrated_engine,
        "UPDATE holds SET expires_at = now() - make_interval(secs => :s) WHERE request_id = 'pending'",
        s=due_s - audit.OVERDUE_ALLOWANCE_S / 2,
    )
    assert await findings(migrated_engine) == set()
    await execute(
        migrated_engine,
        "UPDATE holds SET expires_at = now() - make_interval(secs => :s) WHERE request_id = 'pending'",
        s=due_s + 60,
    )
    assert await findings(migrated_engine) == {("overdue_holds", books.alice, "hold pending")}
    [finding] = (await audit.run(migrated_engine)).findings
    assert finding.found.startswith("still pending ") and finding.found.endswith("reserving 0.002000 USD")


async def test_an_expired_hold_left_uncharged_past_the_report_grace(
    migrated_engine: AsyncEngine, books: Books
) -> None:
    """Released at its expiry by an earlier version, then the sweep must charge it its estimate
    within the grace period (billing/expiry.py); one still uncharged after that means no sweep
    charged it."""
    async with migrated_engine.begin() as conn:
        refusal = await holds.place(
            conn,
            request_id="never-reported",
            wallet_id=books.alice,
            key_id=(
                await conn.execute(
                    sa.text("SELECT id FROM api_keys WHERE wallet_id = :w"), {"w": books.alice}
                )
            )
            .scalars()
            .first(),
            model="gpt-4o-mini",
            amount_nano=1_000,
            ttl_s=0,
            strict=False,
        )
        assert refusal is None
    assert await expire_as_before(migrated_engine) >= 1
    grace_s = 60
    assert ("unreported_holds", books.alice, "hold never-reported") not in await findings(migrated_engine)
    await execute(
        migrated_engine,
        "UPDATE holds SET resolved_at = now() - make_interval(secs => :s) "
        "WHERE request_id = 'never-reported'",
        s=grace_s + audit.OVERDUE_ALLOWANCE_S + 1,
    )
    report = await audit.run(migrated_engine, report_grace_s=grace_s)
    assert [(f.check, f.subject) for f in report.findings] == [
        (audit.Check.UNREPORTED_HOLDS, "hold never-reported")
    ]
    assert (await audit.run(migrated_engine, report_grace_s=grace_s * 100)).clean
    async with migrated_engine.begin() as conn:
        assert await expiry.charge_unreported(conn, report_grace_s=grace_s) == 1
    assert (await audit.run(migrated_engine, report_grace_s=grace_s)).clean


@pytest.mark.parametrize(
    "breakage",
    [
        "UPDATE holds SET posted_nano = posted_nano + 1",  # it posted another amount
        "UPDATE holds SET state = 'voided'",  # charged, yet the hold says voided
        "DELETE FROM holds",  # a charge whose hold is gone
    ],
)
async def test_a_usage_entry_that_disagrees_with_its_hold(
    migrated_engine: AsyncEngine, books: Books, breakage: str
) -> None:
    await execute(migrated_engine, breakage + " WHERE request_id = 'posted'")
    usage = await entry_id(migrated_engine, "usage:posted")
    assert await findings(migrated_engine) == {("usage", books.alice, f"entry {usage} (usage:posted)")}


async def test_a_posted_hold_without_its_charge(migrated_engine: AsyncEngine, books: Books) -> None:
    await execute(
        migrated_engine, "UPDATE holds SET state = 'posted', posted_nano = 0 WHERE request_id = 'voided'"
    )
    assert await findings(migrated_engine) == {("usage", books.alice, "hold voided")}


async def test_a_charge_for_a_request_that_was_voided(migrated_engine: AsyncEngine, books: Books) -> None:
    """Written through the ledger, so every balance agrees: only the usage rule sees it."""
    async with migrated_engine.begin() as conn:
        await ledger.post_entry(
            conn, wallet_id=books.alice, kind="usage", amount_nano=-1_000, idempotency_key="usage:voided"
        )
    charge = await entry_id(migrated_engine, "usage:voided")
    assert await findings(migrated_engine) == {("usage", books.alice, f"entry {charge} (usage:voided)")}


async def test_a_duplicated_top_up_credit(migrated_engine: AsyncEngine, books: Books) -> None:
    """The same payment credited a second time under another key: the balances all agree."""
    async with migrated_engine.begin() as conn:
        await ledger.post_entry(
            conn,
            wallet_id=books.bob,
            kind="topup",
            amount_nano=1_000 * CENT,
            idempotency_key="stripe:pi_bob#again",
            details={"payment_intent": "pi_bob"},
        )
    assert await findings(migrated_engine) == {("stripe", books.bob, "payment pi_bob")}
    [finding] = (await audit.run(migrated_engine)).findings
    assert finding.found == "2 credit(s), 20.000000 USD in all"


async def test_a_top_up_with_no_payment_behind_it(migrated_engine: AsyncEngine, books: Books) -> None:
    async with migrated_engine.begin() as conn:
        await ledger.post_entry(
            conn, wallet_id=books.carol, kind="topup", amount_nano=CENT, idempotency_key="stripe:pi_nowhere"
        )
    credit = await entry_id(migrated_engine, "stripe:pi_nowhere")
    assert await findings(migrated_engine) == {("stripe", books.carol, f"entry {credit} (stripe:pi_nowhere)")}


async def test_a_paid_payment_never_credited(migrated_engine: AsyncEngine, books: Books) -> None:
    await delete_entry(migrated_engine, "stripe:pi_carol")
    await execute(
        migrated_engine,
        "UPDATE wallets SET balance_nano = balance_nano - 5000000000 WHERE id = :id",
        id=books.carol,
    )
    dispute = await entry_id(migrated_engine, "dispute:dp_open")
    assert await findings(migrated_engine) == {
        ("stripe", books.carol, "payment pi_carol"),
        # The dispute's debit is now the wallet's first entry: it starts from 0, not from the credit.
        ("balance_after", books.carol, f"entry {dispute} (dispute:dp_open)"),
    }


@pytest.mark.parametrize(
    ("breakage", "subject"),
    [
        # A refund Stripe reported, never debited.
        (
            "UPDATE stripe_payments SET refunded_nano = refunded_nano + 10000000"
            " WHERE payment_intent = 'pi_bob'",
            "payment pi_bob",
        ),
        # A dispute won, its money never given back.
        ("UPDATE stripe_disputes SET status = 'won' WHERE id = 'dp_open'", "dispute dp_open (pi_carol, won)"),
        # A dispute lost, its money given back all the same.
        ("UPDATE stripe_disputes SET status = 'lost' WHERE id = 'dp_won'", "dispute dp_won (pi_bob, lost)"),
        # Credited for another amount than the session the gateway created.
        ("UPDATE stripe_checkout_sessions SET amount_nano = 1 WHERE id = 'cs_bob'", "payment pi_bob"),
    ],
)
async def test_stripe_facts_the_ledger_does_not_follow(
    migrated_engine: AsyncEngine, books: Books, breakage: str, subject: str
) -> None:
    await execute(migrated_engine, breakage)
    wallet = books.bob if "pi_bob" in subject else books.carol
    # Closing carol's only open dispute leaves her ``disputed`` flag stale too.
    stale_flag = {("stripe", books.carol, "wallet")} if "dp_open" in subject else set()
    assert await findings(migrated_engine) == {("stripe", wallet, subject)} | stale_flag


async def test_a_disputed_flag_that_does_not_follow_the_disputes(
    migrated_engine: AsyncEngine, books: Books
) -> None:
    await execute(migrated_engine, "UPDATE wallets SET disputed = false WHERE id = :id", id=books.carol)
    await execute(migrated_engine, "UPDATE wallets SET disputed = true WHERE id = :id", id=books.bob)
    assert await findings(migrated_engine) == {
        ("stripe", books.carol, "wallet"),
        ("stripe", books.bob, "wallet"),
    }


async def test_findings_are_listed_up_to_a_bound_and_all_counted(
    migrated_engine: AsyncEngine, books: Books, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit, "FINDINGS_LISTED_MAX", 2)
    await execute(migrated_engine, "UPDATE wallets SET balance_nano = balance_nano + 1")
    [balance] = [r for r in (await audit.run(migrated_engine)).results if r.check is audit.Check.BALANCE]
    assert (balance.mismatches, [f.wallet_id for f in balance.findings]) == (
        3,
        sorted([books.alice, books.bob, books.carol])[:2],
    )


# --- one read-only snapshot ----------------------------------------------------------------------


async def test_the_audit_can_write_nothing(migrated_url: str, books: Books) -> None:
    engine = database.create_engine(migrated_url, pool_size=1, max_overflow=0)
    try:
        async with audit.snapshot(engine) as conn:
            with pytest.raises(sa_exc.DBAPIError) as refused:
                await conn.execute(
                    sa.text("UPDATE wallets SET balance_nano = 0 WHERE id = :id"), {"id": books.bob}
                )
        assert "read-only transaction" in str(refused.value)
        assert await findings(engine) == set()
        # The pool's one connection, back from the audit, writes again for everyone else.
        await execute(engine, "UPDATE wallets SET suspended = true WHERE id = :id", id=books.bob)
    finally:
        await engine.dispose()


async def test_the_audit_sees_one_snapshot_and_writers_do_not_wait_for_it(
    migrated_engine: AsyncEngine, books: Books
) -> None:
    """Changes committed while the audit runs — here, between its first statement and its checks —
    are not seen: a credit (balance and entry together) and a breakage alike."""
    before = {r.check: r.checked for r in (await audit.run(migrated_engine)).results}
    async with audit.snapshot(migrated_engine) as conn:
        async with migrated_engine.begin() as writer:
            await ledger.post_entry(
                writer, wallet_id=books.bob, kind="credit", amount_nano=CENT, idempotency_key="credit:during"
            )
            await writer.execute(
                sa.text("UPDATE wallets SET reserved_nano = 7 WHERE id = :id"), {"id": books.carol}
            )
        report = await audit.check(conn)
    assert report.clean
    assert {r.check: r.checked for r in report.results} == before
    assert await findings(migrated_engine) == {("reserved", books.carol, "wallet")}
