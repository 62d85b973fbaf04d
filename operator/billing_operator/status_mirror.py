"""Timers that copy PostgreSQL's truth into ``.status``, and post the Events it implies.

Why timers and not notifications: balances change with every request (the sidecar settles them)
and with top-ups (the Stripe webhook), neither of which knows about Kubernetes. A status that is
at most ``BILLINGPROXY_OPERATOR_STATUS_INTERVAL_S`` old is what ``kubectl get`` needs, and it
costs one indexed read per object per tick. The status is never the record: PostgreSQL is.

Events come from comparing the new reading with the previous one (this operator's last reading,
or after a restart the one last written to the status):
- ``TopUp`` for every ``topup`` or ``credit`` ledger entry newer than ``status.lastTopUp.entryId``
  (a cursor, so each top-up is announced once even across restarts);
- ``WalletEmpty`` when the state becomes ``Empty``; ``LowBalance`` when the balance first drops
  below ``spec.lowBalanceThreshold``;
- one Event per alert event of the wallet (``AutoRechargeSucceeded``, ``AutoRechargeFailed``,
  ``AutoRechargePaused``, ``KeyLimitReached``, and ``LowBalance`` for a Wallet without
  ``spec.lowBalanceThreshold``), taken from ``alert_events`` and marked posted in PostgreSQL in
  the tick's transaction, so two operators or a restart post each once
  (docs/decisions/0036-alert-mail-and-events.md).

A failed reading (PostgreSQL away) flips the ``Synced`` condition to False once, rather than
posting an error every tick; the next good reading flips it back.

A tick runs beside the handlers of its object, and kopf may ask it to stop at any moment:

- **One view per tick.** kopf's ``body`` is live: it is replaced in place whenever the object's
  next watch event is processed, also in the middle of a tick. A tick that chose the current
  key from the status it saw first and compared its reading with the status it saw later wrote
  the old key back over a rotation the handler had just written. Each tick takes one snapshot
  when it starts and decides everything from it.
- **What was announced is remembered here.** The tick's own status write reaches kopf's body
  only with the watch event it causes, which may come after the next tick on a busy machine; a
  tick deciding "first time Empty" or "new top-ups since the cursor" from the status alone
  could announce the same fact twice. The per-object memo keeps what this operator last read
  and announced; the status (the cursor survives restarts) is the fallback.
- **No timer while the operator stops** (``startup.Lifecycle``): the timers' ``when`` filter keeps
  kopf from spawning them again while it winds down, and a tick that starts then does nothing.
  (The objects keep their finalizer meanwhile: the deletion handlers require it on their own.)
- **A tick stops when asked** (:func:`until_stopped`). When the object is deleted or the
  operator stops, kopf sets ``stopped`` and waits for the timer (``startup.TIMER_EXIT_TIMEOUT_S``).
  A tick waiting for PostgreSQL gives up its query and writes nothing; the status of an object
  being deleted, or of an operator stopping, can wait for the next reading.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

import kopf
from sqlalchemy.ext.asyncio import AsyncEngine

from billing import alerts, api_keys, key_limits, ledger, money, wallets
from billing_operator import (
    apikey_reconciler,
    db,
    errors,
    events,
    settings as operator_settings,
    status,
    wallet_reconciler,
)

T = TypeVar("T")
TOP_UP_KINDS = frozenset({"topup", "credit"})
# This operator's last reading of a wallet, in its per-object memo (see the module docstring).
_LAST_READING = "status_mirror.wallet"
# The key and window whose spend limit this operator last announced as reached.
_LIMIT_ANNOUNCED = "status_mirror.key_limit"


class Stopped(Exception):
    """The timer was asked to stop while its tick was waiting."""


async def until_stopped(stopped: kopf.DaemonStopped, work: Coroutine[Any, Any, T]) -> T:
    """``await work``, unless the timer is asked to stop first: then cancel it and raise Stopped.

    Cancelling rolls the tick's transaction back and returns its connection to the pool before
    this returns, so nothing of the tick outlives the timer.
    """
    if stopped:
        work.close()
        raise Stopped
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(stopped.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if task.cancelled():
        raise Stopped
    error = task.exception()
    if error is not None:
        if stopped:
            raise Stopped from error
        raise error
    return task.result()


def _operator_running(memo: kopf.Memo, **_: Any) -> bool:
    lifecycle = memo.get("lifecycle")
    return lifecycle is None or not lifecycle.stopping


def _snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(dict(body))


def _previous_balance(seen: Mapping[str, Any]) -> int | None:
    raw = (seen.get("status") or {}).get("balance")
    try:
        return money.parse_usd(raw, allow_negative=True) if isinstance(raw, str) else None
    except money.MoneyError:
        return None


def _synced(patch: kopf.Patch, seen: Mapping[str, Any], error: errors.ReconcileError | None) -> None:
    if error is None:
        status.set_condition(
            patch,
            seen,
            type=status.SYNCED,
            ok=True,
            reason="Mirrored",
            message="balance and state are mirrored from PostgreSQL",
        )
    else:
        status.set_condition(
            patch, seen, type=status.SYNCED, ok=False, reason=error.reason, message=error.message
        )


async def _read_wallet(
    engine: AsyncEngine, uid: str, cursor: int, limit: int, announced: list[alerts.EventType]
) -> tuple[wallets.Wallet | None, list[ledger.Entry], list[alerts.Announcement]]:
    async with db.transaction(engine) as conn:
        wallet = await wallets.find_owned_wallet(conn, source=wallet_reconciler.SOURCE, external_id=uid)
        if wallet is None:
            return None, [], []
        top_ups = await ledger.entries_after(
            conn, wallet.id, after_entry_id=cursor, kinds=TOP_UP_KINDS, limit=limit
        )
        # Taken (marked posted) in this transaction: committed before they are posted, so two
        # operators, or this one after a restart, post each once.
        news = await alerts.take_announcements(conn, uid, types=announced)
    return wallet, top_ups, news


def _announced(seen: Mapping[str, Any]) -> list[alerts.EventType]:
    """The alert types posted from alert_events. A balance crossing only when the spec declares
    no lowBalanceThreshold: then LowBalance comes from the alert thresholds, else from the
    spec's own, as before (one source per reason)."""
    types: list[alerts.EventType] = [t for t in events.ALERT_REASONS if t != alerts.EventType.BALANCE_LOW]
    try:
        threshold = wallet_reconciler.WalletSpec.parse(seen.get("spec") or {}).low_balance_nano
    except errors.InvalidSpec:
        threshold = None
    return types if threshold is not None else [alerts.EventType.BALANCE_LOW, *types]


