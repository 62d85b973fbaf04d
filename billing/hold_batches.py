"""Group commit: many holds or settlements in one transaction, with the outcomes of one by one.

Why: under load many Checks and settlements are in flight at once. Each alone is one statement
and one commit; :func:`place_many` and :func:`settle_many` run a batch of them in ONE
transaction: one round trip and one WAL flush instead of one per request; all or nothing (a test
fails a batch midway and checks that). The rule itself is :mod:`billing.holds`; this module only
makes it cheaper, and its results and guarantees are those of calling ``holds.place`` or
``holds.settle`` for each request in order (tests compare the two, batch by batch).

Sharp edges:
- Wallet rows are locked in wallet-id order, so two batches cannot deadlock on each other.
- A batch that hits a duplicate key is rolled back whole and redone one by one, where ``place``
  and ``settle`` sort out retried Checks and replayed entries as usual.
- How a batch is sent depends on its size. A small one is the single-request statement for each
  request, pipelined by asyncpg's ``fetchmany`` behind one Sync (PostgreSQL runs that as one
  implicit transaction). From :data:`SET_BATCH_MIN` requests on, the batch is one set-based
  statement over arrays (:data:`PLACE_BATCH_SQL`, :data:`SETTLE_BATCH_SQL`): one plan and one
  pass over the wallets, each wallet row updated once per batch however many of its requests the
  batch holds. Each set-based statement restates its single-request statement's rule for a set,
  so a change to one must be made to the other (every batch test runs both ways). Measured
  (docs/benchmarks.md, "Set-based batches"): at 4 requests the two ways cost PostgreSQL the
  same, at 16 the set-based one less; for a single request it costs more, hence the threshold.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import asyncpg

from billing import database, holds, key_limits

SET_BATCH_MIN = 4

# holds.PLACE_SQL for a batch. Each wallet's requests are admitted in the batch's order against what
# the wallet could spend before the batch ("room" = balance - reserved + limit, the limit 0 in
# strict mode), less the amounts of its earlier requests in the batch ("before"): admitted while
# room - before >= amount. The rule only ever admits a prefix of a wallet's requests:
# before + amount is the running sum up to and including the request, which never decreases
# (amounts are >= 0), so once one is refused every later one is refused too. The requests after
# that prefix are then retried one by one with ``holds.place``, exactly as the sequence would have met
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

# holds.PLACE_LIMITED_SQL for a batch with a limited key among its requests (it reads only the keys $8
# names). Each wallet's requests are admitted as in PLACE_BATCH_SQL against what
# the wallet could spend before the batch ("room" = balance - reserved + limit, the limit 0 in
# strict mode), less the amounts of its earlier requests in the batch ("before"): admitted while
# room - before >= amount. The rule only ever admits a prefix of a wallet's requests:
# before + amount is the running sum up to and including the request, which never decreases
# (amounts are >= 0), so once one is refused every later one is refused too. The requests after
# that prefix are then retried one by one with ``holds.place``, exactly as the sequence would have met
# them (a smaller request may still fit; money may have come back). Wallets are locked in id
# order before anything reads their balance; FOR NO KEY UPDATE returns each row as it is once
# locked (READ COMMITTED), so "room" is never a stale snapshot.
# A limited key's requests are tested the same way against the key's room (limit - spent -
# reserved, its window rolled over as in holds.PLACE_LIMITED_SQL) less its earlier requests in the batch;
# its row is locked after its wallet's (joined to ``locked``). With two rules a refused request no
# longer implies that the later ones are refused, so "admitted" is made a prefix explicitly: a
# request is admitted only if it and every earlier request of its wallet fit; the rest go one by
# one, as before.
# $1 request ids, $2 wallets, $3 keys, $4 models, $5 amounts (arrays, in the batch's order),
# $6 TTL in seconds, $7 strict, $8 the keys the caller knows to be limited (only they are read).
PLACE_LIMITED_BATCH_SQL = f"""
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
), key_limit AS MATERIALIZED (
    SELECT k.id, k.limit_nano - k.reserved_nano - {key_limits.ROLLED_SPENT_SQL} AS key_room,
           {key_limits.ROLLED_START_SQL} AS window_start,
           {key_limits.ROLLED_SPENT_SQL} AS spent_nano
      FROM api_keys k JOIN locked ON k.wallet_id = locked.id
     WHERE k.id = ANY($8::text[]) AND k.limit_nano IS NOT NULL
     ORDER BY k.id
       FOR NO KEY UPDATE OF k
), ranked AS (
    SELECT batch.*, locked.room, key_limit.key_room, key_limit.window_start AS limit_window_start,
           coalesce(sum(batch.amount_nano) OVER (PARTITION BY batch.wallet_id ORDER BY batch.position
                                                 ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING),
                    0) AS before,
           coalesce(sum(batch.amount_nano) OVER (PARTITION BY batch.key_id ORDER BY batch.position
                                                 ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING),
                    0) AS key_before
      FROM batch JOIN locked ON locked.id = batch.wallet_id
      LEFT JOIN key_limit ON key_limit.id = batch.key_id
), judged AS (
    SELECT ranked.*,
           bool_and(room - before >= amount_nano
                    AND (key_room IS NULL OR key_room - key_before >= amount_nano))
               OVER (PARTITION BY wallet_id ORDER BY position ROWS UNBOUNDED PRECEDING) AS fits
      FROM ranked
), admitted AS (
    SELECT * FROM judged WHERE fits
), reserved AS (
    UPDATE wallets
       SET reserved_nano = wallets.reserved_nano + per_wallet.amount
      FROM (SELECT wallet_id, sum(amount_nano) AS amount FROM admitted GROUP BY wallet_id) AS per_wallet
     WHERE wallets.id = per_wallet.wallet_id
), key_reserved AS (
    UPDATE api_keys
       SET reserved_nano = api_keys.reserved_nano + per_key.amount,
           window_start = key_limit.window_start,
           spent_nano = key_limit.spent_nano
      FROM (SELECT key_id, sum(amount_nano) AS amount FROM admitted GROUP BY key_id) AS per_key
           JOIN key_limit ON key_limit.id = per_key.key_id
     WHERE api_keys.id = per_key.key_id
)
INSERT INTO holds (request_id, wallet_id, key_id, model, amount_nano, state, expires_at, limit_window_start)
SELECT request_id, wallet_id, key_id, model, amount_nano, 'pending', now() + make_interval(secs => $6::int),
       limit_window_start
  FROM admitted
