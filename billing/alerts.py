"""Low-balance alerts: the rules and the SQL, no HTTP (docs/decisions/0033-low-balance-alerts.md).

A wallet's owner registers one webhook endpoint. A *sweep* (:func:`sweep`, run by every sidecar
every few seconds) compares each such wallet's balance with the balance it saw last: a threshold
that balance was above and the new one is at or below is *crossed*, and becomes one row of
``alert_events``. A threshold is armed again by any rise above it. The sweep adds nothing to the
Check's or the settlement's statements; it reads ``wallets`` beside them.

The same rows are the delivery queue: :func:`claim_due` leases due events (``FOR UPDATE SKIP
LOCKED``), the caller posts them, and :func:`record_delivered` or :func:`record_failed` (back-off
doubling from a base, given up after a day) writes the outcome. At least once: a sidecar that dies
between the claim and the outcome leaves the event due again when its lease ends, so receivers
deduplicate on the event id.

Sharp edges: the sweep sees balances, not every ledger entry, so a rise and a fall between two
sweeps are not seen; and a wallet already below a threshold when its endpoint is registered does
not fire for it (nothing was crossed).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import hmac
import ipaddress
import json
import secrets
import urllib.parse
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from billing import database, errors, money

Conn = AsyncConnection | database.Connection

# The scheme of Stripe's webhooks, so the same verification code works (docs/alerts.md).
SIGNATURE_HEADER = "BillingProxy-Signature"
EVENT_ID_HEADER = "BillingProxy-Event-Id"
URL_CHARS_MAX = 2048
THRESHOLDS_MAX = 5
# Thresholds are USD amounts a balance can fall to: from $0 to the largest top-up Stripe allows.
THRESHOLD_NANO_MAX = 1_000_000 * money.NANO_PER_USD
# The defaults: LOW_PERCENT of the last top-up (or credit), LOW_NANO_NO_TOPUP without one, and $0.
LOW_PERCENT = 20
LOW_NANO_NO_TOPUP = money.NANO_PER_USD
ZERO_NANO = 0
SWEEP_BATCH_MAX = 500
CLAIM_BATCH_MAX = 20
# How long a claimed event stays out of the queue while its delivery runs (longer than the
# delivery's own timeout), so a sidecar that died mid-delivery leaves it due again after this.
CLAIM_LEASE_S = 60
# Test events waiting for delivery per wallet; a further POST /billing/alerts/test is refused.
TEST_EVENTS_PENDING_MAX = 5
ERROR_CHARS_MAX = 300
SECRET_PREFIX = "whsec_"
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
PRIVATE_ADDRESS = "url must not point at a loopback, link-local, private or reserved address"


class EventType(enum.StrEnum):
    """What an event says. Every type shares the queue, the signature and the delivery; the types
    besides the balance crossing and the test are queued by :func:`queue_event`."""

    BALANCE_LOW = "wallet.balance_low"
    TEST = "alert.test"
    RECHARGE_SUCCEEDED = "auto_recharge.succeeded"
    RECHARGE_FAILED = "auto_recharge.failed"
    RECHARGE_PAUSED = "auto_recharge.paused"
    KEY_LIMIT_REACHED = "key.limit_reached"


class InvalidUrl(errors.UserFacingError, ValueError):
    """A webhook URL the gateway will not post to; the message says which rule it breaks."""


class NotConfigured(errors.UserFacingError, LookupError):
    """The wallet has no alert endpoint."""


class TooManyTestEvents(errors.UserFacingError, RuntimeError):
    """The wallet already has :data:`TEST_EVENTS_PENDING_MAX` test events waiting."""


def address_allowed(address: str, *, allow_private: bool) -> bool:
    """Whether the gateway may connect to ``address``: a public unicast address, unless
    ``allow_private`` (the dev stack and the tests) lifts the rule. An IPv4-mapped IPv6 address is
    judged as the IPv4 address it maps, and so are 6to4 and NAT64 addresses."""
    if allow_private:
        return True
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        # An IPv6 address that carries an IPv4 one reaches it (mapped, 6to4, NAT64): judge that.
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None:
            ip = ip.sixtofour
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.is_global and not ip.is_multicast


def check_url(url: object, *, allow_private: bool) -> str:
    """``url`` if the gateway may post alerts to it, else :class:`InvalidUrl`.

    A name is only checked for its form here; what it resolves to is checked by the caller (the
    API when it is registered, the worker at every delivery: DNS can change in between).
    """
    if not isinstance(url, str) or not url:
        raise InvalidUrl("url must be a string such as https://example.com/hooks/billing")
    if len(url) > URL_CHARS_MAX:
        raise InvalidUrl(f"url must be at most {URL_CHARS_MAX} characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url) or not url.isascii():
        raise InvalidUrl("url must be ASCII without spaces or control characters (punycode a name)")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a port out of range or not a number)
    except ValueError:
        raise InvalidUrl("url is not a well-formed URL") from None
    schemes = ("https", "http") if allow_private else ("https",)
    if parts.scheme not in schemes:
        raise InvalidUrl("url must start with https://")
    if parts.username is not None or parts.password is not None:
        raise InvalidUrl("url must not carry a user name or password")
    host = parts.hostname
    if not host:
        raise InvalidUrl("url must name a host")
    try:
        ipaddress.ip_address(host)
        literal = True
    except ValueError:
        literal = False
    if literal and not address_allowed(host, allow_private=allow_private):
        raise InvalidUrl(PRIVATE_ADDRESS)
    return url


def check_thresholds(values: object) -> list[int]:
    """The owner's thresholds as nano-USD, sorted, without repeats; ValueError saying what is wrong."""
    if not isinstance(values, list) or not 1 <= len(values) <= THRESHOLDS_MAX:
        raise ValueError(f"thresholds_usd must be a list of 1 to {THRESHOLDS_MAX} USD amounts as strings")
    nanos = []
    for value in values:
        if not isinstance(value, str):
            raise ValueError('each threshold must be a USD amount as a string, such as "5.00"')
        try:
            nano = money.parse_usd(value)
        except money.MoneyError as exc:
            raise ValueError(f"threshold {value!r}: {exc}") from None
        if not 0 <= nano <= THRESHOLD_NANO_MAX:
            raise ValueError(f"each threshold must be from 0 to {money.format_usd(THRESHOLD_NANO_MAX)}")
        nanos.append(nano)
    return sorted(set(nanos))


