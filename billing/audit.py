"""The ledger audit: every rule the books keep, checked over the whole database in one snapshot.

Why: money moves through several writers — :func:`billing.ledger.post_entry` (grants, credits,
Stripe's entries), the settlement statements (``billing.holds.SETTLE_SQL`` and its batch form),
the expiry sweep, and :mod:`billing.payments`, which derives entries from Stripe's facts. Each
keeps its rules inside its own transaction; this module is the independent check that, taken
together, they did. ``billingproxy audit`` runs it for a person (exit 1 on any finding), and the
tests run it after every end-to-end test, Stripe test and benchmark.

The checks, one row each in the report (:class:`Check`):

- ``balance``: each wallet's balance is the sum of its ledger entries.
- ``balance_after``: each entry's ``balance_after_nano`` is the one before it (by id, in its
  wallet; 0 before the first) plus its amount. Every writer moves a wallet's balance with the
  wallet row locked and inserts the entry under that lock, so a wallet's ids increase in the
  order its balance moved. A missing or altered entry is one finding, at the entry after it.
- ``reserved``: each wallet's reservations are the sum of its pending holds. A hold past its
  ``expires_at`` is still pending, its reservation held, until its report or its estimate's
  charge resolves it (docs/decisions/0030-unreported-holds.md); ``expired`` holds are those an
  earlier version released at their TTL, and reserve nothing.
- ``key_limits``: each key's running sums (billing/key_limits.py) are its holds': its
  ``reserved_nano`` is the sum of its pending holds that count against a limit, and its
  ``spent_nano`` the sum its posted holds placed in its current window
  (``holds.limit_window_start = api_keys.window_start``) charged. Checked for every key that
  ever had a limit (``window_start`` set) and any other key whose sums are not zero.
- ``overdue_holds``: no hold is still pending the report grace
  (``Settings.hold_report_grace_s``, the one setting the audit reads) plus
  :data:`OVERDUE_ALLOWANCE_S` after its ``expires_at``, measured at the snapshot's ``now()``: by
  then the sweep has charged it its estimate (billing/expiry.py). The rule reads each hold's own
  ``expires_at`` (placement time + the ``hold_ttl_s`` then in force), never the TTL setting, so a
  TTL changed since applies to new holds only, as in the sidecar. The allowance is two sweep
  periods (``holds.EXPIRY_SWEEP_S``): a hold falling due just after a sweep round waits one
  period plus the round's own time. A finding means no sweeper ran: the gateway is down, or its
  sweep fails.
- ``unreported_holds``: the same for the ``expired`` holds of an earlier version: none is still
  ``expired`` (released, never charged) the report grace plus the allowance after its expiry.
- ``usage``: a request's charge and its hold agree. Every ``usage`` entry is keyed
  ``usage:<request id>``, on its hold's wallet, and its hold is ``posted`` for exactly minus the
  entry's amount; every ``posted`` hold has that entry (the key is unique: at most one). A
  pending, voided or expired hold has none (a hold gets one only when its access-log entry or
  its estimate's charge posts it, and is ``posted`` from then on). A void a refused Check's
  report left before any hold (``holds.void_before_hold``) names no wallet and has none either.
- ``stripe``: every payment is credited exactly once (:mod:`billing.payments`): a payment that
  is paid into a wallet has exactly one ``topup`` entry — the key ``stripe:<payment_intent>``,
  its wallet, its amount — and the Checkout Session it came from recorded that wallet and
  amount; refund entries add up to Stripe's cumulative refund, all of it applied; each dispute
  has its debit, and its reversal exactly when its status gave the money back. A payment not
  (yet) paid into a wallet has none of these. No ``topup``, ``refund``, ``dispute`` or
  ``dispute_reversal`` entry lacks the fact it follows, and ``wallets.disputed`` is true exactly
  while the wallet has an open dispute. A payment's origin is its Checkout Session, or the
  recharge that recorded it (same wallet and amount).
- ``recharges`` (docs/decisions/0034-auto-recharge.md): every succeeded recharge is a payment
  credited once (``stripe:<payment_intent>``, its wallet, its amount); no wallet has two
  recharges in flight; and no recharge made its calendar month's (UTC) recharges that had not
  failed exceed the cap in force when it started.

Sharp edges:

- :func:`run` is the audit of a live database: ``BEGIN ISOLATION LEVEL REPEATABLE READ READ
  ONLY`` (:func:`snapshot`), so every statement sees the same committed state, writes nothing,
  and takes no lock a writer waits for. Its one cost: the snapshot holds back VACUUM for as long
  as the audit runs (one pass over each table, seconds for millions of entries).
- :func:`check` runs in the caller's transaction; under READ COMMITTED each statement sees its
  own moment, which is right only on a quiet database (the tests, between requests).
- Findings are listed up to :data:`FINDINGS_LISTED_MAX` per check and all of them counted: a
  badly broken database answers with a readable report, not millions of lines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
from collections.abc import AsyncIterator, Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billing import holds, money, payments, tables
from billing.settings import Settings

OVERDUE_ALLOWANCE_S = 2 * holds.EXPIRY_SWEEP_S
DEFAULT_REPORT_GRACE_S = Settings().hold_report_grace_s
FINDINGS_LISTED_MAX = 1000


class Check(enum.Enum):
    """One rule of the books: its name, the rule in words, and what it counts as checked."""

    BALANCE = ("balance", "balance = Σ ledger entries", "wallets")
    BALANCE_AFTER = ("balance_after", "balance_after = previous + amount", "ledger entries")
    RESERVED = ("reserved", "reserved = Σ pending holds", "wallets")
    KEY_LIMITS = (
        "key_limits",
        "key reserved = Σ its counted pending holds, spent = Σ its window's posted holds",
        "limited keys",
    )
    OVERDUE_HOLDS = (
        "overdue_holds",
        "no pending hold unresolved past its expiry and the report grace",
        "pending holds",
    )
    UNREPORTED_HOLDS = (
        "unreported_holds",
        "no expired hold (released by an earlier version) uncharged past the report grace",
        "expired holds",
    )
    USAGE = ("usage", "usage entry ⇔ posted hold, same amount", "holds + usage entries")
    STRIPE = ("stripe", "each paid payment credited once; refunds, disputes", "payments + disputes")
    RECHARGES = (
        "recharges",
        "each succeeded recharge credited once; one in flight; the month within its cap",
        "recharges",
    )

    def __init__(self, label: str, rule: str, counted: str) -> None:
        self.label = label
        self.rule = rule
        self.counted = counted


@dataclasses.dataclass(frozen=True)
class Finding:
    """One broken rule: where (the wallet, if any, and the row), what the rule expects, what is there."""

    check: Check
    wallet_id: str | None
    subject: str
    expected: str
    found: str

    def __str__(self) -> str:
        where = f"{self.wallet_id or '-'}  {self.check.label}  {self.subject}"
        return f"{where}: expected {self.expected}; found {self.found}"


@dataclasses.dataclass(frozen=True)
class CheckResult:
    check: Check
    checked: int
    # Every finding counts; at most FINDINGS_LISTED_MAX are listed.
    mismatches: int
    findings: tuple[Finding, ...]


@dataclasses.dataclass(frozen=True)
class Report:
    # The snapshot's now(): what "overdue" was measured against.
    at: dt.datetime
    results: tuple[CheckResult, ...]

    @property
    def findings(self) -> list[Finding]:
        return [finding for result in self.results for finding in result.findings]

    @property
    def clean(self) -> bool:
        return all(result.mismatches == 0 for result in self.results)


@contextlib.asynccontextmanager
async def snapshot(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection in ``BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY``, its snapshot taken.

    PostgreSQL takes a REPEATABLE READ snapshot at the transaction's first statement, so this
    runs one (which also makes sure the transaction is what it must be) before handing it over.
    """
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        async with conn.begin():
            isolation, read_only = (
                await conn.execute(
                    sa.text(
                        "SELECT current_setting('transaction_isolation'), "
                        "current_setting('transaction_read_only')"
                    )
                )
            ).one()
            assert (isolation, read_only) == ("repeatable read", "on"), (isolation, read_only)
            yield conn


