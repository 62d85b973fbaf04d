"""Wallets and their API keys: creating them, finding a key by its hash, revoking.

A wallet's money lives in the ledger (:mod:`billing.ledger`); this module owns who has a wallet
and which keys may spend from it. Creating a wallet posts its grant through the ledger, with the
idempotency key ``grant:<source>:<identity>``, so a retried signup or a re-run operator handler
never grants twice. A self-service signup's identity is its mailbox (:mod:`billing.emails`), so
the ledger's unique key also makes addresses of one inbox share one free grant, concurrent
signups included.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from billing import database, emails, errors, keys, ledger, money, settings, tables

if TYPE_CHECKING:
    import asyncpg

WALLET_ID_PREFIX = "wal_"
# A pragmatic address check (RFC 5322 in full accepts far too much): one @, a dotted domain.
_EMAIL = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+"
)
EMAIL_LENGTH_MAX = 254


class EmailInvalid(ValueError):
    pass


class EmailTaken(errors.Conflict):
    """The address, or another address of the same mailbox, already has a self-service wallet."""


class KeyNotFound(LookupError):
    pass


def normalize_email(email: object) -> str:
    """The canonical form we store (lower case), or :class:`EmailInvalid` saying what is wrong."""
    if not isinstance(email, str) or not email.strip():
        raise EmailInvalid('email is required, as a string such as "alice@example.com"')
    email = email.strip()
    if len(email) > EMAIL_LENGTH_MAX or not _EMAIL.fullmatch(email):
        raise EmailInvalid(f"{email[:80]!r} is not a valid email address")
    return email.lower()


@dataclasses.dataclass(frozen=True)
class Wallet:
    id: str
    email: str | None
    source: str
    external_id: str | None
    balance_nano: int
    reserved_nano: int
    suspended: bool
    # On hold while a Stripe payment into it is disputed (billing/payments.py owns it).
    disputed: bool = dataclasses.field(default=False, kw_only=True)
    created_at: dt.datetime
    stripe_customer_id: str | None = None
    # How far below zero admission may take the balance (billing/holds.py); 0 in strict mode.
    overdraft_limit_nano: int = dataclasses.field(default=0, kw_only=True)

    @property
    def available_nano(self) -> int:
        return self.balance_nano - self.reserved_nano

    def overdraft_limit_in(self, *, strict: bool) -> int:
        """The limit admission applies: the wallet's own, or 0 in strict mode."""
        return 0 if strict else self.overdraft_limit_nano

    def is_empty(self, *, strict: bool = False) -> bool:
        """Nothing can be spent until a top-up: ``balance + limit <= 0`` (holds.Shortfall.WALLET_EMPTY)."""
        return self.balance_nano + self.overdraft_limit_in(strict=strict) <= 0

    def state_in(self, *, strict: bool) -> str:
        """``active`` while requests can be admitted, ``suspended`` otherwise: switched off
        (``suspended``), held by an open dispute (``disputed``), or empty (:meth:`is_empty`)."""
        return "suspended" if self.suspended or self.disputed or self.is_empty(strict=strict) else "active"

    @property
    def state(self) -> str:
        """:meth:`state_in` with the wallet's own overdraft limit (overdraft mode, the default)."""
        return self.state_in(strict=False)


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


@dataclasses.dataclass(frozen=True)
class Signup:
    wallet: Wallet
    key: keys.IssuedKey


def _wallet(row: sa.Row[Any]) -> Wallet:
    return Wallet(
        id=row.id,
        email=row.email,
        source=row.source,
        external_id=row.external_id,
        balance_nano=row.balance_nano,
        reserved_nano=row.reserved_nano,
        suspended=row.suspended,
        disputed=row.disputed,
        created_at=row.created_at,
        stripe_customer_id=row.stripe_customer_id,
        overdraft_limit_nano=row.overdraft_limit_nano,
    )


def _key(row: sa.Row[Any] | asyncpg.Record) -> KeyRecord:
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
    )