def new_signing_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def signature(payload: bytes, secret: str, timestamp: int) -> str:
    """The signature header's value: Stripe's scheme, ``t=<unix>,v1=<hex HMAC-SHA256 of "t.body">``."""
    signed = f"{timestamp}.".encode() + payload
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


# --- registration ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Endpoint:
    wallet_id: str
    url: str
    thresholds_nano: list[int] | None  # None: the defaults
    low_default_nano: int
    secret_last4: str

    @property
    def effective_thresholds_nano(self) -> list[int]:
        if self.thresholds_nano is not None:
            return list(self.thresholds_nano)
        return sorted({self.low_default_nano, ZERO_NANO})


def _low_default(wallet: str) -> str:
    """SQL for the default low threshold of the wallet named by the SQL expression ``wallet``."""
    return f"""coalesce((SELECT le.amount_nano * {LOW_PERCENT} / 100
                          FROM ledger_entries le
                         WHERE le.wallet_id = {wallet} AND le.kind IN ('topup', 'credit')
                           AND le.amount_nano > 0
                         ORDER BY le.id DESC LIMIT 1), {LOW_NANO_NO_TOPUP}::bigint)"""


_REGISTER = f"""
INSERT INTO alert_endpoints AS e
       (wallet_id, url, signing_secret, thresholds_nano, low_default_nano, observed_balance_nano)
SELECT w.id, $2::text, $3::text, $4::bigint[], {_low_default("w.id")}, w.balance_nano
  FROM wallets w WHERE w.id = $1::text
    ON CONFLICT (wallet_id) DO UPDATE
   SET url = excluded.url,
       thresholds_nano = excluded.thresholds_nano,
       signing_secret = CASE WHEN $5::boolean OR e.signing_secret IS NULL THEN excluded.signing_secret
                             ELSE e.signing_secret END,
       updated_at = now()
RETURNING e.wallet_id, e.url, e.thresholds_nano, e.low_default_nano, e.signing_secret,
          (e.signing_secret = $3::text) AS created
"""