async def run(engine: AsyncEngine, *, report_grace_s: int = DEFAULT_REPORT_GRACE_S) -> Report:
    """The whole audit, read-only, in one snapshot: safe against a live database."""
    async with snapshot(engine) as conn:
        return await check(conn, report_grace_s=report_grace_s)


async def check(conn: AsyncConnection, *, report_grace_s: int = DEFAULT_REPORT_GRACE_S) -> Report:
    """Every check, in ``conn``'s transaction (see the module's sharp edges)."""
    at = (await conn.execute(sa.text("SELECT now()"))).scalar_one()
    return Report(
        at=at,
        results=(
            await _balance(conn),
            await _balance_after(conn),
            await _reserved(conn),
            await _key_limits(conn),
            await _overdue_holds(conn, report_grace_s),
            await _unreported_holds(conn, report_grace_s),
            await _usage(conn),
            await _stripe(conn),
            await _recharges(conn),
        ),
    )


# --- helpers -------------------------------------------------------------------------------------


def _usd(nano: Any) -> str:
    """Sums come back as numeric (PostgreSQL's sum of bigint); shown exactly, in USD."""
    return f"{money.format_usd(int(nano))} USD"


async def _count(conn: AsyncConnection, sql: str, **params: Any) -> int:
    return int((await conn.execute(sa.text(sql), params)).scalar_one())


