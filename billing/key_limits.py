"""Per-key spend limits: a key may spend at most ``limit_nano`` per window, below its wallet.

Why a module of its own: the rule is enforced by the hold statements (billing/holds.py,
billing/hold_batches.py), which keep the key's running sums exactly as they keep the wallet's
(docs/decisions/0035-per-key-spend-limits.md); this module owns everything else a limit is —
its windows, its validation, setting and clearing it, and reading it back for the API, the CLI
and the operator.

The state, on ``api_keys``: ``limit_nano`` and ``limit_window`` (both NULL: no limit),
``window_start`` (when the current window's count began), ``spent_nano`` (what the holds counted
in that window posted) and ``reserved_nano`` (the key's pending holds that count). A hold counts
against its key when its key had a limit as it was placed; it records the window it counts in
(``holds.limit_window_start``), so a settlement adds its charge to ``spent_nano`` only while that
window is still the key's, and releases the key's reservation however the limit changed since.

Windows are calendar-aligned in UTC: ``daily`` from midnight, ``weekly`` from Monday midnight,
``monthly`` from the 1st; ``total`` never resets. A window rolls over inside the Check's own
statement (:data:`ROLLED_START_SQL`): nothing runs at midnight.

Sharp edges:
- A limit counts the requests admitted while it is set: setting one, or changing its window,
  starts the count at that moment (within the current calendar window), not at the window's
  calendar start; the holds placed before never counted and never will. ``window_start`` only
  moves forward, so the count is never widened backwards either.
- A key row is only ever locked by a transaction that holds its wallet's row (the Check, the
  settlements and the expiry all lock the wallet first), except here, where setting a limit
  locks the key row alone: no transaction can wait on a key while holding another key, so keys
  add no deadlock.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from billing import alerts, money, tables

# The start of ``total``'s one window, and of no calendar one: a fixed instant, so "the window
# changed" is the same comparison for every window.
TOTAL_START = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class Window(enum.Enum):
    DAILY = "daily"
    WEEKLY = "weekly"
    MONTHLY = "monthly"
    TOTAL = "total"


WINDOWS = tuple(window.value for window in Window)


class InvalidLimit(ValueError):
    """A limit the API refuses: the message says what is wrong, ``param`` which field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def calendar_sql(window: str, at: str) -> str:
    """SQL for the calendar start of window ``window`` (an SQL text expression) at ``at``."""
    return (
        f"CASE {window} WHEN 'daily' THEN date_trunc('day', {at}, 'UTC')"
        f" WHEN 'weekly' THEN date_trunc('week', {at}, 'UTC')"
        f" WHEN 'monthly' THEN date_trunc('month', {at}, 'UTC')"
        " ELSE timestamptz '1970-01-01 00:00:00+00' END"
    )


# A limited key's window as the Check sees it now (``k`` is the key's row): the stored one, or,
# once the calendar has moved past it, the current calendar window with nothing spent yet. The
# pending holds stay reserved across a rollover; their charges belong to the window they were
# placed in.
ROLLED_START_SQL = f"greatest(k.window_start, {calendar_sql('k.limit_window', 'now()')})"
ROLLED_SPENT_SQL = (
    f"CASE WHEN k.window_start >= {calendar_sql('k.limit_window', 'now()')} THEN k.spent_nano ELSE 0 END"
)


def calendar_start(window: Window, at: dt.datetime) -> dt.datetime:
    """The start of the calendar window containing ``at`` (UTC), as :func:`calendar_sql` computes it."""
    at = at.astimezone(dt.UTC)
    midnight = at.replace(hour=0, minute=0, second=0, microsecond=0)
    if window is Window.DAILY:
        return midnight
    if window is Window.WEEKLY:
        return midnight - dt.timedelta(days=midnight.weekday())
    if window is Window.MONTHLY:
        return midnight.replace(day=1)
    return TOTAL_START


def resets_at(window: Window, window_start: dt.datetime) -> dt.datetime | None:
    """When the window that began at ``window_start`` ends (None: ``total`` never does)."""
    start = calendar_start(window, window_start)
    if window is Window.DAILY:
        return start + dt.timedelta(days=1)
    if window is Window.WEEKLY:
        return start + dt.timedelta(days=7)
    if window is Window.MONTHLY:
        return start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
    return None


@dataclasses.dataclass(frozen=True)
class KeyLimit:
    """A key's limit and its window's sums, rolled over to ``now`` as the Check would."""

    key_id: str
    wallet_id: str
    limit_nano: int
    window: Window
    window_start: dt.datetime
    spent_nano: int
    reserved_nano: int

    @property
    def resets_at(self) -> dt.datetime | None:
        return resets_at(self.window, self.window_start)

    @property
    def headroom_nano(self) -> int:
        """The largest hold the key admits now."""
        return max(0, self.limit_nano - self.spent_nano - self.reserved_nano)

    def admits(self, amount_nano: int) -> bool:
        return self.spent_nano + self.reserved_nano + amount_nano <= self.limit_nano

    def describe(self, request_nano: int | None = None) -> str:
        """One sentence for a person: the limit, its window, what counts, and when it resets.
        ``request_nano``: the refused request's worst case, named when the limit is not used up
        yet but the request does not fit in what is left."""
        usd = money.format_usd_cents(self.limit_nano)
        counted = (
            f"${money.format_usd_cents(self.spent_nano)} spent, "
            f"${money.format_usd_cents(self.reserved_nano)} held for requests in flight"
        )
        if request_nano is not None and self.headroom_nano > 0:
            sentence = (
                f"This request may cost up to ${money.format_usd_cents(request_nano)}, more than the "
                f"${money.format_usd_cents(self.headroom_nano)} left of this API key's "
                f"{self.window.value} spend limit of ${usd} ({counted})"
            )
        else:
            sentence = f"This API key's {self.window.value} spend limit of ${usd} is reached ({counted})"
        reset = self.resets_at
        if reset is None:
            return f"{sentence}; it does not reset."
        return f"{sentence}; it resets at {iso(reset)}."


