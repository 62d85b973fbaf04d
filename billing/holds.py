"""Holds: two-phase spending, like a card pre-authorization (TigerBeetle's pending transfers).

``place`` reserves a request's estimated worst-case cost when Envoy asks to admit it; the access
log later ``settle``s it: posted for the actual cost (the rest of the reservation returns) or
voided (the backend failed: nothing is charged). A hold nobody settles within ``hold_ttl_s`` is
expired by ``expire_due``: its reservation is released and nothing is charged then; should the
request's access-log entry still arrive later, the actual cost is posted as usual. So every
admitted request ends in exactly one charge or none, never two.

Admission (DESIGN.md): admit only while ``balance - reserved - hold >= -overdraft_limit``, the
wallet's own limit (``wallets.overdraft_limit_nano``; 0 for every wallet in strict mode), so no
request takes a wallet below −(its limit), however large it is or however many run at once
(docs/decisions/0004-overdraft-limit.md);
never while the wallet is ``suspended`` (the operator's and admins' switch) or ``disputed`` (an
open Stripe dispute, billing/payments.py). The test and the reservation are one UPDATE, so
concurrent Checks on one wallet cannot both see the same money.

Every function here is the SQL the sidecar runs, on an asyncpg connection (``billing.database``):
each hot-path call is one prepared statement in one round trip. A SQLAlchemy ``AsyncConnection``
is accepted too (tests, the CLI, the sweeps) and its asyncpg connection used, in its transaction.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection

from billing import database

# An asyncpg connection, or a SQLAlchemy one whose asyncpg connection (and transaction) is used.
Conn = AsyncConnection | database.Connection


class Admission(enum.Enum):
    ADMITTED = "admitted"
    # The hold does not fit even with every reservation released: the wallet is empty, or this
    # request is too large for what is left (:class:`Shortfall` says which).
    INSUFFICIENT_FUNDS = "insufficient_funds"
    # The hold would fit if the requests in flight released their reservations: retry shortly.
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


class Shortfall(enum.Enum):
    """Why an ``INSUFFICIENT_FUNDS`` refusal: what the client can do about it differs."""

    # Nothing can be spent: ``balance + limit <= 0``. Only a top-up helps.
    WALLET_EMPTY = "wallet_empty"
    # ``balance + limit > 0``, but this hold is larger than that: a smaller request (a lower
    # ``max_tokens``) may fit; a top-up helps too.
    REQUEST_TOO_LARGE = "request_too_large"


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
    # The settlement named another wallet or model than the hold the Check recorded: a forged or
    # confused report. Nothing changed; the hold stays as it was, for its true report or expiry.
    REFUSED_MISMATCH = "refused_mismatch"


# Admission and reservation in one statement: the wallet row is updated only if it admits the
# request, and the hold inserted only if it was. Concurrent Checks on one wallet queue on that
# row's lock, and each is tested against the reservations of those before it. The rule,
# ``balance - reserved - hold >= -limit``, is written ``balance - reserved + limit >= hold``
# (strict mode: limit 0); since every admission keeps it, ``balance - reserved >= -limit`` holds
# between settlements, and a settlement at most the hold keeps it too.
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

_HOLDS_PENDING = """
SELECT 1 FROM holds WHERE request_id = $1::text AND wallet_id = $2::text AND state = 'pending'
"""

_WALLET_STATE = """
SELECT balance_nano, reserved_nano, overdraft_limit_nano, suspended, disputed FROM wallets WHERE id = $1::text
"""


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A hold not placed, with what the Check needs to tell the client why and what would fit.

    The money fields are the wallet as read right after the refusal; ``overdraft_limit_nano``
    is the limit the rule applied (0 in strict mode, whatever the wallet's own). Unknown wallets
    and duplicate request ids carry only the hold.
    """

    admission: Admission
    balance_nano: int = 0
    reserved_nano: int = 0
    overdraft_limit_nano: int = 0
    # The hold that did not fit: the request's worst-case cost.
    amount_nano: int = 0
    # Set exactly when ``admission`` is INSUFFICIENT_FUNDS.
    shortfall: Shortfall | None = None

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
) -> Admission | Refusal:
    """Reserve ``amount_nano`` for one request in a single statement (:data:`PLACE_SQL`).

    Use an autocommit connection: one round trip, and the wallet row is locked only for it.
    A Check repeated for the same ``request_id`` (Envoy retrying the Check) is admitted again
    without a second reservation.
    """
    pg = await database.driver_connection(conn)
    # Twice at most: a refusal is explained by a second read, and if money came back in between
    # (a hold was settled), refusing would be a false block.
    refusal: Refusal | None = None
    for _ in range(2):
        try:
            placed = await pg.fetchval(
                PLACE_SQL, request_id, wallet_id, key_id, model, amount_nano, int(ttl_s), strict
            )
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != "holds_pkey":
                raise
            # The statement rolled back, reservation included. The first Check's hold stands,
            # but only a retry of that same request (same wallet, still pending) may ride on it.
            if await _holds_pending(pg, request_id, wallet_id):
                return Admission.ADMITTED
            return Refusal(Admission.DUPLICATE_REQUEST, amount_nano=amount_nano)
        if placed is not None:
            return Admission.ADMITTED
        # A repeated Check finds no money left when its own first hold took it; the statement
        # then inserts nothing, so the duplicate key never fires. Refusing it would be a false block.
        if await _holds_pending(pg, request_id, wallet_id):
            return Admission.ADMITTED
        refusal = await _why_refused(pg, wallet_id, amount_nano, strict)
        if refusal is not None:
            return refusal
    # Refused twice, and twice the wallet read right after would have admitted it: money is
    # moving under us (holds placed and settled between the reads). Retrying is right.
    assert refusal is None
    return Refusal(Admission.FUNDS_RESERVED, amount_nano=amount_nano)


