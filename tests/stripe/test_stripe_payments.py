"""billing.payments on a real PostgreSQL, fed the events the Stripe test double makes: credits,
duplicates (sequential and concurrent), every order of a payment's events, unpaid and async
payments, refunds, disputes, unknown wallets. No HTTP here; the webhook tests add it."""

from __future__ import annotations

import asyncio
import copy
import itertools

import pytest
import sqlalchemy as sa

from billing import ledger, payments, tables, topups, wallets
from billingproxy.devstack.stripe_double import StripeDouble
from stripe_testkit import TEN_USD_NANO, Db

CENT = 10**7


async def kinds(db: Db, wallet_id: str) -> dict[str, int]:
    """Σ amount per entry kind: a payment's end state, whatever the entries' order and count."""
    sums: dict[str, int] = {}
    for entry in await db.entries(wallet_id):
        sums[entry.kind] = sums.get(entry.kind, 0) + entry.amount_nano
    return sums


# --- credits -------------------------------------------------------------------------------------


async def test_a_paid_checkout_credits_the_wallet_once(db: Db, double: StripeDouble, new_session) -> None:
    wallet_id, _ = await db.new_wallet(grant_nano=500_000_000)
    event = double.complete(await new_session(wallet_id))

    first = await db.process(event)
    assert (first.outcome, first.wallet_id, first.duplicate) == ("credited", wallet_id, False)
    assert await db.balance(wallet_id) == 500_000_000 + TEN_USD_NANO
    [grant, credit] = await db.entries(wallet_id)
    pi = event["data"]["object"]["payment_intent"]
    assert (credit.kind, credit.amount_nano, credit.idempotency_key) == (
        "topup",
        TEN_USD_NANO,
        f"stripe:{pi}",
    )
    assert credit.details["checkout_session"] == event["data"]["object"]["id"]

    counts = await db.row_counts()
    again = await db.process(copy.deepcopy(event))
    assert (again.outcome, again.duplicate) == ("credited", True)
    assert await db.row_counts() == counts
    assert await db.balance(wallet_id) == 500_000_000 + TEN_USD_NANO
    [recorded] = await db.events()
    assert (recorded.id, recorded.type, recorded.outcome, recorded.wallet_id) == (
        event["id"],
        "checkout.session.completed",
        "credited",
        wallet_id,
    )


async def test_the_same_payment_through_two_events_credits_once(
    db: Db, double: StripeDouble, new_session
) -> None:
    wallet_id, _ = await db.new_wallet()
    session_id = await new_session(wallet_id)
    completed = double.complete(session_id, async_payment=True)
    assert completed["data"]["object"]["payment_status"] == "unpaid"
    assert (await db.process(completed)).outcome == "awaiting_payment"
    assert await db.balance(wallet_id) == 0

    succeeded = double.async_result(session_id, succeeded=True)
    assert (await db.process(succeeded)).outcome == "credited"
    # Another event about the same (now paid) session: a different event id, the same payment.
    resent = double.event("checkout.session.completed", double.sessions[session_id])
    assert resent["id"] != succeeded["id"]
    assert (await db.process(resent)).outcome == "already_credited"
    assert await kinds(db, wallet_id) == {"topup": TEN_USD_NANO}


async def test_a_failed_async_payment_never_credits(db: Db, double: StripeDouble, new_session) -> None:
    wallet_id, _ = await db.new_wallet()
    session_id = await new_session(wallet_id)
    assert (await db.process(double.complete(session_id, async_payment=True))).outcome == "awaiting_payment"
    failed = double.async_result(session_id, succeeded=False)
    # Even a (malformed) failure event claiming "paid" must not credit.
    failed["data"]["object"]["payment_status"] = "paid"
    assert (await db.process(failed)).outcome == "payment_failed"
    assert await db.entries(wallet_id) == []
    assert await db.count(tables.stripe_payments) == 0


