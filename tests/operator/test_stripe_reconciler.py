"""Stripe reconciliation: a paid Checkout Session whose webhook never came is credited, once,
with the webhook's own idempotency key; against the project's Stripe test double."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import aiohttp
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

import operator_harness as h
from billing import database, payments, recharges, topups, wallets
from billing_operator import settings as operator_settings, stripe_reconciler
from billingproxy.devstack.stripe_double import StripeDouble

SECRET_KEY, WEBHOOK_SECRET = "sk_test_operator", "whsec_operator"
TEN_USD = 10_000_000_000


@pytest.fixture
async def double() -> AsyncIterator[StripeDouble]:
    fake = StripeDouble(
        secret_key=SECRET_KEY,
        webhook_secret=WEBHOOK_SECRET,
        webhook_url="http://127.0.0.1:9/webhook-never-reached",
    )
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


def _session_params(wallet_id: str) -> dict:
    """What the sidecar's Checkout call sends (authz_sidecar/stripe_api.py), for $10, form-decoded."""
    return {
        "mode": "payment",
        "client_reference_id": wallet_id,
        "line_items": [
            {
                "quantity": "1",
                "price_data": {
                    "currency": "usd",
                    "unit_amount": "1000",
                    "product_data": {"name": "API credit"},
                },
            }
        ],
        "metadata": {"wallet_id": wallet_id, "purpose": "billingproxy_topup"},
        "payment_intent_data": {"metadata": {"wallet_id": wallet_id, "purpose": "billingproxy_topup"}},
        "success_url": "http://127.0.0.1/ok",
        "cancel_url": "http://127.0.0.1/cancel",
    }


async def _paid_session_without_webhook(engine: AsyncEngine, double: StripeDouble, wallet_id: str) -> dict:
    session = double.create_session(_session_params(wallet_id))
    async with engine.begin() as conn:
        await topups.record_checkout_session(
            conn, session_id=session["id"], wallet_id=wallet_id, amount_nano=TEN_USD, expires_at=None
        )
    return double.complete(session["id"])  # the event Stripe would send; never delivered


async def _balance(engine: AsyncEngine, wallet_id: str) -> int:
    async with engine.connect() as conn:
        return (await wallets.get_wallet(conn, wallet_id)).balance_nano


async def test_a_missed_webhook_is_credited_once(
    engine: AsyncEngine, database_url: str, double: StripeDouble
) -> None:
    async with engine.begin() as conn:
        wallet = await wallets.create_wallet(conn, source="kubernetes", grant_nano=0, external_id="uid-1")
    event = await _paid_session_without_webhook(engine, double, wallet.id)
    cfg = operator_settings.OperatorSettings(
        database_url=database_url, stripe_secret_key=SECRET_KEY, stripe_api_base=double.url
    )
    async with aiohttp.ClientSession() as session:
        client = stripe_reconciler.client(cfg, session)
        assert await stripe_reconciler.reconcile_once(engine, client, limit=10) == {"credited": 1}
        assert await _balance(engine, wallet.id) == TEN_USD
        assert sum((await stripe_reconciler.reconcile_once(engine, client, limit=10)).values()) == 0
    async with engine.begin() as conn:  # the webhook turns up after all
        late = await payments.process_event(conn, event)
        assert late.outcome == "already_credited"
    assert await _balance(engine, wallet.id) == TEN_USD
    await h.books_balance(engine)


async def test_only_one_replica_reconciles_at_a_time(
    engine: AsyncEngine, database_url: str, double: StripeDouble
) -> None:
    async with engine.begin() as conn:
        wallet = await wallets.create_wallet(conn, source="kubernetes", grant_nano=0, external_id="uid-2")
    await _paid_session_without_webhook(engine, double, wallet.id)
    cfg = operator_settings.OperatorSettings(
        database_url=database_url, stripe_secret_key=SECRET_KEY, stripe_api_base=double.url
    )
    async with engine.connect() as other_replica, aiohttp.ClientSession() as session:
        await other_replica.execute(sa.select(sa.func.pg_advisory_lock(stripe_reconciler.LOCK_KEY)))
        client = stripe_reconciler.client(cfg, session)
        assert await stripe_reconciler.reconcile_once(engine, client, limit=10) == {}
        assert await _balance(engine, wallet.id) == 0
        await other_replica.execute(sa.select(sa.func.pg_advisory_unlock(stripe_reconciler.LOCK_KEY)))
        assert await stripe_reconciler.reconcile_once(engine, client, limit=10) == {"credited": 1}


