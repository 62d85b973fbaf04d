"""Self-service key management: a signed-up user lists, creates and revokes their wallet's keys.

Why a module of its own: :mod:`billing.api_keys` owns the rows and the hot path's look-up; this
module owns the rules a user meets when managing keys through the public API (decision record
0032):

- A wallet has at most ``cap`` active keys, and a wallet always keeps at least one: revoking
  is refused when it would leave none (revoking the very key that makes the request included).
- Both rules are checked under one transaction-scoped advisory lock per wallet, so 30 racing
  creations make no more than ``cap`` keys and two keys revoking each other leave one. Why an
  advisory lock and not the wallet row: the Check locks the wallet row (reserving funds) and
  takes a key-share lock on it (each hold's foreign key), so locking the row here would stall
  the wallet's requests while a key is made; the advisory lock is touched by nobody else.
- The key making the request is read again inside that transaction: a key revoked a moment ago
  may still pass the sidecar's key cache (for ``key_cache_ttl_ms``) but can neither mint a key
  nor revoke one.
- "Last used" and "spend" are derived from the holds each key placed (an index on
  ``holds(key_id, created_at)``, migration 0006), so the Check writes nothing more per request.
  A hold's posted amount is exactly its usage entry's (the audit checks it), so the spend is the
  ledger's sum of the key's usage entries.

- A key's spend limit (billing/key_limits.py) is set and cleared here for its owner: the key
  must be the wallet's, exactly as for revoking. Its window's spend is read from the key's own
  running sums, not summed from holds.

Sharp edge: :attr:`KeyView.spend_nano` is the key's spend over its whole life; the spend in a
limit's window is :attr:`KeyView.limit`'s.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from billing import api_keys, errors, key_format, key_limits, tables

# The classid of this module's advisory locks (two-int form: its key space is not the single
# bigint one the operator's Stripe reconciler uses). "bpKM": BillingProxy Key Management.
_LOCK_CLASS = int.from_bytes(b"bpKM", "big") - 2**31
_KEY_ID = re.compile(re.escape(key_format.ID_PREFIX) + r"[0-9A-Za-z]{1,64}")
# Who a key made through this API belongs to: the same owner as the signup's first key.
SOURCE = "signup"


class TooManyKeys(errors.Conflict):
    def __init__(self, cap: int) -> None:
        super().__init__(f"the wallet already has {cap} active keys")
        self.cap = cap


class LastKey(errors.Conflict):
    """Revoking this key would leave the wallet with no active key."""


class RequesterRefused(Exception):
    """The key making the request may no longer be used (revoked, expired, suspended)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class KeyView:
    """A key as its owner sees it: never its plaintext or hash, only the display prefix."""

    record: api_keys.KeyRecord
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    spend_nano: int
    # The key's spend limit, rolled over to the time of the read (None: no limit).
    limit: key_limits.KeyLimit | None = None

    def state(self, now: dt.datetime) -> str:
        """``active``, or why the key is refused: ``revoked``, ``suspended``, ``expired``."""
        return self.record.refusal(now) or "active"


def is_key_id(text: str) -> bool:
    """The shape of a key id (``key_`` and base62); False says 400 before any look-up."""
    return _KEY_ID.fullmatch(text) is not None


# Each key with the time of its newest hold and the sum its posted holds charged. The lateral
# sub-select walks holds(key_id, created_at) (migration 0006) for one key at a time.
VIEWS_SQL = """
SELECT k.id, k.wallet_id, k.key_hash, k.display_prefix, k.allowed_models, k.expires_at,
       k.revoked_at, k.suspended, k.revoke_after, k.created_at,
       k.limit_nano, k.limit_window, k.window_start, k.spent_nano, k.reserved_nano, now() AS now,
       used.last_used_at, coalesce(used.spend_nano, 0) AS spend_nano
  FROM api_keys AS k
  LEFT JOIN LATERAL (
        SELECT max(h.created_at) AS last_used_at,
               sum(h.posted_nano) FILTER (WHERE h.state = 'posted') AS spend_nano
          FROM holds AS h
         WHERE h.key_id = k.id
  ) AS used ON true
 WHERE k.wallet_id = :wallet_id
   AND (CAST(:key_id AS text) IS NULL AND (k.revoked_at IS NULL OR :include_revoked) OR k.id = :key_id)
 ORDER BY k.created_at, k.id
"""


def _view(row: sa.Row[Any]) -> KeyView:
    return KeyView(
        record=api_keys.key_record(row),
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        spend_nano=int(row.spend_nano),
        limit=key_limits.rolled(row._mapping, row.now),
    )


