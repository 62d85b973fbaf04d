"""Stripe top-ups as ledger entries: what each Stripe fact means for a wallet, applied once.

Why apart from the webhook handler: the webhook (``authz_sidecar/stripe_api.py``) verifies the
signature and hands over the event as plain JSON; a reconciliation (the operator, or a person with
``stripe events resend``) may hand over the same facts again, in any order, any number of times.
The books must end the same in every case, so the rules live here, on plain dicts, with no Stripe
SDK and no web framework (import-linter enforces both).

How it stays right whatever Stripe delivers (duplicates, retries, concurrency, any order):

1. Each event id is recorded once, with its outcome (``stripe_events``). A replay answers the
   first outcome and changes nothing; a concurrent replay waits on the unique index and then sees
   the first one.
2. An event only *merges facts* into rows keyed by Stripe's own ids, monotonically: a payment
   becomes paid and stays paid; ``amount_refunded`` (cumulative in Stripe) only grows; a dispute's
   status follows its newest event.
3. The payment's money effects are then *derived* from its facts and posted with idempotency
   keys: the credit ``stripe:<payment_intent>``, a refund ``refund:<charge>/<cumulative refunded>``
   for the part not yet debited, ``dispute:<id>``, and ``dispute_won:<id>`` when it comes back.
   The payment row is locked meanwhile, so two events of one payment apply one after the other.

:mod:`billing.audit` checks that the ledger agrees with these facts (its ``stripe`` check).

Effects wait for the credit: a refund or a dispute seen before its payment's checkout event is
kept as a fact and applied when the credit lands, so we never debit a payment we never credited,
and the end state is the same in every order.

Sharp edges:

- Only Checkout Sessions the gateway created are credited (``POST /billing/topup`` records each
  in ``stripe_checkout_sessions`` through :mod:`billing.topups`), to the wallet and for the
  amount it recorded then. The Stripe account may serve other products whose events carry the
  same valid signature, and a session's ``client_reference_id`` and metadata are whatever its
  creator wrote: a session we did not record is ``not_ours``; ours paid for another amount or
  currency is ``amount_mismatch``, credited with neither number and left to a person. Every such
  event is recorded with its outcome and must still be answered 2xx, or Stripe retries it for days.
  A PaymentIntent is credited on its own only for a recharge we started (:mod:`billing.recharges`),
  for that recharge's Customer and amount; every other top-up is a session.
- A dispute puts the wallet on hold through its own flag, ``wallets.disputed``: true exactly while
  the wallet has an open dispute, recomputed from the dispute facts after every event that touches
  them, and written by nothing else. It never touches ``wallets.suspended``, the operator's and
  admins' switch (a Wallet resource's ``spec.suspended``, rewritten on every reconcile), so
  neither owner can lift the other's hold: a dispute closing leaves an operator's suspension in
  place, and an operator lifting ``suspended`` leaves the dispute's hold in place. The Check
  admits only ``NOT suspended AND NOT disputed`` (``billing/holds.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from billing import idempotency, ledger, money, recharges, tables

CURRENCY = "usd"
DEFAULT_FAILURES_MAX = 3
# Dispute statuses after which the dispute is closed: it no longer holds its wallet (``disputed``).
DISPUTE_CLOSED = frozenset({"won", "lost", "warning_closed", "prevented"})
# ...and those in which the disputed money came back (an inquiry closed, a dispute won or prevented).
DISPUTE_REVERSED = frozenset({"won", "warning_closed", "prevented"})


def credit_key(payment_intent: str) -> str:
    """The idempotency key of a payment's credit: a payment is credited once, whatever comes."""
    return f"stripe:{payment_intent}"


def dispute_debit_key(dispute_id: str) -> str:
    """The idempotency key of a dispute's debit: every dispute of a credited payment has one."""
    return f"dispute:{dispute_id}"


def dispute_reversal_key(dispute_id: str) -> str:
    """The idempotency key of the money a dispute gave back (a status in :data:`DISPUTE_REVERSED`)."""
    return f"dispute_won:{dispute_id}"


# --- results -------------------------------------------------------------------------------------


class InvalidEvent(ValueError):
    """The (verified) body is not a Stripe event: no id, type or data.object."""


