"""Holds: two-phase spending, like a card pre-authorization (TigerBeetle's pending transfers).

``place`` reserves a request's estimated worst-case cost when Envoy asks to admit it; the access
log later ``settle``s it: posted for the actual cost (the rest of the reservation returns) or
voided (the backend failed: nothing is charged). A hold nobody settles within ``hold_ttl_s`` is
expired by ``expire_due``: its reservation is released and nothing is charged then; should the
request's access-log entry still arrive later, the actual cost is posted as usual. So every
admitted request ends in exactly one charge or none, never two.

Admission (DESIGN.md): admit while ``available = balance - reserved > 0``; in strict mode only
when ``available >= hold``; never while the wallet is ``suspended`` (the operator's and admins'
switch) or ``disputed`` (an open Stripe dispute, billing/payments.py). The test and the
reservation are one UPDATE, so concurrent Checks on one wallet cannot both see the same money.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from billing import ledger, tables


class Admission(enum.Enum):
    ADMITTED = "admitted"
    # The money is gone (balance <= 0), or in strict mode this request could never be covered.
    INSUFFICIENT_FUNDS = "insufficient_funds"
    # There is money, but requests in flight have reserved all of it: retry shortly.
    FUNDS_RESERVED = "funds_reserved"
    # Switched off by its operator or an admin (``wallets.suspended``).
    WALLET_SUSPENDED = "wallet_suspended"
    # On hold while a Stripe payment into it is disputed (``wallets.disputed``, billing/payments.py);
    # topping up does not lift it, the dispute closing does.
    WALLET_DISPUTED = "wallet_disputed"
    WALLET_NOT_FOUND = "wallet_not_found"
    # The request id already names a hold of another wallet, or one already settled: a replayed
    # or forged id. Envoy mints ids itself, so this is never a legitimate retry.
    DUPLICATE_REQUEST = "duplicate_request"


class ChargeHold(enum.Enum):
    """Post the hold's own amount: the request succeeded but reported no usage."""

    CHARGE_HOLD = "charge_hold"


CHARGE_HOLD = ChargeHold.CHARGE_HOLD


class Settlement(enum.Enum):
    POSTED = "posted"
    VOIDED = "voided"
    # The access-log entry came after the hold had expired: charged now, reservation long gone.
    POSTED_AFTER_EXPIRY = "posted_after_expiry"
    ALREADY_POSTED = "already_posted"
    ALREADY_VOIDED = "already_voided"
    VOIDED_AFTER_EXPIRY = "voided_after_expiry"
    UNKNOWN_HOLD = "unknown_hold"


_PLACE = sa.text(
    """
    WITH admitted AS (
        UPDATE wallets
           SET reserved_nano = reserved_nano + :amount
         WHERE id = :wallet_id
           AND NOT suspended
           AND NOT disputed
           AND balance_nano - reserved_nano > 0
           AND (NOT :strict OR balance_nano - reserved_nano >= :amount)
     RETURNING id
    )
    INSERT INTO holds (request_id, wallet_id, key_id, model, amount_nano, state, expires_at)
    SELECT :request_id, id, :key_id, :model, :amount, 'pending',
           now() + make_interval(secs => :ttl_s)
      FROM admitted
    RETURNING request_id
    """
).bindparams(
    sa.bindparam("amount", type_=sa.BigInteger),
    sa.bindparam("strict", type_=sa.Boolean),
    sa.bindparam("ttl_s", type_=sa.Float),
)


@dataclasses.dataclass(frozen=True)
class Refusal:
    admission: Admission
    balance_nano: int = 0
    reserved_nano: int = 0


async def place(
    conn: AsyncConnection,
    *,
    request_id: str,
    wallet_id: str,
    key_id: str,
    model: str,
    amount_nano: int,
    ttl_s: int,
    strict: bool,
) -> Admission | Refusal:
    """Reserve ``amount_nano`` for one request in a single statement (use an AUTOCOMMIT connection).

    A Check repeated for the same ``request_id`` (Envoy retrying the Check) is admitted again
    without a second reservation.
    """
    params = {
        "request_id": request_id,
        "wallet_id": wallet_id,
        "key_id": key_id,
        "model": model,
        "amount": amount_nano,
        "ttl_s": ttl_s,
        "strict": strict,
    }
    # Twice at most: a refusal is explained by a second read, and if money came back in between
    # (a hold was settled), refusing would be a false block.
    refusal: Refusal | None = None
    for _ in range(2):
        try:
            placed = (await conn.execute(_PLACE, params)).first()
        except IntegrityError as exc:
            if "holds_pkey" not in str(exc.orig):
                raise
            # The statement rolled back, reservation included. The first Check's hold stands,
            # but only a retry of that same request (same wallet, still pending) may ride on it.
            if await _holds_pending(conn, request_id, wallet_id):
                return Admission.ADMITTED
            return Refusal(Admission.DUPLICATE_REQUEST)
        if placed is not None:
            return Admission.ADMITTED
        # A repeated Check finds no money left when its own first hold took it; the statement
        # then inserts nothing, so the duplicate key never fires. Refusing it would be a false block.
        if await _holds_pending(conn, request_id, wallet_id):
            return Admission.ADMITTED
        refusal = await _why_refused(conn, wallet_id, amount_nano, strict)
        if refusal is not None:
            return refusal
    assert refusal is None
    return Refusal(Admission.FUNDS_RESERVED)