@kopf.timer(  # type: ignore[arg-type]  # kopf passes timers `stopped` too; TimerFn lacks it
    wallet_reconciler.GROUP,
    wallet_reconciler.VERSION,
    wallet_reconciler.PLURAL,
    id="wallet.status",
    interval=operator_settings.STATUS_INTERVAL_S,
    initial_delay=operator_settings.STATUS_INTERVAL_S,
    when=_operator_running,
)
async def mirror_wallet(
    body: kopf.Body,
    patch: kopf.Patch,
    memo: kopf.Memo,
    stopped: kopf.DaemonStopped,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    if not _operator_running(memo):
        return
    cfg: operator_settings.OperatorSettings = memo.operator_settings
    seen = _snapshot(body)
    last_status = seen.get("status") or {}
    last_read: dict[str, Any] = memo.setdefault(_LAST_READING, {})
    last = last_status.get("lastTopUp") or {}
    cursor = max(
        last.get("entryId") if isinstance(last.get("entryId"), int) else 0, last_read.get("entry_id", 0)
    )
    try:
        wallet, top_ups, news = await until_stopped(
            stopped,
            _read_wallet(
                memo.engine, seen["metadata"]["uid"], cursor, cfg.top_up_events_max, _announced(seen)
            ),
        )
    except Stopped:
        return
    except errors.DatabaseUnavailable as exc:
        _synced(patch, seen, exc)
        return
    if wallet is None:
        return  # not created yet (or its create failed): the reconciler's condition says why
    _synced(patch, seen, None)

    previous_state = last_read.get("state", last_status.get("state"))
    previous_balance = last_read.get("balance_nano", _previous_balance(seen))
    wallet_reconciler.write_status(patch, seen, wallet)
    # Events name the object by kind, name and uid, which are the same in every view of it.
    for entry in top_ups:
        events.top_up(body, entry)
    if top_ups:
        newest = top_ups[-1]
        last_read["entry_id"] = newest.id
        patch.status["lastTopUp"] = {
            "amount": money.format_usd(newest.amount_nano),
            "time": status.rfc3339(newest.created_at),
            "entryId": newest.id,
        }

    for news_item in news:
        events.alert(body, news_item)

    state = wallet_reconciler.state_of(wallet)
    if state == "Empty" and previous_state != "Empty":
        events.wallet_empty(body, wallet.balance_nano)
    try:
        threshold = wallet_reconciler.WalletSpec.parse(seen.get("spec") or {}).low_balance_nano
    except errors.InvalidSpec:
        threshold = None
    if (
        threshold is not None
        and 0 < wallet.balance_nano < threshold
        and (previous_balance is None or previous_balance >= threshold)
    ):
        events.low_balance(body, wallet.balance_nano, threshold)
    last_read.update(state=state, balance_nano=wallet.balance_nano)


async def _read_keys(
    engine: AsyncEngine, uid: str, key_id: str
) -> tuple[list[api_keys.KeyRecord], key_limits.KeyLimit | None]:
    async with db.transaction(engine) as conn:
        owned = await api_keys.keys_owned_by(conn, source=apikey_reconciler.SOURCE, external_id=uid)
        return owned, await key_limits.limit_of(conn, key_id)


@kopf.timer(  # type: ignore[arg-type]  # kopf passes timers `stopped` too; TimerFn lacks it
    apikey_reconciler.GROUP,
    apikey_reconciler.VERSION,
    apikey_reconciler.PLURAL,
    id="apikey.status",
    interval=operator_settings.STATUS_INTERVAL_S,
    initial_delay=operator_settings.STATUS_INTERVAL_S,
    when=_operator_running,
)
async def mirror_apikey(
    body: kopf.Body,
    patch: kopf.Patch,
    memo: kopf.Memo,
    stopped: kopf.DaemonStopped,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """Expiry, suspension (e.g. by a Wallet's deletion) and the end of a grace period happen in
    PostgreSQL or by the clock; this shows them."""
    if not _operator_running(memo):
        return
    seen = _snapshot(body)
    key_id = (seen.get("status") or {}).get("keyId")
    if not key_id:
        return  # no key yet: the reconciler's condition says why
    try:
        owned, limit = await until_stopped(stopped, _read_keys(memo.engine, seen["metadata"]["uid"], key_id))
    except Stopped:
        return
    except errors.DatabaseUnavailable as exc:
        _synced(patch, seen, exc)
        return
    _synced(patch, seen, None)
    current = next((k for k in owned if k.id == key_id), None)
    if current is None:
        return
    now = dt.datetime.now(dt.UTC)
    apikey_reconciler.write_status(
        patch, seen, current, apikey_reconciler.in_grace(owned, current.id, now), now, limit
    )
    if limit is not None and limit.spent_nano >= limit.limit_nano:
        # Once per window: what this operator announced is remembered (the status cannot say it).
        window = key_limits.iso(limit.window_start)
        if memo.get(_LIMIT_ANNOUNCED) != (current.id, window):
            events.key_limit_reached(body, current, limit)
            memo[_LIMIT_ANNOUNCED] = (current.id, window)
