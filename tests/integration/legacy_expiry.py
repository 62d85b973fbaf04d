"""What the expiry sweep of versions before migration 0013 did, for tests of the holds it left.

Those versions marked each pending hold past its ``expires_at`` ``expired`` and released its
reservation (on its wallet, and its key when it counted against a limit) at once. Their
``expired`` holds may still be in a database when the current version starts, and are settled
without a second release (billing/holds.py); this reproduces them in SQL.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

_EXPIRE_AS_BEFORE = """
WITH expired AS (
    UPDATE holds SET state = 'expired', resolved_at = now()
     WHERE state = 'pending' AND expires_at <= now()
 RETURNING wallet_id, key_id, amount_nano, limit_window_start
), wallets_released AS (
    UPDATE wallets w SET reserved_nano = w.reserved_nano - e.amount
      FROM (SELECT wallet_id, sum(amount_nano) AS amount FROM expired GROUP BY wallet_id) AS e
     WHERE w.id = e.wallet_id
), keys_released AS (
    UPDATE api_keys k SET reserved_nano = k.reserved_nano - e.amount
      FROM (SELECT key_id, sum(amount_nano) AS amount FROM expired
             WHERE limit_window_start IS NOT NULL GROUP BY key_id) AS e
     WHERE k.id = e.key_id
)
SELECT count(*) FROM expired
"""


async def expire_as_before(engine: AsyncEngine) -> int:
    """Expire every pending hold past its ``expires_at`` as an earlier version did; how many."""
    async with engine.begin() as conn:
        return int((await conn.execute(sa.text(_EXPIRE_AS_BEFORE))).scalar_one())