async def _holds_pending(pg: database.Connection, request_id: str, wallet_id: str) -> bool:
    return await pg.fetchval(_HOLDS_PENDING, request_id, wallet_id) is not None


async def _why_refused(
    pg: database.Connection, wallet_id: str, amount_nano: int, strict: bool
) -> Refusal | None:
    """Why the wallet refused a hold, or None if, read again now, it would accept it."""
    row = await pg.fetchrow(_WALLET_STATE, wallet_id)
    if row is None:
        return Refusal(Admission.WALLET_NOT_FOUND, amount_nano=amount_nano)
    return refusal_of(
        balance_nano=row["balance_nano"],
        reserved_nano=row["reserved_nano"],
        overdraft_limit_nano=0 if strict else row["overdraft_limit_nano"],
        amount_nano=amount_nano,
        suspended=row["suspended"],
        disputed=row["disputed"],
    )


def refusal_of(
    *,
    balance_nano: int,
    reserved_nano: int,
    overdraft_limit_nano: int,
    amount_nano: int,
    suspended: bool = False,
    disputed: bool = False,
) -> Refusal | None:
    """The admission rule of :data:`PLACE_SQL`, in Python, naming the refusal (None: admitted).

    With ``spendable = balance + limit`` (what the wallet may spend once nothing is reserved):
    the hold fits now when ``spendable - reserved >= hold``; if not, FUNDS_RESERVED when it
    would fit with every reservation released (``spendable >= hold``: waiting helps), else
    INSUFFICIENT_FUNDS — ``wallet_empty`` when ``spendable <= 0`` (no request of any cost fits),
    ``request_too_large`` when ``0 < spendable < hold`` (a smaller one would).
    """

    def refused(admission: Admission, shortfall: Shortfall | None = None) -> Refusal:
        return Refusal(admission, balance_nano, reserved_nano, overdraft_limit_nano, amount_nano, shortfall)

    if suspended:
        return refused(Admission.WALLET_SUSPENDED)
    if disputed:
        return refused(Admission.WALLET_DISPUTED)
    spendable = balance_nano + overdraft_limit_nano
    if spendable - reserved_nano >= amount_nano:
        return None
    if spendable >= amount_nano:
        return refused(Admission.FUNDS_RESERVED)
    if spendable <= 0:
        return refused(Admission.INSUFFICIENT_FUNDS, Shortfall.WALLET_EMPTY)
    return refused(Admission.INSUFFICIENT_FUNDS, Shortfall.REQUEST_TOO_LARGE)


