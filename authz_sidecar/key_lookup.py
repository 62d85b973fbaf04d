"""From a presented ``Authorization`` header to a usable key record, with a short cache.

Why a cache: every Check needs the key, and the key table changes rarely. Why a short one: a
revocation must bite within a second, so entries live ``key_cache_ttl_ms`` (500 ms by default)
and never longer. Unknown keys are cached too (bounded), so a flood of well-formed garbage
reaches the database once per TTL per key. Malformed keys and bad checksums never reach it.
"""

from __future__ import annotations

import datetime as dt
import time

from sqlalchemy.ext.asyncio import AsyncEngine

from authz_sidecar import api_errors
from billing import keys, wallets

_ENTRIES_MAX = 100_000


class KeyLookup:
    def __init__(self, engine: AsyncEngine, ttl_ms: int) -> None:
        self._engine = engine
        self._ttl_s = ttl_ms / 1000
        self._cache: dict[bytes, tuple[float, wallets.KeyRecord | None]] = {}

    @staticmethod
    def bearer(authorization: str | None) -> str:
        """The key from an ``Authorization: Bearer …`` value, or the 401 that says what is wrong."""
        if not authorization:
            raise api_errors.missing_key()
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise api_errors.missing_key()
        return token.strip()

    async def authenticate(self, authorization: str | None) -> wallets.KeyRecord:
        plaintext = self.bearer(authorization)
        if not keys.is_well_formed(plaintext):
            raise api_errors.invalid_key()
        record = await self._find(keys.hash_key(plaintext))
        if record is None:
            raise api_errors.invalid_key()
        refusal = record.refusal(dt.datetime.now(dt.timezone.utc))
        if refusal is not None:
            raise api_errors.key_refused(refusal)
        return record

    async def _find(self, key_hash: bytes) -> wallets.KeyRecord | None:
        now = time.monotonic()
        cached = self._cache.get(key_hash)
        if cached is not None and cached[0] > now:
            return cached[1]
        async with self._engine.connect() as conn:
            record = await wallets.find_key(conn, key_hash)
        if self._ttl_s > 0:
            if len(self._cache) >= _ENTRIES_MAX:
                self._evict(now)
            self._cache[key_hash] = (now + self._ttl_s, record)
        return record

    def _evict(self, now: float) -> None:
        expired = [h for h, (until, _) in self._cache.items() if until <= now]
        for key_hash in expired:
            del self._cache[key_hash]
        if len(self._cache) >= _ENTRIES_MAX:
            self._cache.clear()

    def forget(self) -> None:
        self._cache.clear()
