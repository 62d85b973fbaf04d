"""The Stripe test double against the real `stripe` SDK: the calls the gateway makes answer in
Stripe's shapes (every field is one the SDK declares), errors map to the SDK's exception classes,
events verify with `stripe.Webhook.construct_event`, and it never listens beyond loopback."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
import stripe

from billingproxy.devstack.stripe_double import StripeDouble, server
from stripe_testkit import SECRET_KEY, WEBHOOK_SECRET, declared, session_params


def sdk_params(**changes: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "mode": "payment",
        "line_items": [
            {
                "quantity": 2,
                "price_data": {"currency": "usd", "unit_amount": 750, "product_data": {"name": "credit"}},
            }
        ],
        "client_reference_id": "wal_x",
        "metadata": {"wallet_id": "wal_x"},
        "payment_intent_data": {"metadata": {"wallet_id": "wal_x"}},
        "success_url": "http://gw.test/ok?session_id={CHECKOUT_SESSION_ID}",
        "cancel_url": "http://gw.test/cancelled",
    }
    params.update(changes)
    return params


async def test_sessions_are_created_retrieved_listed_and_expired_through_the_sdk(
    client, double: StripeDouble
) -> None:
    session = await client.v1.checkout.sessions.create_async(sdk_params(), {"idempotency_key": "k-1"})
    assert isinstance(session, stripe.checkout.Session)
    assert (session.object, session.mode, session.status, session.payment_status) == (
        "checkout.session",
        "payment",
        "open",
        "unpaid",
    )
    assert (session.amount_total, session.currency, session.client_reference_id) == (1500, "usd", "wal_x")
    assert session.metadata.to_dict() == {"wallet_id": "wal_x"}
    assert session.id.startswith("cs_test_") and session.livemode is False
    assert session.url == f"{double.url}/c/pay/{session.id}"

    again = await client.v1.checkout.sessions.retrieve_async(session.id)
    assert again.to_dict() == session.to_dict()
    listed = await client.v1.checkout.sessions.list_async({"limit": 5})
    assert [s.id for s in listed.data] == [session.id]
    expired = await client.v1.checkout.sessions.expire_async(session.id)
    assert expired.status == "expired"
    assert double.events[-1]["type"] == "checkout.session.expired"


async def test_idempotency_keys_behave_like_stripes(client, double: StripeDouble) -> None:
    first = await client.v1.checkout.sessions.create_async(sdk_params(), {"idempotency_key": "same"})
    replay = await client.v1.checkout.sessions.create_async(sdk_params(), {"idempotency_key": "same"})
    assert replay.id == first.id and len(double.sessions) == 1
    with pytest.raises(stripe.IdempotencyError, match="same parameters"):
        await client.v1.checkout.sessions.create_async(
            sdk_params(client_reference_id="wal_y"), {"idempotency_key": "same"}
        )


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"success_url": None}, "success_url"),
        ({"mode": "subscription"}, "mode"),
        (
            {
                "line_items": [
                    {
                        "quantity": 1,
                        "price_data": {"currency": "usd", "unit_amount": 49, "product_data": {"name": "x"}},
                    }
                ]
            },
            "line_items",
        ),
        (
            {
                "line_items": [
                    {
                        "quantity": 1,
                        "price_data": {"currency": "eur", "unit_amount": 900, "product_data": {"name": "x"}},
                    }
                ]
            },
            "line_items[0][price_data][currency]",
        ),
        ({"line_items": [{"quantity": 1, "price": "price_123"}]}, "line_items[0][price_data]"),
        ({"success_url": "javascript:alert(1)"}, "success_url"),
    ],
)
async def test_invalid_requests_raise_the_sdks_invalid_request_error(
    client, changes: dict[str, Any], param: str
) -> None:
    params = {k: v for k, v in sdk_params(**changes).items() if v is not None}
    with pytest.raises(stripe.InvalidRequestError) as caught:
        await client.v1.checkout.sessions.create_async(params)
    assert caught.value.param == param


async def test_a_wrong_key_and_a_missing_session_raise_what_stripe_raises(
    client, double: StripeDouble
) -> None:
    async with aiohttp.ClientSession() as session:
        wrong = stripe.StripeClient(
            "sk_test_wrong_key_000",
            base_addresses={"api": double.url},
            max_network_retries=0,
            http_client=stripe.AIOHTTPClient(session=session),
        )
        with pytest.raises(stripe.AuthenticationError, match="Invalid API Key"):
            await wrong.v1.checkout.sessions.list_async()
    with pytest.raises(stripe.InvalidRequestError) as caught:
        await client.v1.checkout.sessions.retrieve_async("cs_test_missing")
    assert caught.value.http_status == 404 and caught.value.code == "resource_missing"


async def test_events_verify_with_the_sdk_and_parse_as_its_objects(double: StripeDouble, new_session) -> None:
    session_id = await new_session("wal_x", recorded=False)
    completed = double.complete(session_id)
    pi = completed["data"]["object"]["payment_intent"]
    refunded = double.refund(pi, 100)
    disputed = double.dispute(pi)
    closed = double.update_dispute(disputed["data"]["object"]["id"], "won")
    expected = [
        (completed, stripe.checkout.Session),
        (refunded, stripe.Charge),
        (disputed, stripe.Dispute),
        (closed, stripe.Dispute),
    ]
    for event, cls in expected:
        payload = double.payload(event)
        parsed = stripe.Webhook.construct_event(
            payload, double.sign(payload), WEBHOOK_SECRET, tolerance=300, api_key=SECRET_KEY
        )
        assert isinstance(parsed, stripe.Event) and parsed.type == event["type"]
        assert isinstance(parsed.data.object, cls), (event["type"], type(parsed.data.object))
        # Every field the double sends is one Stripe's SDK declares for that object.
        assert set(event["data"]["object"]) <= declared(cls), set(event["data"]["object"]) - declared(cls)
        assert set(event) <= declared(stripe.Event)
    assert set(double.payment_intents[pi]) <= declared(stripe.PaymentIntent)
    assert completed["api_version"] == stripe.api_version
    with pytest.raises(stripe.SignatureVerificationError):
        payload = double.payload(completed)
        stripe.Webhook.construct_event(payload, double.sign(payload, secret="whsec_other"), WEBHOOK_SECRET)


def test_form_decoding_follows_stripes_bracket_encoding() -> None:
    pairs = [
        ("line_items[0][price_data][currency]", "usd"),
        ("line_items[0][quantity]", "1"),
        ("line_items[1][quantity]", "2"),
        ("metadata[wallet_id]", "wal_1"),
        ("mode", "payment"),
    ]
    assert server.decode_form(pairs) == {
        "line_items": [{"price_data": {"currency": "usd"}, "quantity": "1"}, {"quantity": "2"}],
        "metadata": {"wallet_id": "wal_1"},
        "mode": "payment",
    }


async def test_a_form_of_numbered_fields_only_is_a_bad_request(double: StripeDouble) -> None:
    # Numbered keys become a list below the top level only: the parameters stay a dict.
    assert server.decode_form([("0", "payment")]) == {"0": "payment"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{double.url}/v1/checkout/sessions",
            data={"0": "payment"},
            headers={"Authorization": f"Bearer {SECRET_KEY}"},
        ) as response,
    ):
        assert response.status == 400, await response.text()
        assert (await response.json())["error"]["param"] == "mode"


async def test_it_listens_on_loopback_only() -> None:
    fake = StripeDouble(
        secret_key=SECRET_KEY, webhook_secret=WEBHOOK_SECRET, webhook_url="http://127.0.0.1:9/x"
    )
    for host in ("0.0.0.0", "192.168.1.10", "example.com", "::"):
        with pytest.raises(ValueError, match="loopback only"):
            await fake.start(host)
    assert server.is_loopback("127.0.0.1") and server.is_loopback("::1")
    with pytest.raises(SystemExit):
        server.main(["--host", "0.0.0.0", "--webhook-url", "http://127.0.0.1:9/x"])
    with pytest.raises(ValueError, match="secret"):
        StripeDouble(secret_key="", webhook_secret=WEBHOOK_SECRET, webhook_url="http://127.0.0.1:9/x")


def test_session_params_helper_matches_what_the_sdk_sends(double: StripeDouble) -> None:
    """The tests' shortcut (create_session with decoded params) and the SDK path agree."""
    session = double.create_session(session_params("wal_z", 1234))
    assert (session["amount_total"], session["client_reference_id"], session["metadata"]) == (
        1234,
        "wal_z",
        {"wallet_id": "wal_z"},
    )