async def _holds_pending(conn: AsyncConnection, request_id: str, wallet_id: str) -> bool:
    h = tables.holds
    row = (
        await conn.execute(
            sa.select(h.c.request_id).where(
                h.c.request_id == request_id, h.c.wallet_id == wallet_id, h.c.state == "pending"
            )
        )
    ).first()
    return row is not None


async def _why_refused(
    conn: AsyncConnection, wallet_id: str, amount_nano: int, strict: bool
) -> Refusal | None:
    """Why the wallet refused a hold, or None if, read again now, it would accept it."""
    w = tables.wallets
    row = (
        await conn.execute(
            sa.select(w.c.balance_nano, w.c.reserved_nano, w.c.suspended, w.c.disputed).where(
                w.c.id == wallet_id
            )
        )
    ).first()
    if row is None:
        return Refusal(Admission.WALLET_NOT_FOUND)
    balance, reserved = row.balance_nano, row.reserved_nano
    if row.suspended:
        return Refusal(Admission.WALLET_SUSPENDED, balance, reserved)
    if row.disputed:
        return Refusal(Admission.WALLET_DISPUTED, balance, reserved)
    if balance <= 0 or (strict and balance < amount_nano):
        return Refusal(Admission.INSUFFICIENT_FUNDS, balance, reserved)
    available = balance - reserved
    if (available >= amount_nano) if strict else (available > 0):
        return None
    if reserved > 0:
        return Refusal(Admission.FUNDS_RESERVED, balance, reserved)
    return Refusal(Admission.INSUFFICIENT_FUNDS, balance, reserved)


async def settle(
    conn: AsyncConnection,
    *,
    request_id: str,
    cost_nano: int | ChargeHold | None,
    details: dict[str, Any] | None = None,
) -> Settlement:
    """Post the actual cost of a request (``cost_nano``), or void it (``None``). Idempotent.

    ``CHARGE_HOLD`` posts the hold's estimate, for a success whose usage never arrived.

    Runs inside the caller's transaction; the charge's idempotency key is ``usage:<request_id>``.
    """
    h = tables.holds
    hold = (
        await conn.execute(sa.select(h).where(h.c.request_id == request_id).with_for_update())
    ).first()
    if hold is None:
        return Settlement.UNKNOWN_HOLD
    if hold.state == "posted":
        return Settlement.ALREADY_POSTED
    if hold.state == "voided":
        return Settlement.ALREADY_VOIDED

    pending = hold.state == "pending"
    if cost_nano is CHARGE_HOLD:
        cost_nano = hold.amount_nano
    if cost_nano is not None and cost_nano < 0:
        raise ValueError(f"a request's cost cannot be negative ({cost_nano}); credits are ledger entries")
    release = hold.amount_nano if pending else 0
    if cost_nano is None:
        new_state, outcome = "voided", Settlement.VOIDED if pending else Settlement.VOIDED_AFTER_EXPIRY
        if release:
            w = tables.wallets
            await conn.execute(
                sa.update(w)
                .where(w.c.id == hold.wallet_id)
                .values(reserved_nano=w.c.reserved_nano - release, updated_at=sa.func.now())
            )
    else:
        new_state = "posted"
        outcome = Settlement.POSTED if pending else Settlement.POSTED_AFTER_EXPIRY
        await ledger.post_entry(
            conn,
            wallet_id=hold.wallet_id,
            kind="usage",
            amount_nano=-cost_nano,
            idempotency_key=f"usage:{request_id}",
            details={"model": hold.model, "key_id": hold.key_id, "request_id": request_id,
                     **(details or {})},
            release_reserved_nano=release,
        )
    await conn.execute(
        sa.update(h)
        .where(h.c.request_id == request_id)
        .values(state=new_state, posted_nano=cost_nano, resolved_at=sa.func.now())
    )
    return outcome


_EXPIRE = sa.text(
    """
    WITH expired AS (
        UPDATE holds SET state = 'expired', resolved_at = now()
         WHERE state = 'pending' AND expires_at <= now()
     RETURNING wallet_id, amount_nano
    ), per_wallet AS (
        SELECT wallet_id, sum(amount_nano) AS amount FROM expired GROUP BY wallet_id
    )
    UPDATE wallets w
       SET reserved_nano = w.reserved_nano - per_wallet.amount, updated_at = now()
      FROM per_wallet
     WHERE w.id = per_wallet.wallet_id
    RETURNING w.id
    """
)


async def expire_due(conn: AsyncConnection) -> int:
    """Expire every pending hold past its expiry; returns how many wallets were touched."""
    return len((await conn.execute(_EXPIRE)).all())


async def outstanding(conn: AsyncConnection) -> int:
    h = tables.holds
    return (
        await conn.execute(sa.select(sa.func.count()).select_from(h).where(h.c.state == "pending"))
    ).scalar_one()
