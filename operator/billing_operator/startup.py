"""Operator-wide activities: settings, logging in, the database pool, and cleanup.

Why kopf's settings are changed here (and not left at kopf's defaults):
- Finalizer and bookkeeping annotations carry our own prefix (``billingproxy.io/…``), so
  ``kubectl get -o yaml`` says who put them there.
- Handler progress is kept in annotations only, never in ``.status``: the CRDs' structural
  schemas would prune kopf's ``status.kopf`` fields, and kopf would then complain of
  inconsistent patches. ``.status`` holds only what ``docs/operator.md`` describes.
- Events name the operator as their source (``billingproxy-operator``).
- Watches are restarted every few minutes, kopf's own advice against silently dead connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import kopf

from billing_operator import config, db, kube, stripe_reconciler

FINALIZER = "billingproxy.io/finalizer"
PREFIX = "billingproxy.io"
# kubernetes' HTTP client logs request URLs at DEBUG; urllib3 likewise. Bodies never, but keep
# their chatter out of the operator's log.
_QUIET_LOGGERS = ("kubernetes", "urllib3")


def configure(settings: kopf.OperatorSettings) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration")
    settings.posting.reporting_component = "billingproxy-operator"
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.networking.request_timeout = 60


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    configure(settings)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.getLogger(name).level, logging.INFO))
    cfg: config.OperatorConfig = memo.get("operator_config") or config.from_env()
    memo.operator_config = cfg
    memo.engine = db.create_engine(cfg.database_url, pool_size=cfg.db_pool_size)
    if cfg.stripe_secret_key:
        memo.stripe_task = asyncio.create_task(stripe_reconciler.run(memo.engine, cfg), name="stripe reconciliation")
    logger.info(
        f"billingproxy operator: status every {config.STATUS_INTERVAL_S:g} s, "
        f"retries after {cfg.retry_delay_s:g} s, default rotation grace {cfg.rotation_grace_s} s, "
        + (f"Stripe reconciled every {cfg.stripe_interval_s:g} s" if cfg.stripe_secret_key
           else "Stripe not configured (no reconciliation)")
    )


@kopf.on.login()
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    configuration = kube.load_configuration()
    cfg: config.OperatorConfig | None = memo.get("operator_config")
    memo.secrets = kube.Secrets(configuration, timeout_s=cfg.kube_timeout_s if cfg else 10.0)
    return kube.connection_info(configuration)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get("stripe_task")
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    engine = memo.get("engine")
    if engine is not None:
        await engine.dispose()
