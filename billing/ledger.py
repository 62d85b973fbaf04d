"""The ledger: every balance change is one immutable entry with a caller-chosen idempotency key.

TigerBeetle's rules, kept here: the caller names the change before submitting it
(``usage:<request-id>``, ``signup:<wallet>``, ``stripe:<payment_intent>``…); submitting the same
key again answers with the first result and changes nothing; the same key with different contents
is its own error (:class:`IdempotencyConflict`). The wallet's balance moves in the same
transaction as its entry, so ``balance = Σ entries`` always holds (:mod:`billing.audit` checks it).

Sharp edge: this module is one of two writers of ``ledger_entries``. Grants, credits and Stripe's
entries come through :func:`post_entry`; a request's ``usage:<request id>`` entry is written by
the settlement statement itself (``billing.holds.SETTLE_SQL`` and its batch form in
``billing.hold_batches``), because the hold, the wallet and the entry must change in one statement
on the hot path: one round trip, the wallet row locked for that statement only. Those statements
keep this module's rules — the entry's unique key, the balance after it, no entry without the
money moving — and :mod:`billing.audit` checks both writers alike.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from billing import idempotency, tables

KINDS = frozenset(
    {"grant", "usage", "credit", "topup", "refund", "dispute", "dispute_reversal", "adjustment"}
)


class LedgerError(Exception):
    """Base of the ledger's named outcomes."""


class IdempotencyConflict(LedgerError):
    """The idempotency key was used before for a different change."""

    def __init__(self, key: str, first: Entry) -> None:
        super().__init__(
            f"idempotency key {key!r} was already used for {first.kind} of {first.amount_nano} "
            f"nano-USD on wallet {first.wallet_id}"
        )
        self.key = key
        self.first = first


class WalletNotFound(LedgerError):
    def __init__(self, wallet_id: str) -> None:
        super().__init__(f"no wallet {wallet_id!r}")
        self.wallet_id = wallet_id


@dataclasses.dataclass(frozen=True)
class Entry:
    id: int
    wallet_id: str
    idempotency_key: str
    kind: str
    amount_nano: int
    balance_after_nano: int
    details: dict[str, Any]
    created_at: dt.datetime
    # False when this call found the entry already written (a replay): nothing changed.
    created: bool = True


def _entry(row: sa.Row[Any], *, created: bool) -> Entry:
    return Entry(
        id=row.id,
        wallet_id=row.wallet_id,
        idempotency_key=row.idempotency_key,
        kind=row.kind,
        amount_nano=row.amount_nano,
        balance_after_nano=row.balance_after_nano,
        details=row.details,
        created_at=row.created_at,
        created=created,
    )


async def find_entry(conn: AsyncConnection, idempotency_key: str) -> Entry | None:
    row = (
        await conn.execute(
            sa.select(tables.ledger_entries).where(tables.ledger_entries.c.idempotency_key == idempotency_key)
        )
    ).first()
    return None if row is None else _entry(row, created=False)


async def post_entry(
    conn: AsyncConnection,
    *,
    wallet_id: str,
    kind: str,
    amount_nano: int,
    idempotency_key: str,
    details: dict[str, Any] | None = None,
    release_reserved_nano: int = 0,
) -> Entry:
    """Apply ``amount_nano`` (signed) to the wallet and record it, once per ``idempotency_key``.

    Must run inside the caller's transaction. ``release_reserved_nano`` lowers the wallet's
    reservations in the same update (a hold being posted). The wallet row is locked first, so its
    balance is read and moved by one writer at a time.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown ledger entry kind {kind!r}")
    if not isinstance(amount_nano, int) or isinstance(amount_nano, bool):
        raise TypeError("amount_nano must be an int")
    wallets = tables.wallets
    # FOR NO KEY UPDATE: it serializes balance writers, yet does not conflict with the KEY SHARE
    # lock that inserting a row referencing the wallet (a payment, a hold) takes — FOR UPDATE
    # would, and deadlock against such an insert in another transaction.
    balance = (
        await conn.execute(
            sa.select(wallets.c.balance_nano).where(wallets.c.id == wallet_id).with_for_update(key_share=True)
        )
    ).scalar_one_or_none()
    if balance is None:
        raise WalletNotFound(wallet_id)

    row, created = await idempotency.insert_once(
        conn,
        tables.ledger_entries,
        {
            "wallet_id": wallet_id,
            "idempotency_key": idempotency_key,
            "kind": kind,
            "amount_nano": amount_nano,
            "balance_after_nano": balance + amount_nano,
            "details": details or {},
        },
        key="idempotency_key",
    )
    if not created:
        first = _entry(row, created=False)
        if (first.wallet_id, first.kind, first.amount_nano) != (wallet_id, kind, amount_nano):
            raise IdempotencyConflict(idempotency_key, first)
        return first

    await conn.execute(
        sa.update(wallets)
        .where(wallets.c.id == wallet_id)
        .values(
            balance_nano=wallets.c.balance_nano + amount_nano,
            reserved_nano=wallets.c.reserved_nano - release_reserved_nano,
            updated_at=sa.func.now(),
        )
    )
    return _entry(row, created=True)


async def entries(
    conn: AsyncConnection, wallet_id: str, *, limit: int, before_id: int | None = None
) -> list[Entry]:
    """A page of the wallet's entries, newest first; pass the last id seen as ``before_id``."""
    le = tables.ledger_entries
    query = sa.select(le).where(le.c.wallet_id == wallet_id).order_by(le.c.id.desc()).limit(limit)
    if before_id is not None:
        query = query.where(le.c.id < before_id)
    return [_entry(row, created=False) for row in (await conn.execute(query)).all()]


async def entries_after(
    conn: AsyncConnection, wallet_id: str, *, after_entry_id: int, kinds: frozenset[str], limit: int
) -> list[Entry]:
    """The wallet's entries of ``kinds`` newer than ``after_entry_id``, oldest first (a cursor)."""
    le = tables.ledger_entries
    query = (
        sa.select(le)
        .where(le.c.wallet_id == wallet_id, le.c.id > after_entry_id, le.c.kind.in_(sorted(kinds)))
        .order_by(le.c.id)
        .limit(limit)
    )
    return [_entry(row, created=False) for row in (await conn.execute(query)).all()]
