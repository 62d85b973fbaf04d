"""Wallets: creating them (with their grant), finding them, and their owners' switches.

A wallet's money lives in the ledger (:mod:`billing.ledger`) and its keys in
:mod:`billing.api_keys`; this module owns who has a wallet. Creating a wallet posts its grant
through the ledger, with the idempotency key ``grant:<source>:<identity>``, so a retried signup or
a re-run operator handler never grants twice. A self-service signup's identity is its mailbox
(:mod:`billing.emails`), so the ledger's unique key also makes addresses of one inbox share one
free grant, concurrent signups included.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import re
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from billing import api_keys, emails, errors, key_format, ledger, money, settings, tables

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

    def state_in(self, *, strict: bool) -> WalletState:
        """The wallet's :class:`WalletState` under the admission mode (``strict``: every limit 0)."""
        if self.suspended:
            return WalletState.SUSPENDED
        if self.disputed:
            return WalletState.DISPUTED
        if self.is_empty(strict=strict):
            return WalletState.EMPTY
        return WalletState.ACTIVE

    @property
    def state(self) -> WalletState:
        """:meth:`state_in` with the wallet's own overdraft limit (overdraft mode, the default)."""
        return self.state_in(strict=False)


class WalletState(enum.Enum):
    """What a wallet's next request meets: the one vocabulary every face renders (the HTTP API's
    ``state`` and the CLI in lower case, a Wallet resource's ``status.state`` capitalised).

    When several apply, the first of ``suspended``, ``disputed``, ``empty`` wins: the order the
    Check refuses in (:func:`billing.holds.refusal_of`), so the state names the refusal a request
    would get, and so what would lift it. Only an admin or the operator lifts ``suspended``, only
    the dispute closing lifts ``disputed`` (a top-up does not), and a top-up lifts ``empty``. A
    wallet with money left that is too small for one request is ``active``: smaller requests are
    still served.
    """

    # Requests are admitted while their worst case fits.
    ACTIVE = "active"
    # ``balance + limit <= 0`` (:meth:`Wallet.is_empty`): nothing is admitted until a top-up.
    EMPTY = "empty"
    # Switched off by its operator or an admin (``wallets.suspended``).
    SUSPENDED = "suspended"
    # On hold while a Stripe payment into it is disputed (``wallets.disputed``).
    DISPUTED = "disputed"


@dataclasses.dataclass(frozen=True)
class Signup:
    wallet: Wallet
    key: key_format.IssuedKey


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
    wallet_id = wallet_id or key_format.random_id(WALLET_ID_PREFIX)
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
    if not 0 <= nano <= settings.OVERDRAFT_LIMIT_NANO_MAX:
        raise OverdraftLimitInvalid(
            "an overdraft limit must be from 0 to "
            f"{money.format_usd(settings.OVERDRAFT_LIMIT_NANO_MAX)} USD, "
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
    key = await api_keys.issue_key(conn, wallet_id=wallet.id, source="signup")
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


# --- Rows owned by an outside resource (the Kubernetes operator) ---------------------------------
# Every function below selects by (source, external_id), never by id alone: a caller acting for
# one owner (a Wallet resource's UID) can never change a wallet that belongs to someone else (a
# self-service signup, an admin), even when handed a wrong id. Keys: billing.api_keys.


class OwnedElsewhere(errors.Conflict):
    """A row with this external id exists but belongs to another source: leave it alone."""


_OWNED_WALLET_FIELDS = frozenset({"email", "suspended", "stripe_customer_id", "overdraft_limit_nano"})


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
            raise OwnedElsewhere(external_id) from None
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
