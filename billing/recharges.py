"""Auto-recharge: the rules and the SQL, no HTTP and no Stripe SDK
(docs/decisions/0034-auto-recharge.md).

A wallet's owner sets a threshold, an amount and an optional monthly cap (``auto_recharges``, one
row per wallet) and saves a card through a Checkout Session in setup mode. Each sidecar's sweep
(:func:`start_due`) then starts a *recharge* (a row of ``recharges``, keyed ``(wallet_id, seq)``)
for every wallet whose available balance fell below its threshold, by one conditional ``INSERT …
SELECT`` run under the ``auto_recharges`` row's lock, so that across any number of sidecars and
restarts a wallet has at most one recharge in flight (and a partial unique index says so too).
Whoever inserted the row charges the card, off-session, with the idempotency key
:func:`idempotency_key` — the same on every retry of that recharge, a new one for the next.

Why the ``auto_recharges`` row is the lock and not the wallet's: the settlement statements lock
``wallets`` on the hot path; a sweep holding it while it decides would stall them.

The credit is not made here: it comes from Stripe's ``payment_intent.succeeded`` through
:mod:`billing.payments` (the rules of a Checkout top-up: ``stripe:<payment_intent>``, refunds,
disputes), which calls :func:`record_succeeded`.

Sharp edges:

- The monthly cap counts every recharge of the calendar month (UTC) that has not failed, the one
  being started included; a failed recharge frees its share. Each row keeps the cap in force when
  it started, which is what :mod:`billing.audit` checks the month against.
- Failures (a decline, 3-D Secure required) count; after ``failures_max`` in a row the setting is
  paused (``paused_reason``) until the owner PUTs it again or saves a new card. Stripe unreachable
  does not count: the recharge stays ``creating`` and is retried with the same key after a
  back-off, and given up (``stripe_unreachable``, not counted) after :data:`RETRY_FOR_S`, well
  within the 24 hours Stripe keeps an idempotency key.
- A succeeded PaymentIntent is always credited, even for a recharge recorded as failed (a lost
  answer, then given up): the money was taken.
- A wallet that is suspended (by an operator or admin) or held by an open dispute gets no
  recharge: its card is not charged while its owner disputes a charge or it cannot spend.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from billing import alerts, database, errors, money

Conn = AsyncConnection | database.Connection

# Stripe's metadata keys on a recharge's PaymentIntent, and its purpose.
PURPOSE = "billingproxy_recharge"
# How long a sweep that started (or retries) a recharge has it to itself while it calls Stripe.
CALL_LEASE_S = 60
# After this long without reaching Stripe, a recharge is given up (well within Stripe's 24 h).
RETRY_FOR_S = 6 * 3600
RETRY_WAIT_MAX_S = 3600
START_BATCH_MAX = 100
# The largest monthly cap (and threshold) anyone can mean.
CAP_NANO_MAX = 1_000_000 * money.NANO_PER_USD
MESSAGE_CHARS_MAX = 300
IN_FLIGHT = ("creating", "pending")


def idempotency_key(wallet_id: str, seq: int) -> str:
    """Stripe's Idempotency-Key of a recharge's PaymentIntent: one PaymentIntent per recharge."""
    return f"recharge:{wallet_id}:{seq}"


def occurrence(wallet_id: str, seq: int) -> str:
    """What an alert about a recharge is about (``alerts.queue_event``): one event per recharge."""
    return f"{wallet_id}:{seq}"


# --- the setting ----------------------------------------------------------------------------------


class InvalidSetting(errors.UserFacingError, ValueError):
    """A setting that is malformed or out of bounds; ``param`` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class Setting:
    threshold_nano: int
    amount_nano: int
    monthly_cap_nano: int | None


def _usd(value: object, param: str, *, cents: bool) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise InvalidSetting(param, f'{param} must be a USD amount as a decimal string, such as "10.00"')
    try:
        nano = money.parse_usd(value.strip())
    except money.MoneyError as exc:
        raise InvalidSetting(param, f"{param}: {exc}") from None
    if cents and nano % money.NANO_PER_CENT:
        raise InvalidSetting(param, f"{param} {value!r} has fractions of a cent; cards are charged in cents")
    return nano