@dataclasses.dataclass(frozen=True)
class Result:
    """What one event (or one reconciled session) did. ``outcome`` is recorded and counted."""

    outcome: str
    wallet_id: str | None = None
    detail: str = ""
    entries: tuple[ledger.Entry, ...] = ()
    duplicate: bool = False


@dataclasses.dataclass
class _Applied:
    pending: bool = False
    credit: ledger.Entry | None = None
    refund: ledger.Entry | None = None
    dispute_debits: list[ledger.Entry] = dataclasses.field(default_factory=list)
    dispute_reversals: list[ledger.Entry] = dataclasses.field(default_factory=list)

    @property
    def created(self) -> tuple[ledger.Entry, ...]:
        every = [self.credit, self.refund, *self.dispute_debits, *self.dispute_reversals]
        return tuple(e for e in every if e is not None and e.created)


# --- reading Stripe's JSON -----------------------------------------------------------------------


def _id(value: object) -> str | None:
    """An expandable field: an id string, or the expanded object's id."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, Mapping):
        ident = value.get("id")
        if isinstance(ident, str):
            return ident
    return None


def _int(obj: Mapping[str, Any], key: str) -> int | None:
    value = obj.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _metadata(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    value = obj.get("metadata")
    return value if isinstance(value, Mapping) else {}


class _Skip(Exception):
    def __init__(self, outcome: str, detail: str = "", wallet_id: str | None = None) -> None:
        super().__init__(outcome)
        self.result = Result(outcome, wallet_id, detail)


# --- events --------------------------------------------------------------------------------------


async def process_event(
    conn: AsyncConnection, event: Mapping[str, Any], *, failures_max: int = DEFAULT_FAILURES_MAX
) -> Result:
    """Record a verified Stripe event and apply it, inside the caller's transaction.

    Call with the event exactly as Stripe sent it (the parsed JSON body); a setup-mode session's
    ``setup_intent`` expanded, with its ``payment_method`` (the webhook handler retrieves them).
    Raises :class:`InvalidEvent` for a body that is not an event; every event is otherwise
    recorded and answered, whatever it is about. ``failures_max``: the recharge failures in a row
    that pause auto-recharge.
    """
    event_id, event_type = event.get("id"), event.get("type")
    data = event.get("data")
    obj = data.get("object") if isinstance(data, Mapping) else None
    if not (
        isinstance(event_id, str) and event_id and isinstance(event_type, str) and isinstance(obj, Mapping)
    ):
        raise InvalidEvent("not a Stripe event: it needs an id, a type and data.object")
    created = event.get("created")
    created = created if isinstance(created, int) and not isinstance(created, bool) else 0

    # First, so a concurrent delivery of the same event waits here and then finds it done.
    recorded, first_delivery = await idempotency.insert_once(
        conn,
        tables.stripe_events,
        {
            "id": event_id,
            "type": event_type,
            "object_id": _id(obj.get("id")),
            "livemode": bool(event.get("livemode")),
            "stripe_created": created,
            "outcome": "processing",
        },
        key="id",
    )
    if not first_delivery:
        return Result(recorded.outcome, recorded.wallet_id, recorded.detail, duplicate=True)

    handler = _HANDLERS.get(event_type)
    try:
        if handler is None:
            result = Result("ignored_type")
        elif handler is _payment_intent:
            result = await _payment_intent(conn, obj, event_type, failures_max)
        else:
            result = await handler(conn, obj, event_type, created)
    except _Skip as skip:
        result = skip.result
    await conn.execute(
        sa.update(tables.stripe_events)
        .where(tables.stripe_events.c.id == event_id)
        .values(outcome=result.outcome, wallet_id=result.wallet_id, detail=result.detail[:500])
    )
    return result


async def apply_checkout_session(conn: AsyncConnection, session: Mapping[str, Any]) -> Result:
    """Apply a Checkout Session retrieved from the API (reconciliation after a missed webhook).

    Credits exactly as ``checkout.session.completed`` would, with the same idempotency key, so a
    webhook arriving later (or earlier) changes nothing more. Records no event.
    """
    try:
        return await _checkout(conn, session, "checkout.session.retrieved", 0)
    except _Skip as skip:
        return skip.result


async def _checkout(
    conn: AsyncConnection, session: Mapping[str, Any], event_type: str, _created: int
) -> Result:
    session_id = _id(session.get("id"))
    if session.get("object") != "checkout.session" or session_id is None:
        raise _Skip("invalid_object", "data.object is not a checkout.session")
    if session.get("mode") == "setup":
        return await _setup_session(conn, session_id, session, event_type)
    recorded = await _recorded_session(conn, session_id)
    if recorded is None:
        # Whatever wallet its client_reference_id or metadata name: those are its creator's words.
        raise _Skip("not_ours", f"session {session_id} was not created by this gateway's /billing/topup")
    # The wallet we recorded when we created the session; the event's copy names nothing for us.
    wallet_id = recorded.wallet_id
    named = {
        name
        for name in (_id(session.get("client_reference_id")), _id(_metadata(session).get("wallet_id")))
        if name is not None
    }
    disagreement = (
        f"; the session names {sorted(named)}, credited to the recorded wallet" if named - {wallet_id} else ""
    )
    if session.get("mode") != "payment":
        raise _Skip("invalid_object", f"session {session_id}: mode {session.get('mode')!r}", wallet_id)

    payment_intent = _id(session.get("payment_intent"))
    await _record_session_status(conn, session_id, session.get("status"), payment_intent)
    if event_type == "checkout.session.async_payment_failed":
        return Result("payment_failed", wallet_id, f"session {session_id}")
    if event_type == "checkout.session.expired" or session.get("status") == "expired":
        return Result("session_expired", wallet_id, f"session {session_id}")
    if session.get("payment_status") != "paid":
        return Result(
            "awaiting_payment",
            wallet_id,
            f"session {session_id}: payment_status {session.get('payment_status')!r}",
        )
    amount_cents = _int(session, "amount_total")
    if (
        session.get("currency") != CURRENCY
        or amount_cents is None
        or amount_cents * money.NANO_PER_CENT != recorded.amount_nano
    ):
        raise _Skip(
            "amount_mismatch",
            f"session {session_id} paid {amount_cents!r} {session.get('currency')!r} cents, "
            f"created for {money.format_usd(recorded.amount_nano)} USD; nothing credited",
            wallet_id,
        )
    if payment_intent is None:
        raise _Skip("invalid_object", "a paid session without payment_intent", wallet_id)

    payments = tables.stripe_payments
    insert = pg_insert(payments).values(
        payment_intent=payment_intent,
        wallet_id=wallet_id,
        checkout_session=session_id,
        amount_nano=recorded.amount_nano,
        paid=True,
    )
    # The first wallet and amount seen stay: the credit's idempotency key is fixed to them.
    await conn.execute(
        insert.on_conflict_do_update(
            index_elements=["payment_intent"],
            set_={
                "wallet_id": sa.func.coalesce(payments.c.wallet_id, insert.excluded.wallet_id),
                "checkout_session": sa.func.coalesce(
                    payments.c.checkout_session, insert.excluded.checkout_session
                ),
                "amount_nano": sa.func.coalesce(payments.c.amount_nano, insert.excluded.amount_nano),
                "paid": True,
                "updated_at": sa.func.now(),
            },
        )
    )
    applied = await _apply(conn, payment_intent)
    credit = applied.credit
    assert credit is not None, "a paid payment with a wallet is always credited"
    if credit.wallet_id != wallet_id:
        return Result(
            "invalid_object", wallet_id, f"{payment_intent} was already credited to {credit.wallet_id}"
        )
    outcome = "credited" if credit.created else "already_credited"
    detail = f"{payment_intent}: {money.format_usd(credit.amount_nano)} USD{disagreement}"
    return Result(outcome, wallet_id, detail, applied.created)


@dataclasses.dataclass(frozen=True)
class _RecordedSession:
    wallet_id: str
    amount_nano: int


async def _recorded_session(conn: AsyncConnection, session_id: str) -> _RecordedSession | None:
    """The wallet and amount we recorded when ``POST /billing/topup`` created the session."""
    s = tables.stripe_checkout_sessions
    row = (await conn.execute(sa.select(s.c.wallet_id, s.c.amount_nano).where(s.c.id == session_id))).first()
    return None if row is None else _RecordedSession(row.wallet_id, row.amount_nano)


async def _record_session_status(
    conn: AsyncConnection, session_id: str, status: object, payment_intent: str | None
) -> None:
    if status not in ("open", "complete", "expired"):
        return
    s = tables.stripe_checkout_sessions
    # complete and expired are final: a late "open" (an old retrieval) never reopens a session.
    await conn.execute(
        sa.update(s)
        .where(s.c.id == session_id, s.c.status == "open")
        .values(status=status, payment_intent=payment_intent, updated_at=sa.func.now())
    )


async def _charge_refunded(
    conn: AsyncConnection, charge: Mapping[str, Any], _type: str, _created: int
) -> Result:
    charge_id = _id(charge.get("id"))
    payment_intent = _id(charge.get("payment_intent"))
    refunded_cents = _int(charge, "amount_refunded")
    if charge.get("object") != "charge" or charge_id is None or refunded_cents is None:
        raise _Skip("invalid_object", "data.object is not a charge with amount_refunded")
    if payment_intent is None:
        raise _Skip("not_ours", f"charge {charge_id} has no payment_intent (not from Checkout)")
    if charge.get("currency") != CURRENCY:
        raise _Skip("unsupported_currency", f"currency {charge.get('currency')!r}")

    payments = tables.stripe_payments
    insert = pg_insert(payments).values(
        payment_intent=payment_intent, charge=charge_id, refunded_nano=refunded_cents * money.NANO_PER_CENT
    )
    # amount_refunded is cumulative and only grows: an older event never lowers it.
    await conn.execute(
        insert.on_conflict_do_update(
            index_elements=["payment_intent"],
            set_={
                "charge": sa.func.coalesce(payments.c.charge, insert.excluded.charge),
                "refunded_nano": sa.func.greatest(payments.c.refunded_nano, insert.excluded.refunded_nano),
                "updated_at": sa.func.now(),
            },
        )
    )
    applied = await _apply(conn, payment_intent)
    wallet_id = applied.credit.wallet_id if applied.credit else None
    if applied.pending:
        return Result(
            "pending_payment", None, f"{payment_intent} not credited yet; refund kept for when it is"
        )
    if applied.refund is not None and applied.refund.created:
        refund = applied.refund
        return Result(
            "refund_debited",
            wallet_id,
            f"{charge_id}: {money.format_usd(-refund.amount_nano)} USD",
            applied.created,
        )
    return Result("refund_already_applied", wallet_id, f"{charge_id}: refunded {refunded_cents} cents in all")


def _status_rank(status: str) -> int:
    """Breaks ties between events of the same second: a closing status is the later one."""
    if status in DISPUTE_CLOSED:
        return 2
    return 1 if status.startswith("appeal_") else 0


async def _dispute(conn: AsyncConnection, dispute: Mapping[str, Any], _type: str, created: int) -> Result:
    dispute_id = _id(dispute.get("id"))
    amount_cents = _int(dispute, "amount")
    status = dispute.get("status")
    if (
        dispute.get("object") != "dispute"
        or dispute_id is None
        or amount_cents is None
        or not isinstance(status, str)
    ):
        raise _Skip("invalid_object", "data.object is not a dispute with an amount and a status")
    payment_intent = _id(dispute.get("payment_intent"))
    if payment_intent is None:
        raise _Skip("not_ours", f"dispute {dispute_id} has no payment_intent (not from Checkout)")
    if dispute.get("currency") != CURRENCY:
        raise _Skip("unsupported_currency", f"currency {dispute.get('currency')!r}")

    # The payment row first (created empty if this is the first we hear of it): it is the lock
    # that serializes everything about one payment.
    await conn.execute(
        pg_insert(tables.stripe_payments)
        .values(payment_intent=payment_intent)
        .on_conflict_do_nothing(index_elements=["payment_intent"])
    )
    await conn.execute(
        sa.select(tables.stripe_payments.c.payment_intent)
        .where(tables.stripe_payments.c.payment_intent == payment_intent)
        .with_for_update()
    )
    d = tables.stripe_disputes
    known = (await conn.execute(sa.select(d).where(d.c.id == dispute_id))).first()
    if known is None:
        await conn.execute(
            sa.insert(d).values(
                id=dispute_id,
                payment_intent=payment_intent,
                charge=_id(dispute.get("charge")),
                amount_nano=amount_cents * money.NANO_PER_CENT,
                status=status,
                status_event_created=created,
            )
        )
    elif (created, _status_rank(status)) > (known.status_event_created, _status_rank(known.status)):
        await conn.execute(
            sa.update(d)
            .where(d.c.id == dispute_id)
            .values(status=status, status_event_created=created, updated_at=sa.func.now())
        )
    applied = await _apply(conn, payment_intent)
    if applied.pending:
        return Result(
            "pending_payment", None, f"{payment_intent} not credited yet; dispute kept for when it is"
        )
    wallet_id = applied.credit.wallet_id if applied.credit else None
    mine = [
        e
        for e in applied.created
        if e.idempotency_key in (dispute_debit_key(dispute_id), dispute_reversal_key(dispute_id))
    ]
    if any(e.kind == "dispute_reversal" for e in mine):
        outcome = "dispute_reversed"
    elif mine:
        outcome = "dispute_debited"
    else:
        outcome = "dispute_recorded"
    return Result(outcome, wallet_id, f"{dispute_id}: {status}", applied.created)


async def _setup_session(
    conn: AsyncConnection, session_id: str, session: Mapping[str, Any], event_type: str
) -> Result:
    """A setup-mode session of ours completed: its card becomes the wallet's auto-recharge card.

    Ours means recorded by ``PUT /billing/auto-recharge`` (:mod:`billing.recharges`), for the
    Customer it names; the card is the expanded ``setup_intent.payment_method`` and must belong
    to that Customer too."""
    recorded = await recharges.setup_session(conn, session_id)
    if recorded is None:
        raise _Skip("not_ours", f"setup session {session_id} was not created by PUT /billing/auto-recharge")
    wallet_id = recorded.wallet_id
    if event_type != "checkout.session.completed" or session.get("status") != "complete":
        return Result("ignored_type", wallet_id, f"setup session {session_id}: {event_type}")
    intent = session.get("setup_intent")
    method = intent.get("payment_method") if isinstance(intent, Mapping) else None
    card = method.get("card") if isinstance(method, Mapping) else None
    pm_id = _id(method)
    if not (isinstance(intent, Mapping) and isinstance(method, Mapping) and isinstance(card, Mapping)) or (
        pm_id is None
    ):
        raise _Skip("invalid_object", f"setup session {session_id}: setup_intent.payment_method not expanded")
    customers = {_id(session.get("customer")), _id(intent.get("customer")), _id(method.get("customer"))}
    if customers != {recorded.customer} or intent.get("status") != "succeeded":
        raise _Skip(
            "invalid_object",
            f"setup session {session_id}: the card is not {recorded.customer}'s, or not set up",
            wallet_id,
        )
    brand, last4 = card.get("brand"), card.get("last4")
    if not (isinstance(brand, str) and isinstance(last4, str)):
        raise _Skip(
            "invalid_object", f"setup session {session_id}: the card has no brand or last4", wallet_id
        )
    saved = await recharges.save_card(conn, session_id, payment_method=pm_id, brand=brand, last4=last4)
    outcome = "card_saved" if saved else "card_already_saved"
    return Result(outcome, wallet_id, f"setup session {session_id}: {brand} …{last4}")


async def _payment_intent(
    conn: AsyncConnection, intent: Mapping[str, Any], event_type: str, failures_max: int
) -> Result:
    """A recharge's PaymentIntent succeeded (credit it, as a Checkout payment) or failed (record
    it). Ours means a recharge we started that recorded it, or that its metadata names and that
    recorded no other; and, either way, for that recharge's Customer and amount. Payment Intents
    of Checkout top-ups are credited through their session, never here."""
    pi = _id(intent.get("id"))
    if intent.get("object") != "payment_intent" or pi is None:
        raise _Skip("invalid_object", "data.object is not a payment_intent")
    metadata = _metadata(intent)
    recharge = await recharges.for_payment_intent(
        conn, pi, wallet_id=metadata.get("wallet_id"), seq=metadata.get("recharge_seq")
    )
    if recharge is None:
        raise _Skip("not_ours", f"{pi} is not a recharge this gateway started")
    wallet_id = recharge.wallet_id
    amount_cents = _int(intent, "amount")
    if (
        _id(intent.get("customer")) != recharge.customer
        or intent.get("currency") != CURRENCY
        or amount_cents is None
        or amount_cents * money.NANO_PER_CENT != recharge.amount_nano
    ):
        raise _Skip(
            "amount_mismatch",
            f"{pi} charged {amount_cents!r} {intent.get('currency')!r} cents to "
            f"{_id(intent.get('customer'))}; recharge {recharge.seq} is "
            f"{money.format_usd(recharge.amount_nano)} USD to {recharge.customer}; nothing credited",
            wallet_id,
        )
    if event_type == "payment_intent.payment_failed":
        error = intent.get("last_payment_error")
        error = error if isinstance(error, Mapping) else {}
        code = error.get("code") if isinstance(error.get("code"), str) else "payment_failed"
        message = error.get("message") if isinstance(error.get("message"), str) else ""
        failure = await recharges.record_failure(
            conn, recharge, code=str(code), message=str(message), payment_intent=pi, failures_max=failures_max
        )
        outcome = "recharge_failed" if failure is not None else "recharge_failure_already_recorded"
        return Result(outcome, wallet_id, f"{pi}: recharge {recharge.seq}: {code}")
    if intent.get("status") != "succeeded":
        return Result("awaiting_payment", wallet_id, f"{pi}: status {intent.get('status')!r}")
    await recharges.record_succeeded(conn, recharge, pi)
    payments = tables.stripe_payments
    insert = pg_insert(payments).values(
        payment_intent=pi, wallet_id=wallet_id, amount_nano=recharge.amount_nano, paid=True
    )
    await conn.execute(
        insert.on_conflict_do_update(
            index_elements=["payment_intent"],
            set_={
                "wallet_id": sa.func.coalesce(payments.c.wallet_id, insert.excluded.wallet_id),
                "amount_nano": sa.func.coalesce(payments.c.amount_nano, insert.excluded.amount_nano),
                "paid": True,
                "updated_at": sa.func.now(),
            },
        )
    )
    applied = await _apply(conn, pi)
    credit = applied.credit
    assert credit is not None, "a paid payment with a wallet is always credited"
    if credit.wallet_id != wallet_id:
        return Result("invalid_object", wallet_id, f"{pi} was already credited to {credit.wallet_id}")
    outcome = "credited" if credit.created else "already_credited"
    detail = f"{pi}: recharge {recharge.seq}, {money.format_usd(credit.amount_nano)} USD"
    return Result(outcome, wallet_id, detail, applied.created)


async def apply_payment_intent(
    conn: AsyncConnection, intent: Mapping[str, Any], *, failures_max: int = DEFAULT_FAILURES_MAX
) -> Result:
    """Apply a recharge's PaymentIntent retrieved from the API (reconciliation after a missed
    webhook): what ``payment_intent.succeeded`` or ``.payment_failed`` would do, with the same
    keys. Records no event."""
    status = intent.get("status")
    event_type = (
        "payment_intent.payment_failed"
        if status == "requires_payment_method" and intent.get("last_payment_error")
        else "payment_intent.succeeded"
    )
    try:
        return await _payment_intent(conn, intent, event_type, failures_max)
    except _Skip as skip:
        return skip.result


_HANDLERS: dict[str, Any] = {
    "payment_intent.succeeded": _payment_intent,
    "payment_intent.payment_failed": _payment_intent,
    "checkout.session.completed": _checkout,
    "checkout.session.async_payment_succeeded": _checkout,
    "checkout.session.async_payment_failed": _checkout,
    "checkout.session.expired": _checkout,
    "charge.refunded": _charge_refunded,
    "charge.dispute.created": _dispute,
    "charge.dispute.updated": _dispute,
    "charge.dispute.closed": _dispute,
    "charge.dispute.funds_withdrawn": _dispute,
    "charge.dispute.funds_reinstated": _dispute,
}
HANDLED_EVENT_TYPES = tuple(_HANDLERS)


# --- effects -------------------------------------------------------------------------------------


async def _apply(conn: AsyncConnection, payment_intent: str) -> _Applied:
    """Post whatever the payment's facts call for and is not posted yet; lock the payment first."""
    p = (
        await conn.execute(
            sa.select(tables.stripe_payments)
            .where(tables.stripe_payments.c.payment_intent == payment_intent)
            .with_for_update()
        )
    ).one()
    if not p.paid or p.wallet_id is None or p.amount_nano is None:
        return _Applied(pending=True)
    applied = _Applied()
    applied.credit = await ledger.post_entry(
        conn,
        wallet_id=p.wallet_id,
        kind="topup",
        amount_nano=p.amount_nano,
        idempotency_key=credit_key(payment_intent),
        details={"payment_intent": payment_intent, "checkout_session": p.checkout_session},
    )
    unapplied = p.refunded_nano - p.refund_applied_nano
    if unapplied > 0:
        applied.refund = await ledger.post_entry(
            conn,
            wallet_id=p.wallet_id,
            kind="refund",
            amount_nano=-unapplied,
            # Stripe's own number (cumulative amount_refunded, in cents) names the refund.
            idempotency_key=f"refund:{p.charge}/{p.refunded_nano // money.NANO_PER_CENT}",
            details={
                "payment_intent": payment_intent,
                "charge": p.charge,
                "amount_refunded_usd": money.format_usd(p.refunded_nano),
            },
        )
        await conn.execute(
            sa.update(tables.stripe_payments)
            .where(tables.stripe_payments.c.payment_intent == payment_intent)
            .values(refund_applied_nano=p.refunded_nano, updated_at=sa.func.now())
        )
    d = tables.stripe_disputes
    for dispute in (
        await conn.execute(sa.select(d).where(d.c.payment_intent == payment_intent).order_by(d.c.id))
    ).all():
        details = {"payment_intent": payment_intent, "charge": dispute.charge, "dispute": dispute.id}
        applied.dispute_debits.append(
            await ledger.post_entry(
                conn,
                wallet_id=p.wallet_id,
                kind="dispute",
                amount_nano=-dispute.amount_nano,
                idempotency_key=dispute_debit_key(dispute.id),
                details=details,
            )
        )
        if dispute.status in DISPUTE_REVERSED:
            applied.dispute_reversals.append(
                await ledger.post_entry(
                    conn,
                    wallet_id=p.wallet_id,
                    kind="dispute_reversal",
                    amount_nano=dispute.amount_nano,
                    idempotency_key=dispute_reversal_key(dispute.id),
                    details={**details, "status": dispute.status},
                )
            )
    await _sync_disputed(conn, p.wallet_id)
    return applied


