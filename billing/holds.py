"""Holds: two-phase spending, like a card pre-authorization (TigerBeetle's pending transfers).

``place`` reserves a request's estimated worst-case cost when Envoy asks to admit it; the access
log later ``settle``s it: posted for the actual cost (the rest of the reservation returns) or
voided (the backend failed: nothing is charged). A hold nobody settles within ``hold_ttl_s`` (its
``expires_at``) stays pending and keeps its reservation: should the request's access-log entry
arrive later, the actual cost is posted as usual (``POSTED_AFTER_EXPIRY``), and if none does,
billing/expiry.py charges it the estimate after the report grace. The reservation is released
only by the settlement that charges or voids the hold, so no wallet can spend again money a hold
may still be charged (docs/decisions/0030-unreported-holds.md). So every admitted request ends
in exactly one charge or none, never two. How a settlement resolves its hold is a
:class:`Resolution`; what became of it, a :class:`Settlement`.

A Check Envoy gave up on (503, no metadata: :func:`void_before_hold`) may commit its hold after
the report of that refusal: the report leaves a void in the request id's place, so the late
Check's insert meets the primary key and places nothing.

The admission rule: admit only while ``balance - reserved - hold >= -overdraft_limit``, the
wallet's own limit (``wallets.overdraft_limit_nano``; 0 for every wallet in strict mode), so no
request takes a wallet below −(its limit), however large it is or however many run at once
(docs/decisions/0004-overdraft-limit.md);
never while the wallet is ``suspended`` (the operator's and admins' switch) or ``disputed`` (an
open Stripe dispute, billing/payments.py). The test and the reservation are one UPDATE, so
concurrent Checks on one wallet cannot both see the same money.

Every function here is the SQL the sidecar runs, on an asyncpg connection (``billing.database``):
each hot-path call is one prepared statement in one round trip. A SQLAlchemy ``AsyncConnection``
is accepted too (tests, the CLI, the sweeps) and its asyncpg connection used, in its transaction.
:mod:`billing.hold_batches` runs the same rule for many requests in one transaction (the sidecar's
group commit); this module is the rule for one.

Sharp edges: the usage entry a settlement posts is written here, by :data:`SETTLE_SQL`, not by
:mod:`billing.ledger` (whose invariants it keeps); and a cost above the hold is posted as the
hold, never more.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any, ClassVar

import asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection

from billing import database, key_limits

# An asyncpg connection, or a SQLAlchemy one whose asyncpg connection (and transaction) is used.
Conn = AsyncConnection | database.Connection


class RefusalReason(enum.Enum):
    """Why :func:`place` refused a hold; each value is the code the client's answer carries."""

    # The hold does not fit even with every reservation released: the wallet is empty, or this
    # request is too large for what is left (:class:`Shortfall` says which).
    INSUFFICIENT_FUNDS = "insufficient_funds"
    # The hold would fit if the requests in flight released their reservations: retry shortly.
    FUNDS_RESERVED = "funds_reserved"
    # Switched off by its operator or an admin (``wallets.suspended``).
    WALLET_SUSPENDED = "wallet_suspended"
    # On hold while a Stripe payment into it is disputed (``wallets.disputed``, billing/payments.py);
    # topping up does not lift it, the dispute closing does.
    PAYMENT_DISPUTED = "payment_disputed"
    # The key's wallet row is gone (keys reference wallets; only a row deleted by hand, while the
    # sidecar's key cache still held its key, gets here).
    WALLET_NOT_FOUND = "wallet_not_found"
    # The request id already names a hold of another wallet, or one already settled: a replayed
    # or forged id, or a Check that answered after Envoy gave up on it, whose refusal was
    # reported first (:func:`void_before_hold`). Envoy mints ids itself, so this is never a
    # legitimate retry.
    DUPLICATE_REQUEST = "duplicate_request"
    # The key's own spend limit (billing/key_limits.py) does not fit the hold: paying in does not
    # help, the window's reset (or the owner raising the limit) does. The wallet's other keys
    # are not concerned.
    KEY_LIMIT_REACHED = "key_limit_reached"


