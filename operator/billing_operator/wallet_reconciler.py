"""Wallet resources → wallet rows in PostgreSQL (source ``kubernetes``, external id = the UID).

Why the UID and not the name: a Wallet deleted and created again under the same name is a new
wallet with its own grant; the old one's ledger stays, as money records always do. And the UID is
what makes creation idempotent: however often the create handler runs (retries, two runs after
a restart midway), the UNIQUE external id and the grant's idempotency key
(``grant:kubernetes:<uid>``) leave one row and one grant.

Sharp edges:
- ``spec.suspended`` is applied when the wallet is created and when the field itself changes,
  never on resume: the column can be changed outside Kubernetes too (by hand, during an
  incident), and an operator restart must not quietly undo that. (A Stripe dispute holds a
  wallet with its own flag, ``disputed``, shown here as state ``Disputed``.)
- ``initialGrant`` is granted once, when the row is created; the CRD forbids changing it (CEL),
  and a change that got through anyway (an older CRD, kubectl --validate=false) is never granted.
- ``overdraftLimitUsd`` (how far below zero the balance may go) is applied like ``suspended``:
  when the wallet is created and when the field itself changes, never on resume — an admin may
  change the limit with ``billingproxy wallet set-overdraft``. Unset, it is the operator's
  default (``BILLINGPROXY_OVERDRAFT_LIMIT_USD``); removing it from the spec restores that default.
- Deleting a Wallet suspends it and all its keys (reversible, unlike revoking) and keeps every
  row: PostgreSQL is the record of money.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import kopf
from sqlalchemy.ext.asyncio import AsyncEngine

from billing import api_keys, money, wallets
from billing_operator import db, errors, events, settings as operator_settings, status

GROUP, VERSION, PLURAL = "billingproxy.io", "v1alpha1", "wallets"
SOURCE = "kubernetes"


@dataclasses.dataclass(frozen=True)
class WalletSpec:
    email: str
    grant_nano: int
    stripe_customer_id: str | None
    low_balance_nano: int | None
    suspended: bool
    # None: not declared (the operator's default applies).
    overdraft_limit_nano: int | None = None

    @classmethod
    def parse(cls, spec: Mapping[str, Any]) -> WalletSpec:
        """The spec as the operator needs it, or :class:`errors.InvalidSpec` naming the field."""
        try:
            email = wallets.normalize_email(spec.get("ownerEmail"))
        except wallets.EmailInvalid as exc:
            raise errors.InvalidSpec(f"spec.ownerEmail: {exc}") from None
        grant = _usd(spec, "initialGrant", operator_settings.INITIAL_GRANT_USD_DEFAULT)
        threshold = _usd(spec, "lowBalanceThreshold", None)
        customer = spec.get("stripeCustomerId")
        if customer is not None and (not isinstance(customer, str) or not customer.startswith("cus_")):
            raise errors.InvalidSpec(
                f"spec.stripeCustomerId: {customer!r} is not a Stripe customer id (cus_…)"
            )
        suspended = spec.get("suspended", False)
        if not isinstance(suspended, bool):
            raise errors.InvalidSpec(f"spec.suspended must be true or false, not {suspended!r}")
        overdraft = _usd(spec, "overdraftLimitUsd", None)
        if overdraft is not None:
            try:
                wallets.check_overdraft_limit(overdraft)
            except wallets.OverdraftLimitInvalid as exc:
                raise errors.InvalidSpec(f"spec.overdraftLimitUsd: {exc}") from None
        assert grant is not None
        return cls(email, grant, customer, threshold, suspended, overdraft)

    def overdraft_limit_or(self, default_nano: int) -> int:
        return default_nano if self.overdraft_limit_nano is None else self.overdraft_limit_nano


def _usd(spec: Mapping[str, Any], field: str, default: str | None) -> int | None:
    raw = spec.get(field, default)
    if raw is None:
        return None
    try:
        return money.parse_usd(raw)
    except money.MoneyError as exc:
        raise errors.InvalidSpec(f"spec.{field}: {exc}") from None


@dataclasses.dataclass(frozen=True)
class Outcome:
    wallet: wallets.Wallet
    created: bool
    switched: bool


async def ensure(
    engine: AsyncEngine,
    *,
    uid: str,
    spec: WalletSpec,
    apply_switch: bool,
    apply_overdraft: bool = False,
    overdraft_default_nano: int = 0,
) -> Outcome:
    """Make the wallet row match the spec. The work only: no status, no Events.

    ``apply_switch`` / ``apply_overdraft``: ``spec.suspended`` / ``spec.overdraftLimitUsd``
    changed, so the row follows it (a new row always does).
    """
    overdraft = spec.overdraft_limit_or(overdraft_default_nano)
    async with db.transaction(engine) as conn:
        try:
            wallet, created = await wallets.ensure_owned_wallet(
                conn,
                source=SOURCE,
                external_id=uid,
                grant_nano=spec.grant_nano,
                email=spec.email,
                stripe_customer_id=spec.stripe_customer_id,
                overdraft_limit_nano=overdraft,
            )
        except wallets.OwnedElsewhere:
            raise errors.NotOwned(
                f"a wallet with external id {uid} exists and is not managed by Kubernetes; left alone"
            ) from None
        changes: dict[str, object] = {}
        if wallet.email != spec.email:
            changes["email"] = spec.email
        if wallet.stripe_customer_id != spec.stripe_customer_id:
            changes["stripe_customer_id"] = spec.stripe_customer_id
        switched = (apply_switch or created) and wallet.suspended != spec.suspended
        if switched:
            changes["suspended"] = spec.suspended
        if apply_overdraft and wallet.overdraft_limit_nano != overdraft:
            changes["overdraft_limit_nano"] = overdraft
        if changes:
            updated = await wallets.update_owned_wallet(conn, source=SOURCE, external_id=uid, **changes)
            assert updated is not None, "the wallet was found in this very transaction"
            wallet = updated
    return Outcome(wallet=wallet, created=created, switched=switched)


async def release(engine: AsyncEngine, *, uid: str) -> tuple[str, int] | None:
    """On deletion: suspend the wallet and its keys; returns (wallet id, keys suspended)."""
    async with db.transaction(engine) as conn:
        wallet = await wallets.update_owned_wallet(conn, source=SOURCE, external_id=uid, suspended=True)
        if wallet is None:
            return None
        return wallet.id, await api_keys.suspend_keys_of_wallet(conn, wallet.id)


def crd_state(state: wallets.WalletState) -> str:
    """A :class:`wallets.WalletState` as the CRD's ``status.state`` spells it (``Active``, ``Empty``, …)."""
    return state.value.capitalize()