async def create_wallet(
    conn: AsyncConnection,
    *,
    source: str,
    grant_nano: int,
    email: str | None = None,
    external_id: str | None = None,
    wallet_id: str | None = None,
    overdraft_limit_nano: int = 0,
    grant_identity: str | None = None,
) -> Wallet:
    """Insert a wallet and post its grant, inside the caller's transaction.

    The overdraft limit defaults to none (0): self-service signups never get one; callers that
    create other wallets pass ``Settings.overdraft_limit_nano`` or the limit their owner declared.
    The grant's key is ``grant:<source>:<grant_identity or external_id or wallet id>``: a second
    wallet of the same identity raises :class:`ledger.IdempotencyConflict` (the caller rolls back).
    """
    check_overdraft_limit(overdraft_limit_nano)
    wallet_id = wallet_id or keys.random_id(WALLET_ID_PREFIX)
    await conn.execute(
        sa.insert(tables.wallets).values(
            id=wallet_id,
            email=email,
            source=source,
            external_id=external_id,
            overdraft_limit_nano=overdraft_limit_nano,
        )
    )
    if grant_nano:
        identity = grant_identity or external_id or wallet_id
        await ledger.post_entry(
            conn,
            wallet_id=wallet_id,
            kind="grant",
            amount_nano=grant_nano,
            idempotency_key=f"grant:{source}:{identity}",
            details={"reason": "initial grant"},
        )
    wallet = await get_wallet(conn, wallet_id)
    assert wallet is not None
    return wallet


class OverdraftLimitInvalid(ValueError):
    pass


def check_overdraft_limit(nano: object) -> int:
    """``nano`` if it is a valid overdraft limit, else :class:`OverdraftLimitInvalid` saying why."""
    if isinstance(nano, bool) or not isinstance(nano, int):
        raise OverdraftLimitInvalid(f"an overdraft limit is a whole number of nano-USD, not {nano!r}")
    if not 0 <= nano <= settings.OVERDRAFT_LIMIT_MAX_NANO:
        raise OverdraftLimitInvalid(
            "an overdraft limit must be from 0 to "
            f"{money.format_usd(settings.OVERDRAFT_LIMIT_MAX_NANO)} USD, "
            f"not {money.format_usd(nano)}"
        )
    return nano


async def set_overdraft_limit(
    conn: AsyncConnection, wallet_id: str, overdraft_limit_nano: int
) -> Wallet | None:
    """Set a wallet's overdraft limit (None: no such wallet). Takes effect at the next Check.

    Lowering it below what is already spent or reserved refuses new requests until the balance
    recovers; it never touches requests in flight or money already charged.
    """
    check_overdraft_limit(overdraft_limit_nano)
    w = tables.wallets
    row = (
        await conn.execute(
            sa.update(w)
            .where(w.c.id == wallet_id)
            .values(overdraft_limit_nano=overdraft_limit_nano, updated_at=sa.func.now())
            .returning(w)
        )
    ).first()
    return None if row is None else _wallet(row)


async def issue_key(
    conn: AsyncConnection,
    *,
    wallet_id: str,
    source: str,
    allowed_models: list[str] | None = None,
    expires_at: dt.datetime | None = None,
    external_id: str | None = None,
) -> keys.IssuedKey:
    issued = keys.generate()
    await conn.execute(
        sa.insert(tables.api_keys).values(
            id=issued.key_id,
            wallet_id=wallet_id,
            key_hash=issued.key_hash,
            display_prefix=issued.display_prefix,
            allowed_models=allowed_models,
            expires_at=expires_at,
            source=source,
            external_id=external_id,
        )
    )
    return issued


def signup_grant_identity(email: str, policy: str = "mailbox") -> str:
    """The free grant's identity for an address: its mailbox under ``policy``, hashed.

    Hashed because ledger entries are immutable and kept for ever, while an address is personal
    data its owner may ask to erase from the wallet. For an address with no tag and no folded dots
    both policies give the same identity, so changing the policy keeps those apart or together
    exactly as before.
    """
    digest = hashlib.sha256(emails.mailbox(normalize_email(email), policy).encode()).hexdigest()
    return f"mailbox:{digest}"


async def signup(
    conn: AsyncConnection, *, email: str, grant_nano: int, email_policy: str = "mailbox"
) -> Signup:
    """A self-service wallet with its free grant and a first key, all or nothing.

    Raises :class:`EmailTaken` if the address already has a self-service wallet, or (with a grant)
    another address of the same mailbox already received one (``email_policy``, see
    :mod:`billing.emails`); the caller's transaction must then be rolled back (nothing of the
    attempt stays). Two such signups at once: the ledger's unique key makes the second wait for
    the first and then fail.
    """
    email = normalize_email(email)
    identity = signup_grant_identity(email, email_policy)
    try:
        wallet = await create_wallet(
            conn, source="signup", grant_nano=grant_nano, email=email, grant_identity=identity
        )
    except IntegrityError as exc:
        if "wallets_signup_email_unique" in str(exc.orig):
            raise EmailTaken(email) from None
        raise
    except ledger.IdempotencyConflict:
        raise EmailTaken(email) from None
    key = await issue_key(conn, wallet_id=wallet.id, source="signup")
    return Signup(wallet=wallet, key=key)


