"""Top-up bookkeeping: the amount a person asks for, and the Checkout Sessions we created.

Why apart from :mod:`billing.payments`: that module is the money rules (what each Stripe fact
means for a wallet); this one is what comes before any fact: reading a requested amount within
the configured bounds, and remembering each Checkout Session ``POST /billing/topup`` created,
for which wallet and amount. Those rows are what makes a session *ours*: the money rules credit
only a session recorded here, and only for the amount recorded here. The operator's
reconciliation reads the ones never seen complete or expire (:func:`open_checkout_sessions`).

Sharp edges: amounts are whole cents (card payments are), so a top-up converts to Stripe's
``unit_amount`` exactly (:func:`cents_from_nano`) or not at all. A session is recorded after
Stripe created it and before its URL is answered, so a customer can only pay a session recorded
here; a replayed creation (the same Idempotency-Key, the same session) keeps the first row.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from billing import ledger, money, payments, tables

# --- amounts -------------------------------------------------------------------------------------


class TopupAmountError(ValueError):
    """A requested top-up amount that is malformed or outside the configured bounds."""


def parse_topup_amount(value: object, *, min_nano: int, max_nano: int) -> int:
    """``"10.00"`` (or a whole number) → nano-USD, in whole cents within ``[min_nano, max_nano]``."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    bounds = f"from {money.format_usd_cents(min_nano)} to {money.format_usd_cents(max_nano)} USD"
    if not isinstance(value, str):
        raise TopupAmountError(f'amount_usd must be a decimal string such as "10.00", {bounds}')
    try:
        nano = money.parse_usd(value.strip())
    except money.MoneyError as exc:
        raise TopupAmountError(f"amount_usd: {exc}") from None
    if nano % money.NANO_PER_CENT:
        raise TopupAmountError(
            f"amount_usd {value!r} has fractions of a cent; card payments are in whole cents"
        )
    if not min_nano <= nano <= max_nano:
        raise TopupAmountError(f"amount_usd must be {bounds}, not {value.strip()}")
    return nano


def cents_from_nano(nano: int) -> int:
    if nano % money.NANO_PER_CENT:
        raise ValueError(f"{nano} nano-USD is not a whole number of cents")
    return nano // money.NANO_PER_CENT


# --- checkout sessions we created ----------------------------------------------------------------


async def record_checkout_session(
    conn: AsyncConnection,
    *,
    session_id: str,
    wallet_id: str,
    amount_nano: int,
    expires_at: dt.datetime | None,
) -> None:
    """Remember a session we created (a replayed creation keeps the first row)."""
    await conn.execute(
        pg_insert(tables.stripe_checkout_sessions)
        .values(id=session_id, wallet_id=wallet_id, amount_nano=amount_nano, expires_at=expires_at)
        .on_conflict_do_nothing(index_elements=["id"])
    )


@dataclasses.dataclass(frozen=True)
class SessionStatus:
    session_id: str
    amount_nano: int
    status: str
    credited: bool


async def checkout_session_status(
    conn: AsyncConnection, session_id: str, *, wallet_id: str | None = None
) -> SessionStatus | None:
    """A session we created; with ``wallet_id``, only if it is that wallet's (another wallet's
    session answers None, as an unknown one does)."""
    s = tables.stripe_checkout_sessions
    query = sa.select(s).where(s.c.id == session_id)
    if wallet_id is not None:
        query = query.where(s.c.wallet_id == wallet_id)
    row = (await conn.execute(query)).first()
    if row is None:
        return None
    credited = (
        row.payment_intent is not None
        and await ledger.find_entry(conn, payments.credit_key(row.payment_intent)) is not None
    )
    return SessionStatus(row.id, row.amount_nano, row.status, credited)


async def open_checkout_sessions(conn: AsyncConnection, *, limit: int) -> list[str]:
    """Sessions we created and never saw complete or expire, oldest first: what a reconciliation
    retrieves from Stripe and passes to :func:`billing.payments.apply_checkout_session`."""
    s = tables.stripe_checkout_sessions
    rows = await conn.execute(
        sa.select(s.c.id).where(s.c.status == "open").order_by(s.c.created_at).limit(limit)
    )
    return list(rows.scalars())