# Settlement in one statement, so the wallet row is locked for one statement, not a transaction.
# The hold is locked first: a concurrent settlement of the same request, or the expiry sweep, is
# waited for, and the row read is the one they left (READ COMMITTED re-reads a row it had to wait
# for). The hold must agree with what the caller says it is for ($5 wallet, $6 model; NULL: no
# claim): wallet, key and model always come from the hold's row, never from the report, and a
# report that names another wallet or model resolves nothing ("agrees" is false; the outcome is
# REFUSED_MISMATCH). Only a pending or expired hold is resolved; the wallet's balance moves by
# the posted cost, its reservation is released only if the hold was still pending (expiry
# released it already), and the usage entry records the balance the wallet UPDATE returned.
# A charge never exceeds its hold (``least``): the hold is the request's worst case, and what
# admitted the request against the wallet's overdraft limit; a cost above it means the estimate
# missed something (the caller's details record the priced cost), and the wallet's bound holds
# all the same. There is deliberately no ON CONFLICT on the entry: if ``usage:<request id>`` exists already,
# the unique violation aborts the whole statement, so money never moves without its entry.
# $1 request id, $2 cost (NULL: void, unless $3), $3 charge the hold's own amount, $4 details,
# $5 the hold's wallet and $6 its model as the caller knows them (NULL: not checked).
SETTLE_SQL = """
WITH hold AS (
    SELECT request_id, amount_nano, state,
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
 RETURNING holds.wallet_id, holds.key_id, holds.model, holds.posted_nano,
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
       hold.state AS was,
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
    cost_nano: int | ChargeHold | None,
    details: dict[str, Any] | None = None,
    wallet_id: str = "",
    model: str = "",
) -> Settlement:
    """Post the actual cost of a request (``cost_nano``), or void it (``None``). Idempotent.

    ``CHARGE_HOLD`` posts the hold's estimate, for a success whose usage never arrived.

    ``wallet_id`` / ``model``: what the caller says the hold is for (empty: not checked). A report
    (the access log, ``billingproxy reconcile``) names both, and a hold that disagrees is left
    untouched: :attr:`Settlement.REFUSED_MISMATCH`. The charge always goes to the hold's own wallet
    and key and names the hold's own model, whatever the caller says.

    One statement (:data:`SETTLE_SQL`); the charge's idempotency key is ``usage:<request_id>``.
    """
    args = _settle_args(request_id, cost_nano, details, wallet_id, model)
    posts = cost_nano is not None
    pg = await database.driver_connection(conn)
    try:
        row = await pg.fetchrow(SETTLE_SQL, *args)
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name != "ledger_entries_idempotency_key_key":
            raise
        # ``usage:<request id>`` exists already, so this request was charged: the statement,
        # aborted whole, changed nothing.
        return Settlement.ALREADY_POSTED
    return _outcome(row, request_id, posts)


def _settle_args(
    request_id: str,
    cost_nano: int | ChargeHold | None,
    details: dict[str, Any] | None,
    wallet_id: str,
    model: str,
) -> tuple[Any, ...]:
    if isinstance(cost_nano, int) and cost_nano < 0:
        raise ValueError(f"a request's cost cannot be negative ({cost_nano}); credits are ledger entries")
    charge_hold = cost_nano is CHARGE_HOLD
    return (
        request_id,
        None if charge_hold else cost_nano,
        charge_hold,
        json.dumps(details or {}),
        wallet_id or None,
        model or None,
    )


def _outcome(row: asyncpg.Record | None, request_id: str, posts: bool) -> Settlement:
    if row is None:
        return Settlement.UNKNOWN_HOLD
    if not row["agrees"]:
        assert (row["resolved"], row["charged"]) == (0, 0), f"settling {request_id}: {row!r}"
        return Settlement.REFUSED_MISMATCH
    if row["was"] in ("pending", "expired"):
        assert (row["resolved"], row["charged"]) == (1, int(posts)), f"settling {request_id}: {row!r}"
    return _OUTCOMES[(row["was"], posts)]


# --- group commit ---------------------------------------------------------------------------------
#
# Under load many Checks and settlements are in flight at once. Each alone is one statement and
# one commit; ``place_many`` and ``settle_many`` run a batch of them in ONE transaction: one round
# trip and one WAL flush instead of one per request; all or nothing (a test fails a batch midway
# and checks that). Results and guarantees are those of calling ``place`` or ``settle`` for each
# in order (tests compare the two, batch by batch). Wallet rows are locked in wallet-id order, so
# two batches cannot deadlock on each other. A batch that hits a duplicate key is rolled back
# whole and redone one by one, where ``place`` and ``settle`` sort out retried Checks and replayed
# entries as usual.
#
# How a batch is sent depends on its size. A small one is the single-request statement for each
# request, pipelined by asyncpg's ``fetchmany`` behind one Sync (PostgreSQL runs that as one
# implicit transaction). From SET_BATCH_MIN requests on, the batch is one set-based statement
# over arrays (PLACE_BATCH_SQL, SETTLE_BATCH_SQL): one plan and one pass over the wallets, each
# wallet row updated once per batch however many of its requests the batch holds. Measured
# (docs/benchmarks.md, "Set-based batches"): at 4 requests the two ways cost PostgreSQL the same,
# at 16 the set-based one ~35% less; for a single request it costs more, hence the threshold.
SET_BATCH_MIN = 4

# PLACE_SQL for a batch. Each wallet's requests are admitted in the batch's order against what
# the wallet could spend before the batch ("room" = balance - reserved + limit, the limit 0 in
# strict mode), less the amounts of its earlier requests in the batch ("before"): admitted while
# room - before >= amount. The rule only ever admits a prefix of a wallet's requests:
# before + amount is the running sum up to and including the request, which never decreases
# (amounts are >= 0), so once one is refused every later one is refused too. The requests after
# that prefix are then retried one by one with ``place``, exactly as the sequence would have met
# them (a smaller request may still fit; money may have come back). Wallets are locked in id
# order before anything reads their balance; FOR NO KEY UPDATE returns each row as it is once
# locked (READ COMMITTED), so "room" is never a stale snapshot.
# $1 request ids, $2 wallets, $3 keys, $4 models, $5 amounts (arrays, in the batch's order),
# $6 TTL in seconds, $7 strict.
PLACE_BATCH_SQL = """
WITH batch AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[])
           WITH ORDINALITY AS r(request_id, wallet_id, key_id, model, amount_nano, position)
), locked AS MATERIALIZED (
    SELECT id, balance_nano - reserved_nano
               + CASE WHEN $7::boolean THEN 0 ELSE overdraft_limit_nano END AS room
      FROM wallets
     WHERE id = ANY($2::text[]) AND NOT suspended AND NOT disputed
     ORDER BY id
       FOR NO KEY UPDATE
), ranked AS (
    SELECT batch.*, locked.room,
           coalesce(sum(batch.amount_nano) OVER (PARTITION BY batch.wallet_id ORDER BY batch.position
                                                 ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING),
                    0) AS before
      FROM batch JOIN locked ON locked.id = batch.wallet_id
), admitted AS (
    SELECT * FROM ranked
     WHERE room - before >= amount_nano
), reserved AS (
    UPDATE wallets
       SET reserved_nano = wallets.reserved_nano + per_wallet.amount
      FROM (SELECT wallet_id, sum(amount_nano) AS amount FROM admitted GROUP BY wallet_id) AS per_wallet
     WHERE wallets.id = per_wallet.wallet_id
)
INSERT INTO holds (request_id, wallet_id, key_id, model, amount_nano, state, expires_at)
SELECT request_id, wallet_id, key_id, model, amount_nano, 'pending', now() + make_interval(secs => $6::int)
  FROM admitted