def state_of(wallet: wallets.Wallet) -> str:
    return crd_state(wallet.state)


def write_status(patch: kopf.Patch, body: Mapping[str, Any], wallet: wallets.Wallet) -> None:
    """Status fields mirrored from the row (also used by the status timer)."""
    fields = {
        "walletId": wallet.id,
        "balance": money.format_usd(wallet.balance_nano),
        "reserved": money.format_usd(wallet.reserved_nano),
        "overdraftLimit": money.format_usd(wallet.overdraft_limit_nano),
        "state": state_of(wallet),
    }
    current = body.get("status") or {}
    for key, value in fields.items():
        if current.get(key) != value:
            patch.status[key] = value


# --- kopf handlers ------------------------------------------------------------------------------


# What the index below holds, as the handlers that ask it see it.
WalletUids = kopf.Index[tuple[str | None, str], str]


@kopf.index(GROUP, VERSION, PLURAL)
def wallet_uids(
    namespace: str | None, name: str, uid: str, meta: kopf.Meta, **_: Any
) -> dict[tuple[str | None, str], str] | None:
    """(namespace, name) → UID, for ApiKeys to find their Wallet. Wallets being deleted are left
    out: a new key for a wallet on its way out would be suspended at once."""
    if meta.get("deletionTimestamp"):
        return None
    return {(namespace, name): uid}


async def _reconcile(
    *,
    body: kopf.Body,
    spec: Mapping[str, Any],
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: kopf.Logger,
    apply_switch: bool,
    apply_overdraft: bool = False,
) -> None:
    cfg: operator_settings.OperatorSettings = memo.operator_settings
    async with status.reconciling(patch=patch, body=body, retry_delay_s=cfg.retry_delay_s, logger=logger):
        desired = WalletSpec.parse(spec)
        outcome = await ensure(
            memo.engine,
            uid=body.metadata.uid,
            spec=desired,
            apply_switch=apply_switch,
            apply_overdraft=apply_overdraft,
            overdraft_default_nano=cfg.overdraft_limit_nano,
        )
    wallet = outcome.wallet
    write_status(patch, body, wallet)
    if body.metadata.get("generation") is not None:
        patch.status["observedGeneration"] = body.metadata["generation"]
    if outcome.created:
        events.wallet_created(body, wallet, desired.grant_nano)
    if outcome.switched and not outcome.created:
        events.wallet_switched(body, wallet)
    status.set_condition(
        patch,
        body,
        type=status.READY,
        ok=True,
        reason="Reconciled",
        message=f"wallet {wallet.id} matches the spec",
    )


@kopf.on.create(GROUP, VERSION, PLURAL, id="wallet.create")
async def on_create(
    body: kopf.Body, spec: kopf.Spec, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    await _reconcile(body=body, spec=spec, patch=patch, memo=memo, logger=logger, apply_switch=True)


@kopf.on.update(GROUP, VERSION, PLURAL, id="wallet.update")
async def on_update(
    body: kopf.Body,
    spec: kopf.Spec,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: kopf.Logger,
    diff: kopf.Diff,
    **_: Any,
) -> None:
    changed = {tuple(field[:2]) for _op, field, _old, _new in diff}
    await _reconcile(
        body=body,
        spec=spec,
        patch=patch,
        memo=memo,
        logger=logger,
        apply_switch=("spec", "suspended") in changed,
        apply_overdraft=("spec", "overdraftLimitUsd") in changed,
    )


@kopf.on.resume(GROUP, VERSION, PLURAL, id="wallet.resume")
async def on_resume(
    body: kopf.Body, spec: kopf.Spec, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    await _reconcile(body=body, spec=spec, patch=patch, memo=memo, logger=logger, apply_switch=False)


# In the per-object memo: the release of this object was announced.
RELEASE_ANNOUNCED = "wallet.released"


@kopf.on.delete(GROUP, VERSION, PLURAL, id="wallet.delete")
async def on_delete(
    body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    """Suspend the wallet and its keys; announce it once.

    kopf may run this again after it succeeded: while a timer of the object is still exiting it
    keeps the finalizer, forgets the handler's success, and runs it again on the next event
    (kopf issue #882). The work is idempotent; the Event is not, and the second run, finding the
    keys already suspended, would announce "0 key(s)". The per-object memo (one per object, kept
    until the object is gone) remembers that the release was announced.
    """
    cfg: operator_settings.OperatorSettings = memo.operator_settings
    async with status.reconciling(patch=patch, body=body, retry_delay_s=cfg.retry_delay_s, logger=logger):
        released = await release(memo.engine, uid=body.metadata.uid)
    if released is not None and not memo.get(RELEASE_ANNOUNCED):
        events.wallet_released(body, *released)
        memo[RELEASE_ANNOUNCED] = True
