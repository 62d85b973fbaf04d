"""What a wallet spent, for people: per UTC day, by model and by key (the account page's chart).

One aggregate statement over the wallet's ``usage`` ledger entries (index
``ledger_usage_by_wallet_time``), never a sum of pages: the ledger is the truth, and each usage
entry names its model and key in ``details``. Amounts are nano-USD spent (positive).
"""

from __future__ import annotations

import dataclasses
import datetime as dt

from sqlalchemy.ext.asyncio import AsyncConnection

from billing import database

Conn = AsyncConnection | database.Connection

DAYS = 30
# An entry older than the key/model columns (none here) or settled without one reads as this.
UNKNOWN = "unknown"


@dataclasses.dataclass(frozen=True)
class DaySpend:
    day: dt.date
    model: str
    key_id: str
    nano: int


_BY_DAY = f"""
SELECT (date_trunc('day', created_at AT TIME ZONE 'UTC'))::date AS day,
       coalesce(details->>'model', '{UNKNOWN}') AS model,
       coalesce(details->>'key_id', '{UNKNOWN}') AS key_id,
       sum(-amount_nano)::bigint AS nano
  FROM ledger_entries
 WHERE wallet_id = $1::text AND kind = 'usage' AND created_at >= $2::timestamptz
 GROUP BY 1, 2, 3
 ORDER BY 1, 2, 3
"""


def window_start(today: dt.date, days: int = DAYS) -> dt.date:
    """The first day shown when ``today`` (UTC) is the last of ``days``."""
    return today - dt.timedelta(days=days - 1)


async def by_day(conn: Conn, wallet_id: str, *, today: dt.date, days: int = DAYS) -> list[DaySpend]:
    """The wallet's spend per UTC day, model and key, for the ``days`` days ending ``today``."""
    first = window_start(today, days)
    since = dt.datetime.combine(first, dt.time(), tzinfo=dt.UTC)
    pg = await database.driver_connection(conn)
    rows = await pg.fetch(_BY_DAY, wallet_id, since)
    return [DaySpend(row["day"], row["model"], row["key_id"], int(row["nano"])) for row in rows]


def totals(rows: list[DaySpend], field: str) -> dict[str, int]:
    """Spend summed by ``field`` (``"model"`` or ``"key_id"``), largest first."""
    sums: dict[str, int] = {}
    for row in rows:
        name = getattr(row, field)
        sums[name] = sums.get(name, 0) + row.nano
    return dict(sorted(sums.items(), key=lambda item: (-item[1], item[0])))