async def test_the_operator_reconciles_and_the_wallet_shows_the_top_up(
    direct_settings, kubeconfig, kube, engine: AsyncEngine, double: StripeDouble
) -> None:
    cfg = dataclasses.replace(
        direct_settings, stripe_secret_key=SECRET_KEY, stripe_api_base=double.url, stripe_interval_s=0.2
    )
    async with h.running(cfg):
        await kube.create("Wallet", "team-a", {"ownerEmail": "alice@example.com"})
        wallet_id = (await kube.wait_for("wallets", "team-a", h.is_ready))["status"]["walletId"]
        await _paid_session_without_webhook(engine, double, wallet_id)
        await kube.wait_for("wallets", "team-a", lambda o: o["status"].get("balance") == "10.500000")
        assert "$10.000000" in (await kube.wait_event("team-a", "TopUp"))["message"]


async def _recharge_in_flight(engine: AsyncEngine, double: StripeDouble, test_card: str) -> str:
    """A wallet whose auto-recharge started a PaymentIntent on ``test_card`` that Stripe decided
    and whose webhook never came; the wallet's id."""
    async with engine.begin() as conn:
        wallet = await wallets.create_wallet(conn, source="kubernetes", grant_nano=0, external_id="uid-r")
    customer = double.create_customer({})["id"]
    card = double.attach_payment_method(test_card, customer)["id"]
    async with engine.begin() as conn:
        await recharges.put_setting(conn, wallet.id, recharges.Setting(2 * TEN_USD // 10, TEN_USD, None))
        await recharges.record_customer(conn, wallet.id, customer)
        await recharges.record_setup_session(
            conn, session_id="cs_setup_r", wallet_id=wallet.id, customer=customer
        )
        assert await recharges.save_card(conn, "cs_setup_r", payment_method=card, brand="visa", last4="4242")
    async with database.acquire(engine) as conn:
        (recharge,) = await recharges.start_due(conn)
    intent, _events = double.create_payment_intent(
        {
            "amount": "1000",
            "currency": "usd",
            "customer": customer,
            "payment_method": card,
            "off_session": "true",
            "confirm": "true",
            "metadata": {"wallet_id": wallet.id, "recharge_seq": "1"},
        }
    )
    async with engine.begin() as conn:
        assert await recharges.record_created(conn, recharge, intent["id"])
    return wallet.id


async def test_a_recharge_whose_webhook_never_came_is_credited_once(
    engine: AsyncEngine, database_url: str, double: StripeDouble
) -> None:
    """An auto-recharge's PaymentIntent succeeded, its webhook was lost: the reconciler asks
    Stripe about recharges still pending and credits it with the webhook's key, once."""
    wallet_id = await _recharge_in_flight(engine, double, "pm_card_visa")
    cfg = operator_settings.OperatorSettings(
        database_url=database_url, stripe_secret_key=SECRET_KEY, stripe_api_base=double.url
    )
    async with aiohttp.ClientSession() as session:
        client = stripe_reconciler.client(cfg, session)
        assert await stripe_reconciler.reconcile_once(engine, client, limit=10) == {}, "not overdue yet"
        once = await stripe_reconciler.reconcile_once(engine, client, limit=10, recharge_pending_s=0)
        assert once == {"credited": 1}
        again = await stripe_reconciler.reconcile_once(engine, client, limit=10, recharge_pending_s=0)
        assert sum(again.values()) == 0
    assert await _balance(engine, wallet_id) == TEN_USD
    await h.books_balance(engine)


@pytest.mark.parametrize("failures_max", [1, 2])
async def test_a_declined_recharge_the_reconciler_finds_counts_toward_the_configured_pause(
    engine: AsyncEngine, database_url: str, double: StripeDouble, failures_max: int
) -> None:
    """The reconciler pauses auto-recharge after as many failures in a row as the sidecars do:
    BILLINGPROXY_AUTO_RECHARGE_FAILURES_MAX, read by both."""
    cfg = operator_settings.from_env(
        {
            "DATABASE_URL": database_url,
            "STRIPE_SECRET_KEY": SECRET_KEY,
            "STRIPE_WEBHOOK_SECRET": "whsec_test",
            "STRIPE_API_BASE": double.url,
            "BILLINGPROXY_AUTO_RECHARGE_FAILURES_MAX": str(failures_max),
        }
    )
    assert cfg.auto_recharge_failures_max == failures_max
    wallet_id = await _recharge_in_flight(engine, double, "pm_card_chargeCustomerFail")
    async with aiohttp.ClientSession() as session:
        client = stripe_reconciler.client(cfg, session)
        outcomes = await stripe_reconciler.reconcile_once(
            engine, client, limit=10, recharge_pending_s=0, failures_max=cfg.auto_recharge_failures_max
        )
    assert sum(outcomes.values()) == 1, outcomes
    async with database.acquire(engine) as conn:
        status = await recharges.status(conn, wallet_id)
    assert status is not None
    assert (status.paused_reason is not None) == (failures_max == 1), status
    assert await _balance(engine, wallet_id) == 0