def parse_setting(
    *, threshold: object, amount: object, monthly_cap: object, amount_min_nano: int, amount_max_nano: int
) -> Setting:
    """The owner's ``threshold_usd``, ``amount_usd`` and ``monthly_cap_usd`` (None: no cap) as a
    :class:`Setting`, or :class:`InvalidSetting` naming the first field that is wrong.

    The amount is a top-up, within the top-up bounds; the threshold is from $0 to the largest
    top-up; a cap is whole cents and fits at least one recharge."""
    lo, hi = money.format_usd_cents(amount_min_nano), money.format_usd_cents(amount_max_nano)
    amount_nano = _usd(amount, "amount_usd", cents=True)
    if not amount_min_nano <= amount_nano <= amount_max_nano:
        raise InvalidSetting("amount_usd", f"amount_usd must be from {lo} to {hi} USD (the top-up bounds)")
    threshold_nano = _usd(threshold, "threshold_usd", cents=False)
    if threshold_nano > amount_max_nano:
        raise InvalidSetting("threshold_usd", f"threshold_usd must be from 0 to {hi} USD")
    cap_nano = None
    if monthly_cap is not None:
        cap_nano = _usd(monthly_cap, "monthly_cap_usd", cents=True)
        if not amount_nano <= cap_nano <= CAP_NANO_MAX:
            raise InvalidSetting(
                "monthly_cap_usd",
                f"monthly_cap_usd must be at least amount_usd ({money.format_usd_cents(amount_nano)}) "
                f"and at most {money.format_usd_cents(CAP_NANO_MAX)} USD",
            )
    return Setting(threshold_nano, amount_nano, cap_nano)


@dataclasses.dataclass(frozen=True)
class Recharge:
    wallet_id: str
    seq: int
    amount_nano: int
    customer: str
    payment_method: str
    state: str
    payment_intent: str | None
    failure_code: str | None
    failure_message: str | None
    attempts: int
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class Status:
    """A wallet's auto-recharge as ``GET /billing/auto-recharge`` shows it."""

    wallet_id: str
    enabled: bool
    threshold_nano: int
    amount_nano: int
    monthly_cap_nano: int | None
    stripe_customer_id: str | None
    payment_method: str | None
    card_brand: str | None
    card_last4: str | None
    consecutive_failures: int
    paused_reason: str | None
    month_total_nano: int
    last: Recharge | None


_RECHARGE_COLUMNS = """r.wallet_id, r.seq, r.amount_nano, r.customer, r.payment_method, r.state,
       r.payment_intent, r.failure_code, r.failure_message, r.attempts, r.created_at, r.updated_at"""

# The first instant of the calendar month (UTC) of the timestamptz expression ``at``.
_MONTH = "(date_trunc('month', ({at}) AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')"


def _month_total(wallet: str, at: str) -> str:
    """SQL: the wallet's recharges this calendar month that did not fail."""
    return f"""(SELECT coalesce(sum(r.amount_nano), 0) FROM recharges r
                 WHERE r.wallet_id = {wallet} AND r.state <> 'failed'
                   AND r.created_at >= {_MONTH.format(at=at)})"""


def _recharge(row: Any) -> Recharge:
    return Recharge(**{f.name: row[f.name] for f in dataclasses.fields(Recharge)})


_SET = """
INSERT INTO auto_recharges AS a (wallet_id, threshold_nano, amount_nano, monthly_cap_nano)
VALUES ($1::text, $2::bigint, $3::bigint, $4::bigint)
    ON CONFLICT (wallet_id) DO UPDATE
   SET threshold_nano = excluded.threshold_nano,
       amount_nano = excluded.amount_nano,
       monthly_cap_nano = excluded.monthly_cap_nano,
       enabled = true,
       consecutive_failures = 0,
       paused_reason = NULL,
       updated_at = now()
"""


async def put_setting(conn: Conn, wallet_id: str, setting: Setting) -> None:
    """Create or replace the wallet's setting and turn it on; a paused one resumes (the owner has
    seen the failures: a PUT is how they say to try again)."""
    pg = await database.driver_connection(conn)
    await pg.execute(_SET, wallet_id, setting.threshold_nano, setting.amount_nano, setting.monthly_cap_nano)


