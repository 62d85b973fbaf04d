"""The Kubernetes Events the operator posts, all in one place.

Why one module: Event reasons are an interface (people alert on them and `kubectl get events
--field-selector reason=WalletEmpty` must keep working), and Events are readable by anyone who
can read the namespace — so every message here is built from ids, key prefixes and amounts only,
never from a key's plaintext. The parameters make that hard to get wrong: no function takes
an :class:`~billing.key_format.IssuedKey`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

import kopf

from billing import alerts, api_keys, key_limits, ledger, money, wallets

# Wallet
WALLET_CREATED = "WalletCreated"
WALLET_SUSPENDED = "WalletSuspended"
WALLET_RESUMED = "WalletResumed"
WALLET_RELEASED = "WalletReleased"
TOP_UP = "TopUp"
LOW_BALANCE = "LowBalance"
WALLET_EMPTY = "WalletEmpty"
AUTO_RECHARGE_SUCCEEDED = "AutoRechargeSucceeded"
AUTO_RECHARGE_FAILED = "AutoRechargeFailed"
AUTO_RECHARGE_PAUSED = "AutoRechargePaused"
KEY_LIMIT_REACHED = "KeyLimitReached"
# ApiKey
KEY_ISSUED = "KeyIssued"
KEY_ROTATED = "KeyRotated"
KEY_REVOKED = "KeyRevoked"


def _usd(nano: int) -> str:
    return f"${money.format_usd(nano)}"


def _key(record: api_keys.KeyRecord) -> str:
    return f"{record.id} ({record.display_prefix}…)"


def wallet_created(body: kopf.Body, wallet: wallets.Wallet, grant_nano: int) -> None:
    kopf.info(
        body,
        reason=WALLET_CREATED,
        message=f"wallet {wallet.id} created with an initial grant of {_usd(grant_nano)}",
    )


def wallet_switched(body: kopf.Body, wallet: wallets.Wallet) -> None:
    if wallet.suspended:
        kopf.warn(
            body, reason=WALLET_SUSPENDED, message=f"wallet {wallet.id} suspended: its keys are refused"
        )
    else:
        kopf.info(body, reason=WALLET_RESUMED, message=f"wallet {wallet.id} resumed")


def wallet_released(body: kopf.Body, wallet_id: str, keys_suspended: int) -> None:
    kopf.info(
        body,
        reason=WALLET_RELEASED,
        message=f"wallet {wallet_id} suspended with {keys_suspended} key(s); its ledger is kept",
    )


def top_up(body: kopf.Body, entry: ledger.Entry) -> None:
    kopf.info(
        body,
        reason=TOP_UP,
        message=(
            f"credited {_usd(entry.amount_nano)} ({entry.kind}); balance {_usd(entry.balance_after_nano)}"
        ),
    )


def low_balance(body: kopf.Body, balance_nano: int, threshold_nano: int) -> None:
    kopf.warn(
        body,
        reason=LOW_BALANCE,
        message=f"balance {_usd(balance_nano)} is below the threshold of {_usd(threshold_nano)}",
    )


def wallet_empty(body: kopf.Body, balance_nano: int) -> None:
    kopf.warn(
        body,
        reason=WALLET_EMPTY,
        message=f"balance {_usd(balance_nano)}: requests are refused until the wallet is topped up",
    )


# The alert events (billing.alerts.EventType) posted on their Wallet, by reason; a success is
# Normal, the rest Warning. alert.test is a webhook's test and is not posted.
ALERT_REASONS = {
    alerts.EventType.BALANCE_LOW: LOW_BALANCE,
    alerts.EventType.RECHARGE_SUCCEEDED: AUTO_RECHARGE_SUCCEEDED,
    alerts.EventType.RECHARGE_FAILED: AUTO_RECHARGE_FAILED,
    alerts.EventType.RECHARGE_PAUSED: AUTO_RECHARGE_PAUSED,
    alerts.EventType.KEY_LIMIT_REACHED: KEY_LIMIT_REACHED,
}
_DATA_CHARS_MAX = 300


def alert(body: kopf.Body, event: alerts.Announcement) -> None:
    """An alert event as a Kubernetes Event. Its data are what the producer wrote (ids, amounts,
    a reason), never a key's plaintext, which no alert carries."""
    reason = next((r for t, r in ALERT_REASONS.items() if t == event.type), None)
    if reason is None:
        return
    if event.threshold_nano is not None:
        message = (
            f"balance {_usd(event.balance_nano)} is at or below the alert threshold of "
            f"{_usd(event.threshold_nano)}"
        )
    else:
        message = f"{event.type}; balance {_usd(event.balance_nano)}"
    details = ", ".join(f"{name} {value}" for name, value in sorted(event.data.items()))
    if details:
        message = f"{message}: {details}"[:_DATA_CHARS_MAX]
    post = kopf.info if reason == AUTO_RECHARGE_SUCCEEDED else kopf.warn
    post(body, reason=reason, message=f"{message} (event {event.event_id})")


def key_issued(body: kopf.Body, record: api_keys.KeyRecord, secret_name: str) -> None:
    kopf.info(body, reason=KEY_ISSUED, message=f"key {_key(record)} written to Secret {secret_name}")


def key_rotated(
    body: kopf.Body, record: api_keys.KeyRecord, secret_name: str, superseded: Iterable[api_keys.KeyRecord]
) -> None:
    old = ", ".join(
        f"{k.id} until {k.revoke_after.astimezone(dt.UTC):%Y-%m-%dT%H:%M:%SZ}"
        for k in superseded
        if k.revoke_after is not None
    )
    kopf.info(
        body,
        reason=KEY_ROTATED,
        message=f"key {_key(record)} written to Secret {secret_name}"
        + (f"; the previous key stays valid: {old}" if old else ""),
    )


def key_revoked(body: kopf.Body, records: Iterable[api_keys.KeyRecord]) -> None:
    ids = ", ".join(k.id for k in records) or "none left"
    kopf.info(body, reason=KEY_REVOKED, message=f"revoked: {ids}")


def key_limit_reached(body: kopf.Body, record: api_keys.KeyRecord, limit: key_limits.KeyLimit) -> None:
    reset = limit.resets_at
    until = "for good (a total limit)" if reset is None else f"until {key_limits.iso(reset)}"
    kopf.warn(
        body,
        reason=KEY_LIMIT_REACHED,
        message=(
            f"key {_key(record)} spent {_usd(limit.spent_nano)} of its {limit.window.value} limit of "
            f"{_usd(limit.limit_nano)}: refused {until}"
        ),
    )