_ENDPOINT = """
SELECT wallet_id, url, thresholds_nano, low_default_nano, signing_secret
  FROM alert_endpoints WHERE wallet_id = $1::text AND url IS NOT NULL
"""


def _endpoint(row: Any) -> Endpoint:
    thresholds = row["thresholds_nano"]
    return Endpoint(
        wallet_id=row["wallet_id"],
        url=row["url"],
        thresholds_nano=None if thresholds is None else list(thresholds),
        low_default_nano=row["low_default_nano"],
        secret_last4=row["signing_secret"][-4:],
    )


async def register(
    conn: Conn,
    wallet_id: str,
    *,
    url: str,
    thresholds_nano: list[int] | None,
    rotate_secret: bool,
) -> tuple[Endpoint, str | None]:
    """Create or replace the wallet's endpoint; the signing secret too when it is new (the first
    registration, or ``rotate_secret``), which is the only time it is returned. The balance now
    is what the first sweep compares with: thresholds already below it stay quiet (a wallet
    already watched for its mail keeps what the sweep saw)."""
    pg = await database.driver_connection(conn)
    row = await pg.fetchrow(_REGISTER, wallet_id, url, new_signing_secret(), thresholds_nano, rotate_secret)
    assert row is not None, "the caller's key names an existing wallet"
    shown = row["signing_secret"] if row["created"] else None
    return _endpoint(row), shown


async def endpoint(conn: Conn, wallet_id: str) -> Endpoint | None:
    pg = await database.driver_connection(conn)
    row = await pg.fetchrow(_ENDPOINT, wallet_id)
    return None if row is None else _endpoint(row)


_REMOVE = """
WITH ended AS (
    UPDATE alert_events
       SET gave_up_at = now(), last_error = 'the webhook was removed'
     WHERE wallet_id = $1::text AND delivered_at IS NULL AND gave_up_at IS NULL
)
DELETE FROM alert_endpoints WHERE wallet_id = $1::text AND url IS NOT NULL RETURNING wallet_id
"""


async def remove(conn: Conn, wallet_id: str) -> bool:
    """Remove the wallet's endpoint (its events not yet posted to it are given up); False if it
    had none. The events stay, as the record of what was sent; their mail is not affected, and a
    wallet watched for its mail is enrolled again by the next round (:func:`enrol`)."""
    pg = await database.driver_connection(conn)
    return await pg.fetchval(_REMOVE, wallet_id) is not None


@dataclasses.dataclass(frozen=True)
class EventRecord:
    """An event as its owner sees it in ``GET /billing/alerts``."""

    id: str
    type: str
    threshold_nano: int | None
    balance_nano: int
    created_at: dt.datetime
    attempts: int
    delivered_at: dt.datetime | None
    gave_up_at: dt.datetime | None
    last_error: str | None

    @property
    def state(self) -> str:
        if self.delivered_at is not None:
            return "delivered"
        return "gave_up" if self.gave_up_at is not None else "pending"


async def recent_events(conn: Conn, wallet_id: str, *, limit: int) -> list[EventRecord]:
    pg = await database.driver_connection(conn)
    rows = await pg.fetch(
        """SELECT id, type, threshold_nano, balance_nano, created_at, attempts, delivered_at,
                  gave_up_at, last_error
             FROM alert_events WHERE wallet_id = $1::text
            ORDER BY created_at DESC, id LIMIT $2::int""",
        wallet_id,
        limit,
    )
    return [EventRecord(**dict(row)) for row in rows]


_QUEUE_TEST = f"""
INSERT INTO alert_events (id, wallet_id, type, balance_nano)
SELECT $2::text, w.id, '{EventType.TEST}', w.balance_nano
  FROM wallets w JOIN alert_endpoints e ON e.wallet_id = w.id AND e.url IS NOT NULL
 WHERE w.id = $1::text
   AND (SELECT count(*) FROM alert_events ev
         WHERE ev.wallet_id = w.id AND ev.type = '{EventType.TEST}'
           AND ev.delivered_at IS NULL AND ev.gave_up_at IS NULL) < {TEST_EVENTS_PENDING_MAX}
RETURNING id
"""


def new_event_id() -> str:
    return "evt_" + secrets.token_hex(16)


