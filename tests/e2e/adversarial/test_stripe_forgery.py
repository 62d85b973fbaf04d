"""Issue 10, finding 9: Stripe credits only what the gateway itself created.

The gateway's Stripe account may serve other products too, and every event Stripe sends for
them is signed with the same webhook secret. So a valid signature proves only that Stripe sent
the event, not that the payment was a top-up: a ``checkout.session.completed`` for a session
another product created (its metadata, a wallet id in ``client_reference_id``) must be recorded
and answered 2xx, and credit nothing. A session the gateway did create credits the wallet and
the amount the gateway recorded when it created it, whatever the event's copy says. Signatures
dated beyond the tolerance in the future are refused like stale ones.

Through the real stack: Envoy, the sidecar, PostgreSQL, and the Stripe test double in this
process (the gateway's SDK points at it; its events are signed with Stripe's real scheme).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from billingproxy.devstack.stripe_double import StripeDouble

pytestmark = pytest.mark.integration

SECRET_KEY = "sk_test_adversarial_0123456789"
WEBHOOK_SECRET = "whsec_adversarial_0123456789abcdef"
FIVE_USD_CENTS = 500
GRANT_USD = "0.500000"


@pytest.fixture(scope="module")
async def double() -> AsyncIterator[StripeDouble]:
    fake = StripeDouble(
        secret_key=SECRET_KEY, webhook_secret=WEBHOOK_SECRET, webhook_url="http://127.0.0.1:9/unset"
    )
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture(scope="module")
async def stack(launch_stack, double: StripeDouble) -> AsyncIterator[Any]:
    async with launch_stack(
        STRIPE_SECRET_KEY=SECRET_KEY, STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET, STRIPE_API_BASE=double.url
    ) as running:
        double.webhook_url = running.gateway + "/stripe/webhook"
        yield running


def foreign_session(
    double: StripeDouble, *, reference: str | None, metadata: dict[str, str]
) -> dict[str, Any]:
    """A Checkout Session another product on the same Stripe account created (not /billing/topup)."""
    params: dict[str, Any] = {
        "mode": "payment",
        "success_url": "https://other-product.test/thanks",
        "line_items": [
            {
                "quantity": "1",
                "price_data": {
                    "currency": "usd",
                    "unit_amount": str(FIVE_USD_CENTS),
                    "product_data": {"name": "Other product"},
                },
            }
        ],
        "metadata": metadata,
    }
    if reference is not None:
        params["client_reference_id"] = reference
    return double.create_session(params)


async def topup_entries(stack, wallet_id: str) -> list[Any]:
    return [e for e in await stack.db.ledger(wallet_id) if e.kind == "topup"]


async def event_outcome(stack, event_id: str) -> tuple[str, str | None]:
    [row] = await stack.db.rows("SELECT outcome, wallet_id FROM stripe_events WHERE id = :id", id=event_id)
    return row.outcome, row.wallet_id


async def balance_usd(stack, api_key: str) -> str:
    async with stack.http.get(
        stack.gateway + "/billing/balance", headers={"authorization": f"Bearer {api_key}"}
    ) as r:
        assert r.status == 200
        return (await r.json())["balance_usd"]


async def topup(stack, api_key: str, amount_usd: str) -> dict[str, Any]:
    async with stack.http.post(
        stack.gateway + "/billing/topup",
        json={"amount_usd": amount_usd},
        headers={"authorization": f"Bearer {api_key}"},
    ) as r:
        body = await r.json()
        assert r.status == 200, body
        return body


@pytest.mark.parametrize(
    ("reference", "metadata"),
    [
        ("victim", {"product": "other-app", "order": "A-17"}),
        (None, {"wallet_id": "victim", "product": "other-app"}),
        ("victim", {"wallet_id": "victim", "purpose": "billingproxy_topup"}),
    ],
    ids=["client_reference_id", "metadata_wallet_id", "both_and_our_purpose"],
)
async def test_a_paid_session_the_gateway_never_created_credits_nothing(
    stack, double: StripeDouble, reference: str | None, metadata: dict[str, str]
) -> None:
    victim = await stack.signup()
    wallet_id = victim["wallet_id"]
    fill = {k: (wallet_id if v == "victim" else v) for k, v in metadata.items()}
    session = foreign_session(double, reference=wallet_id if reference else None, metadata=fill)
    event = double.complete(session["id"])

    assert await double.deliver(event) == 200  # answered 2xx, so Stripe stops retrying
    assert (await event_outcome(stack, event["id"]))[0] == "not_ours"
    assert await topup_entries(stack, wallet_id) == []
    assert await balance_usd(stack, victim["api_key"]) == GRANT_USD
    assert not await stack.db.rows(
        "SELECT 1 FROM stripe_payments WHERE payment_intent = :pi",
        pi=event["data"]["object"]["payment_intent"],
    )


async def test_a_payment_intent_event_credits_nothing(stack, double: StripeDouble) -> None:
    """A PaymentIntent is credited on its own only for a recharge the gateway started (for its
    Customer and amount); one naming a wallet and a recharge number is recorded, not ours."""
    victim = await stack.signup()
    session = foreign_session(double, reference=None, metadata={})
    double.complete(session["id"])
    intent = dict(double.payment_intents[double.sessions[session["id"]]["payment_intent"]])
    intent["metadata"] = {
        "wallet_id": victim["wallet_id"],
        "recharge_seq": "1",
        "purpose": "billingproxy_topup",
    }
    event = double.event("payment_intent.succeeded", intent)
    assert await double.deliver(event) == 200
    assert (await event_outcome(stack, event["id"]))[0] == "not_ours"
    assert await balance_usd(stack, victim["api_key"]) == GRANT_USD


async def test_our_session_credits_the_recorded_wallet_not_the_one_the_event_names(
    stack, double: StripeDouble
) -> None:
    payer, bystander = await stack.signup(), await stack.signup()
    created = await topup(stack, payer["api_key"], "10.00")
    # The event's copy of the session names another wallet (in both places it could).
    stored = double.sessions[created["session_id"]]
    stored["client_reference_id"] = bystander["wallet_id"]
    stored["metadata"] = {**stored["metadata"], "wallet_id": bystander["wallet_id"]}
    event = double.complete(created["session_id"])

    assert await double.deliver(event) == 200
    assert await event_outcome(stack, event["id"]) == ("credited", payer["wallet_id"])
    assert [e.amount_nano for e in await topup_entries(stack, payer["wallet_id"])] == [10 * 10**9]
    assert await topup_entries(stack, bystander["wallet_id"]) == []
    assert await balance_usd(stack, bystander["api_key"]) == GRANT_USD


async def test_our_session_paid_another_amount_credits_nothing(stack, double: StripeDouble) -> None:
    """The recorded amount is what was asked for; a session paid for another amount is left to a
    person (recorded, 2xx), never credited with either number."""
    payer = await stack.signup()
    created = await topup(stack, payer["api_key"], "5.00")
    double.sessions[created["session_id"]]["amount_total"] = 50_000  # $500 in the event
    event = double.complete(created["session_id"])

    assert await double.deliver(event) == 200
    assert await event_outcome(stack, event["id"]) == ("amount_mismatch", payer["wallet_id"])
    assert await topup_entries(stack, payer["wallet_id"]) == []
    assert await balance_usd(stack, payer["api_key"]) == GRANT_USD


async def test_signatures_dated_beyond_the_tolerance_in_the_future_are_refused(
    stack, double: StripeDouble
) -> None:
    payer = await stack.signup()
    created = await topup(stack, payer["api_key"], "10.00")
    event = double.complete(created["session_id"])
    payload = double.payload(event)

    async def deliver(timestamp: int) -> tuple[int, dict[str, Any]]:
        headers = {
            "content-type": "application/json",
            "stripe-signature": double.sign(payload, timestamp=timestamp),
        }
        async with stack.http.post(
            stack.gateway + "/stripe/webhook", data=payload.encode(), headers=headers
        ) as r:
            return r.status, await r.json()

    now = int(time.time())
    for ahead in (301 + 5, 3600, 10 * 365 * 86400):
        status, body = await deliver(now + ahead)
        assert (status, body["error"]["code"]) == (400, "invalid_signature"), (ahead, body)
    assert not await stack.db.rows("SELECT 1 FROM stripe_events WHERE id = :id", id=event["id"])
    assert await topup_entries(stack, payer["wallet_id"]) == []

    # A clock a little ahead (within the tolerance) is still fine.
    status, body = await deliver(now + 60)
    assert (status, body["outcome"]) == (200, "credited")
