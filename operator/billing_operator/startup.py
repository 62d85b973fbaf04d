"""Operator-wide activities: settings, logging in, the database pool, and cleanup.

Why kopf's settings are changed here (and not left at kopf's defaults):
- Finalizer and bookkeeping annotations carry our own prefix (``billingproxy.io/…``), so
  ``kubectl get -o yaml`` says who put them there.
- Handler progress is kept in annotations only, never in ``.status``: the CRDs' structural
  schemas would prune kopf's ``status.kopf`` fields, and kopf would then complain of
  inconsistent patches. ``.status`` holds only what ``docs/operator.md`` describes.
- Events name the operator as their source (``billingproxy-operator``).
- Watches are restarted every few minutes, kopf's own advice against silently dead connections.
- Timers get time to finish the tick they are in when asked to stop (:data:`TIMER_EXIT_TIMEOUT_S`).
  kopf's default gives a timer ten zero-time event-loop cycles, which a tick waiting for
  PostgreSQL or for its status write never meets. Then, when the object is being deleted, kopf
  keeps the finalizer and looks again only after ``cancellation_polling``, 60 s by default, so a
  deleted Wallet or ApiKey lingered for a minute (unless some other write happened to wake kopf
  up); and when the operator stops, kopf leaves the timer running ("orphaned") and runs the
  cleanup anyway: the tick then finished on a disposed pool and a closed API session and opened
  new connections that nobody closed. The ticks stop promptly (``status_mirror``), this gives
  them the time to, and the polling interval bounds the wait if one still does not.
- :class:`Lifecycle` says when the operator is stopping. kopf stops the timers it knows of when
  it exits, but its workers go on draining their queued events for a moment, and each event
  spawns the object's timer again (kopf guards against this when pausing for peering, not when
  exiting). That new timer is never stopped: it ticked on after the cleanup, on a re-created
  pool, until kopf cancelled it 5 s later. Timers are not spawned, and ticks do nothing, once
  ``Lifecycle.stopping`` is set: by :func:`runner.run` as soon as a stop is asked for (before
  kopf sees it), and by the cleanup in any case (``kopf run`` stops on signals we do not see).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any

import kopf

from billing_operator import db, kube, settings as operator_settings, stripe_reconciler

FINALIZER = "billingproxy.io/finalizer"
PREFIX = "billingproxy.io"
# kubernetes' HTTP client logs request URLs at DEBUG; urllib3 likewise. Bodies never, but keep
# their chatter out of the operator's log.
_QUIET_LOGGERS = ("kubernetes", "urllib3")
# How long kopf waits for a timer to finish its tick once asked to stop (object deleted, operator
# stopping). A stopped tick only has to roll back its transaction, or let its status write
# finish: milliseconds normally; this is the margin for a loaded machine.
TIMER_EXIT_TIMEOUT_S = 3.0
# If a timer still has not exited, how often kopf looks again before it removes the finalizer.
TIMER_EXIT_POLLING_S = 1.0


@dataclasses.dataclass
class Lifecycle:
    """Shared by reference with every object's memo (kopf's per-object memos are shallow copies
    of the operator's), so setting ``stopping`` reaches every handler and timer filter at once."""

    stopping: bool = False


def configure(settings: kopf.OperatorSettings) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration"
    )
    settings.posting.reporting_component = "billingproxy-operator"
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.networking.request_timeout = 60
    settings.background.instant_exit_timeout = TIMER_EXIT_TIMEOUT_S
    settings.background.cancellation_polling = TIMER_EXIT_POLLING_S


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    configure(settings)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.getLogger(name).level, logging.INFO))
    cfg: operator_settings.OperatorSettings = memo.get("operator_settings") or operator_settings.from_env()
    memo.operator_settings = cfg
    memo.lifecycle = memo.get("lifecycle") or Lifecycle()
    memo.engine = db.create_engine(cfg.database_url, pool_size=cfg.db_pool_size)
    if cfg.stripe_secret_key:
        memo.stripe_task = asyncio.create_task(
            stripe_reconciler.run(memo.engine, cfg), name="stripe reconciliation"
        )
    logger.info(
        f"billingproxy operator: status every {operator_settings.STATUS_INTERVAL_S:g} s, "
        f"retries after {cfg.retry_delay_s:g} s, default rotation grace {cfg.rotation_grace_s} s, "
        + (
            f"Stripe reconciled every {cfg.stripe_interval_s:g} s"
            if cfg.stripe_secret_key
            else "Stripe not configured (no reconciliation)"
        )
    )


@kopf.on.login()
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    configuration = kube.load_configuration()
    cfg: operator_settings.OperatorSettings | None = memo.get("operator_settings")
    memo.secrets = kube.Secrets(configuration, timeout_s=cfg.kube_timeout_s if cfg else 10.0)
    return kube.connection_info(configuration)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    lifecycle = memo.get("lifecycle")
    if lifecycle is not None:
        lifecycle.stopping = True  # before the pool goes: no tick may start on it any more
    task = memo.get("stripe_task")
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    engine = memo.get("engine")
    if engine is not None:
        await engine.dispose()
