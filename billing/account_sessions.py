"""Sign-in sessions of the account page (docs/decisions/0037-account-page.md).

A person signs in with an API key; the key is exchanged for a session so that the page never
keeps the key. The session token (the cookie's value) is 32 random bytes; only its SHA-256 is
stored, so the table holds nothing a visitor could present. Each session belongs to one wallet,
and every page reads the wallet id from the session, never from the request.

Lifetimes: a session ends :data:`IDLE_S` after its last use (each use moves ``expires_at``) and
:data:`ABSOLUTE_S` after sign-in whatever happens; sign-out deletes the row; a session whose key
is revoked, suspended or expired is refused (and deleted) at its next use.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import secrets

from sqlalchemy.ext.asyncio import AsyncConnection

from billing import api_keys, database

Conn = AsyncConnection | database.Connection

IDLE_S = 30 * 60
ABSOLUTE_S = 12 * 60 * 60
TOKEN_BYTES = 32
# A cookie value longer than this is not one of ours: refused before hashing or a query.
TOKEN_CHARS_MAX = 64


@dataclasses.dataclass(frozen=True)
class Session:
    """A live session: whose it is, and the CSRF token its forms carry."""

    wallet_id: str
    key_id: str
    csrf_token: str = dataclasses.field(repr=False)
    expires_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class Started:
    """A new session and the token for its cookie (shown to nobody else, stored as a hash)."""

    token: str = dataclasses.field(repr=False)
    session: Session


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


# The key's state is judged in SQL with the database's clock (the one expires_at is written
# with), and read from the table, not from the sidecar's key cache: a key revoked a moment ago
# starts no session.
_KEY_USABLE = """
   AND k.revoked_at IS NULL AND NOT k.suspended
   AND (k.revoke_after IS NULL OR k.revoke_after > now())
   AND (k.expires_at IS NULL OR k.expires_at > now())"""

_START = f"""
INSERT INTO account_sessions (token_hash, wallet_id, key_id, csrf_token, expires_at, ends_at)
SELECT $1::bytea, k.wallet_id, k.id, $3::text,
       now() + make_interval(secs => {IDLE_S}), now() + make_interval(secs => {ABSOLUTE_S})
  FROM api_keys k
 WHERE k.id = $2::text{_KEY_USABLE}
RETURNING wallet_id, expires_at
"""


async def start(conn: Conn, key: api_keys.KeyRecord) -> Started | None:
    """A new session for ``key``'s wallet, or None when the key can no longer be used. A new
    token every time, so no token chosen before sign-in (fixation) ever names a session."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    csrf_token = secrets.token_urlsafe(TOKEN_BYTES)
    pg = await database.driver_connection(conn)
    row = await pg.fetchrow(_START, token_hash(token), key.id, csrf_token)
    if row is None:
        return None
    return Started(token, Session(row["wallet_id"], key.id, csrf_token, row["expires_at"]))


# One statement: the session, renewed, only while it is live and its key still usable.
_USE = f"""
UPDATE account_sessions s
   SET expires_at = least(now() + make_interval(secs => {IDLE_S}), s.ends_at)
  FROM api_keys k
 WHERE s.token_hash = $1::bytea
   AND s.expires_at > now() AND s.ends_at > now()
   AND k.id = s.key_id{_KEY_USABLE}
RETURNING s.wallet_id, s.key_id, s.csrf_token, s.expires_at
"""


async def use(conn: Conn, token: str | None) -> Session | None:
    """The live session ``token`` names, its idle lifetime renewed; None for anything else (no
    cookie, a malformed one, an ended session, a session whose key can no longer be used)."""
    if not token or len(token) > TOKEN_CHARS_MAX or not token.isascii():
        return None
    pg = await database.driver_connection(conn)
    row = await pg.fetchrow(_USE, token_hash(token))
    if row is None:
        # Whatever made it unusable is final (time only moves on; a revoked key stays revoked).
        await pg.execute("DELETE FROM account_sessions WHERE token_hash = $1::bytea", token_hash(token))
        return None
    return Session(row["wallet_id"], row["key_id"], row["csrf_token"], row["expires_at"])


async def end(conn: Conn, token: str | None) -> bool:
    """Sign out: the row goes, so a copy of the cookie is refused from now on."""
    if not token or len(token) > TOKEN_CHARS_MAX or not token.isascii():
        return False
    pg = await database.driver_connection(conn)
    status = await pg.execute("DELETE FROM account_sessions WHERE token_hash = $1::bytea", token_hash(token))
    return status != "DELETE 0"


async def prune(conn: Conn) -> int:
    """Delete the sessions that ended by time; how many. Run beside the other sweeps."""
    pg = await database.driver_connection(conn)
    status = await pg.execute("DELETE FROM account_sessions WHERE expires_at <= now() OR ends_at <= now()")
    return int(status.split()[-1])


def csrf_matches(session: Session, presented: str | None) -> bool:
    """Constant-time comparison of a form's token with the session's."""
    if not presented:
        return False
    return secrets.compare_digest(session.csrf_token.encode(), presented.encode())