async def disable(conn: Conn, wallet_id: str) -> bool:
    """Turn auto-recharge off (the row and its history stay); False if it was never set up or is
    already off. A recharge in flight finishes."""
    pg = await database.driver_connection(conn)
    done = await pg.fetchval(
        "UPDATE auto_recharges SET enabled = false, updated_at = now() "
        "WHERE wallet_id = $1::text AND enabled RETURNING wallet_id",
        wallet_id,
    )
    return done is not None


async def status(conn: Conn, wallet_id: str) -> Status | None:
    pg = await database.driver_connection(conn)
    row = await pg.fetchrow(
        f"""SELECT a.*, {_month_total("a.wallet_id", "now()")} AS month_total_nano
              FROM auto_recharges a WHERE a.wallet_id = $1::text""",
        wallet_id,
    )
    if row is None:
        return None
    last = await pg.fetchrow(
        f"SELECT {_RECHARGE_COLUMNS} FROM recharges r WHERE r.wallet_id = $1::text "
        "ORDER BY r.seq DESC LIMIT 1",
        wallet_id,
    )
    return Status(
        wallet_id=row["wallet_id"],
        enabled=row["enabled"],
        threshold_nano=row["threshold_nano"],
        amount_nano=row["amount_nano"],
        monthly_cap_nano=row["monthly_cap_nano"],
        stripe_customer_id=row["stripe_customer_id"],
        payment_method=row["payment_method"],
        card_brand=row["card_brand"],
        card_last4=row["card_last4"],
        consecutive_failures=row["consecutive_failures"],
        paused_reason=row["paused_reason"],
        month_total_nano=int(row["month_total_nano"]),
        last=None if last is None else _recharge(last),
    )


async def record_customer(conn: Conn, wallet_id: str, customer_id: str) -> str:
    """Keep the wallet's Stripe Customer (the first one recorded stays); the one kept."""
    pg = await database.driver_connection(conn)
    kept = await pg.fetchval(
        """UPDATE auto_recharges SET stripe_customer_id = coalesce(stripe_customer_id, $2::text),
                  updated_at = now()
            WHERE wallet_id = $1::text RETURNING stripe_customer_id""",
        wallet_id,
        customer_id,
    )
    assert kept is not None, "the setting is put before its customer is made"
    return str(kept)


async def record_setup_session(conn: Conn, *, session_id: str, wallet_id: str, customer: str) -> None:
    """Remember a setup-mode Checkout Session we created (a replayed creation keeps the first row)."""
    pg = await database.driver_connection(conn)
    await pg.execute(
        "INSERT INTO recharge_setup_sessions (id, wallet_id, customer) VALUES ($1::text, $2::text, $3::text) "
        "ON CONFLICT (id) DO NOTHING",
        session_id,
        wallet_id,
        customer,
    )


@dataclasses.dataclass(frozen=True)
class SetupSession:
    session_id: str
    wallet_id: str
    customer: str
    payment_method: str | None


async def setup_session(conn: Conn, session_id: str) -> SetupSession | None:
    pg = await database.driver_connection(conn)
    row = await pg.fetchrow(
        "SELECT id, wallet_id, customer, payment_method FROM recharge_setup_sessions WHERE id = $1::text",
        session_id,
    )
    return (
        None
        if row is None
        else SetupSession(row["id"], row["wallet_id"], row["customer"], row["payment_method"])
    )


_SAVE_CARD = """
WITH session AS (
    UPDATE recharge_setup_sessions s
       SET payment_method = $2::text, updated_at = now()
     WHERE s.id = $1::text AND s.payment_method IS NULL
    RETURNING s.wallet_id, s.customer
)
UPDATE auto_recharges a
   SET payment_method = $2::text, card_brand = $3::text, card_last4 = $4::text,
       consecutive_failures = 0, paused_reason = NULL, updated_at = now()
  FROM session
 WHERE a.wallet_id = session.wallet_id AND a.stripe_customer_id = session.customer
RETURNING a.wallet_id
"""


async def save_card(conn: Conn, session_id: str, *, payment_method: str, brand: str, last4: str) -> bool:
    """The card a setup session of ours saved becomes the wallet's (a new card resumes a paused
    setting); False if that session already saved one (a replay)."""
    pg = await database.driver_connection(conn)
    return await pg.fetchval(_SAVE_CARD, session_id, payment_method, brand[:30], last4[:4]) is not None


# --- starting recharges (the sweep) -----------------------------------------------------------------

