"""What becomes of holds nobody settles: charged their estimate when no access log ever reports
them, their reservations kept until then.

Every admitted request is reported by Envoy twice: over gRPC within milliseconds, and in its JSON
access-log file, which the sidecar follows from an offset kept in PostgreSQL
(authz_sidecar/access_log_file.py). A hold neither report resolves
(docs/decisions/0030-unreported-holds.md):

1. At ``expires_at`` (``hold_ttl_s`` after the Check; every request has ended by then, since
   Envoy's route timeout is shorter) nothing happens to it: it stays pending, its reservation
   held on the wallet (and its key). Released there while its charge is still to come, that
   money could be spent again first, and the charge would then take the wallet below −(its
   overdraft limit) or the key past its limit. A report that arrives now settles it as usual
   (``posted_after_expiry`` / ``voided_after_expiry``).
2. ``hold_report_grace_s`` after its expiry, a hold still unreported is *charged its estimate*,
   the request's worst case, like any answer whose usage never arrived, and its reservation
   released by that charge. The durable record cannot show that such a request never reached
   the backend — a request that did not is reported (Envoy logs its refusal or failure, and the
   report voids it) — and the provider bills what it served, so charging nothing would let a
   lost report serve a request free.

Holds in state ``expired`` are those an earlier version expired at their TTL, releasing their
reservations then; they are charged the same way, ``hold_report_grace_s`` after that expiry
(``resolved_at``), and without a second release (billing/holds.py).

The charge is an ordinary settlement (``usage:<request id>``): idempotent and safe from several
sidecars at once, since a second sweep or a late report finds the hold already posted.
"""

from __future__ import annotations

import dataclasses

from billing import database, hold_batches, holds

# Holds charged per statement; the next sweep takes the rest.
UNREPORTED_BATCH_MAX = 500

# What the ledger entry of a hold charged for want of a report says.
UNREPORTED_DETAILS = {"usage_source": "hold_estimate", "unfinished": "no_access_log_report"}

# Each branch reads its own partial index (holds_pending_by_expiry, holds_expired_by_resolution).
_UNREPORTED = """
(SELECT request_id, wallet_id, model, expires_at AS due
   FROM holds
  WHERE state = 'pending' AND expires_at <= now() - make_interval(secs => $1::int)
  ORDER BY expires_at
  LIMIT $2::int)
UNION ALL
(SELECT request_id, wallet_id, model, resolved_at AS due
   FROM holds
  WHERE state = 'expired' AND resolved_at <= now() - make_interval(secs => $1::int)
  ORDER BY resolved_at
  LIMIT $2::int)
ORDER BY due
LIMIT $2::int
"""


@dataclasses.dataclass(frozen=True)
class Sweep:
    """What one sweep did."""

    charged: int  # holds unreported past their expiry and the grace period it charged their estimate


async def sweep(conn: holds.Conn, *, report_grace_s: int) -> Sweep:
    """Charge the estimate of the holds unreported ``report_grace_s`` after their expiry (at most
    :data:`UNREPORTED_BATCH_MAX` per sweep)."""
    return Sweep(charged=await charge_unreported(conn, report_grace_s=report_grace_s))


async def charge_unreported(conn: holds.Conn, *, report_grace_s: int) -> int:
    """Charge each hold unreported ``report_grace_s`` after its expiry its own amount; how many
    it charged."""
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