async def queue_test_event(conn: Conn, wallet_id: str) -> str:
    """Queue an ``alert.test`` event for the wallet's endpoint; its id. NotConfigured without an
    endpoint, TooManyTestEvents while earlier ones still wait."""
    pg = await database.driver_connection(conn)
    event_id = await pg.fetchval(_QUEUE_TEST, wallet_id, new_event_id())
    if event_id is None:
        if await endpoint(conn, wallet_id) is None:
            raise NotConfigured(wallet_id)
        raise TooManyTestEvents(wallet_id)
    return str(event_id)


# An event for a wallet watched without a webhook is born given up for the webhook channel: the
# other channels (mail, Kubernetes Events) take it from alert_deliveries.
_NO_WEBHOOK = "no webhook was registered"
_QUEUE_EVENT = f"""
INSERT INTO alert_events (id, wallet_id, type, balance_nano, data, gave_up_at, last_error)
SELECT $2::text, w.id, $3::text, w.balance_nano, $4::jsonb,
       CASE WHEN e.url IS NULL THEN now() END, CASE WHEN e.url IS NULL THEN '{_NO_WEBHOOK}' END
  FROM wallets w LEFT JOIN alert_endpoints e ON e.wallet_id = w.id
 WHERE w.id = $1::text
    ON CONFLICT (id) DO NOTHING
RETURNING id
"""


def event_id_for(event_type: EventType, occurrence: str) -> str:
    """The id of the one event of ``event_type`` about ``occurrence`` (a recharge, a key's window):
    derived, not random, so queueing it again (a retried sweep, a second sidecar) adds nothing."""
    digest = hashlib.sha256(f"{event_type}:{occurrence}".encode()).hexdigest()
    return "evt_" + digest[:32]


async def queue_event(
    conn: Conn, wallet_id: str, event_type: EventType, *, occurrence: str, data: dict[str, str]
) -> str | None:
    """Queue one event of ``event_type`` about ``occurrence`` for the wallet, in the caller's
    transaction (so it exists exactly when the fact it reports does). Its id, or None when the
    event was already queued. Recorded whether or not the wallet is watched yet: a recharge a
    second after signup is still mailed (the mail and Kubernetes channels take every new event of
    a wallet with an address or a resource); without a webhook its webhook delivery is recorded
    as given up. ``data``'s values are strings (USD amounts as decimal strings, never floats)."""
    pg = await database.driver_connection(conn)
    event_id = await pg.fetchval(
        _QUEUE_EVENT, wallet_id, event_id_for(event_type, occurrence), str(event_type), json.dumps(data)
    )
    return None if event_id is None else str(event_id)


# --- the sweep -------------------------------------------------------------------------------------

# One statement, safe from several sidecars at once: the endpoint rows it takes are locked (others
# skip them) and moved to the balance seen, so a second sweep finds them unchanged; the unique key
# (wallet, observation, threshold, type) is the second guard.
_SWEEP = f"""
WITH seen AS (
    SELECT e.wallet_id, e.url, e.observed_balance_nano AS before_nano, w.balance_nano AS after_nano,
           e.thresholds_nano, e.low_default_nano, e.observation + 1 AS observation
      FROM alert_endpoints e JOIN wallets w ON w.id = e.wallet_id
     WHERE w.balance_nano <> e.observed_balance_nano
     ORDER BY e.wallet_id
     LIMIT $1::int
       FOR NO KEY UPDATE OF e SKIP LOCKED
), judged AS (
    SELECT seen.*,
           CASE WHEN after_nano > before_nano THEN {_low_default("seen.wallet_id")}
                ELSE low_default_nano END AS low_nano
      FROM seen
), moved AS (
    UPDATE alert_endpoints e
       SET observed_balance_nano = judged.after_nano,
           observation = judged.observation,
           low_default_nano = judged.low_nano,
           updated_at = now()
      FROM judged
     WHERE e.wallet_id = judged.wallet_id
)
INSERT INTO alert_events
       (id, wallet_id, type, observation, threshold_nano, balance_nano, gave_up_at, last_error)
SELECT 'evt_' || replace(gen_random_uuid()::text, '-', ''),
       judged.wallet_id, '{EventType.BALANCE_LOW}', judged.observation, t.threshold_nano, judged.after_nano,
       CASE WHEN judged.url IS NULL THEN now() END, CASE WHEN judged.url IS NULL THEN '{_NO_WEBHOOK}' END
  FROM judged
 CROSS JOIN LATERAL (
       SELECT DISTINCT unnest(coalesce(judged.thresholds_nano,
                                       ARRAY[judged.low_nano, {ZERO_NANO}::bigint])) AS threshold_nano
       ) t
 WHERE judged.before_nano > t.threshold_nano AND judged.after_nano <= t.threshold_nano
    ON CONFLICT ON CONSTRAINT alert_events_one_per_crossing DO NOTHING
RETURNING id
"""


