"""ApiKey resources → a key: its plaintext in the named Secret, its hash in PostgreSQL.

The order is the point. The Secret is written first and PostgreSQL second, and every run starts
from what the Secret holds (:mod:`key_secrets`): so a crash, a lost status patch or a duplicate
run between the two steps finds the key in the Secret and records that very key, instead of
losing it or minting a second one. A key row never exists without its plaintext in the Secret,
except after the Secret was deleted, which the operator heals by issuing a replacement.

Rotation: raising ``spec.rotationGeneration`` puts a new key into the same Secret; every other
key of this ApiKey gets ``revoke_after = now + rotationGracePeriodSeconds`` in PostgreSQL, so
clients have the grace period to pick up the new Secret, and the old key stops working then
without the operator having to be up at that moment (the Check reads ``revoke_after``).

Deletion (finalizer): every key of the ApiKey is revoked in PostgreSQL, then its Secret is
deleted; the object goes only after both. The gateway's key cache (≤ 1 s) is the only delay.

Sharp edges:
- ``spec.suspended`` is applied on create and when it changes, never on resume: deleting a
  Wallet suspends its keys, and a restart must not quietly lift that.
- A Secret of that name that is not ours (no owner reference to this ApiKey) is never touched:
  the ApiKey waits (``SecretConflict``) until the name is free or changed.
- ``spec.spendLimit`` is applied to each of the ApiKey's working keys when it differs from
  theirs; each key counts its own spend, so a key in its rotation grace period and its successor
  may together spend up to twice the limit in that time.
- If the Wallet behind ``walletRef`` is replaced (deleted and created again: a new UID, a new
  wallet row), the ApiKey gets a new key on the new wallet and the old key is revoked at once.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Mapping
from typing import Any

import kopf
from sqlalchemy.ext.asyncio import AsyncEngine

from billing import api_keys, key_format, key_limits, money, wallets
from billing_operator import (
    db,
    errors,
    events,
    key_secrets,
    kube,
    settings as operator_settings,
    status,
    wallet_reconciler,
)

GROUP, VERSION, PLURAL = "billingproxy.io", "v1alpha1", "apikeys"
SOURCE = "kubernetes"
# RFC 1123 subdomain, what Kubernetes accepts as a Secret or Wallet name.
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
NAME_LENGTH_MAX = 253
MODELS_MAX = 100
MODEL_LENGTH_MAX = 200
ROTATION_GENERATION_MAX = 2**53


@dataclasses.dataclass(frozen=True)
class ApiKeySpec:
    wallet_name: str
    secret_name: str
    allowed_models: list[str] | None
    expires_at: dt.datetime | None
    suspended: bool
    rotation_generation: int
    grace_s: int
    # (limit in nano-USD, window), or None: no limit.
    spend_limit: tuple[int, key_limits.Window] | None = None

    @classmethod
    def parse(cls, spec: Mapping[str, Any], *, default_grace_s: int) -> ApiKeySpec:
        """The spec as the operator needs it, or :class:`errors.InvalidSpec` naming the field."""
        wallet_name = _object_name("spec.walletRef.name", (spec.get("walletRef") or {}).get("name"))
        secret_name = _object_name("spec.secretName", spec.get("secretName"))
        models = spec.get("allowedModels")
        if models is not None:
            if (
                not isinstance(models, list)
                or not 1 <= len(models) <= MODELS_MAX
                or not all(isinstance(m, str) and 1 <= len(m) <= MODEL_LENGTH_MAX for m in models)
            ):
                raise errors.InvalidSpec(
                    f"spec.allowedModels must list 1 to {MODELS_MAX} model names (omit it to allow any model)"
                )
            models = sorted(set(models))
        expires_at = _timestamp(spec.get("expiresAt"))
        suspended = spec.get("suspended", False)
        if not isinstance(suspended, bool):
            raise errors.InvalidSpec(f"spec.suspended must be true or false, not {suspended!r}")
        generation = spec.get("rotationGeneration", 0)
        if (
            not isinstance(generation, int)
            or isinstance(generation, bool)
            or not 0 <= generation <= ROTATION_GENERATION_MAX
        ):
            raise errors.InvalidSpec(
                f"spec.rotationGeneration must be a whole number ≥ 0, not {generation!r}"
            )
        grace = spec.get("rotationGracePeriodSeconds", default_grace_s)
        if (
            not isinstance(grace, int)
            or isinstance(grace, bool)
            or not 0 <= grace <= operator_settings.ROTATION_GRACE_S_MAX
        ):
            grace_max = operator_settings.ROTATION_GRACE_S_MAX
            raise errors.InvalidSpec(
                f"spec.rotationGracePeriodSeconds must be 0 to {grace_max}, not {grace!r}"
            )
        return cls(
            wallet_name, secret_name, models, expires_at, suspended, generation, grace, _spend_limit(spec)
        )


def _spend_limit(spec: Mapping[str, Any]) -> tuple[int, key_limits.Window] | None:
    raw = spec.get("spendLimit")
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise errors.InvalidSpec(f'spec.spendLimit must be {{usd: "5.00", window: monthly}}, not {raw!r}')
    try:
        return key_limits.parse(dict(raw))
    except key_limits.InvalidLimit as exc:
        raise errors.InvalidSpec(f"spec.spendLimit.{exc.param}: {exc}") from None


def _object_name(field: str, value: object) -> str:
    if not isinstance(value, str) or len(value) > NAME_LENGTH_MAX or not _NAME.fullmatch(value):
        raise errors.InvalidSpec(f"{field} must be a Kubernetes object name (RFC 1123), not {value!r}")
    return value


def _namespace(body: kopf.Body) -> str:
    namespace = body.metadata.namespace
    assert namespace is not None, "ApiKey is a namespaced resource"
    return namespace


def _timestamp(value: object) -> dt.datetime | None:
    if value is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise errors.InvalidSpec(
            f"spec.expiresAt must be an RFC 3339 time such as 2027-01-31T00:00:00Z, not {value!r}"
        )
    return moment


@dataclasses.dataclass(frozen=True)
class Outcome:
    current: api_keys.KeyRecord
    # The current key reached PostgreSQL in this run (it may have reached the Secret in an
    # earlier, interrupted one); ``first`` when the ApiKey had no other key before it.
    recorded_now: bool
    first: bool
    # Earlier keys of this ApiKey still inside their grace period.
    superseded: list[api_keys.KeyRecord]
    # The current key's spend limit as of this run (None: no limit).
    limit: key_limits.KeyLimit | None = None


def wallet_uid(index: wallet_reconciler.WalletUids, namespace: str, name: str) -> str:
    found = list(index.get((namespace, name)) or [])
    if not found:
        raise errors.Waiting(f"no Wallet {name!r} in namespace {namespace!r} (yet)", reason="WalletNotFound")
    return found[0]


async def ensure(
    engine: AsyncEngine,
    secrets: kube.Secrets,
    *,
    owner: kopf.Body,
    wallet_uid: str,
    spec: ApiKeySpec,
    apply_switch: bool,
) -> Outcome:
    """Make the Secret and the key rows match the spec. The work only: no status, no Events."""
    uid, namespace = owner.metadata.uid, _namespace(owner)
    async with db.transaction(engine) as conn:
        wallet = await wallets.find_owned_wallet(conn, source=SOURCE, external_id=wallet_uid)
        before = await api_keys.keys_owned_by(conn, source=SOURCE, external_id=uid)
    if wallet is None:
        raise errors.Waiting(
            f"Wallet {spec.wallet_name!r} has no wallet in PostgreSQL yet", reason="WalletNotReady"
        )

    secret = await secrets.read(namespace, spec.secret_name)
    if secret is not None and key_secrets.owner_uid(secret) != uid:
        whose = "another ApiKey's" if key_secrets.is_managed(secret) else "not managed by the operator"
        raise errors.Waiting(
            f"Secret {spec.secret_name!r} exists and is {whose}; it is left alone. Choose another "
            "secretName or delete that Secret",
            reason="SecretConflict",
        )
    stored = key_secrets.read(secret) if secret is not None else None
    stored_row = next((k for k in before if stored and stored.issued and k.id == stored.issued.key_id), None)
    wallet_replaced = stored_row is not None and stored_row.wallet_id != wallet.id
    issue = (
        stored is None
        or stored.issued is None
        or stored.generation != spec.rotation_generation
        or wallet_replaced
    )
    if issue:
        issued = key_format.generate()
        if secret is None:
            body = key_secrets.build(
                owner=owner,
                secret_name=spec.secret_name,
                wallet_name=spec.wallet_name,
                issued=issued,
                generation=spec.rotation_generation,
            )
            try:
                await secrets.create(namespace, body)
            except kube.AlreadyExists:
                raise errors.Waiting(
                    f"Secret {spec.secret_name!r} appeared meanwhile; looking again",
                    reason="SecretConflict",
                    delay_s=1.0,
                ) from None
        else:
            await secrets.patch(
                namespace,
                spec.secret_name,
                key_secrets.rotation_patch(
                    owner=owner,
                    wallet_name=spec.wallet_name,
                    issued=issued,
                    generation=spec.rotation_generation,
                ),
            )
    else:
        assert stored is not None and stored.issued is not None
        issued = stored.issued

    grace = dt.timedelta(0) if wallet_replaced else dt.timedelta(seconds=spec.grace_s)
    async with db.transaction(engine) as conn:
        try:
            record, recorded_now = await api_keys.record_key(
                conn,
                issued=issued,
                wallet_id=wallet.id,
                source=SOURCE,
                external_id=uid,
                allowed_models=spec.allowed_models,
                expires_at=spec.expires_at,
                suspended=spec.suspended,
            )
        except api_keys.KeyConflict as exc:
            raise errors.ReconcileError(str(exc), reason="KeyConflict") from None
        changes: dict[str, object] = {"allowed_models": spec.allowed_models, "expires_at": spec.expires_at}
        if apply_switch:
            changes["suspended"] = spec.suspended
        await api_keys.update_owned_keys(conn, source=SOURCE, external_id=uid, **changes)
        await api_keys.schedule_revocation(
            conn, source=SOURCE, external_id=uid, keep_key_id=record.id, after=grace
        )
        after = await api_keys.keys_owned_by(conn, source=SOURCE, external_id=uid)
        for key in after:
            if key.revoked_at is None:
                await key_limits.apply(conn, key.id, spec.spend_limit)
        limit = await key_limits.limit_of(conn, record.id)
    now = dt.datetime.now(dt.UTC)
    current = next(k for k in after if k.id == record.id)
    return Outcome(
        current=current,
        recorded_now=recorded_now,
        first=not any(k.id != record.id for k in before),
        superseded=in_grace(after, current.id, now),
        limit=limit,
    )


def in_grace(
    records: list[api_keys.KeyRecord], current_id: str, now: dt.datetime
) -> list[api_keys.KeyRecord]:
    return [
        k
        for k in records
        if k.id != current_id and k.revoked_at is None and k.revoke_after is not None and k.revoke_after > now
    ]


async def revoke(engine: AsyncEngine, secrets: kube.Secrets, *, owner: kopf.Body) -> list[api_keys.KeyRecord]:
    """On deletion: revoke every key of the ApiKey, then delete its Secret (if it is ours).

    Returns every key of the ApiKey, all revoked now: also those an earlier attempt revoked
    (before its Secret call failed, or before kopf ran the handler again), so the Event names them.
    """
    uid, namespace = owner.metadata.uid, _namespace(owner)
    async with db.transaction(engine) as conn:
        await api_keys.revoke_owned_keys(conn, source=SOURCE, external_id=uid)
        revoked = await api_keys.keys_owned_by(conn, source=SOURCE, external_id=uid)
    secret_name = owner.spec.get("secretName")
    if isinstance(secret_name, str) and _NAME.fullmatch(secret_name):
        secret = await secrets.read(namespace, secret_name)
        if secret is not None and key_secrets.owner_uid(secret) == uid:
            await secrets.delete(namespace, secret_name, uid=secret["metadata"].get("uid"))
    return revoked


def state_of(record: api_keys.KeyRecord, now: dt.datetime) -> str:
    return {None: "Active", "revoked": "Revoked", "suspended": "Suspended", "expired": "Expired"}[
        record.refusal(now)
    ]


def _revoke_after(record: api_keys.KeyRecord) -> dt.datetime:
    assert record.revoke_after is not None, "a superseded key has its revocation time (in_grace)"
    return record.revoke_after


def write_status(
    patch: kopf.Patch,
    body: Mapping[str, Any],
    current: api_keys.KeyRecord,
    superseded: list[api_keys.KeyRecord],
    now: dt.datetime,
    limit: key_limits.KeyLimit | None = None,
) -> None:
    """Status fields from the rows (also used by the status timer)."""
    previous = max(superseded, key=_revoke_after) if superseded else None
    reset = limit.resets_at if limit is not None else None
    fields: dict[str, object] = {
        "spentUsd": money.format_usd(limit.spent_nano) if limit is not None else None,
        "resetsAt": status.rfc3339(reset) if reset is not None else None,
        "keyId": current.id,
        "keyPrefix": current.display_prefix,
        "walletId": current.wallet_id,
        "state": state_of(current, now),
        "previousKeyId": previous.id if previous else None,
        "previousKeyRevokeAt": status.rfc3339(previous.revoke_after) if previous else None,
    }
    existing = body.get("status") or {}
    for key, value in fields.items():
        if existing.get(key) != value:
            patch.status[key] = value


# --- kopf handlers ------------------------------------------------------------------------------


async def _reconcile(
    *,
    body: kopf.Body,
    spec: Mapping[str, Any],
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: kopf.Logger,
    wallet_uids: wallet_reconciler.WalletUids,
    apply_switch: bool,
) -> None:
    cfg: operator_settings.OperatorSettings = memo.operator_settings
    async with status.reconciling(patch=patch, body=body, retry_delay_s=cfg.retry_delay_s, logger=logger):
        desired = ApiKeySpec.parse(spec, default_grace_s=cfg.rotation_grace_s)
        owner_uid = wallet_uid(wallet_uids, _namespace(body), desired.wallet_name)
        outcome = await ensure(
            memo.engine,
            memo.secrets,
            owner=body,
            wallet_uid=owner_uid,
            spec=desired,
            apply_switch=apply_switch,
        )
    now = dt.datetime.now(dt.UTC)
    write_status(patch, body, outcome.current, outcome.superseded, now, outcome.limit)
    patch.status["rotationGeneration"] = desired.rotation_generation
    if body.metadata.get("generation") is not None:
        patch.status["observedGeneration"] = body.metadata["generation"]
    if outcome.recorded_now and outcome.first:
        events.key_issued(body, outcome.current, desired.secret_name)
    elif outcome.recorded_now:
        events.key_rotated(body, outcome.current, desired.secret_name, outcome.superseded)
    status.set_condition(
        patch,
        body,
        type=status.READY,
        ok=True,
        reason="KeyIssued",
        message=f"key {outcome.current.id} is in Secret {desired.secret_name}",
    )


@kopf.on.create(  # type: ignore[arg-type]  # kopf passes the index wallet_uids; ChangingFn lacks it
    GROUP, VERSION, PLURAL, id="apikey.create"
)
async def on_create(
    body: kopf.Body,
    spec: kopf.Spec,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: kopf.Logger,
    wallet_uids: wallet_reconciler.WalletUids,
    **_: Any,
) -> None:
    await _reconcile(
        body=body,
        spec=spec,
        patch=patch,
        memo=memo,
        logger=logger,
        wallet_uids=wallet_uids,
        apply_switch=True,
    )


@kopf.on.update(  # type: ignore[arg-type]  # kopf passes the index wallet_uids; ChangingFn lacks it
    GROUP, VERSION, PLURAL, id="apikey.update"
)
async def on_update(
    body: kopf.Body,
    spec: kopf.Spec,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: kopf.Logger,
    wallet_uids: wallet_reconciler.WalletUids,
    diff: kopf.Diff,
    **_: Any,
) -> None:
    switch_changed = any(tuple(field[:2]) == ("spec", "suspended") for _op, field, _old, _new in diff)
    await _reconcile(
        body=body,
        spec=spec,
        patch=patch,
        memo=memo,
        logger=logger,
        wallet_uids=wallet_uids,
        apply_switch=switch_changed,
    )


@kopf.on.resume(  # type: ignore[arg-type]  # kopf passes the index wallet_uids; ChangingFn lacks it
    GROUP, VERSION, PLURAL, id="apikey.resume"
)
async def on_resume(
    body: kopf.Body,
    spec: kopf.Spec,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: kopf.Logger,
    wallet_uids: wallet_reconciler.WalletUids,
    **_: Any,
) -> None:
    await _reconcile(
        body=body,
        spec=spec,
        patch=patch,
        memo=memo,
        logger=logger,
        wallet_uids=wallet_uids,
        apply_switch=False,
    )


# In the per-object memo: the revocation of this object's keys was announced.
REVOCATION_ANNOUNCED = "apikey.revoked"


@kopf.on.delete(GROUP, VERSION, PLURAL, id="apikey.delete")
async def on_delete(
    body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    """Revoke the keys and delete the Secret; announce it once (kopf may run this again after
    it succeeded, see ``wallet_reconciler.on_delete``)."""
    cfg: operator_settings.OperatorSettings = memo.operator_settings
    async with status.reconciling(patch=patch, body=body, retry_delay_s=cfg.retry_delay_s, logger=logger):
        revoked = await revoke(memo.engine, memo.secrets, owner=body)
    if not memo.get(REVOCATION_ANNOUNCED):
        events.key_revoked(body, revoked)
        memo[REVOCATION_ANNOUNCED] = True