class Shortfall(enum.Enum):
    """Why an ``INSUFFICIENT_FUNDS`` refusal: what the client can do about it differs."""

    # Nothing can be spent: ``balance + limit <= 0``. Only a top-up helps.
    WALLET_EMPTY = "wallet_empty"
    # ``balance + limit > 0``, but this hold is larger than that: a smaller request (a lower
    # ``max_tokens``) may fit; a top-up helps too.
    REQUEST_TOO_LARGE = "request_too_large"


@dataclasses.dataclass(frozen=True)
class Resolution:
    """What a settlement does with its hold, one of three:

    - ``Resolution.post(cost_nano)``: charge the request's actual cost (at most the hold; the rest
      of the reservation returns);
    - ``Resolution.POST_ESTIMATE``: charge the hold's own amount, the request's worst case — a
      success whose usage never arrived, or an answer cut short;
    - ``Resolution.VOID``: charge nothing (the backend failed, or never saw the request).
    """

    # Set only by ``post``: the actual cost.
    cost_nano: int | None = None
    # Set only by ``POST_ESTIMATE``.
    estimate: bool = False

    VOID: ClassVar[Resolution]
    POST_ESTIMATE: ClassVar[Resolution]

    def __post_init__(self) -> None:
        if self.cost_nano is not None and self.estimate:
            raise ValueError("a settlement posts either a cost or the hold's estimate, not both")
        if self.cost_nano is not None and self.cost_nano < 0:
            raise ValueError(
                f"a request's cost cannot be negative ({self.cost_nano}); credits are ledger entries"
            )

    @classmethod
    def post(cls, cost_nano: int) -> Resolution:
        return cls(cost_nano=cost_nano)

    @property
    def posts(self) -> bool:
        """Whether the hold ends ``posted`` (else ``voided``)."""
        return self.estimate or self.cost_nano is not None


Resolution.VOID = Resolution()
Resolution.POST_ESTIMATE = Resolution(estimate=True)


class Settlement(enum.Enum):
    POSTED = "posted"
    VOIDED = "voided"
    # The access-log entry (or the estimate, billing/expiry.py) came after the hold's
    # ``expires_at``: charged now, and its reservation, kept until now, released.
    POSTED_AFTER_EXPIRY = "posted_after_expiry"
    ALREADY_POSTED = "already_posted"
    ALREADY_VOIDED = "already_voided"
    VOIDED_AFTER_EXPIRY = "voided_after_expiry"
    UNKNOWN_HOLD = "unknown_hold"
    # A refused Check's report came before its hold: a void now stands in the request id's place,
    # and the Check's hold, should it still be inserted, is refused (:func:`void_before_hold`).
    VOIDED_BEFORE_HOLD = "voided_before_hold"
    # The settlement named another wallet or model than the hold the Check recorded: a forged or
    # confused report. Nothing changed; the hold stays as it was, for its true report or its
    # estimate's charge.
    REFUSED_MISMATCH = "refused_mismatch"


# Admission and reservation in one statement: the wallet row is updated only if it admits the
# request, and the hold inserted only if it was. Concurrent Checks on one wallet queue on that
# row's lock, and each is tested against the reservations of those before it. The rule,
# ``balance - reserved - hold >= -limit``, is written ``balance - reserved + limit >= hold``
# (strict mode: limit 0); since every admission keeps it, ``balance - reserved >= -limit`` holds
# between settlements, and a settlement at most the hold keeps it too. This is the statement of
# a key without a spend limit: it never reads the key's row (:data:`PLACE_LIMITED_SQL` does).
# $1 request id, $2 wallet, $3 key, $4 model, $5 amount, $6 TTL in seconds, $7 strict.
PLACE_SQL = """
WITH admitted AS (
    UPDATE wallets
       SET reserved_nano = reserved_nano + $5::bigint
     WHERE id = $2::text
       AND NOT suspended
       AND NOT disputed
       AND balance_nano - reserved_nano
           + CASE WHEN $7::boolean THEN 0 ELSE overdraft_limit_nano END >= $5::bigint
 RETURNING id
)
INSERT INTO holds (request_id, wallet_id, key_id, model, amount_nano, state, expires_at)
SELECT $1::text, id, $3::text, $4::text, $5::bigint, 'pending',
       now() + make_interval(secs => $6::int)
  FROM admitted
RETURNING request_id
"""