async def sweep(conn: Conn, *, batch_max: int = SWEEP_BATCH_MAX) -> int:
    """Record every threshold crossed since the last sweep (up to ``batch_max`` wallets); how many
    events it made. Run it outside a transaction of the caller's, or commit soon: it locks the
    endpoint rows it takes."""
    pg = await database.driver_connection(conn)
    return len(await pg.fetch(_SWEEP, batch_max))


# --- delivery --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Delivery:
    """A claimed event, with where it goes and the secret that signs it."""

    event_id: str
    wallet_id: str
    type: str
    threshold_nano: int | None
    balance_nano: int
    created_at: dt.datetime
    attempt: int
    url: str
    signing_secret: str = dataclasses.field(repr=False)
    data: dict[str, str] = dataclasses.field(default_factory=dict)

    def payload(self) -> bytes:
        """The body: the same bytes on every attempt (built from the row, not from now)."""
        data: dict[str, Any] = {
            **self.data,
            "wallet_id": self.wallet_id,
            "balance_usd": money.format_usd(self.balance_nano),
        }
        if self.threshold_nano is not None:
            data["threshold_usd"] = money.format_usd(self.threshold_nano)
        event = {
            "id": self.event_id,
            "object": "event",
            "type": self.type,
            "created": int(self.created_at.timestamp()),
            "data": data,
        }
        return json.dumps(event, separators=(",", ":"), sort_keys=True).encode()


def _claim_sql(table: str, key: str, which: str, joined: str, joined_on: str, returning: str) -> str:
    """Lease up to $1 due rows of ``table`` (``t``, those ``which`` names) for $2 seconds, one more
    attempt each: the webhook's queue (alert_events) and the other channels' (alert_deliveries)."""
    return f"""
WITH due AS (
    SELECT t.{key}
      FROM {table} t
     WHERE {which} AND t.delivered_at IS NULL AND t.gave_up_at IS NULL AND t.next_attempt_at <= now()
     ORDER BY t.next_attempt_at
     LIMIT $1::int
       FOR UPDATE SKIP LOCKED
)
UPDATE {table} t
   SET attempts = t.attempts + 1,
       next_attempt_at = now() + make_interval(secs => $2::int)
  FROM due, {joined}
 WHERE t.{key} = due.{key} AND {which} AND {joined_on}
RETURNING {returning}
"""


_CLAIM = _claim_sql(
    "alert_events",
    "id",
    "true",
    "alert_endpoints e",
    "e.wallet_id = t.wallet_id",
    """t.id, t.wallet_id, t.type, t.threshold_nano, t.balance_nano, t.created_at, t.attempts,
          e.url, e.signing_secret, t.data::text AS data""",
)


async def claim_due(
    conn: Conn, *, limit: int = CLAIM_BATCH_MAX, lease_s: int = CLAIM_LEASE_S
) -> list[Delivery]:
    """Lease up to ``limit`` due events for ``lease_s`` (one more attempt each), committed before
    any is posted: no transaction stays open across the network."""
    pg = await database.driver_connection(conn)
    rows = await pg.fetch(_CLAIM, limit, lease_s)
    return [
        Delivery(
            event_id=row["id"],
            wallet_id=row["wallet_id"],
            type=row["type"],
            threshold_nano=row["threshold_nano"],
            balance_nano=row["balance_nano"],
            created_at=row["created_at"],
            attempt=row["attempts"],
            url=row["url"],
            signing_secret=row["signing_secret"],
            data=json.loads(row["data"]),  # as text: raw and engine connections decode jsonb apart
        )
        for row in rows
    ]