async def _mismatching(conn: AsyncConnection, sql: str, **params: Any) -> tuple[int, list[sa.Row[Any]]]:
    """The rows ``sql`` selects as broken, at most FINDINGS_LISTED_MAX, and how many there are in
    all. ``sql`` selects ``count(*) OVER () AS mismatches`` and ends in ``LIMIT :listed_max``."""
    rows = list((await conn.execute(sa.text(sql), {**params, "listed_max": FINDINGS_LISTED_MAX})).all())
    return (int(rows[0].mismatches) if rows else 0), rows


def _result(check: Check, checked: int, mismatches: int, findings: list[Finding]) -> CheckResult:
    return CheckResult(check, checked, mismatches, tuple(findings[:FINDINGS_LISTED_MAX]))


# --- wallets and their entries -------------------------------------------------------------------


async def _balance(conn: AsyncConnection) -> CheckResult:
    return await _wallet_sum(conn, Check.BALANCE, "balance", "ledger_entries", "entries")


async def _reserved(conn: AsyncConnection) -> CheckResult:
    return await _wallet_sum(
        conn, Check.RESERVED, "reserved", "holds WHERE state = 'pending'", "pending holds"
    )


async def _key_limits(conn: AsyncConnection) -> CheckResult:
    """Keys whose limit sums are not what their holds say."""
    keys = """
        SELECT k.id, k.wallet_id, k.reserved_nano, k.spent_nano,
               (SELECT coalesce(sum(h.amount_nano), 0) FROM holds h
                 WHERE h.key_id = k.id AND h.state = 'pending' AND h.limit_window_start IS NOT NULL)
                 AS expected_reserved,
               (SELECT coalesce(sum(h.posted_nano), 0) FROM holds h
                 WHERE h.key_id = k.id AND h.state = 'posted' AND h.limit_window_start = k.window_start)
                 AS expected_spent
          FROM api_keys k
         WHERE k.window_start IS NOT NULL OR k.reserved_nano <> 0 OR k.spent_nano <> 0
    """
    mismatches, rows = await _mismatching(
        conn,
        f"""
        SELECT *, count(*) OVER () AS mismatches FROM ({keys}) AS k
         WHERE reserved_nano <> expected_reserved OR spent_nano <> expected_spent
         ORDER BY id
         LIMIT :listed_max
        """,
    )
    findings = [
        Finding(
            Check.KEY_LIMITS,
            row.wallet_id,
            f"key {row.id}",
            f"reserved {_usd(row.expected_reserved)}, spent {_usd(row.expected_spent)} (its holds)",
            f"reserved {_usd(row.reserved_nano)}, spent {_usd(row.spent_nano)}",
        )
        for row in rows
    ]
    checked = await _count(conn, f"SELECT count(*) FROM ({keys}) AS k")
    return _result(Check.KEY_LIMITS, checked, mismatches, findings)