# :data:`PLACE_SQL` for a key that has a spend limit (billing/key_limits.py), the same rule for
# the wallet plus the key's: the wallet row is locked only if it admits the request, the key's
# row after it, and both rows are updated and the hold inserted only if both admit it (so the
# wallet is locked by a SELECT and then updated: a refusal by the key must leave it unchanged).
# The key's rule, ``spent + reserved + hold <= limit``, is kept as the wallet's is, with no
# overdraft in either mode; its window rolls over here (key_limits.ROLLED_START_SQL), and the
# hold records the window it counts in. A key whose limit was removed meanwhile (the key cache
# still says it has one) is read but neither locked nor written: the hold then counts nowhere.
# The parameters are PLACE_SQL's.
PLACE_LIMITED_SQL = f"""
WITH wallet AS MATERIALIZED (
    SELECT id
      FROM wallets
     WHERE id = $2::text
       AND NOT suspended
       AND NOT disputed
       AND balance_nano - reserved_nano
           + CASE WHEN $7::boolean THEN 0 ELSE overdraft_limit_nano END >= $5::bigint
       FOR NO KEY UPDATE
), key_limit AS MATERIALIZED (
    SELECT k.id, k.limit_nano, k.reserved_nano,
           {key_limits.ROLLED_START_SQL} AS window_start,
           {key_limits.ROLLED_SPENT_SQL} AS spent_nano
      FROM api_keys k JOIN wallet ON k.wallet_id = wallet.id
     WHERE k.id = $3::text AND k.limit_nano IS NOT NULL
       FOR NO KEY UPDATE OF k
), admissible AS (
    SELECT id FROM wallet
     WHERE NOT EXISTS (SELECT 1 FROM key_limit
                        WHERE spent_nano + reserved_nano + $5::bigint > limit_nano)
), key_reserved AS (
    UPDATE api_keys
       SET reserved_nano = api_keys.reserved_nano + $5::bigint,
           window_start = key_limit.window_start,
           spent_nano = key_limit.spent_nano
      FROM key_limit CROSS JOIN admissible
     WHERE api_keys.id = key_limit.id
), admitted AS (
    UPDATE wallets
       SET reserved_nano = wallets.reserved_nano + $5::bigint
      FROM admissible
     WHERE wallets.id = admissible.id
 RETURNING wallets.id
)
INSERT INTO holds (request_id, wallet_id, key_id, model, amount_nano, state, expires_at, limit_window_start)
SELECT $1::text, id, $3::text, $4::text, $5::bigint, 'pending',
       now() + make_interval(secs => $6::int), (SELECT window_start FROM key_limit)
  FROM admitted
RETURNING request_id
"""

_HOLDS_PENDING = """
SELECT 1 FROM holds WHERE request_id = $1::text AND wallet_id = $2::text AND state = 'pending'
"""