# Candidates first, locked (other sweeps skip them); then, in a statement of its own (so under READ
# COMMITTED it sees whatever an earlier holder of the lock committed), the conditional insert.
_LOCK_CANDIDATES = """
SELECT a.wallet_id
  FROM auto_recharges a JOIN wallets w ON w.id = a.wallet_id
 WHERE a.enabled AND a.paused_reason IS NULL AND a.payment_method IS NOT NULL
   AND NOT w.suspended AND NOT w.disputed
   AND w.balance_nano - w.reserved_nano < a.threshold_nano
   AND NOT EXISTS (SELECT 1 FROM recharges r WHERE r.wallet_id = a.wallet_id
                                              AND r.state IN ('creating', 'pending'))
 ORDER BY a.wallet_id
 LIMIT $1::int
   FOR NO KEY UPDATE OF a SKIP LOCKED
"""

_START = f"""
WITH started AS (
    INSERT INTO recharges AS r (wallet_id, seq, amount_nano, monthly_cap_nano, customer, payment_method,
                                attempts, next_attempt_at, created_at, updated_at)
    SELECT a.wallet_id, a.last_seq + 1, a.amount_nano, a.monthly_cap_nano, a.stripe_customer_id,
           a.payment_method, 1, $2::timestamptz + make_interval(secs => $3::int), $2::timestamptz,
           $2::timestamptz
      FROM auto_recharges a JOIN wallets w ON w.id = a.wallet_id
     WHERE a.wallet_id = ANY($1::text[])
       AND a.enabled AND a.paused_reason IS NULL
       AND a.payment_method IS NOT NULL AND a.stripe_customer_id IS NOT NULL
       AND NOT w.suspended AND NOT w.disputed
       AND w.balance_nano - w.reserved_nano < a.threshold_nano
       AND NOT EXISTS (SELECT 1 FROM recharges f WHERE f.wallet_id = a.wallet_id
                                                  AND f.state IN ('creating', 'pending'))
       AND (a.monthly_cap_nano IS NULL
            OR {_month_total("a.wallet_id", "$2::timestamptz")} + a.amount_nano <= a.monthly_cap_nano)
        ON CONFLICT DO NOTHING
    RETURNING {_RECHARGE_COLUMNS}
), bumped AS (
    UPDATE auto_recharges a SET last_seq = started.seq, updated_at = now()
      FROM started WHERE a.wallet_id = started.wallet_id
)
SELECT * FROM started r
"""


async def start_due(
    pool_conn: database.Connection,
    *,
    limit: int = START_BATCH_MAX,
    now: dt.datetime | None = None,
    lease_s: int = CALL_LEASE_S,
) -> list[Recharge]:
    """Start one recharge for each wallet (up to ``limit``) below its threshold with none in
    flight, not paused, suspended or disputed, with a card, and room under its monthly cap; the
    ones started, leased to the caller for ``lease_s`` while it calls Stripe. Its own transaction:
    pass a connection that is in none. ``now``: the clock the month is judged by (tests); the
    database's otherwise."""
    async with pool_conn.transaction():
        ids = [row["wallet_id"] for row in await pool_conn.fetch(_LOCK_CANDIDATES, limit)]
        if not ids:
            return []
        at = now or await pool_conn.fetchval("SELECT now()")
        rows = await pool_conn.fetch(_START, ids, at, lease_s)
    return [_recharge(row) for row in rows]


_CLAIM_RETRIES = f"""
WITH due AS (
    SELECT r.wallet_id, r.seq FROM recharges r
     WHERE r.state = 'creating' AND r.next_attempt_at <= now()
     ORDER BY r.next_attempt_at
     LIMIT $1::int
       FOR UPDATE SKIP LOCKED
)
UPDATE recharges r
   SET attempts = r.attempts + 1, next_attempt_at = now() + make_interval(secs => $2::int),
       updated_at = now()
  FROM due WHERE r.wallet_id = due.wallet_id AND r.seq = due.seq
RETURNING {_RECHARGE_COLUMNS}
"""