async def record_delivered(conn: Conn, event_id: str) -> None:
    pg = await database.driver_connection(conn)
    await pg.execute(
        "UPDATE alert_events SET delivered_at = now(), last_error = NULL "
        "WHERE id = $1::text AND delivered_at IS NULL",
        event_id,
    )


# Attempt n+1 waits base × 2^(n-1) (the exponent bounded, so the interval never overflows); once
# it would start later than retry_for_s after the event was made, it is given up instead (at once
# when $5 says the failure is final). One rule for every channel: the webhook's state is in
# alert_events, the others' in alert_deliveries ($6 names the channel there).
def _failed_sql(table: str, where: str, made_at: str) -> str:
    return f"""
WITH next AS (
    SELECT now() + make_interval(secs => $3::bigint * (2 ^ least(t.attempts - 1, 30)) / 1000.0) AS at,
           {made_at} + make_interval(secs => $4::int) AS deadline
      FROM {table} t
     WHERE {where} AND t.delivered_at IS NULL AND t.gave_up_at IS NULL
)
UPDATE {table} t
   SET last_error = $2::text,
       next_attempt_at = next.at,
       gave_up_at = CASE WHEN $5::boolean OR next.at > next.deadline THEN now() END
  FROM next
 WHERE {where}
RETURNING t.gave_up_at IS NOT NULL
"""


_FAILED = _failed_sql("alert_events", "t.id = $1::text AND $6::text IS NULL", "t.created_at")
_CHANNEL_FAILED = _failed_sql(
    "alert_deliveries",
    "t.event_id = $1::text AND t.channel = $6::text",
    "(SELECT ev.created_at FROM alert_events ev WHERE ev.id = t.event_id)",
)


async def record_failed(
    conn: Conn, event_id: str, error: str, *, retry_base_ms: int, retry_for_s: int
) -> bool:
    """Schedule the next attempt after a failed one, or give the event up; True if given up."""
    pg = await database.driver_connection(conn)
    gave_up = await pg.fetchval(
        _FAILED, event_id, error[:ERROR_CHARS_MAX], retry_base_ms, retry_for_s, False, None
    )
    return bool(gave_up)


async def pending(conn: Conn) -> int:
    """Events neither delivered nor given up."""
    pg = await database.driver_connection(conn)
    return int(
        await pg.fetchval(
            "SELECT count(*) FROM alert_events WHERE delivered_at IS NULL AND gave_up_at IS NULL"
        )
    )


# --- the other channels: mail and Kubernetes Events ------------------------------------------------


class Channel(enum.StrEnum):
    """Where an event goes besides the webhook; each tracks its own attempts in alert_deliveries."""

    MAIL = "mail"
    KUBERNETES = "kubernetes"


# How far back the channels look for events they have not taken: an event older than this (made
# while mail was off, say) is not sent late.
NEW_EVENTS_LOOKBACK_S = 86_400
ENROL_BATCH_MAX = 500
# Types mailed: every one but the webhook's test (which would let anyone who can sign up with an
# address make the gateway mail it at will).
_NOT_MAILED = (EventType.TEST,)

# Wallets the sweep should watch though they have no webhook: Kubernetes-declared ones (their
# Events) and, when mail is on, those with an email. The row starts at the balance now, so nothing
# already crossed fires; the thresholds are the defaults.
_ENROL = f"""
INSERT INTO alert_endpoints AS e
       (wallet_id, url, signing_secret, thresholds_nano, low_default_nano, observed_balance_nano)
SELECT w.id, NULL, NULL, NULL, {_low_default("w.id")}, w.balance_nano
  FROM wallets w
 WHERE (w.source = 'kubernetes' OR ($1::boolean AND w.email IS NOT NULL))
   AND NOT EXISTS (SELECT 1 FROM alert_endpoints x WHERE x.wallet_id = w.id)
 LIMIT $2::int
    ON CONFLICT (wallet_id) DO NOTHING
RETURNING e.wallet_id
"""


async def enrol(conn: Conn, *, mail: bool, batch_max: int = ENROL_BATCH_MAX) -> int:
    """Watch the wallets that get alerts without a webhook (Kubernetes-declared ones, and with
    ``mail`` those with an email address); how many were added."""
    pg = await database.driver_connection(conn)
    return len(await pg.fetch(_ENROL, mail, batch_max))