RETURNING request_id
"""

# holds.SETTLE_SQL for a batch of distinct request ids: holds locked in request-id order, then their
# wallets in id order; each wallet moved once by the sum of its postings and releases; the usage
# entries inserted in (wallet, request id) order, each with the balance after it (the balance
# before the batch less the running sum of the wallet's postings) — exactly the entries and
# balances the single statements, run in that order, write. A ``usage:`` key that exists already
# aborts the whole statement, as in holds.SETTLE_SQL. Each hold must agree with its request's wallet
# and model, as there; one that does not is left alone, the others settle. One row per hold found,
# as holds.SETTLE_SQL's. The keys' sums move as there, after their wallets (joined to ``moved``); a
# key's window only moves forward, so of the windows its holds in the batch were placed in, only
# the newest can still be the key's: only its charges may count in the key's spend.
# $1 request ids, $2 costs, $3 post-the-hold's-estimate flags, $4 details, $5 expected wallets, $6 expected
# models (arrays, one per request; a NULL expectation is not checked).
SETTLE_BATCH_SQL = """
WITH batch AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::boolean[], $4::jsonb[], $5::text[], $6::text[])
           AS r(request_id, cost_nano, post_estimate, details, expected_wallet, expected_model)
), hold AS MATERIALIZED (
    SELECT request_id, amount_nano, state, wallet_id, model, expires_at
      FROM holds
     WHERE request_id = ANY($1::text[])
     ORDER BY request_id
       FOR NO KEY UPDATE
), judged AS (
    SELECT hold.request_id, hold.amount_nano, hold.state, hold.expires_at,
           (batch.expected_wallet IS NULL OR hold.wallet_id = batch.expected_wallet)
           AND (batch.expected_model IS NULL OR hold.model = batch.expected_model) AS agrees
      FROM hold JOIN batch USING (request_id)
), resolved AS (
    UPDATE holds
       SET state = CASE WHEN batch.post_estimate OR batch.cost_nano IS NOT NULL THEN 'posted'
                        ELSE 'voided' END,
           posted_nano = CASE WHEN batch.post_estimate THEN judged.amount_nano
                              WHEN batch.cost_nano IS NULL THEN NULL  -- a void (least() skips NULLs)
                              ELSE least(batch.cost_nano, judged.amount_nano) END,
           resolved_at = now()
      FROM judged JOIN batch USING (request_id)
     WHERE holds.request_id = judged.request_id
       AND judged.state IN ('pending', 'expired')
       AND judged.agrees
 RETURNING holds.request_id, holds.wallet_id, holds.key_id, holds.model, holds.posted_nano,
           holds.limit_window_start,
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
), per_key AS (
    SELECT key_id, wallet_id, sum(released) AS released, max(limit_window_start) AS window_start,
           coalesce(sum(posted_nano) FILTER (WHERE limit_window_start = newest), 0) AS posted
      FROM (SELECT resolved.*, max(limit_window_start) OVER (PARTITION BY key_id) AS newest
              FROM resolved
             WHERE limit_window_start IS NOT NULL) AS counted
     GROUP BY key_id, wallet_id
), key_moved AS (
    UPDATE api_keys
       SET reserved_nano = api_keys.reserved_nano - per_key.released,
           spent_nano = api_keys.spent_nano
                        + CASE WHEN api_keys.window_start = per_key.window_start
                               THEN per_key.posted ELSE 0 END
      FROM per_key JOIN moved ON moved.id = per_key.wallet_id
     WHERE api_keys.id = per_key.key_id
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
       CASE WHEN judged.state = 'pending' AND judged.expires_at <= now() THEN 'expired' ELSE judged.state END
           AS was,
       judged.agrees,
       (judged.request_id IN (SELECT request_id FROM resolved))::int AS resolved,
       ('usage:' || judged.request_id IN (SELECT idempotency_key FROM charged))::int AS charged
  FROM judged
"""


@dataclasses.dataclass(frozen=True)
class HoldRequest:
    """One Check's reservation (the arguments of :func:`holds.place`)."""

    request_id: str
    wallet_id: str
    key_id: str
    model: str
    amount_nano: int
    # Whether the key has a spend limit, as the caller knows it (``holds.place``'s ``limited``).
    limited: bool = True


@dataclasses.dataclass(frozen=True)
class SettleRequest:
    """One finished request's settlement (the arguments of :func:`holds.settle`)."""

    request_id: str
    resolution: holds.Resolution
    details: dict[str, Any] | None = None
    # The hold's wallet and model as the caller knows them (the access log does): checked against
    # the hold (empty: not checked); the wallet also orders a small batch's locks.
    wallet_id: str = ""
    model: str = ""


async def place_many(
    conn: holds.Conn, requests: list[HoldRequest], *, ttl_s: int, strict: bool
) -> list[holds.Refusal | None]:
    """:func:`holds.place` for each request, as one transaction; results (None: placed) in the
    requests' order."""

    async def one_by_one(items: list[HoldRequest]) -> list[holds.Refusal | None]:
        return [
            await holds.place(
                conn,
                request_id=r.request_id,
                wallet_id=r.wallet_id,
                key_id=r.key_id,
                model=r.model,
                amount_nano=r.amount_nano,
                ttl_s=ttl_s,
                strict=strict,
                limited=r.limited,
            )
            for r in items
        ]

    if len(requests) < 2 or len({r.request_id for r in requests}) < len(requests):
        return await one_by_one(requests)
    pg = await database.driver_connection(conn)
    try:
        if len(requests) >= SET_BATCH_MIN:
            limited = [r.key_id for r in requests if r.limited]
            columns = (
                [r.request_id for r in requests],
                [r.wallet_id for r in requests],
                [r.key_id for r in requests],
                [r.model for r in requests],
                [r.amount_nano for r in requests],
                int(ttl_s),
                strict,
            )
            if limited:
                rows = await pg.fetch(PLACE_LIMITED_BATCH_SQL, *columns, limited)
            else:
                rows = await pg.fetch(PLACE_BATCH_SQL, *columns)
        else:
            ordered = sorted(requests, key=lambda r: r.wallet_id)
            # One statement for the whole pipeline: the limited one if any key needs it.
            rows = await pg.fetchmany(
                holds.PLACE_LIMITED_SQL if any(r.limited for r in requests) else holds.PLACE_SQL,
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
    return [None if r.request_id in placed else (await one_by_one([r]))[0] for r in requests]


async def settle_many(conn: holds.Conn, requests: list[SettleRequest]) -> list[holds.Settlement]:
    """:func:`holds.settle` for each request, as one transaction; results in the requests' order."""
    args = {
        r.request_id: holds.settle_parameters(r.request_id, r.resolution, r.details, r.wallet_id, r.model)
        for r in requests
    }

    async def one_by_one(items: list[SettleRequest]) -> list[holds.Settlement]:
        return [
            await holds.settle(
                conn,
                request_id=r.request_id,
                resolution=r.resolution,
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
            rows = await pg.fetchmany(holds.SETTLE_SQL, [args[r.request_id] for r in ordered])
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name != "ledger_entries_idempotency_key_key":
            raise
        return await one_by_one(requests)  # an entry delivered twice: the batch changed nothing
    by_id = {row["request_id"]: row for row in rows}
    return [holds.settlement_of(by_id.get(r.request_id), r.request_id, r.resolution) for r in requests]