async def list_keys(conn: AsyncConnection, wallet_id: str, *, include_revoked: bool = False) -> list[KeyView]:
    """The wallet's keys, oldest first; revoked keys (history) only for ``include_revoked``."""
    params = {"wallet_id": wallet_id, "key_id": None, "include_revoked": include_revoked}
    rows = await conn.execute(sa.text(VIEWS_SQL), params)
    return [_view(row) for row in rows]


async def _view_of(conn: AsyncConnection, wallet_id: str, key_id: str) -> KeyView | None:
    """One key of the wallet, revoked or not; None for a key of another wallet (or none)."""
    params = {"wallet_id": wallet_id, "key_id": key_id, "include_revoked": True}
    row = (await conn.execute(sa.text(VIEWS_SQL), params)).first()
    return None if row is None else _view(row)


async def _lock_wallet_keys(conn: AsyncConnection, wallet_id: str) -> None:
    await conn.execute(
        sa.text("SELECT pg_advisory_xact_lock(:cls, hashtext(:wallet_id))"),
        {"cls": _LOCK_CLASS, "wallet_id": wallet_id},
    )


async def _active_keys(conn: AsyncConnection, wallet_id: str, *, except_id: str | None = None) -> int:
    """How many of the wallet's keys would let their owner in now (the Check's own rule,
    :meth:`api_keys.KeyRecord.refusal`), leaving out ``except_id``."""
    k = tables.api_keys
    rows = await conn.execute(sa.select(k).where(k.c.wallet_id == wallet_id, k.c.revoked_at.is_(None)))
    now = dt.datetime.now(dt.UTC)
    usable = [r for r in map(api_keys.key_record, rows) if r.refusal(now) is None and r.id != except_id]
    return len(usable)


async def _check_requester(conn: AsyncConnection, requester_id: str) -> None:
    record = await api_keys.get_key(conn, requester_id)
    assert record is not None, "an authenticated key exists (keys are never deleted)"
    refusal = record.refusal(dt.datetime.now(dt.UTC))
    if refusal is not None:
        raise RequesterRefused(refusal)


async def create_key(
    conn: AsyncConnection, *, wallet_id: str, requester_id: str, cap: int
) -> tuple[key_format.IssuedKey, KeyView]:
    """A new key for the wallet (its plaintext only in the answer), or :class:`TooManyKeys`.

    ``conn`` must be in a transaction: the lock and the count hold until it ends.
    """
    await _lock_wallet_keys(conn, wallet_id)
    await _check_requester(conn, requester_id)
    if await _active_keys(conn, wallet_id) >= cap:
        raise TooManyKeys(cap)
    issued = await api_keys.issue_key(conn, wallet_id=wallet_id, source=SOURCE)
    view = await _view_of(conn, wallet_id, issued.key_id)
    assert view is not None, "the key was just recorded for this wallet"
    return issued, view


async def revoke_key(
    conn: AsyncConnection, *, wallet_id: str, requester_id: str, key_id: str
) -> tuple[KeyView, bool]:
    """Revoke one of the wallet's keys; ``(view, False)`` if it was revoked already (no change).

    :class:`api_keys.KeyNotFound` for a key of another wallet, exactly as for no key at all;
    :class:`LastKey` when no other active key would remain. ``conn`` must be in a transaction.
    """
    await _lock_wallet_keys(conn, wallet_id)
    await _check_requester(conn, requester_id)
    view = await _view_of(conn, wallet_id, key_id)
    if view is None:
        raise api_keys.KeyNotFound(key_id)
    if view.record.revoked_at is not None:
        return view, False
    if await _active_keys(conn, wallet_id, except_id=key_id) == 0:
        raise LastKey(f"{key_id} is the wallet's last active key")
    await api_keys.revoke_key(conn, key_id)
    revoked = await _view_of(conn, wallet_id, key_id)
    assert revoked is not None
    return revoked, True


async def set_limit(
    conn: AsyncConnection,
    *,
    wallet_id: str,
    requester_id: str,
    key_id: str,
    limit_nano: int | None,
    window: key_limits.Window | None = None,
) -> KeyView:
    """Set (``limit_nano``, ``window``) or clear (``limit_nano`` None) a key's spend limit.

    :class:`api_keys.KeyNotFound` for a key of another wallet, exactly as for no key at all.
    ``conn`` must be in a transaction.
    """
    await _check_requester(conn, requester_id)
    if await _view_of(conn, wallet_id, key_id) is None:
        raise api_keys.KeyNotFound(key_id)
    if limit_nano is None:
        await key_limits.clear_limit(conn, key_id)
    else:
        assert window is not None, "a limit has a window"
        await key_limits.set_limit(conn, key_id, limit_nano, window)
    view = await _view_of(conn, wallet_id, key_id)
    assert view is not None
    return view