RETURNING request_id
"""

# SETTLE_SQL for a batch of distinct request ids: holds locked in request-id order, then their
# wallets in id order; each wallet moved once by the sum of its postings and releases; the usage
# entries inserted in (wallet, request id) order, each with the balance after it (the balance
# before the batch less the running sum of the wallet's postings) — exactly the entries and
# balances the single statements, run in that order, write. A ``usage:`` key that exists already
# aborts the whole statement, as in SETTLE_SQL. Each hold must agree with its request's wallet and
# model, as in SETTLE_SQL; one that does not is left alone, the others settle. One row per hold
# found, as SETTLE_SQL's.
# $1 request ids, $2 costs, $3 charge-the-hold flags, $4 details, $5 expected wallets, $6 expected
# models (arrays, one per request; a NULL expectation is not checked).
SETTLE_BATCH_SQL = """
WITH batch AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::boolean[], $4::jsonb[], $5::text[], $6::text[])
           AS r(request_id, cost_nano, charge_hold, details, expected_wallet, expected_model)
), hold AS MATERIALIZED (
    SELECT request_id, amount_nano, state, wallet_id, model
      FROM holds
     WHERE request_id = ANY($1::text[])
     ORDER BY request_id
       FOR NO KEY UPDATE
), judged AS (
    SELECT hold.request_id, hold.amount_nano, hold.state,
           (batch.expected_wallet IS NULL OR hold.wallet_id = batch.expected_wallet)
           AND (batch.expected_model IS NULL OR hold.model = batch.expected_model) AS agrees
      FROM hold JOIN batch USING (request_id)
), resolved AS (
    UPDATE holds
       SET state = CASE WHEN batch.charge_hold OR batch.cost_nano IS NOT NULL THEN 'posted' ELSE 'voided' END,
           posted_nano = CASE WHEN batch.charge_hold THEN judged.amount_nano
                              WHEN batch.cost_nano IS NULL THEN NULL  -- a void (least() skips NULLs)
                              ELSE least(batch.cost_nano, judged.amount_nano) END,
           resolved_at = now()
      FROM judged JOIN batch USING (request_id)
     WHERE holds.request_id = judged.request_id
       AND judged.state IN ('pending', 'expired')
       AND judged.agrees
 RETURNING holds.request_id, holds.wallet_id, holds.key_id, holds.model, holds.posted_nano,
           CASE WHEN judged.state = 'pending' THEN judged.amount_nano ELSE 0 END AS released
), per_wallet AS (
    SELECT wallet_id, coalesce(sum(posted_nano), 0) AS posted, sum(released) AS released
      FROM resolved
     GROUP BY wallet_id
    HAVING bool_or(posted_nano IS NOT NULL) OR sum(released) > 0
), locked AS MATERIALIZED (
    SELECT wallets.id
      FROM wallets JOIN per_wallet ON per_wallet.wallet_id = wallets.id
     ORDER BY wallets.id
       FOR NO KEY UPDATE OF wallets
), moved AS (
    UPDATE wallets
       SET balance_nano = wallets.balance_nano - per_wallet.posted,
           reserved_nano = wallets.reserved_nano - per_wallet.released,
           updated_at = now()
      FROM per_wallet JOIN locked ON locked.id = per_wallet.wallet_id
     WHERE wallets.id = per_wallet.wallet_id
 RETURNING wallets.id, wallets.balance_nano + per_wallet.posted AS balance_before
), charged AS (
    INSERT INTO ledger_entries (wallet_id, idempotency_key, kind, amount_nano, balance_after_nano, details)
    SELECT resolved.wallet_id, 'usage:' || resolved.request_id, 'usage', -resolved.posted_nano,
           moved.balance_before - sum(resolved.posted_nano) OVER (PARTITION BY resolved.wallet_id
                                                                  ORDER BY resolved.request_id),
           jsonb_build_object('model', resolved.model, 'key_id', resolved.key_id,
                              'request_id', resolved.request_id) || batch.details
      FROM resolved JOIN moved ON moved.id = resolved.wallet_id JOIN batch USING (request_id)
     WHERE resolved.posted_nano IS NOT NULL
     ORDER BY resolved.wallet_id, resolved.request_id
 RETURNING idempotency_key
)
SELECT judged.request_id,
       judged.state AS was,
       judged.agrees,
       (judged.request_id IN (SELECT request_id FROM resolved))::int AS resolved,
       ('usage:' || judged.request_id IN (SELECT idempotency_key FROM charged))::int AS charged
  FROM judged