def has_open_dispute(wallet_id: sa.ColumnElement[str] | str) -> sa.Exists:
    """EXISTS an open dispute on a credited payment of the wallet (a dispute on a payment we never
    credited waits, like its debit). What ``wallets.disputed`` must equal; :mod:`billing.audit`
    checks it."""
    d, p = tables.stripe_disputes, tables.stripe_payments
    return (
        sa.select(d.c.id)
        .join(p, p.c.payment_intent == d.c.payment_intent)
        .where(p.c.wallet_id == wallet_id, p.c.paid, d.c.status.not_in(sorted(DISPUTE_CLOSED)))
        .exists()
    )


async def _sync_disputed(conn: AsyncConnection, wallet_id: str) -> None:
    """``wallets.disputed`` = the wallet has an open dispute (written only when it differs).

    Never touches ``suspended``: that switch belongs to the operator and admins.
    """
    w = tables.wallets
    # The wallet lock first, in its own statement (``ledger.post_entry`` has usually taken it
    # already): under READ COMMITTED the UPDATE below then sees every dispute change committed by
    # an earlier holder, and a later holder recomputes after us, so disputes of two payments of
    # one wallet changing at once cannot leave the flag stale.
    await conn.execute(sa.select(w.c.id).where(w.c.id == wallet_id).with_for_update(key_share=True))
    has_open = has_open_dispute(wallet_id)
    await conn.execute(
        sa.update(w)
        .where(w.c.id == wallet_id, w.c.disputed != has_open)
        .values(disputed=has_open, updated_at=sa.func.now())
    )