_TAKE_FOR_MAIL = f"""
INSERT INTO alert_deliveries (event_id, channel, recipient)
SELECT ev.id, '{Channel.MAIL}', w.email
  FROM alert_events ev JOIN wallets w ON w.id = ev.wallet_id
 WHERE ev.created_at > now() - make_interval(secs => {NEW_EVENTS_LOOKBACK_S})
   AND ev.type <> ALL($1::text[])
   AND w.email IS NOT NULL
   AND NOT EXISTS (SELECT 1 FROM alert_deliveries d WHERE d.event_id = ev.id AND d.channel = '{Channel.MAIL}')
 ORDER BY ev.created_at
 LIMIT $2::int
    ON CONFLICT (event_id, channel) DO NOTHING
RETURNING event_id
"""


async def take_for_mail(conn: Conn, *, batch_max: int = SWEEP_BATCH_MAX) -> int:
    """Give each new event of a wallet with an email its mail delivery (once, whoever runs it);
    how many. The address is the wallet's as it is now, kept with the delivery."""
    pg = await database.driver_connection(conn)
    return len(await pg.fetch(_TAKE_FOR_MAIL, [str(t) for t in _NOT_MAILED], batch_max))


@dataclasses.dataclass(frozen=True)
class MailDelivery:
    """A claimed mail: what the event says and the address it goes to."""

    event_id: str
    wallet_id: str
    type: str
    threshold_nano: int | None
    balance_nano: int
    attempt: int
    recipient: str
    data: dict[str, str] = dataclasses.field(default_factory=dict)


_CLAIM_CHANNEL = _claim_sql(
    "alert_deliveries",
    "event_id",
    "t.channel = $3::text",
    "alert_events ev",
    "ev.id = t.event_id",
    """ev.id, ev.wallet_id, ev.type, ev.threshold_nano, ev.balance_nano, t.attempts, t.recipient,
          ev.data::text AS data""",
)


async def claim_mail(
    conn: Conn, *, limit: int = CLAIM_BATCH_MAX, lease_s: int = CLAIM_LEASE_S
) -> list[MailDelivery]:
    """Lease up to ``limit`` due mails, as :func:`claim_due` leases webhook posts."""
    pg = await database.driver_connection(conn)
    rows = await pg.fetch(_CLAIM_CHANNEL, limit, lease_s, str(Channel.MAIL))
    return [
        MailDelivery(
            event_id=row["id"],
            wallet_id=row["wallet_id"],
            type=row["type"],
            threshold_nano=row["threshold_nano"],
            balance_nano=row["balance_nano"],
            attempt=row["attempts"],
            recipient=row["recipient"] or "",
            data=json.loads(row["data"]),
        )
        for row in rows
    ]


async def record_channel_delivered(conn: Conn, event_id: str, channel: Channel) -> None:
    pg = await database.driver_connection(conn)
    await pg.execute(
        "UPDATE alert_deliveries SET delivered_at = now(), last_error = NULL "
        "WHERE event_id = $1::text AND channel = $2::text AND delivered_at IS NULL",
        event_id,
        str(channel),
    )


async def record_channel_failed(
    conn: Conn,
    event_id: str,
    channel: Channel,
    error: str,
    *,
    retry_base_ms: int,
    retry_for_s: int,
    final: bool = False,
) -> bool:
    """:func:`record_failed` for a channel's delivery; ``final`` gives up at once (an address no
    attempt can reach). True if given up."""
    pg = await database.driver_connection(conn)
    gave_up = await pg.fetchval(
        _CHANNEL_FAILED, event_id, error[:ERROR_CHARS_MAX], retry_base_ms, retry_for_s, final, str(channel)
    )
    return bool(gave_up)


WEBHOOK = "webhook"