async def _wallet_sum(
    conn: AsyncConnection, check: Check, name: str, rows: str, rows_named: str
) -> CheckResult:
    """Wallets whose ``<name>_nano`` is not the sum of ``amount_nano`` over their ``rows``."""
    mismatches, wallets = await _mismatching(
        conn,
        f"""
        SELECT w.id, w.{name}_nano AS found_nano, coalesce(r.total, 0) AS expected_nano,
               coalesce(r.n, 0) AS n, count(*) OVER () AS mismatches
          FROM wallets w
          LEFT JOIN (SELECT wallet_id, sum(amount_nano) AS total, count(*) AS n
                       FROM {rows} GROUP BY wallet_id) AS r ON r.wallet_id = w.id
         WHERE w.{name}_nano <> coalesce(r.total, 0)
         ORDER BY w.id
         LIMIT :listed_max
        """,
    )
    findings = [
        Finding(
            check,
            row.id,
            "wallet",
            f"{name} {_usd(row.expected_nano)} (Σ of its {row.n} {rows_named})",
            f"{name} {_usd(row.found_nano)}",
        )
        for row in wallets
    ]
    return _result(check, await _count(conn, "SELECT count(*) FROM wallets"), mismatches, findings)


async def _balance_after(conn: AsyncConnection) -> CheckResult:
    mismatches, rows = await _mismatching(
        conn,
        """
        SELECT wallet_id, id, idempotency_key, before_nano, amount_nano, balance_after_nano,
               count(*) OVER () AS mismatches
          FROM (SELECT id, wallet_id, idempotency_key, amount_nano, balance_after_nano,
                       coalesce(lag(balance_after_nano) OVER (PARTITION BY wallet_id ORDER BY id), 0)
                           AS before_nano
                  FROM ledger_entries) AS e
         WHERE balance_after_nano <> before_nano::numeric + amount_nano
         ORDER BY wallet_id, id
         LIMIT :listed_max
        """,
    )
    findings = [
        Finding(
            Check.BALANCE_AFTER,
            row.wallet_id,
            f"entry {row.id} ({row.idempotency_key})",
            f"balance after {_usd(row.before_nano + row.amount_nano)} "
            f"({_usd(row.before_nano)} before it, {_usd(row.amount_nano)})",
            f"balance after {_usd(row.balance_after_nano)}",
        )
        for row in rows
    ]
    checked = await _count(conn, "SELECT count(*) FROM ledger_entries")
    return _result(Check.BALANCE_AFTER, checked, mismatches, findings)


# --- holds ---------------------------------------------------------------------------------------


async def _overdue_holds(conn: AsyncConnection, report_grace_s: int) -> CheckResult:
    return await _late_holds(
        conn,
        Check.OVERDUE_HOLDS,
        state="pending",
        since="expires_at",
        due_s=report_grace_s + OVERDUE_ALLOWANCE_S,
        expected=lambda due_s, since: (
            f"reported or charged its estimate within {due_s:g} s of its expiry at {since}"
        ),
        found=lambda late_s, amount: f"still pending {late_s} s after it, reserving {amount}",
    )


async def _unreported_holds(conn: AsyncConnection, report_grace_s: int) -> CheckResult:
    return await _late_holds(
        conn,
        Check.UNREPORTED_HOLDS,
        state="expired",
        since="resolved_at",  # an expired hold's resolved_at is when it expired
        due_s=report_grace_s + OVERDUE_ALLOWANCE_S,
        expected=lambda due_s, since: f"charged its estimate within {due_s:g} s of its expiry at {since}",
        found=lambda late_s, amount: f"still expired and uncharged {late_s} s after it ({amount})",
    )


async def _late_holds(
    conn: AsyncConnection,
    check: Check,
    *,
    state: str,
    since: str,
    due_s: int,
    expected: Callable[[int, str], str],
    found: Callable[[int, str], str],
) -> CheckResult:
    """Holds still in ``state`` more than ``due_s`` after their ``since`` column: each a finding."""
    # ``since`` is spliced into the SQL as a column name: one of these two, never input.
    assert (state, since) in (("pending", "expires_at"), ("expired", "resolved_at"))
    mismatches, rows = await _mismatching(
        conn,
        f"""
        SELECT wallet_id, request_id, amount_nano, {since} AS since,
               floor(extract(epoch FROM now() - {since}))::bigint AS late_s,
               count(*) OVER () AS mismatches
          FROM holds
         WHERE state = :state AND {since} <= now() - make_interval(secs => :due_s)
         ORDER BY {since}, request_id
         LIMIT :listed_max
        """,
        state=state,
        due_s=due_s,
    )
    findings = [
        Finding(
            check,
            row.wallet_id,
            f"hold {row.request_id}",
            expected(due_s, row.since.isoformat()),
            found(row.late_s, _usd(row.amount_nano)),
        )
        for row in rows
    ]
    checked = await _count(conn, "SELECT count(*) FROM holds WHERE state = :state", state=state)
    return _result(check, checked, mismatches, findings)