async def test_unpaid_and_expired_sessions_credit_nothing(db: Db, double: StripeDouble, new_session) -> None:
    wallet_id, _ = await db.new_wallet()
    unpaid = double.complete(await new_session(wallet_id), async_payment=True)
    expired = double.expire(await new_session(wallet_id))
    no_payment = double.complete(await new_session(wallet_id))
    no_payment["data"]["object"]["payment_status"] = "no_payment_required"
    assert [(await db.process(e)).outcome for e in (unpaid, expired, no_payment)] == [
        "awaiting_payment",
        "session_expired",
        "awaiting_payment",
    ]
    assert await db.entries(wallet_id) == []


async def test_a_session_we_did_not_create_is_recorded_not_credited(
    db: Db, double: StripeDouble, new_session
) -> None:
    """Another product on the same Stripe account: its session may name one of our wallets."""
    wallet_id, _ = await db.new_wallet()
    before = await db.row_counts()
    session_id = await new_session(wallet_id, recorded=False)
    event = double.complete(session_id)
    result = await db.process(event)
    assert (result.outcome, result.wallet_id) == ("not_ours", None)
    after = await db.row_counts()
    assert after == {**before, "stripe_events": 1}
    # The reconciliation path (a session retrieved from Stripe) follows the same rule.
    async with db.engine.begin() as conn:
        assert (
            await payments.apply_checkout_session(conn, double.sessions[session_id])
        ).outcome == "not_ours"
    # ...and its refund later stays a fact about a payment nobody was credited for.
    refund = await db.process(double.refund(event["data"]["object"]["payment_intent"], 500))
    assert refund.outcome == "pending_payment"
    assert await db.count(tables.ledger_entries) == 0


@pytest.mark.parametrize("names", [{"client_reference_id": None, "metadata": {}}, "another wallet"])
async def test_our_session_credits_the_recorded_wallet_whatever_the_event_names(
    db: Db, double: StripeDouble, new_session, names: dict | str
) -> None:
    wallet_id, _ = await db.new_wallet()
    other_id, _ = await db.new_wallet()
    event = double.complete(await new_session(wallet_id))
    if names == "another wallet":
        names = {"client_reference_id": other_id, "metadata": {"wallet_id": other_id}}
    event["data"]["object"].update(names)
    result = await db.process(event)
    assert (result.outcome, result.wallet_id) == ("credited", wallet_id)
    assert await kinds(db, wallet_id) == {"topup": TEN_USD_NANO}
    assert await db.entries(other_id) == []


@pytest.mark.parametrize(
    ("change", "outcome"),
    [
        ({"id": "cs_test_not_created_here"}, "not_ours"),
        ({"mode": "subscription"}, "invalid_object"),
        ({"currency": "eur"}, "amount_mismatch"),
        ({"amount_total": 999}, "amount_mismatch"),
        ({"amount_total": 100_000}, "amount_mismatch"),
        ({"amount_total": None}, "amount_mismatch"),
        ({"payment_intent": None}, "invalid_object"),
        ({"object": "payment_intent"}, "invalid_object"),
    ],
)
async def test_sessions_that_are_not_our_top_ups_as_recorded_credit_nothing(
    db: Db, double: StripeDouble, new_session, change: dict, outcome: str
) -> None:
    wallet_id, _ = await db.new_wallet()
    event = double.complete(await new_session(wallet_id))
    event["data"]["object"].update(change)
    assert (await db.process(event)).outcome == outcome
    assert await db.entries(wallet_id) == []
    assert await db.count(tables.stripe_payments) == 0


async def test_events_we_do_not_handle_are_recorded_and_bodies_that_are_not_events_refused(
    db: Db, double: StripeDouble
) -> None:
    event = double.event("customer.created", {"id": "cus_1", "object": "customer"})
    assert (await db.process(event)).outcome == "ignored_type"
    for broken in ({}, {"id": "evt_1", "type": "x"}, {"id": "evt_1", "type": "x", "data": {"object": []}}):
        with pytest.raises(payments.InvalidEvent):
            await db.process(broken)
    assert await db.count(tables.stripe_events) == 1