async def get_wallet(conn: AsyncConnection, wallet_id: str) -> Wallet | None:
    row = (await conn.execute(sa.select(tables.wallets).where(tables.wallets.c.id == wallet_id))).first()
    return None if row is None else _wallet(row)


async def find_wallet(conn: AsyncConnection, ref: str) -> Wallet | None:
    """A wallet by id (``wal_…``) or by owner email (self-service wallets first)."""
    if ref.startswith(WALLET_ID_PREFIX):
        return await get_wallet(conn, ref)
    w = tables.wallets
    row = (
        await conn.execute(
            sa.select(w)
            .where(sa.func.lower(w.c.email) == ref.strip().lower())
            .order_by((w.c.source == "signup").desc(), w.c.created_at)
            .limit(1)
        )
    ).first()
    return None if row is None else _wallet(row)


# Keys by their SHA-256, one or many: the sidecar's look-up and its cache's batched re-reads
# (authz_sidecar/key_lookup.py) run this statement, on asyncpg, as every other caller does.
_FIND_KEYS = """
SELECT id, wallet_id, key_hash, display_prefix, allowed_models, expires_at, revoked_at,
       suspended, revoke_after
  FROM api_keys
 WHERE key_hash = ANY($1::bytea[])
"""


async def find_keys(
    conn: AsyncConnection | database.Connection, key_hashes: Sequence[bytes]
) -> dict[bytes, KeyRecord]:
    """The stored keys among ``key_hashes``, by hash, in one indexed statement."""
    pg = await database.driver_connection(conn)
    records = [_key(row) for row in await pg.fetch(_FIND_KEYS, list(key_hashes))]
    return {record.key_hash: record for record in records}


async def find_key(conn: AsyncConnection | database.Connection, key_hash: bytes) -> KeyRecord | None:
    record = (await find_keys(conn, [key_hash])).get(key_hash)
    if record is None or not keys.hashes_match(record.key_hash, key_hash):
        return None
    return record


async def get_key(conn: AsyncConnection, key_id: str) -> KeyRecord | None:
    row = (await conn.execute(sa.select(tables.api_keys).where(tables.api_keys.c.id == key_id))).first()
    return None if row is None else _key(row)


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
    return [_key(row) for row in rows]


# --- Rows owned by an outside resource (the Kubernetes operator) ---------------------------------
# Every function below selects by (source, external_id), never by id alone: a caller acting for
# one owner (a Wallet or ApiKey resource's UID) can never change a wallet or key that belongs to
# someone else (a self-service signup, an admin), even when handed a wrong id.


class NotOwned(errors.Conflict):
    """A row with this external id exists but belongs to another source: leave it alone."""


class KeyConflict(errors.Conflict):
    """A key id is already stored with another hash, wallet or owner."""


_OWNED_WALLET_FIELDS = frozenset({"email", "suspended", "stripe_customer_id", "overdraft_limit_nano"})
_OWNED_KEY_FIELDS = frozenset({"allowed_models", "expires_at", "suspended"})


async def find_owned_wallet(conn: AsyncConnection, *, source: str, external_id: str) -> Wallet | None:
    w = tables.wallets
    row = (
        await conn.execute(sa.select(w).where(w.c.source == source, w.c.external_id == external_id))
    ).first()
    return None if row is None else _wallet(row)


async def ensure_owned_wallet(
    conn: AsyncConnection,
    *,
    source: str,
    external_id: str,
    grant_nano: int,
    email: str | None,
    stripe_customer_id: str | None = None,
    overdraft_limit_nano: int = 0,
) -> tuple[Wallet, bool]:
    """The owner's wallet, created with its grant on the first call: ``(wallet, created)``.

    Safe to run twice, concurrently or after a crash: the UNIQUE external id makes a second
    insert wait for the first and fail, and the grant's idempotency key
    (``grant:<source>:<external_id>``) could not post twice anyway.
    """
    existing = await find_owned_wallet(conn, source=source, external_id=external_id)
    if existing is not None:
        return existing, False
    try:
        async with conn.begin_nested():
            wallet = await create_wallet(
                conn,
                source=source,
                grant_nano=grant_nano,
                email=email,
                external_id=external_id,
                overdraft_limit_nano=overdraft_limit_nano,
            )
            if stripe_customer_id is not None:
                wallet = (
                    await update_owned_wallet(
                        conn, source=source, external_id=external_id, stripe_customer_id=stripe_customer_id
                    )
                    or wallet
                )
        return wallet, True
    except IntegrityError:
        existing = await find_owned_wallet(conn, source=source, external_id=external_id)
        if existing is None:
            raise NotOwned(external_id) from None
        return existing, False