"""


@dataclasses.dataclass(frozen=True)
class HoldRequest:
    """One Check's reservation (the arguments of :func:`place`)."""

    request_id: str
    wallet_id: str
    key_id: str
    model: str
    amount_nano: int


@dataclasses.dataclass(frozen=True)
class SettleRequest:
    """One finished request's settlement (the arguments of :func:`settle`)."""

    request_id: str
    cost_nano: int | ChargeHold | None
    details: dict[str, Any] | None = None
    # The hold's wallet and model as the caller knows them (the access log does): checked against
    # the hold (empty: not checked); the wallet also orders a small batch's locks.
    wallet_id: str = ""
    model: str = ""


async def place_many(
    conn: Conn, requests: list[HoldRequest], *, ttl_s: int, strict: bool
) -> list[Admission | Refusal]:
    """:func:`place` for each request, as one transaction; results in the requests' order."""

    async def one_by_one(items: list[HoldRequest]) -> list[Admission | Refusal]:
        return [
            await place(
                conn,
                request_id=r.request_id,
                wallet_id=r.wallet_id,
                key_id=r.key_id,
                model=r.model,
                amount_nano=r.amount_nano,
                ttl_s=ttl_s,
                strict=strict,
            )
            for r in items
        ]

    if len(requests) < 2 or len({r.request_id for r in requests}) < len(requests):
        return await one_by_one(requests)
    pg = await database.driver_connection(conn)
    try:
        if len(requests) >= SET_BATCH_MIN:
            rows = await pg.fetch(
                PLACE_BATCH_SQL,
                [r.request_id for r in requests],
                [r.wallet_id for r in requests],
                [r.key_id for r in requests],
                [r.model for r in requests],
                [r.amount_nano for r in requests],
                int(ttl_s),
                strict,
            )
        else:
            ordered = sorted(requests, key=lambda r: r.wallet_id)
            rows = await pg.fetchmany(
                PLACE_SQL,
                [
                    (r.request_id, r.wallet_id, r.key_id, r.model, r.amount_nano, int(ttl_s), strict)
                    for r in ordered
                ],
            )
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name != "holds_pkey":
            raise
        return await one_by_one(requests)  # a retried Check among them: nothing was placed
    placed = {row["request_id"] for row in rows}
    # Not placed: refused, or a repeat of a Check whose hold took the money. ``place`` tells which
    # (and admits it if money came back meanwhile).
    return [Admission.ADMITTED if r.request_id in placed else (await one_by_one([r]))[0] for r in requests]