async def test_a_retrieved_session_credits_like_its_webhook(
    db: Db, double: StripeDouble, new_session
) -> None:
    """Reconciliation after a missed webhook, then the webhook after all: one credit."""
    wallet_id, _ = await db.new_wallet()
    session_id = await new_session(wallet_id)
    async with db.engine.begin() as conn:
        await topups.record_checkout_session(
            conn, session_id=session_id, wallet_id=wallet_id, amount_nano=TEN_USD_NANO, expires_at=None
        )
        assert await topups.open_checkout_sessions(conn, limit=10) == [session_id]
    event = double.complete(session_id)
    async with db.engine.begin() as conn:
        assert (
            await payments.apply_checkout_session(conn, double.sessions[session_id])
        ).outcome == "credited"
        assert await topups.open_checkout_sessions(conn, limit=10) == []
        status = await topups.checkout_session_status(conn, session_id)
    assert status == topups.SessionStatus(session_id, TEN_USD_NANO, "complete", credited=True)
    assert (await db.process(event)).outcome == "already_credited"
    assert await kinds(db, wallet_id) == {"topup": TEN_USD_NANO}


# --- refunds -------------------------------------------------------------------------------------


async def test_partial_then_full_refunds_debit_only_the_new_part(
    db: Db, double: StripeDouble, new_session
) -> None:
    wallet_id, _ = await db.new_wallet()
    paid = double.complete(await new_session(wallet_id))
    pi = paid["data"]["object"]["payment_intent"]
    await db.process(paid)

    partial = double.refund(pi, 300)
    assert partial["data"]["object"]["amount_refunded"] == 300 and not partial["data"]["object"]["refunded"]
    result = await db.process(partial)
    assert result.outcome == "refund_debited"
    assert await db.balance(wallet_id) == 700 * CENT

    rest = double.refund(pi)
    assert rest["data"]["object"]["amount_refunded"] == 1000 and rest["data"]["object"]["refunded"]
    assert (await db.process(rest)).outcome == "refund_debited"
    assert await db.balance(wallet_id) == 0
    charge = rest["data"]["object"]["id"]
    assert [(e.kind, e.amount_nano, e.idempotency_key) for e in (await db.entries(wallet_id))[1:]] == [
        ("refund", -300 * CENT, f"refund:{charge}/300"),
        ("refund", -700 * CENT, f"refund:{charge}/1000"),
    ]
    # The same refund again, as a new event (Stripe resends a snapshot): nothing more.
    resent = double.event("charge.refunded", double.charges[charge])
    assert (await db.process(resent)).outcome == "refund_already_applied"
    assert await db.balance(wallet_id) == 0


async def test_refund_events_out_of_order_end_the_same(db: Db, double: StripeDouble, new_session) -> None:
    wallet_id, _ = await db.new_wallet()
    paid = double.complete(await new_session(wallet_id))
    pi = paid["data"]["object"]["payment_intent"]
    first, second = double.refund(pi, 300), double.refund(pi, 200)
    # The later snapshot (500 in all) first, then the older one (300): the older changes nothing.
    assert (await db.process(second)).outcome == "pending_payment"
    assert (await db.process(paid)).outcome == "credited"
    assert (await db.process(first)).outcome == "refund_already_applied"
    assert await kinds(db, wallet_id) == {"topup": TEN_USD_NANO, "refund": -500 * CENT}


# --- disputes ------------------------------------------------------------------------------------