def iso(moment: dt.datetime) -> str:
    """An instant as ISO 8601 in UTC with a ``Z``: how every surface shows a reset time."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rolled(row: Any, now: dt.datetime) -> KeyLimit | None:
    """A key row's limit as of ``now`` (None: no limit); ``row`` has the ``api_keys`` columns."""
    if row["limit_nano"] is None:
        return None
    window = Window(row["limit_window"])
    current = calendar_start(window, now)
    stored = row["window_start"]
    in_window = stored is not None and stored >= current
    return KeyLimit(
        key_id=row["id"],
        wallet_id=row["wallet_id"],
        limit_nano=int(row["limit_nano"]),
        window=window,
        window_start=stored if in_window else current,
        spent_nano=int(row["spent_nano"]) if in_window else 0,
        reserved_nano=int(row["reserved_nano"]),
    )


def parse(body: dict[str, Any]) -> tuple[int, Window]:
    """``{"usd": "5.00", "window": "monthly"}`` → (limit in nano-USD, window), or
    :class:`InvalidLimit` naming the field. Every field is checked before anything is written."""
    unknown = sorted(set(body) - {"usd", "window"})
    if unknown:
        raise InvalidLimit(f"{unknown[0]!r} is not a field of a key's limit (usd, window).", unknown[0])
    usd = body.get("usd")
    if not isinstance(usd, str):
        raise InvalidLimit('"usd" must be a decimal string such as "5.00".', "usd")
    try:
        limit_nano = money.parse_usd(usd)
    except money.MoneyError as exc:
        raise InvalidLimit(f"{exc}.", "usd") from None
    window = body.get("window")
    if not isinstance(window, str) or window not in WINDOWS:
        raise InvalidLimit(f'"window" must be one of {", ".join(WINDOWS)}.', "window")
    return limit_nano, Window(window)


# Sets a key's limit under its row lock. The window's count starts now unless it is the window
# already counting (same start): ``window_start`` never moves back, and ``spent_nano`` is kept
# only when the window stays the same one (the holds that counted in it are the same).
_SET = f"""
WITH k AS MATERIALIZED (
    SELECT id, window_start AS old_start,
           greatest(window_start, {calendar_sql("CAST(:window AS text)", "now()")}) AS new_start
      FROM api_keys
     WHERE id = :key_id
       FOR NO KEY UPDATE
)
UPDATE api_keys
   SET limit_nano = :limit_nano,
       limit_window = :window,
       window_start = k.new_start,
       spent_nano = CASE WHEN k.old_start IS NOT DISTINCT FROM k.new_start THEN api_keys.spent_nano ELSE 0 END
  FROM k
 WHERE api_keys.id = k.id
"""

# Clearing keeps the window and its sums: the key's pending holds still release its reservation
# as they settle, so a limit set again later starts from exact sums.
_CLEAR = "UPDATE api_keys SET limit_nano = NULL, limit_window = NULL WHERE id = :key_id"


async def set_limit(conn: AsyncConnection, key_id: str, limit_nano: int, window: Window) -> None:
    """Set (or change) a key's limit; the caller has checked that the key is the wallet's."""
    if not 0 <= limit_nano <= money.NANO_MAX:
        raise InvalidLimit("the limit must be zero or more", "usd")
    await conn.execute(sa.text(_SET), {"key_id": key_id, "limit_nano": limit_nano, "window": window.value})


async def clear_limit(conn: AsyncConnection, key_id: str) -> None:
    await conn.execute(sa.text(_CLEAR), {"key_id": key_id})


async def apply(conn: AsyncConnection, key_id: str, desired: tuple[int, Window] | None) -> bool:
    """Make the key's limit ``desired`` (None: none) if it is not already; whether it changed.
    For owners that declare a limit (the operator): re-applying the same one writes nothing, so
    the window's count is left alone."""
    k = tables.api_keys
    row = (await conn.execute(sa.select(k.c.limit_nano, k.c.limit_window).where(k.c.id == key_id))).first()
    if row is None:
        return False
    current = None if row.limit_nano is None else (int(row.limit_nano), Window(row.limit_window))
    if current == desired:
        return False
    if desired is None:
        await clear_limit(conn, key_id)
    else:
        await set_limit(conn, key_id, *desired)
    return True


async def limit_of(conn: AsyncConnection, key_id: str) -> KeyLimit | None:
    """The key's limit as the Check would see it now (None: no limit, or no such key)."""
    k = tables.api_keys
    row = (await conn.execute(sa.select(k, sa.func.now().label("now")).where(k.c.id == key_id))).first()
    return None if row is None else rolled(row._mapping, row.now)


async def queue_alert(conn: alerts.Conn, limit: KeyLimit) -> str | None:
    """Queue the ``key.limit_reached`` alert of the key's window: once per window, however many
    requests it refused and however many sidecars saw them (the occurrence is the key and the
    window's start). Its id, or None (no alert endpoint, or queued already)."""
    reset = limit.resets_at
    return await alerts.queue_event(
        conn,
        limit.wallet_id,
        alerts.EventType.KEY_LIMIT_REACHED,
        occurrence=f"{limit.key_id}:{iso(limit.window_start)}",
        data={
            "key_id": limit.key_id,
            "limit_usd": money.format_usd(limit.limit_nano),
            "window": limit.window.value,
            "window_start": iso(limit.window_start),
            "resets_at": "" if reset is None else iso(reset),
        },
    )
