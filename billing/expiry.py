"""What becomes of holds nobody settles: released at their expiry, charged their estimate when no
access log ever reports them.

Every admitted request is reported by Envoy twice: over gRPC within milliseconds, and in its JSON
access-log file, which the sidecar follows from an offset kept in PostgreSQL
(authz_sidecar/access_log_file.py). A hold neither report resolves goes through two steps
(docs/decisions/0030-unreported-holds.md):

1. At ``expires_at`` (``hold_ttl_s`` after the Check; every request has ended by then, since
   Envoy's route timeout is shorter) the hold is *expired*: its reservation is released, so the
   wallet may spend it again, and nothing is charged yet (``holds.expire_due``). A report that
   arrives now settles it as usual (``posted_after_expiry`` / ``voided_after_expiry``).
2. ``hold_report_grace_s`` later, a hold still unreported is *charged its estimate*, the
   request's worst case, like any answer whose usage never arrived. The durable record cannot
   show that such a request never reached the backend — a request that did not is reported
   (Envoy logs its refusal or failure, and the report voids it) — and the provider bills what it
   served, so charging nothing would let a lost report serve a request free.

Both steps are idempotent and safe from several sidecars at once: expiry skips holds another
transaction has locked, and the charge is an ordinary settlement (``usage:<request id>``), which
a second sweep or a late report finds already posted.
"""

from __future__ import annotations

import dataclasses

from billing import database, hold_batches, holds

# Holds charged per statement; the next sweep takes the rest.
UNREPORTED_BATCH_MAX = 500

# What the ledger entry of a hold charged for want of a report says.
UNREPORTED_DETAILS = {"usage_source": "hold_estimate", "unfinished": "no_access_log_report"}

_UNREPORTED = """
SELECT request_id, wallet_id, model
  FROM holds
 WHERE state = 'expired' AND resolved_at <= now() - make_interval(secs => $1::int)
 ORDER BY resolved_at
 LIMIT $2::int
"""


@dataclasses.dataclass(frozen=True)
class Sweep:
    """What one sweep did."""

    expired: int  # holds past their expiry whose reservations it released
    charged: int  # expired holds past the grace period it charged their estimate


async def sweep(conn: holds.Conn, *, report_grace_s: int) -> Sweep:
    """Expire the holds due, then charge the estimate of those unreported ``report_grace_s``
    after their expiry (at most :data:`UNREPORTED_BATCH_MAX` per sweep)."""
    expired = await holds.expire_due(conn)
    return Sweep(expired=expired, charged=await charge_unreported(conn, report_grace_s=report_grace_s))


async def charge_unreported(conn: holds.Conn, *, report_grace_s: int) -> int:
    """Charge each hold expired at least ``report_grace_s`` ago its own amount; how many it charged."""
    pg = await database.driver_connection(conn)
    rows = await pg.fetch(_UNREPORTED, report_grace_s, UNREPORTED_BATCH_MAX)
    if not rows:
        return 0
    outcomes = await hold_batches.settle_many(
        conn,
        [
            hold_batches.SettleRequest(
                row["request_id"],
                holds.Resolution.POST_ESTIMATE,
                dict(UNREPORTED_DETAILS),
                wallet_id=row["wallet_id"],
                model=row["model"],
            )
            for row in rows
        ],
    )
    return sum(outcome is holds.Settlement.POSTED_AFTER_EXPIRY for outcome in outcomes)