async def test_a_dispute_debits_and_holds_the_wallet_until_won(
    db: Db, double: StripeDouble, new_session
) -> None:
    wallet_id, _ = await db.new_wallet()
    paid = double.complete(await new_session(wallet_id))
    pi = paid["data"]["object"]["payment_intent"]
    await db.process(paid)
    # Take most of it away (an adjustment: a usage entry needs its request's hold), so the
    # dispute takes the balance below zero.
    async with db.engine.begin() as conn:
        await ledger.post_entry(
            conn,
            wallet_id=wallet_id,
            kind="adjustment",
            amount_nano=-9 * 10**9,
            idempotency_key="adjustment:r1",
        )

    created = double.dispute(pi)
    assert (await db.process(created)).outcome == "dispute_debited"
    wallet = await db.wallet(wallet_id)
    assert (wallet.balance_nano, wallet.disputed, wallet.suspended, wallet.state) == (
        -9 * 10**9,
        True,
        False,
        wallets.WalletState.DISPUTED,
    )

    dispute_id = created["data"]["object"]["id"]
    assert (await db.process(double.update_dispute(dispute_id, "under_review"))).outcome == "dispute_recorded"
    wallet = await db.wallet(wallet_id)
    assert (wallet.disputed, wallet.suspended) == (True, False)

    won = double.update_dispute(dispute_id, "won")
    assert won["type"] == "charge.dispute.closed"
    assert (await db.process(won)).outcome == "dispute_reversed"
    wallet = await db.wallet(wallet_id)
    assert (wallet.balance_nano, wallet.disputed, wallet.suspended, wallet.state) == (
        10**9,
        False,
        False,
        wallets.WalletState.ACTIVE,
    )
    assert [(e.kind, e.idempotency_key) for e in (await db.entries(wallet_id))[-2:]] == [
        ("dispute", f"dispute:{dispute_id}"),
        ("dispute_reversal", f"dispute_won:{dispute_id}"),
    ]


async def test_a_lost_dispute_keeps_the_debit_and_lifts_the_hold(
    db: Db, double: StripeDouble, new_session
) -> None:
    wallet_id, _ = await db.new_wallet()
    paid = double.complete(await new_session(wallet_id))
    await db.process(paid)
    created = double.dispute(paid["data"]["object"]["payment_intent"])
    await db.process(created)
    assert (await db.wallet(wallet_id)).disputed
    assert (
        await db.process(double.update_dispute(created["data"]["object"]["id"], "lost"))
    ).outcome == "dispute_recorded"
    wallet = await db.wallet(wallet_id)
    assert (wallet.balance_nano, wallet.disputed, wallet.suspended) == (0, False, False)
    assert await kinds(db, wallet_id) == {"topup": TEN_USD_NANO, "dispute": -TEN_USD_NANO}


async def set_suspended(db: Db, wallet_id: str, suspended: bool) -> None:
    """What the operator (a Wallet resource's spec.suspended) or an admin writes."""
    async with db.engine.begin() as conn:
        await conn.execute(
            sa.update(tables.wallets).where(tables.wallets.c.id == wallet_id).values(suspended=suspended)
        )


async def test_an_operators_suspension_and_a_disputes_hold_never_lift_each_other(
    db: Db, double: StripeDouble, new_session
) -> None:
    wallet_id, _ = await db.new_wallet()
    a, b = double.complete(await new_session(wallet_id)), double.complete(await new_session(wallet_id))
    await db.process(a)
    await db.process(b)

    # The operator suspends first; a dispute opens and closes: the suspension is still there.
    await set_suspended(db, wallet_id, True)
    first = double.dispute(a["data"]["object"]["payment_intent"])
    await db.process(first)
    wallet = await db.wallet(wallet_id)
    assert (wallet.suspended, wallet.disputed) == (True, True)
    await db.process(double.update_dispute(first["data"]["object"]["id"], "won"))
    wallet = await db.wallet(wallet_id)
    assert (wallet.suspended, wallet.disputed, wallet.state) == (True, False, wallets.WalletState.SUSPENDED)

    # A dispute opens; the operator lifts `suspended` (a reconcile of spec.suspended: false), and
    # later events of the dispute do not change that: the dispute's hold stays until it closes.
    second = double.dispute(b["data"]["object"]["payment_intent"])
    await db.process(second)
    await set_suspended(db, wallet_id, False)
    wallet = await db.wallet(wallet_id)
    assert (wallet.suspended, wallet.disputed, wallet.state) == (False, True, wallets.WalletState.DISPUTED)
    await db.process(double.update_dispute(second["data"]["object"]["id"], "under_review"))
    wallet = await db.wallet(wallet_id)
    assert (wallet.suspended, wallet.disputed, wallet.state) == (False, True, wallets.WalletState.DISPUTED)

    # The operator suspends on top of the open dispute; the dispute closing leaves it suspended.
    await set_suspended(db, wallet_id, True)
    await db.process(double.update_dispute(second["data"]["object"]["id"], "lost"))
    wallet = await db.wallet(wallet_id)
    assert (wallet.suspended, wallet.disputed, wallet.state) == (True, False, wallets.WalletState.SUSPENDED)
    await set_suspended(db, wallet_id, False)
    wallet = await db.wallet(wallet_id)
    assert (wallet.suspended, wallet.disputed, wallet.state) == (False, False, wallets.WalletState.ACTIVE)