# The key SETTLE_SQL (and its batch form) gives a request's charge: 'usage:' || request id.
_USAGE_PREFIX = "usage:"


async def _usage(conn: AsyncConnection) -> CheckResult:
    charged, charges = await _mismatching(
        conn,
        """
        SELECT e.wallet_id, e.id, e.idempotency_key, e.kind, e.amount_nano,
               h.request_id, h.wallet_id AS hold_wallet_id, h.state, h.posted_nano,
               count(*) OVER () AS mismatches
          FROM ledger_entries e
          LEFT JOIN holds h ON starts_with(e.idempotency_key, :prefix)
                           AND h.request_id = substr(e.idempotency_key, length(:prefix) + 1)
         WHERE (e.kind = 'usage' OR starts_with(e.idempotency_key, :prefix))
           AND (e.kind <> 'usage' OR h.request_id IS NULL OR h.state <> 'posted'
                OR h.wallet_id <> e.wallet_id OR h.posted_nano IS NULL
                OR e.amount_nano <> -h.posted_nano)
         ORDER BY e.wallet_id, e.id
         LIMIT :listed_max
        """,
        prefix=_USAGE_PREFIX,
    )
    findings = [_usage_finding(row) for row in charges]
    uncharged, posted = await _mismatching(
        conn,
        """
        SELECT h.wallet_id, h.request_id, h.posted_nano, count(*) OVER () AS mismatches
          FROM holds h
         WHERE h.state = 'posted'
           AND NOT EXISTS (SELECT 1 FROM ledger_entries e WHERE e.idempotency_key = :prefix || h.request_id)
         ORDER BY h.wallet_id, h.request_id
         LIMIT :listed_max
        """,
        prefix=_USAGE_PREFIX,
    )
    findings += [
        Finding(
            Check.USAGE,
            row.wallet_id,
            f"hold {row.request_id}",
            f"posted, so charged by entry {_USAGE_PREFIX}{row.request_id}",
            f"no such entry (posted {_usd(row.posted_nano or 0)})",
        )
        for row in posted
    ]
    checked = await _count(
        conn,
        "SELECT (SELECT count(*) FROM holds) + (SELECT count(*) FROM ledger_entries WHERE kind = 'usage')",
    )
    return _result(Check.USAGE, checked, charged + uncharged, findings)


def _usage_finding(row: sa.Row[Any]) -> Finding:
    """What is wrong with a usage entry the query found wrong, the first of its faults."""
    subject = f"entry {row.id} ({row.idempotency_key})"

    def finding(expected: str, found: str) -> Finding:
        return Finding(Check.USAGE, row.wallet_id, subject, expected, found)

    if row.kind != "usage":
        return finding(f"kind usage, as its key {_USAGE_PREFIX}… says", f"kind {row.kind}")
    if row.request_id is None:
        if not row.idempotency_key.startswith(_USAGE_PREFIX):
            return finding(f"the key {_USAGE_PREFIX}<request id>", f"the key {row.idempotency_key}")
        return finding("the hold of its request", "no such hold")
    if row.state != "posted":
        return finding("its hold posted", f"its hold {row.state}")
    if row.hold_wallet_id != row.wallet_id:
        return finding(f"on its hold's wallet {row.hold_wallet_id}", f"on wallet {row.wallet_id}")
    if row.posted_nano is None:
        return finding(f"its posted hold to name the amount ({_usd(-row.amount_nano)})", "posted_nano NULL")
    return finding(
        f"{_usd(-row.posted_nano)} (its hold posted {_usd(row.posted_nano)})", _usd(row.amount_nano)
    )


# --- Stripe --------------------------------------------------------------------------------------

# Whether a payment is paid into a wallet, so its effects are due: billing.payments._apply's own test.
_CREDITED = "(p.paid AND p.wallet_id IS NOT NULL AND p.amount_nano IS NOT NULL)"

# The payment a top-up or refund entry follows: the payment_intent its details name (every writer
# names it), else the one its credit key names.
_STRIPE_ENTRIES = """
stripe_entries AS (
    SELECT e.id, e.kind, e.wallet_id, e.amount_nano, e.idempotency_key,
           coalesce(e.details->>'payment_intent',
                    CASE WHEN starts_with(e.idempotency_key, :credit_prefix)
                         THEN substr(e.idempotency_key, length(:credit_prefix) + 1) END) AS payment_intent
      FROM ledger_entries e
     WHERE e.kind IN ('topup', 'refund')
)
"""

