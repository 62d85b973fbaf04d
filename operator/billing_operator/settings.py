"""The operator's own settings, read once from the environment and checked.

The database comes from the core settings (``DATABASE_URL``, :mod:`billing.settings`); what only
the operator needs is named here, ``BILLINGPROXY_OPERATOR_*``, with its default and unit.

Sharp edge: kopf fixes a timer's interval when the handler is registered, i.e. when
``billing_operator`` is imported, not when the operator starts. So the one setting that shapes a
decorator, :data:`STATUS_INTERVAL_S`, is read at import time; everything else is read by
:func:`from_env` when the operator starts (and an error there stops it with a clear message).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from billing import settings as settings_mod

ENV_PREFIX = "BILLINGPROXY_OPERATOR_"

# -- how often balance, reserved and state are copied from PostgreSQL into each status (seconds).
STATUS_INTERVAL_S_DEFAULT = 10.0
# -- rotation grace when an ApiKey does not say (the CRD's default for rotationGracePeriodSeconds).
ROTATION_GRACE_S_DEFAULT = 3600
# -- the initial grant of a Wallet that does not say (the CRD's default for initialGrant).
INITIAL_GRANT_USD_DEFAULT = "0.50"
ROTATION_GRACE_S_MAX = 30 * 24 * 3600


def _float(env: Mapping[str, str], name: str, default: float, lo: float, hi: float) -> float:
    raw = env.get(ENV_PREFIX + name, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise settings_mod.SettingsError(
            f"{ENV_PREFIX}{name} must be a number of seconds such as 10 or 0.5, not {raw!r}"
        ) from None
    if not lo <= value <= hi:
        raise settings_mod.SettingsError(f"{ENV_PREFIX}{name} must be between {lo} and {hi}, not {raw}")
    return value


def _status_interval_s(env: Mapping[str, str]) -> float:
    return _float(env, "STATUS_INTERVAL_S", STATUS_INTERVAL_S_DEFAULT, 0.1, 3600)


STATUS_INTERVAL_S = _status_interval_s(os.environ)


@dataclasses.dataclass(frozen=True)
class OperatorSettings:
    # -- PostgreSQL URL (the record of money); from DATABASE_URL.
    database_url: str
    # -- how long a handler waits before retrying when PostgreSQL or the Kubernetes API is
    #    unreachable, or a referenced Wallet is not there yet.
    retry_delay_s: float = 10.0
    # -- ApiKey rotation grace when the resource does not set rotationGracePeriodSeconds.
    rotation_grace_s: int = ROTATION_GRACE_S_DEFAULT
    # -- namespaces to watch (`billingproxy operator` only; `kopf run` takes -n/-A). Empty: all.
    namespaces: tuple[str, ...] = ()
    # -- kopf peering object for running several replicas with one active (`billingproxy
    #    operator` only; `kopf run` takes --peering). Empty: standalone.
    peering: str = ""
    # -- kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz. Empty: none.
    liveness_url: str = ""
    # -- timeout of one Kubernetes API call for Secrets (seconds).
    kube_timeout_s: float = 10.0
    # -- PostgreSQL connections the operator may hold.
    db_pool_size: int = 4
    # -- top-up Events emitted per wallet per status tick at most (the rest follow next tick).
    top_up_events_max: int = 20
    # -- Stripe (from STRIPE_SECRET_KEY / STRIPE_API_BASE): empty key, no reconciliation.
    stripe_secret_key: str = dataclasses.field(default="", repr=False)
    stripe_api_base: str = ""
    # -- how often paid Checkout Sessions are reconciled against the ledger (seconds).
    stripe_interval_s: float = 300.0
    # -- open Checkout Sessions looked up in Stripe per round at most.
    stripe_sessions_max: int = 100
    # -- overdraft limit of a Wallet that sets no overdraftLimitUsd, in nano-USD; from
    #    BILLINGPROXY_OVERDRAFT_LIMIT_USD (the core setting, shared with every non-signup wallet).
    overdraft_limit_nano: int = settings_mod.Settings.overdraft_limit_nano
    # -- failed auto-recharges in a row that pause a wallet's auto-recharge, from
    #    BILLINGPROXY_AUTO_RECHARGE_FAILURES_MAX (the core setting the sidecars read: a failure the
    #    reconciler finds counts as one the webhook brings).
    auto_recharge_failures_max: int = settings_mod.Settings.auto_recharge_failures_max


def from_env(
    env: Mapping[str, str] | None = None, *, settings: settings_mod.Settings | None = None
) -> OperatorSettings:
    env = os.environ if env is None else env
    settings = settings if settings is not None else settings_mod.from_env(env)
    if not settings.database_url:
        raise settings_mod.SettingsError(
            "the operator needs DATABASE_URL (postgresql://user:password@host:5432/billingproxy)"
        )
    grace_raw = env.get(ENV_PREFIX + "ROTATION_GRACE_S", "")
    try:
        grace = int(grace_raw) if grace_raw else ROTATION_GRACE_S_DEFAULT
    except ValueError:
        raise settings_mod.SettingsError(
            f"{ENV_PREFIX}ROTATION_GRACE_S must be a whole number of seconds, not {grace_raw!r}"
        ) from None
    if not 0 <= grace <= ROTATION_GRACE_S_MAX:
        raise settings_mod.SettingsError(
            f"{ENV_PREFIX}ROTATION_GRACE_S must be between 0 and {ROTATION_GRACE_S_MAX}, not {grace}"
        )
    namespaces = tuple(n.strip() for n in env.get(ENV_PREFIX + "NAMESPACES", "").split(",") if n.strip())
    return OperatorSettings(
        database_url=settings.database_url,
        retry_delay_s=_float(env, "RETRY_DELAY_S", 10.0, 0.05, 3600),
        rotation_grace_s=grace,
        namespaces=namespaces,
        peering=env.get(ENV_PREFIX + "PEERING", "").strip(),
        liveness_url=env.get(ENV_PREFIX + "LIVENESS_URL", "").strip(),
        kube_timeout_s=_float(env, "KUBE_TIMEOUT_S", 10.0, 0.1, 300),
        stripe_secret_key=settings.stripe_secret_key,
        stripe_api_base=settings.stripe_api_base,
        stripe_interval_s=_float(env, "STRIPE_INTERVAL_S", 300.0, 0.1, 86_400),
        overdraft_limit_nano=settings.overdraft_limit_nano,
        auto_recharge_failures_max=settings.auto_recharge_failures_max,
    )