async def test_two_disputes_keep_the_wallet_on_hold_until_the_last_closes(
    db: Db, double: StripeDouble, new_session
) -> None:
    wallet_id, _ = await db.new_wallet()
    a, b = double.complete(await new_session(wallet_id)), double.complete(await new_session(wallet_id))
    await db.process(a)
    await db.process(b)
    da = double.dispute(a["data"]["object"]["payment_intent"])
    db_ = double.dispute(b["data"]["object"]["payment_intent"])
    await db.process(da)
    await db.process(db_)
    await db.process(double.update_dispute(da["data"]["object"]["id"], "won"))
    wallet = await db.wallet(wallet_id)
    assert (wallet.disputed, wallet.suspended) == (True, False)
    await db.process(double.update_dispute(db_["data"]["object"]["id"], "warning_closed"))
    wallet = await db.wallet(wallet_id)
    assert (wallet.balance_nano, wallet.disputed, wallet.suspended) == (2 * TEN_USD_NANO, False, False)


async def test_a_late_or_older_dispute_event_never_reopens_a_closed_dispute(
    db: Db, double: StripeDouble, new_session
) -> None:
    wallet_id, _ = await db.new_wallet()
    paid = double.complete(await new_session(wallet_id))
    created = double.dispute(paid["data"]["object"]["payment_intent"])
    dispute_id = created["data"]["object"]["id"]
    review = double.update_dispute(dispute_id, "under_review")
    won = double.update_dispute(dispute_id, "won")
    review["created"] = won["created"]  # the same second: the closing status still wins
    created["created"] = won["created"] - 5  # older
    for event in (won, paid, review, created):
        await db.process(event)
    wallet = await db.wallet(wallet_id)
    assert (wallet.balance_nano, wallet.disputed, wallet.suspended) == (TEN_USD_NANO, False, False)
    assert await kinds(db, wallet_id) == {
        "topup": TEN_USD_NANO,
        "dispute": -TEN_USD_NANO,
        "dispute_reversal": TEN_USD_NANO,
    }


# --- every order ---------------------------------------------------------------------------------


async def test_every_order_of_a_payments_events_ends_in_the_same_state(
    db: Db, double: StripeDouble, new_session
) -> None:
    """completed, two partial refunds, a dispute opened and won (plus a duplicate), in all 120
    orders: the same balance, the same sums per kind, not on hold, books in agreement; the wallet
    is held (``disputed``) at some point exactly when the dispute lands after the credit and before
    its closing, and ``suspended`` (the operator's switch) is never touched."""
    names = ("completed", "refund_300", "refund_200", "dispute", "won")
    states = set()
    for order in itertools.permutations(range(len(names))):
        wallet_id, _ = await db.new_wallet()
        paid = double.complete(await new_session(wallet_id))
        pi = paid["data"]["object"]["payment_intent"]
        r1, r2 = double.refund(pi, 300), double.refund(pi, 200)
        dispute = double.dispute(pi)
        won = double.update_dispute(dispute["data"]["object"]["id"], "won")
        events = [paid, r1, r2, dispute, won]
        seen_disputed = False
        for i in order:
            await db.process(events[i])
            wallet = await db.wallet(wallet_id)
            assert not wallet.suspended
            seen_disputed |= wallet.disputed
        # Held in between only if the credit and the dispute both came before the closing.
        assert seen_disputed == (order.index(0) < order.index(4) and order.index(3) < order.index(4)), order
        await db.process(copy.deepcopy(events[order[0]]))  # a duplicate at the end
        wallet = await db.wallet(wallet_id)
        states.add(
            (
                wallet.balance_nano,
                wallet.disputed,
                wallet.suspended,
                tuple(sorted((await kinds(db, wallet_id)).items())),
            )
        )
    assert states == {
        (
            500 * CENT,
            False,
            False,
            (
                ("dispute", -500 * CENT),
                ("dispute_reversal", 500 * CENT),
                ("refund", -500 * CENT),
                ("topup", TEN_USD_NANO),
            ),
        )
    }


