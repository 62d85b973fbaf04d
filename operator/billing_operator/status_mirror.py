"""Timers that copy PostgreSQL's truth into ``.status``, and post the Events it implies.

Why timers and not notifications: balances change with every request (the sidecar settles them)
and with top-ups (the Stripe webhook), neither of which knows about Kubernetes. A status that is
at most ``BILLINGPROXY_OPERATOR_STATUS_INTERVAL_S`` old is what ``kubectl get`` needs, and it
costs one indexed read per object per tick. The status is never the record: PostgreSQL is.

Events come from comparing the new reading with the last one written to the status:
- ``TopUp`` for every ``topup`` or ``credit`` ledger entry newer than ``status.lastTopUp.entryId``
  (a cursor, so each top-up is announced once even across restarts);
- ``WalletEmpty`` when the state becomes ``Empty``; ``LowBalance`` when the balance first drops
  below ``spec.lowBalanceThreshold``.

A failed reading (PostgreSQL away) flips the ``Synced`` condition to False once, rather than
posting an error every tick; the next good reading flips it back.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from billing import ledger, money, wallets
from billing_operator import apikey_reconciler, config, db, errors, events, status, wallet_reconciler

TOP_UP_KINDS = frozenset({"topup", "credit"})


def _previous_balance(body: Mapping[str, Any]) -> int | None:
    raw = (body.get("status") or {}).get("balance")
    try:
        return money.parse_usd(raw, allow_negative=True) if isinstance(raw, str) else None
    except money.MoneyError:
        return None


def _synced(patch: kopf.Patch, body: Mapping[str, Any], error: errors.ReconcileError | None) -> None:
    if error is None:
        status.set_condition(patch, body, type=status.SYNCED, ok=True, reason="Mirrored",
                             message="balance and state are mirrored from PostgreSQL")
    else:
        status.set_condition(patch, body, type=status.SYNCED, ok=False, reason=error.reason, message=error.message)


@kopf.timer(wallet_reconciler.GROUP, wallet_reconciler.VERSION, wallet_reconciler.PLURAL,
            id="wallet.status", interval=config.STATUS_INTERVAL_S, initial_delay=config.STATUS_INTERVAL_S)
async def mirror_wallet(body: kopf.Body, spec: kopf.Spec, patch: kopf.Patch, memo: kopf.Memo,
                        logger: logging.Logger, **_: Any) -> None:
    cfg: config.OperatorConfig = memo.operator_config
    last = (body.get("status") or {}).get("lastTopUp") or {}
    cursor = last.get("entryId") if isinstance(last.get("entryId"), int) else 0
    try:
        async with db.transaction(memo.engine) as conn:
            wallet = await wallets.find_owned_wallet(conn, source=wallet_reconciler.SOURCE, external_id=body.metadata.uid)
            top_ups = [] if wallet is None else await ledger.entries_after(
                conn, wallet.id, after_entry_id=cursor, kinds=TOP_UP_KINDS, limit=cfg.top_up_events_max)
    except errors.DatabaseUnavailable as exc:
        _synced(patch, body, exc)
        return
    if wallet is None:
        return  # not created yet (or its create failed): the reconciler's condition says why
    _synced(patch, body, None)

    previous_state = (body.get("status") or {}).get("state")
    previous_balance = _previous_balance(body)
    wallet_reconciler.write_status(patch, body, wallet)
    for entry in top_ups:
        events.top_up(body, entry)
    if top_ups:
        newest = top_ups[-1]
        patch.status["lastTopUp"] = {
            "amount": money.format_usd(newest.amount_nano),
            "time": status.rfc3339(newest.created_at),
            "entryId": newest.id,
        }

    state = wallet_reconciler.state_of(wallet)
    if state == "Empty" and previous_state != "Empty":
        events.wallet_empty(body, wallet.balance_nano)
    try:
        threshold = wallet_reconciler.WalletSpec.parse(spec).low_balance_nano
    except errors.InvalidSpec:
        threshold = None
    if (threshold is not None and 0 < wallet.balance_nano < threshold
            and (previous_balance is None or previous_balance >= threshold)):
        events.low_balance(body, wallet.balance_nano, threshold)


@kopf.timer(apikey_reconciler.GROUP, apikey_reconciler.VERSION, apikey_reconciler.PLURAL,
            id="apikey.status", interval=config.STATUS_INTERVAL_S, initial_delay=config.STATUS_INTERVAL_S)
async def mirror_apikey(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: logging.Logger,
                        **_: Any) -> None:
    """Expiry, suspension (e.g. by a Wallet's deletion) and the end of a grace period happen in
    PostgreSQL or by the clock; this shows them."""
    key_id = (body.get("status") or {}).get("keyId")
    if not key_id:
        return  # no key yet: the reconciler's condition says why
    try:
        async with db.transaction(memo.engine) as conn:
            owned = await wallets.keys_owned_by(conn, source=apikey_reconciler.SOURCE, external_id=body.metadata.uid)
    except errors.DatabaseUnavailable as exc:
        _synced(patch, body, exc)
        return
    _synced(patch, body, None)
    current = next((k for k in owned if k.id == key_id), None)
    if current is None:
        return
    now = dt.datetime.now(dt.timezone.utc)
    apikey_reconciler.write_status(patch, body, current, apikey_reconciler.in_grace(owned, current.id, now), now)