async def update_owned_wallet(
    conn: AsyncConnection, *, source: str, external_id: str, **changes: object
) -> Wallet | None:
    """Set ``email``, ``suspended``, ``stripe_customer_id`` or ``overdraft_limit_nano`` of the
    owner's wallet (None: no wallet)."""
    unknown = set(changes) - _OWNED_WALLET_FIELDS
    if unknown:
        raise ValueError(f"cannot change {sorted(unknown)} of a wallet this way")
    if "overdraft_limit_nano" in changes:
        check_overdraft_limit(changes["overdraft_limit_nano"])
    w = tables.wallets
    row = (
        await conn.execute(
            sa.update(w)
            .where(w.c.source == source, w.c.external_id == external_id)
            .values(**changes, updated_at=sa.func.now())
            .returning(w)
        )
    ).first()
    return None if row is None else _wallet(row)


async def suspend_keys_of_wallet(conn: AsyncConnection, wallet_id: str) -> int:
    """Suspend every live key of the wallet; returns how many changed. Reversible, unlike revoking."""
    k = tables.api_keys
    result = await conn.execute(
        sa.update(k)
        .where(k.c.wallet_id == wallet_id, k.c.revoked_at.is_(None), k.c.suspended.is_(False))
        .values(suspended=True)
    )
    return result.rowcount


async def keys_owned_by(conn: AsyncConnection, *, source: str, external_id: str) -> list[KeyRecord]:
    k = tables.api_keys
    rows = await conn.execute(
        sa.select(k)
        .where(k.c.source == source, k.c.external_id == external_id)
        .order_by(k.c.created_at, k.c.id)
    )
    return [_key(row) for row in rows]


async def record_key(
    conn: AsyncConnection,
    *,
    issued: keys.IssuedKey,
    wallet_id: str,
    source: str,
    external_id: str,
    allowed_models: list[str] | None = None,
    expires_at: dt.datetime | None = None,
    suspended: bool = False,
) -> tuple[KeyRecord, bool]:
    """Store a key generated elsewhere (the plaintext already sits in a Kubernetes Secret).

    Idempotent on the key id: recording the same key again answers ``(record, False)``; the same
    id with another hash, wallet or owner raises :class:`KeyConflict`.
    """
    k = tables.api_keys
    row = (
        await conn.execute(
            pg_insert(k)
            .values(
                id=issued.key_id,
                wallet_id=wallet_id,
                key_hash=issued.key_hash,
                display_prefix=issued.display_prefix,
                allowed_models=allowed_models,
                expires_at=expires_at,
                suspended=suspended,
                source=source,
                external_id=external_id,
            )
            .on_conflict_do_nothing(index_elements=["id"])
            .returning(k)
        )
    ).first()
    if row is not None:
        return _key(row), True
    row = (await conn.execute(sa.select(k).where(k.c.id == issued.key_id))).first()
    assert row is not None, "conflicting key vanished: keys are never deleted"
    same = keys.hashes_match(bytes(row.key_hash), issued.key_hash) and (
        row.wallet_id,
        row.source,
        row.external_id,
    ) == (wallet_id, source, external_id)
    if not same:
        raise KeyConflict(f"key {issued.key_id} is already stored for another key, wallet or owner")
    return _key(row), False


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
    return [_key(row) for row in rows]


async def revoke_owned_keys(conn: AsyncConnection, *, source: str, external_id: str) -> list[KeyRecord]:
    """Revoke every key of the owner now (idempotent: a revoked key keeps its first time)."""
    k = tables.api_keys
    rows = await conn.execute(
        sa.update(k)
        .where(k.c.source == source, k.c.external_id == external_id, k.c.revoked_at.is_(None))
        .values(revoked_at=sa.func.now())
        .returning(k)
    )
    return [_key(row) for row in rows]
