"""Stripe reconciliation: credit every paid Checkout Session, and every succeeded recharge,
whose webhook never arrived.

Every few minutes: the Checkout Sessions we created and never saw complete or expire
(:func:`billing.topups.open_checkout_sessions`) are retrieved from Stripe and applied with
:func:`billing.payments.apply_checkout_session`; the PaymentIntents of auto-recharges still
``pending`` after :data:`RECHARGE_PENDING_S` (:func:`billing.recharges.pending_payment_intents`)
are retrieved and applied with :func:`billing.payments.apply_payment_intent` — the very rules and
idempotency keys (``stripe:<payment_intent>``) of the webhook, so a payment is credited once
whether the webhook comes first, later, twice, or never.

Why a background task and not a kopf timer: kopf's timers belong to one object each, and this
job belongs to the operator. Why a PostgreSQL advisory lock: with several replicas every one
runs this loop (kopf peering pauses handlers, not background tasks); the lock makes one of them
do the work at a time, peering or not.

Stripe unreachable, or PostgreSQL: a warning, and the next round tries again. Nothing is lost
while it waits: the sessions stay open in PostgreSQL until applied.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import aiohttp
import sqlalchemy as sa
import stripe
from sqlalchemy.ext.asyncio import AsyncEngine

import billing_stripe
from billing import database, payments, recharges, topups
from billing_operator import db, errors, settings as operator_settings

logger = logging.getLogger(__package__)

# pg_advisory_lock key: "bpSR" (BillingProxy Stripe Reconciliation).
LOCK_KEY = 0x62705352
# A recharge's webhook normally comes within seconds; after this long, ask Stripe.
RECHARGE_PENDING_S = 60


def client(cfg: operator_settings.OperatorSettings, session: aiohttp.ClientSession) -> stripe.StripeClient:
    return billing_stripe.make_client(
        secret_key=cfg.stripe_secret_key, api_base=cfg.stripe_api_base, session=session
    )


async def reconcile_once(
    engine: AsyncEngine,
    stripe_client: stripe.StripeClient,
    *,
    limit: int,
    recharge_pending_s: int = RECHARGE_PENDING_S,
    failures_max: int = payments.DEFAULT_FAILURES_MAX,
) -> Counter[str]:
    """One round, under the advisory lock; returns how many sessions and recharges had each
    outcome (empty when another replica holds the lock). ``failures_max``: the failed recharges in
    a row that pause a wallet's auto-recharge, as the sidecars count them."""
    outcomes: Counter[str] = Counter()
    async with engine.connect() as lock_conn:
        locked = (await lock_conn.execute(sa.select(sa.func.pg_try_advisory_lock(LOCK_KEY)))).scalar_one()
        if not locked:
            return outcomes
        try:
            async with db.transaction(engine) as conn:
                open_ids = await topups.open_checkout_sessions(conn, limit=limit)
            for session_id in open_ids:
                session = await stripe_client.v1.checkout.sessions.retrieve_async(session_id)
                async with db.transaction(engine) as conn:
                    result = await payments.apply_checkout_session(conn, session.to_dict())
                outcomes[result.outcome] += 1
            async with db.transaction(engine) as conn:
                pending = await recharges.pending_payment_intents(
                    conn, older_than_s=recharge_pending_s, limit=limit
                )
            for payment_intent in pending:
                intent = await stripe_client.v1.payment_intents.retrieve_async(payment_intent)
                async with db.transaction(engine) as conn:
                    result = await payments.apply_payment_intent(
                        conn, intent.to_dict(), failures_max=failures_max
                    )
                outcomes[result.outcome] += 1
        finally:
            await lock_conn.execute(sa.select(sa.func.pg_advisory_unlock(LOCK_KEY)))
            await lock_conn.commit()
    return outcomes


async def run(engine: AsyncEngine, cfg: operator_settings.OperatorSettings) -> None:
    """Reconcile every ``cfg.stripe_interval_s`` until cancelled."""
    async with aiohttp.ClientSession() as session:
        stripe_client = client(cfg, session)
        while True:
            try:
                outcomes = await reconcile_once(
                    engine,
                    stripe_client,
                    limit=cfg.stripe_sessions_max,
                    failures_max=cfg.auto_recharge_failures_max,
                )
            except stripe.StripeError as exc:
                logger.warning(f"Stripe reconciliation: Stripe answered {type(exc).__name__}; retrying later")
            except errors.DatabaseUnavailable as exc:
                logger.warning(f"Stripe reconciliation: {exc}")
            except Exception as exc:  # the loop must outlive any one bad round
                if database.is_unreachable(exc):
                    logger.warning(f"Stripe reconciliation: PostgreSQL is unreachable ({type(exc).__name__})")
                else:
                    logger.exception("Stripe reconciliation failed; retrying later")
            else:
                if outcomes:
                    summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items()))
                    logger.info(f"Stripe reconciliation: {summary}")
            await asyncio.sleep(cfg.stripe_interval_s)