async def claim_retries(
    conn: Conn, *, limit: int = START_BATCH_MAX, lease_s: int = CALL_LEASE_S
) -> list[Recharge]:
    """Recharges still ``creating`` whose wait is over (Stripe was unreachable, or a sidecar died
    between the insert and the call), leased to the caller: it calls Stripe again with the same
    idempotency key, so a PaymentIntent made before is answered, not made twice."""
    pg = await database.driver_connection(conn)
    return [_recharge(row) for row in await pg.fetch(_CLAIM_RETRIES, limit, lease_s)]


async def record_created(conn: Conn, recharge: Recharge, payment_intent: str) -> bool:
    """Stripe made the PaymentIntent (its outcome comes by webhook): ``pending``. False if the
    recharge was already past ``creating`` (the webhook came first)."""
    pg = await database.driver_connection(conn)
    done = await pg.fetchval(
        """UPDATE recharges SET state = 'pending', payment_intent = $3::text, updated_at = now()
            WHERE wallet_id = $1::text AND seq = $2::int AND state = 'creating' RETURNING seq""",
        recharge.wallet_id,
        recharge.seq,
        payment_intent,
    )
    return done is not None


_UNREACHABLE = """
UPDATE recharges
   SET failure_message = $3::text,
       next_attempt_at = now() + make_interval(
           secs => least($4::bigint * (2 ^ least(attempts - 1, 30)) / 1000.0, $5::int)),
       updated_at = now()
 WHERE wallet_id = $1::text AND seq = $2::int AND state = 'creating'
   AND created_at > now() - make_interval(secs => $6::int)
RETURNING seq
"""


async def record_unreachable(conn: Conn, recharge: Recharge, error: str, *, retry_base_ms: int) -> bool:
    """Stripe could not be reached: retry later (the wait doubles from ``retry_base_ms`` with each
    attempt, up to an hour), with the same key; not a failure. After :data:`RETRY_FOR_S` the
    recharge is given up instead (``stripe_unreachable``, not counted). True if it will retry."""
    pg = await database.driver_connection(conn)
    retried = await pg.fetchval(
        _UNREACHABLE,
        recharge.wallet_id,
        recharge.seq,
        error[:MESSAGE_CHARS_MAX],
        retry_base_ms,
        RETRY_WAIT_MAX_S,
        RETRY_FOR_S,
    )
    if retried is not None:
        return True
    await pg.execute(
        """UPDATE recharges SET state = 'failed', failure_code = 'stripe_unreachable',
                  failure_message = $3::text, updated_at = now()
            WHERE wallet_id = $1::text AND seq = $2::int AND state = 'creating'""",
        recharge.wallet_id,
        recharge.seq,
        error[:MESSAGE_CHARS_MAX],
    )
    return False


@dataclasses.dataclass(frozen=True)
class Failure:
    consecutive_failures: int
    paused: bool


_FAIL = """
WITH failed AS (
    UPDATE recharges
       SET state = 'failed', failure_code = $3::text, failure_message = $4::text,
           payment_intent = coalesce(payment_intent, $5::text), updated_at = now()
     WHERE wallet_id = $1::text AND seq = $2::int AND state IN ('creating', 'pending')
    RETURNING wallet_id
)
UPDATE auto_recharges a
   SET consecutive_failures = a.consecutive_failures + 1,
       paused_reason = CASE WHEN a.paused_reason IS NULL AND a.consecutive_failures + 1 >= $6::int
                            THEN $7::text ELSE a.paused_reason END,
       updated_at = now()
  FROM failed
 WHERE a.wallet_id = failed.wallet_id
RETURNING a.consecutive_failures, a.paused_reason IS NOT NULL AND a.consecutive_failures = $6::int AS paused
"""


