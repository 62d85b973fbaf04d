"""Wallets and their API keys: creating them, finding a key by its hash, revoking.

A wallet's money lives in the ledger (:mod:`billing.ledger`); this module owns who has a wallet
and which keys may spend from it. Creating a wallet posts its grant through the ledger, with the
idempotency key ``grant:<source>:<identity>``, so a retried signup or a re-run operator handler
never grants twice.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from billing import keys, ledger, tables

WALLET_ID_PREFIX = "wal_"
# A pragmatic address check (RFC 5322 in full accepts far too much): one @, a dotted domain.
_EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+")
EMAIL_LENGTH_MAX = 254


class EmailInvalid(ValueError):
    pass


class EmailTaken(Exception):
    pass


class KeyNotFound(LookupError):
    pass


def normalize_email(email: object) -> str:
    """The canonical form we store (lower case), or :class:`EmailInvalid` saying what is wrong."""
    if not isinstance(email, str) or not email.strip():
        raise EmailInvalid("email is required, as a string such as \"alice@example.com\"")
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
    created_at: dt.datetime

    @property
    def available_nano(self) -> int:
        return self.balance_nano - self.reserved_nano

    @property
    def state(self) -> str:
        """``active`` while requests can be admitted, ``suspended`` otherwise (switch or empty)."""
        return "suspended" if self.suspended or self.balance_nano <= 0 else "active"


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

    def refusal(self, now: dt.datetime) -> str | None:
        """Why this key may not be used now, or None when it may."""
        if self.revoked_at is not None:
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


def _wallet(row: sa.Row) -> Wallet:
    return Wallet(
        id=row.id,
        email=row.email,
        source=row.source,
        external_id=row.external_id,
        balance_nano=row.balance_nano,
        reserved_nano=row.reserved_nano,
        suspended=row.suspended,
        created_at=row.created_at,
    )


def _key(row: sa.Row) -> KeyRecord:
    return KeyRecord(
        id=row.id,
        wallet_id=row.wallet_id,
        key_hash=bytes(row.key_hash),
        display_prefix=row.display_prefix,
        allowed_models=tuple(row.allowed_models) if row.allowed_models is not None else None,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        suspended=row.suspended,
    )


async def create_wallet(
    conn: AsyncConnection,
    *,
    source: str,
    grant_nano: int,
    email: str | None = None,
    external_id: str | None = None,
    wallet_id: str | None = None,
) -> Wallet:
    """Insert a wallet and post its grant, inside the caller's transaction."""
    wallet_id = wallet_id or keys.random_id(WALLET_ID_PREFIX)
    await conn.execute(
        sa.insert(tables.wallets).values(
            id=wallet_id, email=email, source=source, external_id=external_id
        )
    )
    if grant_nano:
        identity = external_id or wallet_id
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


async def signup(conn: AsyncConnection, *, email: str, grant_nano: int) -> Signup:
    """A self-service wallet with its free grant and a first key, all or nothing.

    Raises :class:`EmailTaken` if the address already has a self-service wallet; the caller's
    transaction must then be rolled back (nothing of the attempt stays).
    """
    email = normalize_email(email)
    try:
        wallet = await create_wallet(conn, source="signup", grant_nano=grant_nano, email=email)
    except IntegrityError as exc:
        if "wallets_signup_email_unique" in str(exc.orig):
            raise EmailTaken(email) from None
        raise
    key = await issue_key(conn, wallet_id=wallet.id, source="signup")
    return Signup(wallet=wallet, key=key)


async def get_wallet(conn: AsyncConnection, wallet_id: str) -> Wallet | None:
    row = (
        await conn.execute(sa.select(tables.wallets).where(tables.wallets.c.id == wallet_id))
    ).first()
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


async def find_key(conn: AsyncConnection, key_hash: bytes) -> KeyRecord | None:
    row = (
        await conn.execute(sa.select(tables.api_keys).where(tables.api_keys.c.key_hash == key_hash))
    ).first()
    if row is None or not keys.hashes_match(bytes(row.key_hash), key_hash):
        return None
    return _key(row)


async def get_key(conn: AsyncConnection, key_id: str) -> KeyRecord | None:
    row = (
        await conn.execute(sa.select(tables.api_keys).where(tables.api_keys.c.id == key_id))
    ).first()
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