_PAYMENTS = f"""
WITH {_STRIPE_ENTRIES}
SELECT p.payment_intent, p.wallet_id, p.amount_nano, p.refunded_nano, p.refund_applied_nano,
       p.checkout_session, {_CREDITED} AS credited,
       s.id AS session_id, s.wallet_id AS session_wallet_id, s.amount_nano AS session_amount_nano,
       rc.seq AS recharge_seq, rc.wallet_id AS recharge_wallet_id, rc.amount_nano AS recharge_amount_nano,
       count(e.id) FILTER (WHERE e.kind = 'topup') AS credits,
       count(e.id) FILTER (WHERE e.kind = 'topup'
                             AND e.idempotency_key = :credit_prefix || p.payment_intent
                             AND e.wallet_id = p.wallet_id
                             AND e.amount_nano = p.amount_nano) AS exact_credits,
       coalesce(sum(e.amount_nano) FILTER (WHERE e.kind = 'topup'), 0) AS credited_nano,
       count(e.id) FILTER (WHERE e.kind = 'refund') AS refunds,
       coalesce(-sum(e.amount_nano) FILTER (WHERE e.kind = 'refund'), 0) AS debited_nano,
       count(e.id) FILTER (WHERE e.wallet_id IS DISTINCT FROM p.wallet_id) AS elsewhere
  FROM stripe_payments p
  LEFT JOIN stripe_checkout_sessions s ON s.id = p.checkout_session
  LEFT JOIN recharges rc ON rc.payment_intent = p.payment_intent
  LEFT JOIN stripe_entries e ON e.payment_intent = p.payment_intent
 GROUP BY p.payment_intent, s.id, rc.wallet_id, rc.seq
 ORDER BY p.payment_intent
"""

_DISPUTES = f"""
SELECT d.id, d.payment_intent, d.amount_nano, d.status, p.wallet_id, {_CREDITED} AS credited,
       debit.kind AS debit_kind, debit.wallet_id AS debit_wallet_id, debit.amount_nano AS debit_nano,
       reversal.kind AS reversal_kind, reversal.wallet_id AS reversal_wallet_id,
       reversal.amount_nano AS reversal_nano
  FROM stripe_disputes d
  JOIN stripe_payments p ON p.payment_intent = d.payment_intent
  LEFT JOIN ledger_entries debit ON debit.idempotency_key = :debit_prefix || d.id
  LEFT JOIN ledger_entries reversal ON reversal.idempotency_key = :reversal_prefix || d.id
 ORDER BY d.id
"""

# Entries of Stripe's kinds that no recorded fact accounts for (a payment, a dispute).
_UNACCOUNTED = f"""
WITH {_STRIPE_ENTRIES}
SELECT e.wallet_id, e.id, e.kind, e.idempotency_key, e.amount_nano, count(*) OVER () AS mismatches
  FROM ledger_entries e
  LEFT JOIN stripe_entries se ON se.id = e.id
 WHERE CASE
         WHEN e.kind IN ('topup', 'refund') THEN NOT EXISTS (
             SELECT 1 FROM stripe_payments p WHERE p.payment_intent = se.payment_intent)
         WHEN e.kind = 'dispute' THEN NOT EXISTS (
             SELECT 1 FROM stripe_disputes d WHERE e.idempotency_key = :debit_prefix || d.id)
         WHEN e.kind = 'dispute_reversal' THEN NOT EXISTS (
             SELECT 1 FROM stripe_disputes d WHERE e.idempotency_key = :reversal_prefix || d.id)
         ELSE false
       END
 ORDER BY e.wallet_id, e.id
 LIMIT :listed_max
"""

_KEY_PREFIXES = {
    "credit_prefix": payments.credit_key(""),
    "debit_prefix": payments.dispute_debit_key(""),
    "reversal_prefix": payments.dispute_reversal_key(""),
}