_WALLET_STATE = """
SELECT w.balance_nano, w.reserved_nano, w.overdraft_limit_nano, w.suspended, w.disputed, now() AS now,
       k.id, k.wallet_id, k.limit_nano, k.limit_window, k.window_start, k.spent_nano,
       k.reserved_nano AS key_reserved_nano
  FROM wallets w LEFT JOIN api_keys k ON k.id = $2::text AND k.wallet_id = w.id
 WHERE w.id = $1::text
"""


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A hold not placed, with what the Check needs to tell the client why and what would fit.

    The money fields are the wallet as read right after the refusal; ``overdraft_limit_nano``
    is the limit the rule applied (0 in strict mode, whatever the wallet's own). Unknown wallets
    and duplicate request ids carry only the hold.
    """

    reason: RefusalReason
    balance_nano: int = 0
    reserved_nano: int = 0
    overdraft_limit_nano: int = 0
    # The hold that did not fit: the request's worst-case cost.
    amount_nano: int = 0
    # Set exactly when ``reason`` is INSUFFICIENT_FUNDS.
    shortfall: Shortfall | None = None
    # Set exactly when ``reason`` is KEY_LIMIT_REACHED: the key's limit as read after the refusal.
    key_limit: key_limits.KeyLimit | None = None

    @property
    def headroom_nano(self) -> int:
        """The largest hold the wallet would admit now (``balance - reserved + limit``, at least 0)."""
        return max(0, self.balance_nano - self.reserved_nano + self.overdraft_limit_nano)


async def place(
    conn: Conn,
    *,
    request_id: str,
    wallet_id: str,
    key_id: str,
    model: str,
    amount_nano: int,
    ttl_s: int,
    strict: bool,
    limited: bool = True,
) -> Refusal | None:
    """Reserve ``amount_nano`` for one request in a single statement (:data:`PLACE_SQL`); None
    when the hold is placed (the request is admitted), else why not.

    ``limited``: whether the key has a spend limit, as the caller knows it (the sidecar: its key
    cache, ``KeyRecord.limited``). False takes the statement that never reads the key's row, so
    a limit set a moment ago applies from the caller's next look-up of the key; True is exact
    for every key and is what a caller that does not know should pass.

    Use an autocommit connection: one round trip, and the wallet row is locked only for it.
    A Check repeated for the same ``request_id`` (Envoy retrying the Check) is admitted again
    without a second reservation.
    """
    pg = await database.driver_connection(conn)
    statement = PLACE_LIMITED_SQL if limited else PLACE_SQL
    # Twice at most: a refusal is explained by a second read, and if money came back in between
    # (a hold was settled), refusing would be a false block.
    for _ in range(2):
        try:
            placed = await pg.fetchval(
                statement, request_id, wallet_id, key_id, model, amount_nano, int(ttl_s), strict
            )
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != "holds_pkey":
                raise
            # The statement rolled back, reservation included. The first Check's hold stands,
            # but only a retry of that same request (same wallet, still pending) may ride on it.
            if await _holds_pending(pg, request_id, wallet_id):
                return None
            return Refusal(RefusalReason.DUPLICATE_REQUEST, amount_nano=amount_nano)
        if placed is not None:
            return None
        # A repeated Check finds no money left when its own first hold took it; the statement
        # then inserts nothing, so the duplicate key never fires. Refusing it would be a false block.
        if await _holds_pending(pg, request_id, wallet_id):
            return None
        refusal = await _why_refused(pg, wallet_id, key_id, amount_nano, strict)
        if refusal is not None:
            return refusal
    # Refused twice, and twice the wallet read right after would have admitted it: money is
    # moving under us (holds placed and settled between the reads). Retrying is right.
    return Refusal(RefusalReason.FUNDS_RESERVED, amount_nano=amount_nano)


async def _holds_pending(pg: database.Connection, request_id: str, wallet_id: str) -> bool:
    return await pg.fetchval(_HOLDS_PENDING, request_id, wallet_id) is not None


async def _why_refused(
    pg: database.Connection, wallet_id: str, key_id: str, amount_nano: int, strict: bool
) -> Refusal | None:
    """Why the wallet or the key refused a hold, or None if, read again now, both would accept it."""
    row = await pg.fetchrow(_WALLET_STATE, wallet_id, key_id)
    if row is None:
        return Refusal(RefusalReason.WALLET_NOT_FOUND, amount_nano=amount_nano)
    key_row = (
        {**dict(row.items()), "reserved_nano": row["key_reserved_nano"]} if row["id"] is not None else None
    )
    return refusal_of(
        balance_nano=row["balance_nano"],
        reserved_nano=row["reserved_nano"],
        overdraft_limit_nano=0 if strict else row["overdraft_limit_nano"],
        amount_nano=amount_nano,
        suspended=row["suspended"],
        disputed=row["disputed"],
        key_limit=None if key_row is None else key_limits.rolled(key_row, row["now"]),
    )


def refusal_of(
    *,
    balance_nano: int,
    reserved_nano: int,
    overdraft_limit_nano: int,
    amount_nano: int,
    suspended: bool = False,
    disputed: bool = False,
    key_limit: key_limits.KeyLimit | None = None,
) -> Refusal | None:
    """The admission rule of :data:`PLACE_SQL`, in Python, naming the refusal (None: admitted).

    A suspended wallet is refused as such before a disputed one, and both before any question of
    money: the order :class:`billing.wallets.WalletState` names a wallet's state in. The key's
    limit comes next, before the wallet's money: when it does not fit, a top-up would not help.

    With ``spendable = balance + limit`` (what the wallet may spend once nothing is reserved):
    the hold fits now when ``spendable - reserved >= hold``; if not, FUNDS_RESERVED when it
    would fit with every reservation released (``spendable >= hold``: waiting helps), else
    INSUFFICIENT_FUNDS — ``wallet_empty`` when ``spendable <= 0`` (no request of any cost fits),
    ``request_too_large`` when ``0 < spendable < hold`` (a smaller one would).
    """

    def refused(reason: RefusalReason, shortfall: Shortfall | None = None) -> Refusal:
        return Refusal(reason, balance_nano, reserved_nano, overdraft_limit_nano, amount_nano, shortfall)

    if suspended:
        return refused(RefusalReason.WALLET_SUSPENDED)
    if disputed:
        return refused(RefusalReason.PAYMENT_DISPUTED)
    if key_limit is not None and not key_limit.admits(amount_nano):
        return dataclasses.replace(refused(RefusalReason.KEY_LIMIT_REACHED), key_limit=key_limit)
    spendable = balance_nano + overdraft_limit_nano
    if spendable - reserved_nano >= amount_nano:
        return None
    if spendable >= amount_nano:
        return refused(RefusalReason.FUNDS_RESERVED)
    if spendable <= 0:
        return refused(RefusalReason.INSUFFICIENT_FUNDS, Shortfall.WALLET_EMPTY)
    return refused(RefusalReason.INSUFFICIENT_FUNDS, Shortfall.REQUEST_TOO_LARGE)


# Settlement in one statement, so the wallet row is locked for one statement, not a transaction.
# The hold is locked first: a concurrent settlement of the same request, or the expiry sweep, is
# waited for, and the row read is the one they left (READ COMMITTED re-reads a row it had to wait
# for). The hold must agree with what the caller says it is for ($5 wallet, $6 model; NULL: no
# claim): wallet, key and model always come from the hold's row, never from the report, and a
# report that names another wallet or model resolves nothing ("agrees" is false; the outcome is
# REFUSED_MISMATCH). Only a pending or expired hold is resolved; the wallet's balance moves by
# the posted cost, its reservation is released if the hold is pending (past its ``expires_at`` or
# not: it keeps its reservation until now), and the usage entry records the balance the wallet
# UPDATE returned. State ``expired`` is that of holds an earlier version expired at their TTL,
# releasing their reservations then; it is resolved without a release.
# A hold that counts against its key's limit moves the key's sums the same way, after the wallet
# (joined to ``moved``: the key row is locked only under its wallet's): its reservation released
# if it was pending, its charge added to the key's spend if the key's window is still the one the
# hold was placed in (a charge after a rollover belongs to the old window). The outcome calls a
# pending hold past its ``expires_at`` ``expired`` (``was``), as it reports a late settlement.
# A charge never exceeds its hold (``least``): the hold is the request's worst case, and what
# admitted the request against the wallet's overdraft limit; a cost above it means the estimate
# missed something (the caller's details record the priced cost), and the wallet's bound holds
# all the same. There is deliberately no ON CONFLICT on the entry: if ``usage:<request id>`` exists already,
# the unique violation aborts the whole statement, so money never moves without its entry.
# $1 request id, $2 cost (NULL: void, unless $3), $3 post the hold's own amount, $4 details,
# $5 the hold's wallet and $6 its model as the caller knows them (NULL: not checked).
SETTLE_SQL = """
WITH hold AS (
    SELECT request_id, amount_nano, state, expires_at,
           ($5::text IS NULL OR wallet_id = $5::text) AND ($6::text IS NULL OR model = $6::text) AS agrees
      FROM holds
     WHERE request_id = $1::text
       FOR NO KEY UPDATE
), resolved AS (
    UPDATE holds
       SET state = CASE WHEN $3::boolean OR $2::bigint IS NOT NULL THEN 'posted' ELSE 'voided' END,
           posted_nano = CASE WHEN $3::boolean THEN hold.amount_nano
                              WHEN $2::bigint IS NULL THEN NULL  -- a void (least() skips NULLs)
                              ELSE least($2::bigint, hold.amount_nano) END,
           resolved_at = now()
      FROM hold
     WHERE holds.request_id = hold.request_id
       AND hold.state IN ('pending', 'expired')
       AND hold.agrees
 RETURNING holds.wallet_id, holds.key_id, holds.model, holds.posted_nano, holds.limit_window_start,
           CASE WHEN hold.state = 'pending' THEN hold.amount_nano ELSE 0 END AS released
), moved AS (
    UPDATE wallets
       SET balance_nano = wallets.balance_nano - coalesce(resolved.posted_nano, 0),
           reserved_nano = wallets.reserved_nano - resolved.released,
           updated_at = now()
      FROM resolved
     WHERE wallets.id = resolved.wallet_id
       AND (resolved.posted_nano IS NOT NULL OR resolved.released > 0)
 RETURNING wallets.balance_nano
), key_moved AS (
    UPDATE api_keys
       SET reserved_nano = api_keys.reserved_nano - resolved.released,
           spent_nano = api_keys.spent_nano
                        + CASE WHEN api_keys.window_start = resolved.limit_window_start
                               THEN coalesce(resolved.posted_nano, 0) ELSE 0 END
      FROM resolved CROSS JOIN moved
     WHERE api_keys.id = resolved.key_id
       AND resolved.limit_window_start IS NOT NULL
), charged AS (
    INSERT INTO ledger_entries (wallet_id, idempotency_key, kind, amount_nano, balance_after_nano, details)
    SELECT resolved.wallet_id, 'usage:' || $1::text, 'usage', -resolved.posted_nano, moved.balance_nano,
           jsonb_build_object('model', resolved.model, 'key_id', resolved.key_id, 'request_id', $1::text)
           || $4::jsonb
      FROM resolved CROSS JOIN moved
     WHERE resolved.posted_nano IS NOT NULL
 RETURNING id
)
SELECT $1::text AS request_id,
       CASE WHEN hold.state = 'pending' AND hold.expires_at <= now() THEN 'expired' ELSE hold.state END
           AS was,
       hold.agrees,
       (SELECT count(*) FROM resolved) AS resolved,
       (SELECT count(*) FROM charged) AS charged
  FROM hold
"""

# (the hold's state before, whether this settlement posts) -> what happened.
_OUTCOMES = {
    ("pending", True): Settlement.POSTED,
    ("pending", False): Settlement.VOIDED,
    ("expired", True): Settlement.POSTED_AFTER_EXPIRY,
    ("expired", False): Settlement.VOIDED_AFTER_EXPIRY,
    ("posted", True): Settlement.ALREADY_POSTED,
    ("posted", False): Settlement.ALREADY_POSTED,
    ("voided", True): Settlement.ALREADY_VOIDED,
    ("voided", False): Settlement.ALREADY_VOIDED,
}


async def settle(
    conn: Conn,
    *,
    request_id: str,
    resolution: Resolution,
    details: dict[str, Any] | None = None,
    wallet_id: str = "",
    model: str = "",
) -> Settlement:
    """Resolve a request's hold as ``resolution`` says: post a cost or its estimate, or void it.
    Idempotent.

    ``wallet_id`` / ``model``: what the caller says the hold is for (empty: not checked). A report
    (the access log, ``billingproxy reconcile``) names both, and a hold that disagrees is left
    untouched: :attr:`Settlement.REFUSED_MISMATCH`. The charge always goes to the hold's own wallet
    and key and names the hold's own model, whatever the caller says.

    One statement (:data:`SETTLE_SQL`); the charge's idempotency key is ``usage:<request_id>``.
    """
    pg = await database.driver_connection(conn)
    try:
        row = await pg.fetchrow(
            SETTLE_SQL, *settle_parameters(request_id, resolution, details, wallet_id, model)
        )
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name != "ledger_entries_idempotency_key_key":
            raise
        # ``usage:<request id>`` exists already, so this request was charged: the statement,
        # aborted whole, changed nothing.
        return Settlement.ALREADY_POSTED
    return settlement_of(row, request_id, resolution)


def settle_parameters(
    request_id: str, resolution: Resolution, details: dict[str, Any] | None, wallet_id: str, model: str
) -> tuple[Any, ...]:
    """:data:`SETTLE_SQL`'s parameters ($1…$6), also the columns of a set-based batch."""
    return (
        request_id,
        resolution.cost_nano,
        resolution.estimate,
        json.dumps(details or {}),
        wallet_id or None,
        model or None,
    )


def settlement_of(row: asyncpg.Record | None, request_id: str, resolution: Resolution) -> Settlement:
    """What a settlement statement's row (None: no such hold) says happened to the hold."""
    if row is None:
        return Settlement.UNKNOWN_HOLD
    if not row["agrees"]:
        assert (row["resolved"], row["charged"]) == (0, 0), f"settling {request_id}: {row!r}"
        return Settlement.REFUSED_MISMATCH
    if row["was"] in ("pending", "expired"):
        assert (row["resolved"], row["charged"]) == (1, int(resolution.posts)), (
            f"settling {request_id}: {row!r}"
        )
    return _OUTCOMES[(row["was"], resolution.posts)]


# How often the sidecar's sweep (billing/expiry.py) runs: a hold unreported at its ``expires_at``
# plus the report grace is charged within one period (plus the round's own time);
# ``billing.audit`` allows for that before it calls such a hold overdue.
EXPIRY_SWEEP_S = 5


async def outstanding(conn: Conn) -> int:
    pg = await database.driver_connection(conn)
    count: int = await pg.fetchval("SELECT count(*) FROM holds WHERE state = 'pending'")
    return count


# The void a Check's failure leaves in its request id's place when no hold is there yet: no
# wallet, key or model (the report of a refused Check knows none), nothing held, nothing charged.
# ON CONFLICT waits for a hold being inserted by a Check in flight and then inserts nothing; the
# caller voids that hold instead. One row per statement, autocommitted: a statement that holds
# one uncommitted void while it waits for a Check's insert could deadlock with that Check's batch.
_VOID_BEFORE_HOLD = """
INSERT INTO holds (request_id, wallet_id, key_id, model, amount_nano, state, expires_at, resolved_at)
VALUES ($1::text, NULL, NULL, NULL, 0, 'voided', now(), now())
ON CONFLICT (request_id) DO NOTHING
RETURNING request_id
"""


async def void_before_hold(conn: Conn, request_id: str) -> bool:
    """Take ``request_id`` for a void if no hold has it yet; whether it did.

    For the report of a Check Envoy gave up on (it answered 503 with no metadata,
    authz_sidecar/access_log.py): the Check may still be running, and commit its hold after
    Envoy's refusal — even after that refusal's report. Without this the report's void would find
    nothing and the hold would stay, to be charged its estimate for a request never served.
    With it, whichever comes second loses: a Check whose hold is already there is voided by the
    caller as usual (False here), and a Check that comes later hits the primary key, its whole
    statement rolls back — reservation included — and it is refused (``DUPLICATE_REQUEST``).
    The Check's own statement is unchanged: no extra round trip on the hot path.

    Use an autocommit connection, outside any transaction: the row must be committed alone.
    """
    pg = await database.driver_connection(conn)
    return await pg.fetchval(_VOID_BEFORE_HOLD, request_id) is not None