async def settle_many(conn: Conn, requests: list[SettleRequest]) -> list[Settlement]:
    """:func:`settle` for each request, as one transaction; results in the requests' order."""
    args = {
        r.request_id: _settle_args(r.request_id, r.cost_nano, r.details, r.wallet_id, r.model)
        for r in requests
    }

    async def one_by_one(items: list[SettleRequest]) -> list[Settlement]:
        return [
            await settle(
                conn,
                request_id=r.request_id,
                cost_nano=r.cost_nano,
                details=r.details,
                wallet_id=r.wallet_id,
                model=r.model,
            )
            for r in items
        ]

    if len(requests) < 2 or len(args) < len(requests):
        return await one_by_one(requests)
    pg = await database.driver_connection(conn)
    try:
        if len(requests) >= SET_BATCH_MIN:
            rows = await pg.fetch(
                SETTLE_BATCH_SQL, *(list(column) for column in zip(*args.values(), strict=True))
            )
        else:
            ordered = sorted(requests, key=lambda r: (r.wallet_id, r.request_id))
            rows = await pg.fetchmany(SETTLE_SQL, [args[r.request_id] for r in ordered])
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name != "ledger_entries_idempotency_key_key":
            raise
        return await one_by_one(requests)  # an entry delivered twice: the batch changed nothing
    by_id = {row["request_id"]: row for row in rows}
    return [_outcome(by_id.get(r.request_id), r.request_id, r.cost_nano is not None) for r in requests]


# Expiry, for the sweep: every pending hold past its time is expired and its reservation released,
# per wallet, in one statement. Nothing is charged. It takes the batches' lock order — holds by
# request id, then wallets by id — so it cannot deadlock with a batch; a hold a settlement holds
# locked right now is skipped (SKIP LOCKED): it is being settled, or the next sweep expires it.
_EXPIRE = """
WITH due AS MATERIALIZED (
    SELECT request_id
      FROM holds
     WHERE state = 'pending' AND expires_at <= now()
     ORDER BY request_id
       FOR NO KEY UPDATE SKIP LOCKED
), expired AS (
    UPDATE holds SET state = 'expired', resolved_at = now()
      FROM due
     WHERE holds.request_id = due.request_id
 RETURNING holds.wallet_id, holds.amount_nano
), per_wallet AS (
    SELECT wallet_id, sum(amount_nano) AS amount FROM expired GROUP BY wallet_id
), locked AS MATERIALIZED (
    SELECT wallets.id
      FROM wallets JOIN per_wallet ON per_wallet.wallet_id = wallets.id
     ORDER BY wallets.id
       FOR NO KEY UPDATE OF wallets
)
UPDATE wallets w
   SET reserved_nano = w.reserved_nano - per_wallet.amount, updated_at = now()
  FROM per_wallet JOIN locked ON locked.id = per_wallet.wallet_id
 WHERE w.id = per_wallet.wallet_id
RETURNING w.id
"""


async def expire_due(conn: Conn) -> int:
    """Expire every pending hold past its expiry; returns how many wallets were touched."""
    pg = await database.driver_connection(conn)
    return len(await pg.fetch(_EXPIRE))


async def outstanding(conn: Conn) -> int:
    pg = await database.driver_connection(conn)
    count: int = await pg.fetchval("SELECT count(*) FROM holds WHERE state = 'pending'")
    return count
