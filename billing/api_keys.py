"""API key rows: issuing and recording keys, finding one by its hash, revoking, suspending.

The key's text (prefix, checksum, hash) is :mod:`billing.key_format`; this module owns the
``api_keys`` rows: which wallet a key spends from, which models it may call, until when, and
whether it is revoked or suspended. Only the hash is stored. Every insert goes through
:func:`record_key`, idempotent on the key id, so an operator re-running its handler after a
crash records the key in its Secret once.

Sharp edges: the Check's look-up (:func:`find_keys`) runs on the hot path, on the asyncpg pool,
as one indexed statement for a whole batch of hashes; keep it that way. A key is never deleted:
revoking stamps ``revoked_at`` once, and a rotated key's ``revoke_after`` only moves earlier.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from billing import database, errors, idempotency, key_format, tables

if TYPE_CHECKING:
    import asyncpg


class KeyNotFound(LookupError):
    pass


class KeyConflict(errors.Conflict):
    """A key id is already stored with another hash, wallet or owner."""


@dataclasses.dataclass(frozen=True)
class KeyRecord:
    id: str
    wallet_id: str
    key_hash: bytes
    display_prefix: str
    allowed_models: tuple[str, ...] | None
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    suspended: bool
    # A rotated key's end of grace: from then on it is refused exactly as a revoked one.
    revoke_after: dt.datetime | None = None
    # The key has a spend limit (billing/key_limits.py): its holds take the statement that tests
    # it. Only whether, never the limit itself, which the statement reads under the key's lock.
    limited: bool = False

    def refusal(self, now: dt.datetime) -> str | None:
        """Why this key may not be used now, or None when it may."""
        if self.revoked_at is not None:
            return "revoked"
        if self.revoke_after is not None and self.revoke_after <= now:
            return "revoked"
        if self.suspended:
            return "suspended"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return None


def key_record(row: sa.Row[Any] | asyncpg.Record) -> KeyRecord:
    """A key from a SQLAlchemy row or an asyncpg record (the Check's look-up)."""
    fields = row._mapping if isinstance(row, sa.Row) else row
    models = fields["allowed_models"]
    return KeyRecord(
        id=fields["id"],
        wallet_id=fields["wallet_id"],
        key_hash=bytes(fields["key_hash"]),
        display_prefix=fields["display_prefix"],
        allowed_models=tuple(models) if models is not None else None,
        expires_at=fields["expires_at"],
        revoked_at=fields["revoked_at"],
        suspended=fields["suspended"],
        revoke_after=fields["revoke_after"],
        limited=fields["limit_nano"] is not None,
    )


async def record_key(
    conn: AsyncConnection,
    *,
    issued: key_format.IssuedKey,
    wallet_id: str,
    source: str,
    external_id: str | None = None,
    allowed_models: list[str] | None = None,
    expires_at: dt.datetime | None = None,
    suspended: bool = False,
) -> tuple[KeyRecord, bool]:
    """Store a generated key: the one place a key row is inserted.

    The operator records a key whose plaintext already sits in a Kubernetes Secret;
    :func:`issue_key` records the key it has just generated. Idempotent on the key id: recording
    the same key again answers ``(record, False)``; the same id with another hash, wallet or owner
    raises :class:`KeyConflict`.
    """
    row, created = await idempotency.insert_once(
        conn,
        tables.api_keys,
        {
            "id": issued.key_id,
            "wallet_id": wallet_id,
            "key_hash": issued.key_hash,
            "display_prefix": issued.display_prefix,
            "allowed_models": allowed_models,
            "expires_at": expires_at,
            "suspended": suspended,
            "source": source,
            "external_id": external_id,
        },
        key="id",
    )
    if created:
        return key_record(row), True
    same = key_format.hashes_match(bytes(row.key_hash), issued.key_hash) and (
        row.wallet_id,
        row.source,
        row.external_id,
    ) == (wallet_id, source, external_id)
    if not same:
        raise KeyConflict(f"key {issued.key_id} is already stored for another key, wallet or owner")
    return key_record(row), False


async def issue_key(
    conn: AsyncConnection,
    *,
    wallet_id: str,
    source: str,
    allowed_models: list[str] | None = None,
    expires_at: dt.datetime | None = None,
    external_id: str | None = None,
) -> key_format.IssuedKey:
    """A new key for the wallet: its plaintext is in the answer, to be shown once, and nowhere else."""
    issued = key_format.generate()
    await record_key(
        conn,
        issued=issued,
        wallet_id=wallet_id,
        source=source,
        external_id=external_id,
        allowed_models=allowed_models,
        expires_at=expires_at,
    )
    return issued


# Keys by their SHA-256, one or many: the sidecar's look-up and its cache's batched re-reads
# (authz_sidecar/key_lookup.py) run this statement, on asyncpg, as every other caller does.
_FIND_KEYS = """
SELECT id, wallet_id, key_hash, display_prefix, allowed_models, expires_at, revoked_at,
       suspended, revoke_after, limit_nano
  FROM api_keys
 WHERE key_hash = ANY($1::bytea[])
"""


async def find_keys(
    conn: AsyncConnection | database.Connection, key_hashes: Sequence[bytes]
) -> dict[bytes, KeyRecord]:
    """The stored keys among ``key_hashes``, by hash, in one indexed statement."""
    pg = await database.driver_connection(conn)
    records = [key_record(row) for row in await pg.fetch(_FIND_KEYS, list(key_hashes))]
    return {record.key_hash: record for record in records}


async def find_key(conn: AsyncConnection | database.Connection, key_hash: bytes) -> KeyRecord | None:
    record = (await find_keys(conn, [key_hash])).get(key_hash)
    if record is None or not key_format.hashes_match(record.key_hash, key_hash):
        return None
    return record


async def get_key(conn: AsyncConnection, key_id: str) -> KeyRecord | None:
    row = (await conn.execute(sa.select(tables.api_keys).where(tables.api_keys.c.id == key_id))).first()
    return None if row is None else key_record(row)


async def revoke_key(conn: AsyncConnection, key_id: str) -> KeyRecord:
    """Revoke a key (idempotent: revoking twice keeps the first time)."""
    k = tables.api_keys
    await conn.execute(
        sa.update(k).where(k.c.id == key_id, k.c.revoked_at.is_(None)).values(revoked_at=sa.func.now())
    )
    record = await get_key(conn, key_id)
    if record is None:
        raise KeyNotFound(key_id)
    return record


async def keys_of(conn: AsyncConnection, wallet_id: str) -> list[KeyRecord]:
    k = tables.api_keys
    rows = await conn.execute(sa.select(k).where(k.c.wallet_id == wallet_id).order_by(k.c.created_at))
    return [key_record(row) for row in rows]


async def suspend_keys_of_wallet(conn: AsyncConnection, wallet_id: str) -> int:
    """Suspend every live key of the wallet; returns how many changed. Reversible, unlike revoking."""
    k = tables.api_keys
    result = await conn.execute(
        sa.update(k)
        .where(k.c.wallet_id == wallet_id, k.c.revoked_at.is_(None), k.c.suspended.is_(False))
        .values(suspended=True)
    )
    return result.rowcount


# --- Keys owned by an outside resource (the Kubernetes operator) ---------------------------------
# Every function below selects by (source, external_id), never by id alone: a caller acting for
# one owner (an ApiKey resource's UID) can never change a key that belongs to someone else (a
# self-service signup, an admin), even when handed a wrong id.

_OWNED_KEY_FIELDS = frozenset({"allowed_models", "expires_at", "suspended"})


async def keys_owned_by(conn: AsyncConnection, *, source: str, external_id: str) -> list[KeyRecord]:
    k = tables.api_keys
    rows = await conn.execute(
        sa.select(k)
        .where(k.c.source == source, k.c.external_id == external_id)
        .order_by(k.c.created_at, k.c.id)
    )
    return [key_record(row) for row in rows]


async def update_owned_keys(
    conn: AsyncConnection, *, source: str, external_id: str, **changes: object
) -> int:
    """Set ``allowed_models``, ``expires_at`` or ``suspended`` on the owner's unrevoked keys."""
    unknown = set(changes) - _OWNED_KEY_FIELDS
    if unknown:
        raise ValueError(f"cannot change {sorted(unknown)} of a key this way")
    k = tables.api_keys
    result = await conn.execute(
        sa.update(k)
        .where(k.c.source == source, k.c.external_id == external_id, k.c.revoked_at.is_(None))
        .values(**changes)
    )
    return result.rowcount


async def schedule_revocation(
    conn: AsyncConnection, *, source: str, external_id: str, keep_key_id: str, after: dt.timedelta
) -> list[KeyRecord]:
    """Set every unrevoked key of the owner except ``keep_key_id`` to be revoked ``after`` from now
    (by the database's clock).

    The earliest schedule wins: running this again later (a retried rotation) never extends a
    grace period, and ``after=0`` ends one at once. Returns the keys so scheduled.
    """
    k = tables.api_keys
    at = sa.func.now() + sa.literal(after, sa.Interval())
    rows = await conn.execute(
        sa.update(k)
        .where(
            k.c.source == source,
            k.c.external_id == external_id,
            k.c.id != keep_key_id,
            k.c.revoked_at.is_(None),
        )
        .values(revoke_after=sa.func.least(sa.func.coalesce(k.c.revoke_after, at), at))
        .returning(k)
    )
    return [key_record(row) for row in rows]


async def revoke_owned_keys(conn: AsyncConnection, *, source: str, external_id: str) -> list[KeyRecord]:
    """Revoke every key of the owner now (idempotent: a revoked key keeps its first time)."""
    k = tables.api_keys
    rows = await conn.execute(
        sa.update(k)
        .where(k.c.source == source, k.c.external_id == external_id, k.c.revoked_at.is_(None))
        .values(revoked_at=sa.func.now())
        .returning(k)
    )
    return [key_record(row) for row in rows]