# --- concurrency ---------------------------------------------------------------------------------


async def test_concurrent_deliveries_credit_once(db: Db, double: StripeDouble, new_session) -> None:
    wallet_id, _ = await db.new_wallet()
    session_id = await new_session(wallet_id)
    completed = double.complete(session_id, async_payment=True)
    succeeded = double.async_result(session_id, succeeded=True)
    paid_again = double.event("checkout.session.completed", double.sessions[session_id])
    # Ten copies of one event, and two other events about the same payment, all at once.
    results = await asyncio.gather(
        *(db.process(copy.deepcopy(succeeded)) for _ in range(10)),
        db.process(completed),
        db.process(paid_again),
    )
    outcomes = sorted(r.outcome for r in results if not r.duplicate)
    assert sorted(outcomes) == sorted(["awaiting_payment", "credited", "already_credited"])
    assert sum(r.duplicate for r in results) == 9
    assert await kinds(db, wallet_id) == {"topup": TEN_USD_NANO}


async def test_concurrent_refunds_and_disputes_apply_once_each(
    db: Db, double: StripeDouble, new_session
) -> None:
    wallet_id, _ = await db.new_wallet()
    paid = double.complete(await new_session(wallet_id))
    pi = paid["data"]["object"]["payment_intent"]
    refunds = [double.refund(pi, 100) for _ in range(5)]  # cumulative 100, 200, … 500
    dispute = double.dispute(pi)
    await asyncio.gather(
        db.process(paid),
        *(db.process(r) for r in refunds),
        db.process(dispute),
        *(db.process(copy.deepcopy(r)) for r in refunds),
    )
    wallet = await db.wallet(wallet_id)
    assert await kinds(db, wallet_id) == {
        "topup": TEN_USD_NANO,
        "refund": -500 * CENT,
        "dispute": -500 * CENT,
    }
    assert (wallet.balance_nano, wallet.disputed, wallet.suspended) == (0, True, False)


async def test_disputes_of_several_payments_changing_at_once_leave_disputed_exact(
    db: Db, double: StripeDouble, new_session
) -> None:
    """One wallet, six payments credited at once, then their disputes open and close concurrently,
    round after round: ``disputed`` always ends equal to "some dispute is open" (the books check
    it after the test). Concurrent credits once deadlocked (FOR UPDATE against the payment row's
    foreign-key share lock); the ledger now locks FOR NO KEY UPDATE."""
    wallet_id, _ = await db.new_wallet()
    paid = [double.complete(await new_session(wallet_id)) for _ in range(6)]
    await asyncio.gather(*(db.process(event) for event in paid))
    assert (await db.wallet(wallet_id)).balance_nano == 6 * TEN_USD_NANO
    disputes = [double.dispute(e["data"]["object"]["payment_intent"]) for e in paid]
    ids = [d["data"]["object"]["id"] for d in disputes]
    # Round 1: all open at once. Round 2: all but the last close at once, the last goes to review.
    await asyncio.gather(*(db.process(d) for d in disputes))
    assert (await db.wallet(wallet_id)).disputed
    closing = [double.update_dispute(i, "won") for i in ids[:-1]]
    await asyncio.gather(
        *(db.process(e) for e in closing), db.process(double.update_dispute(ids[-1], "under_review"))
    )
    wallet = await db.wallet(wallet_id)
    assert (wallet.disputed, wallet.suspended) == (True, False)
    assert await db.problems() == []
    # Round 3: the last closes, concurrently with replays of the earlier closings.
    await asyncio.gather(
        db.process(double.update_dispute(ids[-1], "lost")), *(db.process(copy.deepcopy(e)) for e in closing)
    )
    wallet = await db.wallet(wallet_id)
    assert (wallet.disputed, wallet.suspended) == (False, False)
