"""From a presented ``Authorization`` header to a usable key record, with a cache kept fresh.

Why a cache: every Check needs the key, and the key table changes rarely. The rule it keeps: an
answer is used only while it is younger than ``key_cache_ttl_ms`` (500 ms by default, at most
1000), counted from the *start* of the query that read it. A revocation committed at time R is
therefore refused by every Check after R + TTL, whatever else happens (docs/architecture.md,
Keys).

Why it does not stall the Check: once :meth:`KeyLookup.start` has been called (the sidecar does),
a refresher re-reads, every third of the TTL, every key a Check used in the last
``RECENT_S`` seconds, in one batched statement (``billing.api_keys.find_keys``) of at most
``REFRESH_MAX`` keys. A key in use is therefore always fresh and its Checks never wait for the
database; a Check only looks its key up itself the first time, after a quiet spell, or when the
refresher is late (slow database, overload): correct in every case, just slower.

Unknown keys are cached too (bounded, never refreshed: they age out), so a flood of well-formed
garbage reaches the database once per TTL per key. Malformed keys and bad checksums never reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable

from authz_sidecar import api_errors
from billing import api_keys, database, key_format

logger = logging.getLogger(__name__)

_ENTRIES_MAX = 100_000
# A key unused for this long is no longer refreshed (and is forgotten once its answer is stale).
RECENT_S = 5.0
# At most this many keys are re-read per refresh; the least recently used beyond it age out.
REFRESH_MAX = 2_000


@dataclasses.dataclass(slots=True)
class _Entry:
    record: api_keys.KeyRecord | None
    read_at: float  # when the query that read ``record`` started (monotonic clock)
    used_at: float  # when a Check last used it


class KeyLookup:
    def __init__(
        self,
        db: database.Database,
        ttl_ms: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """``clock`` (monotonic seconds) and ``sleep`` (the refresher's wait, in that clock's
        seconds) are all the TTL and the refresher know of time: a test gives both and moves
        time itself. (A key's expiry date is checked against the calendar, as before.)"""
        self._db = db
        self._ttl_s = ttl_ms / 1000
        self._clock = clock
        self._sleep = sleep
        self._cache: dict[bytes, _Entry] = {}
        self._refresher: asyncio.Task[None] | None = None
        # Look-ups made on a Check's path (cache misses) and batched refreshes, for tests and tuning.
        self.lookups = 0
        self.refreshes = 0

    def start(self) -> None:
        """Keep the keys in use fresh in the background (needs a running event loop)."""
        if self._ttl_s > 0 and self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_forever(), name="key-cache-refresher")

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None

    @staticmethod
    def bearer(authorization: str | None) -> str:
        """The key from an ``Authorization: Bearer …`` value, or the 401 that says what is wrong."""
        if not authorization:
            raise api_errors.missing_key()
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise api_errors.missing_key()
        return token.strip()

    async def authenticate(self, authorization: str | None) -> api_keys.KeyRecord:
        plaintext = self.bearer(authorization)
        if not key_format.is_well_formed(plaintext):
            raise api_errors.invalid_key()
        record = await self._find(key_format.hash_key(plaintext))
        if record is None:
            raise api_errors.invalid_key()
        refusal = record.refusal(dt.datetime.now(dt.UTC))
        if refusal is not None:
            raise api_errors.key_refused(refusal)
        return record

    async def _find(self, key_hash: bytes) -> api_keys.KeyRecord | None:
        now = self._clock()
        entry = self._cache.get(key_hash)
        if entry is not None and now - entry.read_at < self._ttl_s:
            entry.used_at = now
            return entry.record
        self.lookups += 1
        async with database.acquire(self._db) as conn:
            record = await api_keys.find_key(conn, key_hash)
        if self._ttl_s > 0:
            if entry is None and len(self._cache) >= _ENTRIES_MAX:
                self._evict(now)
            self._cache[key_hash] = _Entry(record, read_at=now, used_at=now)
        return record

    def _evict(self, now: float) -> None:
        stale = [h for h, e in self._cache.items() if now - e.read_at >= self._ttl_s]
        for key_hash in stale:
            del self._cache[key_hash]
        if len(self._cache) >= _ENTRIES_MAX:
            self._cache.clear()

    async def refresh(self) -> None:
        """Re-read the keys used lately; forget the stale answers nobody uses."""
        started = self._clock()
        recent: list[tuple[float, bytes]] = []
        for key_hash, entry in list(self._cache.items()):
            if entry.record is not None and started - entry.used_at < RECENT_S:
                recent.append((entry.used_at, key_hash))
            elif started - entry.read_at >= self._ttl_s:
                del self._cache[key_hash]
        if not recent:
            return
        recent.sort(reverse=True)
        wanted = [key_hash for _, key_hash in recent[:REFRESH_MAX]]
        async with database.acquire(self._db) as conn:
            found = await api_keys.find_keys(conn, wanted)
        self.refreshes += 1
        for key_hash in wanted:
            cached = self._cache.get(key_hash)
            # A Check may have read the key itself meanwhile, after this query began: keep that.
            if cached is not None and cached.read_at < started:
                cached.record = found.get(key_hash)
                cached.read_at = started

    async def _refresh_forever(self) -> None:
        period = self._ttl_s / 3
        failing = False
        while True:
            started = self._clock()
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 (the Checks look keys up themselves meanwhile)
                if not failing:
                    logger.warning("key cache refresh failed (%s); Checks look keys up themselves", exc)
                failing = True
            else:
                failing = False
            await self._sleep(max(0.0, started + period - self._clock()))

    def forget(self) -> None:
        self._cache.clear()
