"""The recharge worker: each round, start the recharges that are due (billing.recharges.start_due)
and charge them, off-session, on Stripe; then retry the ones Stripe did not answer.

Every sidecar runs one, beside the alert worker and never on the Check's path. The database
decides who charges what: a recharge row is inserted by one sweep only (under the
``auto_recharges`` row's lock, with a unique index behind it), and that sweep holds a lease on it
while it calls Stripe; a retry (Stripe unreachable, or a sidecar that died between the insert and
the call) leases it the same way. Every call for recharge ``seq`` of a wallet carries the
Idempotency-Key ``recharge:<wallet>:<seq>`` and the parameters recorded on the row, so however
often it is made Stripe makes one PaymentIntent.

What Stripe answers:

- a PaymentIntent (succeeded, or processing): ``pending``; the credit comes with
  ``payment_intent.succeeded`` (billing/payments.py), never from this answer;
- a card error (declined, authentication required), which carries the failed PaymentIntent: the
  recharge failed, counted toward pausing, alerted (billing.recharges.record_failure);
- no answer (connection, rate limit, Stripe's 5xx): retried later with the same key, not counted;
- any other refusal (the card was detached, a bad parameter): a failure, like a decline.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import aiohttp
import asyncpg
import stripe

import billing_stripe
from authz_sidecar import metrics
from billing import database, money, recharges
from billing.settings import Settings

logger = logging.getLogger(__name__)


class PaymentIntents(Protocol):
    """The one Stripe call the worker makes (tests put a fault in front of it)."""

    async def create(self, params: dict[str, Any], idempotency_key: str) -> Any: ...


class StripePaymentIntents:
    def __init__(self, client: stripe.StripeClient) -> None:
        self._client = client

    async def create(self, params: dict[str, Any], idempotency_key: str) -> Any:
        return await self._client.v1.payment_intents.create_async(
            params,  # type: ignore[arg-type]  # a plain dict of PaymentIntentCreateParams' keys
            {"idempotency_key": idempotency_key},
        )


def payment_intent_params(recharge: recharges.Recharge) -> dict[str, Any]:
    """The PaymentIntent of a recharge, from its row only (a retry must send the same)."""
    return {
        "amount": recharge.amount_nano // money.NANO_PER_CENT,
        "currency": "usd",
        "customer": recharge.customer,
        "payment_method": recharge.payment_method,
        "off_session": True,
        "confirm": True,
        "description": f"BillingProxy auto-recharge {recharge.seq}",
        "metadata": {
            "wallet_id": recharge.wallet_id,
            "recharge_seq": str(recharge.seq),
            "purpose": recharges.PURPOSE,
        },
    }


class RechargeWorker:
    """The sidecar's recharge task (started and stopped like the alert worker)."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool | Any) -> None:
        self._settings = settings
        self._pool = pool

    async def run(self) -> None:
        s = self._settings
        async with aiohttp.ClientSession() as session:
            intents = StripePaymentIntents(
                billing_stripe.make_client(
                    secret_key=s.stripe_secret_key, api_base=s.stripe_api_base, session=session
                )
            )
            while True:
                try:
                    await self.round(intents)
                except Exception as exc:  # noqa: BLE001 (the worker outlives a failed round; the next retries)
                    logger.warning("recharge round failed: %s", exc)
                await asyncio.sleep(s.auto_recharge_interval_ms / 1000)

    async def round(self, intents: PaymentIntents) -> int:
        """Start what is due and call Stripe for it and for what waits for a retry; how many calls."""
        async with database.acquire(self._pool) as conn:
            started = await recharges.start_due(conn)
            retried = await recharges.claim_retries(conn)
        for recharge in started:
            logger.info(
                "auto-recharge %s of wallet %s: %s USD",
                recharge.seq,
                recharge.wallet_id,
                money.format_usd_cents(recharge.amount_nano),
            )
        due = started + retried
        await asyncio.gather(*(self.charge(intents, r) for r in due))
        return len(due)

    async def charge(self, intents: PaymentIntents, recharge: recharges.Recharge) -> None:
        """One call to Stripe for ``recharge``, and its outcome recorded."""
        key = recharges.idempotency_key(recharge.wallet_id, recharge.seq)
        s = self._settings
        try:
            intent = await intents.create(payment_intent_params(recharge), key)
        except stripe.CardError as exc:
            error = exc.error
            failed = getattr(error, "payment_intent", None) if error is not None else None
            await self._failed(
                recharge,
                code=exc.code or "card_declined",
                message=exc.user_message or str(exc),
                payment_intent=getattr(failed, "id", None),
            )
        except (stripe.APIConnectionError, stripe.RateLimitError, stripe.APIError) as exc:
            async with database.acquire(self._pool) as conn:
                retrying = await recharges.record_unreachable(
                    conn,
                    recharge,
                    f"{type(exc).__name__}: {exc}",
                    retry_base_ms=s.auto_recharge_retry_base_ms,
                )
            metrics.recharge_calls.labels("unreachable" if retrying else "gave_up").inc()
            logger.warning(
                "auto-recharge %s of wallet %s: Stripe unreachable (%s); %s",
                recharge.seq,
                recharge.wallet_id,
                type(exc).__name__,
                "retrying with the same key" if retrying else "given up",
            )
        except stripe.StripeError as exc:
            await self._failed(
                recharge,
                code=exc.code or type(exc).__name__,
                message=exc.user_message or str(exc),
                payment_intent=None,
            )
        else:
            metrics.recharge_calls.labels("created").inc()
            async with database.acquire(self._pool) as conn:
                await recharges.record_created(conn, recharge, intent.id)

    async def _failed(
        self, recharge: recharges.Recharge, *, code: str, message: str, payment_intent: str | None
    ) -> None:
        metrics.recharge_calls.labels("failed").inc()
        async with database.acquire(self._pool) as conn, conn.transaction():
            failure = await recharges.record_failure(
                conn,
                recharge,
                code=code,
                message=message,
                payment_intent=payment_intent,
                failures_max=self._settings.auto_recharge_failures_max,
            )
        if failure is not None:
            logger.warning(
                "auto-recharge %s of wallet %s failed: %s (%d in a row%s)",
                recharge.seq,
                recharge.wallet_id,
                code,
                failure.consecutive_failures,
                "; paused" if failure.paused else "",
            )