async def record_failure(
    conn: Conn,
    recharge: Recharge,
    *,
    code: str,
    message: str,
    payment_intent: str | None,
    failures_max: int,
) -> Failure | None:
    """The card was declined (or needs its owner for 3-D Secure): the recharge failed, it frees
    its share of the cap, counts toward pausing, and its alerts are queued (in the caller's
    transaction). None if it was already over (the other path — the create's answer or the
    webhook — recorded it first)."""
    pg = await database.driver_connection(conn)
    reason = (
        f"{failures_max} recharges in a row failed, the last with {code}; PUT the setting again to resume"
    )
    row = await pg.fetchrow(
        _FAIL,
        recharge.wallet_id,
        recharge.seq,
        code[:100],
        message[:MESSAGE_CHARS_MAX],
        payment_intent,
        failures_max,
        reason,
    )
    if row is None:
        return None
    failure = Failure(row["consecutive_failures"], bool(row["paused"]))
    data = {
        **_alert_data(recharge, payment_intent),
        "failure_code": code,
        "failure_message": message[:MESSAGE_CHARS_MAX],
        "consecutive_failures": str(failure.consecutive_failures),
    }
    key = occurrence(recharge.wallet_id, recharge.seq)
    await alerts.queue_event(
        conn, recharge.wallet_id, alerts.EventType.RECHARGE_FAILED, occurrence=key, data=data
    )
    if failure.paused:
        await alerts.queue_event(
            conn,
            recharge.wallet_id,
            alerts.EventType.RECHARGE_PAUSED,
            occurrence=key,
            data={**data, "paused_reason": reason},
        )
    return failure


def _alert_data(recharge: Recharge, payment_intent: str | None) -> dict[str, str]:
    return {
        "recharge_seq": str(recharge.seq),
        "amount_usd": money.format_usd_cents(recharge.amount_nano),
        "payment_intent": payment_intent or "",
    }


# --- what Stripe says about a recharge's PaymentIntent (billing/payments.py) --------------------------


async def for_payment_intent(
    conn: Conn, payment_intent: str, *, wallet_id: object, seq: object
) -> Recharge | None:
    """The recharge a PaymentIntent is for, locked: the one that recorded it, else the one its
    metadata names if that one has recorded no other (the webhook can come before the create's
    answer is recorded). The caller checks the customer and the amount against it."""
    pg = await database.driver_connection(conn)
    row = await pg.fetchrow(
        f"SELECT {_RECHARGE_COLUMNS} FROM recharges r WHERE r.payment_intent = $1::text FOR UPDATE",
        payment_intent,
    )
    if row is not None:
        return _recharge(row)
    if not (
        isinstance(wallet_id, str)
        and isinstance(seq, str)
        and seq.isascii()
        and seq.isdigit()
        and len(seq) < 10
    ):
        return None
    row = await pg.fetchrow(
        f"""SELECT {_RECHARGE_COLUMNS} FROM recharges r
             WHERE r.wallet_id = $1::text AND r.seq = $2::int AND r.payment_intent IS NULL FOR UPDATE""",
        wallet_id,
        int(seq),
    )
    return None if row is None else _recharge(row)


async def record_succeeded(conn: Conn, recharge: Recharge, payment_intent: str) -> bool:
    """Stripe took the money: the recharge succeeded (from any state: a recharge given up whose
    PaymentIntent succeeds after all is still paid for), the failure count starts again, and the
    alert is queued. The caller credits the ledger. False if it was already recorded."""
    pg = await database.driver_connection(conn)
    done = await pg.fetchval(
        """WITH r AS (
               UPDATE recharges SET state = 'succeeded', payment_intent = $3::text,
                      failure_code = NULL, failure_message = NULL, updated_at = now()
                WHERE wallet_id = $1::text AND seq = $2::int AND state <> 'succeeded'
               RETURNING wallet_id)
           UPDATE auto_recharges a SET consecutive_failures = 0, updated_at = now()
             FROM r WHERE a.wallet_id = r.wallet_id
           RETURNING a.wallet_id""",
        recharge.wallet_id,
        recharge.seq,
        payment_intent,
    )
    if done is None:
        return False
    await alerts.queue_event(
        conn,
        recharge.wallet_id,
        alerts.EventType.RECHARGE_SUCCEEDED,
        occurrence=occurrence(recharge.wallet_id, recharge.seq),
        data=_alert_data(recharge, payment_intent),
    )
    return True


async def pending_payment_intents(conn: Conn, *, older_than_s: int, limit: int) -> list[str]:
    """PaymentIntents of recharges still ``pending`` after ``older_than_s``: what a reconciliation
    retrieves from Stripe (a missed ``payment_intent.*`` webhook), oldest first."""
    pg = await database.driver_connection(conn)
    rows = await pg.fetch(
        """SELECT payment_intent FROM recharges
            WHERE state = 'pending' AND updated_at < now() - make_interval(secs => $1::int)
            ORDER BY updated_at LIMIT $2::int""",
        older_than_s,
        limit,
    )
    return [row["payment_intent"] for row in rows]