async def _stripe(conn: AsyncConnection) -> CheckResult:
    findings: list[Finding] = []
    mismatches = 0
    # Streamed: one row per payment and per dispute, judged here, however many there are.
    async with conn.stream(
        sa.text(_PAYMENTS), {"credit_prefix": _KEY_PREFIXES["credit_prefix"]}
    ) as payment_rows:
        async for row in payment_rows:
            found = _payment_findings(row)
            mismatches += len(found)
            findings += found[: FINDINGS_LISTED_MAX - len(findings)]
    async with conn.stream(sa.text(_DISPUTES), _KEY_PREFIXES) as dispute_rows:
        async for row in dispute_rows:
            found = _dispute_findings(row)
            mismatches += len(found)
            findings += found[: FINDINGS_LISTED_MAX - len(findings)]
    unaccounted, entries = await _mismatching(conn, _UNACCOUNTED, **_KEY_PREFIXES)
    mismatches += unaccounted
    findings += [
        Finding(
            Check.STRIPE,
            row.wallet_id,
            f"entry {row.id} ({row.idempotency_key})",
            f"a recorded Stripe {'payment' if row.kind in ('topup', 'refund') else 'dispute'} "
            f"it follows ({row.kind} of {_usd(row.amount_nano)})",
            "none",
        )
        for row in entries
    ]
    flagged, wallets = await _disputed_flags(conn)
    mismatches += flagged
    findings += wallets
    checked = await _count(
        conn, "SELECT (SELECT count(*) FROM stripe_payments) + (SELECT count(*) FROM stripe_disputes)"
    )
    return _result(Check.STRIPE, checked, mismatches, findings)


def _payment_findings(row: sa.Row[Any]) -> list[Finding]:
    """Whether a payment's entries are what its facts call for (``payments._apply``)."""
    subject = f"payment {row.payment_intent}"

    def finding(expected: str, found: str) -> Finding:
        return Finding(Check.STRIPE, row.wallet_id, subject, expected, found)

    if not row.credited:
        if row.credits or row.refunds or row.refund_applied_nano:
            return [
                finding(
                    "no credit or refund before it is paid into a wallet",
                    f"{row.credits} credit(s), {row.refunds} refund(s), "
                    f"{_usd(row.refund_applied_nano)} marked refunded",
                )
            ]
        return []
    found = []
    key = payments.credit_key(row.payment_intent)
    if (row.credits, row.exact_credits) != (1, 1):
        found.append(
            finding(
                f"credited once: {key}, {_usd(row.amount_nano)} to {row.wallet_id}",
                f"{row.credits} credit(s), {_usd(row.credited_nano)} in all"
                + ("" if row.exact_credits else f", none of them {key} for that amount to that wallet"),
            )
        )
    if row.checkout_session is None and row.recharge_seq is not None:
        if (row.recharge_wallet_id, row.recharge_amount_nano) != (row.wallet_id, row.amount_nano):
            found.append(
                finding(
                    f"its recharge {row.recharge_seq} started for {_usd(row.amount_nano)} to {row.wallet_id}",
                    f"started for {_usd(row.recharge_amount_nano)} to {row.recharge_wallet_id}",
                )
            )
    elif (row.session_wallet_id, row.session_amount_nano) != (row.wallet_id, row.amount_nano):
        found.append(
            finding(
                f"its checkout session {row.checkout_session} recorded for {_usd(row.amount_nano)} "
                f"to {row.wallet_id}",
                "no such session recorded"
                if row.session_id is None
                else f"recorded for {_usd(row.session_amount_nano)} to {row.session_wallet_id}",
            )
        )
    if not row.debited_nano == row.refund_applied_nano == row.refunded_nano:
        found.append(
            finding(
                f"refunds debited: {_usd(row.refunded_nano)} (Stripe's amount_refunded)",
                f"{row.refunds} refund entries of {_usd(row.debited_nano)}, "
                f"{_usd(row.refund_applied_nano)} marked applied",
            )
        )
    if row.elsewhere:
        found.append(finding(f"every entry of it on {row.wallet_id}", f"{row.elsewhere} on another wallet"))
    return found