async def record_attempt(
    conn: Conn,
    event_id: str,
    channel: str,
    error: str | None,
    *,
    retry_base_ms: int,
    retry_for_s: int,
    final: bool = False,
) -> bool:
    """Record one attempt on ``channel`` (:data:`WEBHOOK` or a :class:`Channel`): delivered when
    ``error`` is None, else failed (given up when retries are over, or at once if ``final``).
    True if given up."""
    if error is None:
        if channel == WEBHOOK:
            await record_delivered(conn, event_id)
        else:
            await record_channel_delivered(conn, event_id, Channel(channel))
        return False
    if channel == WEBHOOK:
        return await record_failed(
            conn, event_id, error, retry_base_ms=retry_base_ms, retry_for_s=retry_for_s
        )
    return await record_channel_failed(
        conn,
        event_id,
        Channel(channel),
        error,
        retry_base_ms=retry_base_ms,
        retry_for_s=retry_for_s,
        final=final,
    )


@dataclasses.dataclass(frozen=True)
class Announcement:
    """An event to post as a Kubernetes Event on its Wallet resource."""

    event_id: str
    type: str
    threshold_nano: int | None
    balance_nano: int
    data: dict[str, str]


# Taken and marked posted in one statement: a second operator (or this one after a restart)
# finds the row and takes nothing, so each event is posted once. At most once: an operator that
# stops between this commit and the post loses that Event (the record stays in alert_events).
_ANNOUNCE = f"""
WITH fresh AS (
    SELECT ev.id, ev.created_at
      FROM alert_events ev JOIN wallets w ON w.id = ev.wallet_id
     WHERE w.source = 'kubernetes' AND w.external_id = $1::text
       AND ev.created_at > now() - make_interval(secs => {NEW_EVENTS_LOOKBACK_S})
       AND ev.type = ANY($2::text[])
       AND NOT EXISTS (SELECT 1 FROM alert_deliveries d
                        WHERE d.event_id = ev.id AND d.channel = '{Channel.KUBERNETES}')
     ORDER BY ev.created_at
     LIMIT $3::int
), taken AS (
    INSERT INTO alert_deliveries (event_id, channel, attempts, delivered_at)
    SELECT id, '{Channel.KUBERNETES}', 1, now() FROM fresh
        ON CONFLICT (event_id, channel) DO NOTHING
    RETURNING event_id
)
SELECT ev.id, ev.type, ev.threshold_nano, ev.balance_nano, ev.data::text AS data
  FROM taken JOIN alert_events ev ON ev.id = taken.event_id
 ORDER BY ev.created_at, ev.id
"""


async def take_announcements(
    conn: Conn, external_id: str, *, types: list[EventType], limit: int = CLAIM_BATCH_MAX
) -> list[Announcement]:
    """The events of ``types`` about the Kubernetes-declared wallet ``external_id`` (its resource's
    uid) that no operator has posted yet, now marked posted: commit, then post them."""
    pg = await database.driver_connection(conn)
    rows = await pg.fetch(_ANNOUNCE, external_id, [str(t) for t in types], limit)
    return [
        Announcement(
            event_id=row["id"],
            type=row["type"],
            threshold_nano=row["threshold_nano"],
            balance_nano=row["balance_nano"],
            data=json.loads(row["data"]),
        )
        for row in rows
    ]


_PENDING_BY_CHANNEL = f"""
SELECT 'webhook' AS channel, count(*) AS n FROM alert_events
 WHERE delivered_at IS NULL AND gave_up_at IS NULL
UNION ALL
SELECT channel, count(*) FROM alert_deliveries
 WHERE delivered_at IS NULL AND gave_up_at IS NULL AND channel = '{Channel.MAIL}'
 GROUP BY channel
"""


async def pending_by_channel(conn: Conn) -> dict[str, int]:
    """Deliveries neither made nor given up, by channel (webhook, mail)."""
    pg = await database.driver_connection(conn)
    counts = {"webhook": 0, str(Channel.MAIL): 0}
    counts.update({row["channel"]: int(row["n"]) for row in await pg.fetch(_PENDING_BY_CHANNEL)})
    return counts


async def made_since(conn: Conn, since_s: int) -> dict[str, int]:
    """Events made in the last ``since_s`` seconds, by type (every producer's, from the table)."""
    pg = await database.driver_connection(conn)
    rows = await pg.fetch(
        "SELECT type, count(*) AS n FROM alert_events "
        "WHERE created_at > now() - make_interval(secs => $1::int) GROUP BY type",
        since_s,
    )
    return {row["type"]: int(row["n"]) for row in rows}