def _dispute_findings(row: sa.Row[Any]) -> list[Finding]:
    """Whether a dispute's debit and reversal are what its payment and status call for."""
    subject = f"dispute {row.id} ({row.payment_intent}, {row.status})"
    reversed_ = row.status in payments.DISPUTE_REVERSED
    found = []
    for kind, entry_kind, wallet_id, nano, expected_nano, due in (
        ("dispute", row.debit_kind, row.debit_wallet_id, row.debit_nano, -row.amount_nano, row.credited),
        (
            "dispute_reversal",
            row.reversal_kind,
            row.reversal_wallet_id,
            row.reversal_nano,
            row.amount_nano,
            row.credited and reversed_,
        ),
    ):
        if not due and entry_kind is not None:
            why = (
                "its payment is not credited" if not row.credited else f"status {row.status} keeps the money"
            )
            found.append(
                Finding(
                    Check.STRIPE, wallet_id, subject, f"no {kind} entry: {why}", f"{kind} of {_usd(nano)}"
                )
            )
        elif due and (entry_kind, wallet_id, nano) != (kind, row.wallet_id, expected_nano):
            found.append(
                Finding(
                    Check.STRIPE,
                    row.wallet_id,
                    subject,
                    f"{kind} of {_usd(expected_nano)} to {row.wallet_id}",
                    "no entry" if entry_kind is None else f"{entry_kind} of {_usd(nano)} to {wallet_id}",
                )
            )
    return found


async def _disputed_flags(conn: AsyncConnection) -> tuple[int, list[Finding]]:
    """Wallets whose ``disputed`` flag is not "has an open dispute" (``payments.has_open_dispute``)."""
    w = tables.wallets
    has_open = payments.has_open_dispute(w.c.id)
    query = (
        sa.select(
            w.c.id, w.c.disputed, has_open.label("has_open"), sa.func.count().over().label("mismatches")
        )
        .where(w.c.disputed != has_open)
        .order_by(w.c.id)
        .limit(FINDINGS_LISTED_MAX)
    )
    rows = (await conn.execute(query)).all()
    findings = [
        Finding(
            Check.STRIPE,
            row.id,
            "wallet",
            f"disputed={row.has_open} ({'an' if row.has_open else 'no'} open dispute)",
            f"disputed={row.disputed}",
        )
        for row in rows
    ]
    return (int(rows[0].mismatches) if rows else 0), findings


# --- auto-recharge -------------------------------------------------------------------------------

_RECHARGE_FINDINGS = """
SELECT r.wallet_id, 'recharge ' || r.seq AS subject,
       'credited once: ' || :credit_prefix || coalesce(r.payment_intent, '?') AS expected,
       (SELECT count(*) FROM ledger_entries e
         WHERE e.idempotency_key = :credit_prefix || r.payment_intent
           AND e.wallet_id = r.wallet_id AND e.amount_nano = r.amount_nano) || ' such credit(s)' AS found
  FROM recharges r
 WHERE r.state = 'succeeded'
   AND (r.payment_intent IS NULL
        OR 1 <> (SELECT count(*) FROM ledger_entries e
                  WHERE e.idempotency_key = :credit_prefix || r.payment_intent
                    AND e.wallet_id = r.wallet_id AND e.amount_nano = r.amount_nano))
UNION ALL
SELECT r.wallet_id, 'wallet ' || r.wallet_id, 'at most one recharge in flight',
       count(*) || ' (seq ' || string_agg(r.seq::text, ', ' ORDER BY r.seq) || ')'
  FROM recharges r
 WHERE r.state IN ('creating', 'pending')
 GROUP BY r.wallet_id HAVING count(*) > 1
UNION ALL
SELECT r.wallet_id, 'recharge ' || r.seq,
       'its month''s recharges within the cap of ' || r.monthly_cap_nano || ' nano-USD',
       m.total || ' nano-USD'
  FROM recharges r
 CROSS JOIN LATERAL (
       SELECT sum(o.amount_nano) AS total FROM recharges o
        WHERE o.wallet_id = r.wallet_id AND o.seq <= r.seq AND o.state <> 'failed'
          AND date_trunc('month', o.created_at AT TIME ZONE 'UTC')
              = date_trunc('month', r.created_at AT TIME ZONE 'UTC')) m
 WHERE r.monthly_cap_nano IS NOT NULL AND r.state <> 'failed' AND m.total > r.monthly_cap_nano
"""


async def _recharges(conn: AsyncConnection) -> CheckResult:
    rows = (
        await conn.execute(sa.text(_RECHARGE_FINDINGS), {"credit_prefix": _KEY_PREFIXES["credit_prefix"]})
    ).all()
    findings = [Finding(Check.RECHARGES, row.wallet_id, row.subject, row.expected, row.found) for row in rows]
    checked = await _count(conn, "SELECT count(*) FROM recharges")
    return _result(Check.RECHARGES, checked, len(findings), findings)
