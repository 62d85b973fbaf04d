"""The Stripe test double's saved cards against the real `stripe` SDK — what auto-recharge needs:
a Customer per wallet, a card saved by Checkout (``mode=setup``, or ``setup_future_usage`` on a
payment), and off-session PaymentIntents whose outcome is decided by Stripe's documented test
cards, failing with the SDK's own ``CardError``, the PaymentIntent in ``error.payment_intent``,
and a signed ``payment_intent.*`` webhook, all in Stripe's shapes (fields the SDK declares)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
import stripe
from aiohttp import web
from support.waiting import wait_until

from billingproxy.devstack.stripe_double import StripeDouble, model
from stripe_testkit import SECRET_KEY, WEBHOOK_SECRET, declared

OK, DECLINED, AUTHENTICATION, DECLINED_LATER = (
    "4242 4242 4242 4242",
    "4000 0000 0000 0002",
    "4000 0027 6000 3184",
    "4000 0000 0000 0341",
)


class Receiver:
    """A webhook endpoint: verifies each event's signature with the SDK, keeps the good ones."""

    def __init__(self) -> None:
        self.events: list[stripe.Event] = []

    async def handle(self, request: web.Request) -> web.Response:
        payload = await request.text()
        try:
            event = stripe.Webhook.construct_event(
                payload, request.headers.get("stripe-signature", ""), WEBHOOK_SECRET, api_key=SECRET_KEY
            )
        except stripe.SignatureVerificationError:
            return web.json_response({"error": "bad signature"}, status=400)
        self.events.append(event)
        return web.json_response({"received": True})

    async def of_type(self, type_: str, count: int = 1) -> list[stripe.Event]:
        async def arrived() -> list[stripe.Event]:
            found = [e for e in self.events if e.type == type_]
            return found if len(found) >= count else []

        return await wait_until(arrived, 10, f"{count} {type_} webhook(s)")


@pytest.fixture
async def receiver(double: StripeDouble) -> AsyncIterator[Receiver]:
    """The double's webhooks go here."""
    endpoint = Receiver()
    app = web.Application()
    app.router.add_post("/stripe/webhook", endpoint.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    double.webhook_url = f"http://127.0.0.1:{runner.addresses[0][1]}/stripe/webhook"
    try:
        yield endpoint
    finally:
        await runner.cleanup()


def setup_params(customer: str, **changes: Any) -> dict[str, Any]:
    """A setup-mode session's parameters; ``""`` or ``None`` leaves a parameter out."""
    params: dict[str, Any] = {
        "mode": "setup",
        "currency": "usd",
        "customer": customer,
        "setup_intent_data": {"metadata": {"wallet_id": "wal_x"}},
        "success_url": "http://gw.test/saved?session_id={CHECKOUT_SESSION_ID}",
        "cancel_url": "http://gw.test/cancelled",
    }
    params.update(changes)
    return {k: v for k, v in params.items() if v not in (None, "")}


def recharge_params(customer: str, payment_method: str, **changes: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "amount": 1000,
        "currency": "usd",
        "customer": customer,
        "payment_method": payment_method,
        "off_session": True,
        "confirm": True,
        "metadata": {"wallet_id": "wal_x", "purpose": "billingproxy_recharge"},
    }
    params.update(changes)
    return {k: v for k, v in params.items() if v is not None}


@pytest.fixture
def saved_card(
    client: stripe.StripeClient, double: StripeDouble
) -> Callable[[str], Awaitable[tuple[str, str]]]:
    """``await saved_card(number)``: a new Customer with that test card saved by a setup-mode
    Checkout Session, as the gateway will do it: (customer id, payment method id)."""

    async def save(number: str) -> tuple[str, str]:
        customer = await client.v1.customers.create_async({"email": "alice@example.com"})
        session = await client.v1.checkout.sessions.create_async(setup_params(customer.id))
        double.complete(session.id, card=number)
        (saved,) = (await client.v1.customers.payment_methods.list_async(customer.id)).data
        return customer.id, saved.id

    return save


@contextlib.contextmanager
def global_sdk(double: StripeDouble) -> Iterator[None]:
    """The SDK's module-level style (``stripe.api_key``, ``stripe.api_base``), restored after."""
    before = stripe.api_key, stripe.api_base, stripe.max_network_retries
    stripe.api_key, stripe.api_base, stripe.max_network_retries = SECRET_KEY, double.url, 0
    try:
        yield
    finally:
        stripe.api_key, stripe.api_base, stripe.max_network_retries = before


async def test_customers_are_created_retrieved_and_updated_through_the_sdk(
    client: stripe.StripeClient, double: StripeDouble
) -> None:
    customer = await client.v1.customers.create_async(
        {"email": "alice@example.com", "metadata": {"wallet_id": "wal_x"}}
    )
    assert isinstance(customer, stripe.Customer) and customer.id.startswith("cus_")
    assert (customer.email, customer.livemode, customer.metadata.to_dict()) == (
        "alice@example.com",
        False,
        {"wallet_id": "wal_x"},
    )
    assert customer.invoice_settings.default_payment_method is None
    assert (await client.v1.customers.retrieve_async(customer.id)).to_dict() == customer.to_dict()

    updated = await client.v1.customers.update_async(
        customer.id, {"metadata": {"wallet_id": "", "tier": "pro"}, "name": "Alice"}
    )
    assert (updated.name, updated.metadata.to_dict()) == ("Alice", {"tier": "pro"})
    with pytest.raises(stripe.InvalidRequestError) as caught:
        await client.v1.customers.update_async(
            customer.id, {"invoice_settings": {"default_payment_method": "pm_nobodys"}}
        )
    assert caught.value.param == "invoice_settings[default_payment_method]"
    with pytest.raises(stripe.InvalidRequestError) as caught:
        await client.v1.customers.retrieve_async("cus_missing")
    assert (caught.value.http_status, caught.value.code) == (404, "resource_missing")
    assert set(customer.to_dict()) <= declared(stripe.Customer)
    assert [e["type"] for e in double.events] == ["customer.created", "customer.updated"]


async def test_a_setup_session_paid_on_the_page_saves_the_card_to_the_customer(
    client: stripe.StripeClient, double: StripeDouble, receiver: Receiver
) -> None:
    customer = await client.v1.customers.create_async({"email": "alice@example.com"})
    session = await client.v1.checkout.sessions.create_async(setup_params(customer.id))
    assert (session.mode, session.status, session.payment_status, session.amount_total) == (
        "setup",
        "open",
        "no_payment_required",
        None,
    )
    async with aiohttp.ClientSession() as browser:
        async with browser.get(session.url) as r:
            page = await r.text()
        assert r.status == 200 and ">Save card (test)</button>" in page
        # A plain form, prefilled with the card that succeeds: it works without JavaScript.
        assert "<form method=post" in page and 'name=card value="4242424242424242"' in page
        async with browser.post(session.url, data={"card": OK}, allow_redirects=False) as r:
            assert r.status == 303, await r.text()
            assert r.headers["location"] == f"http://gw.test/saved?session_id={session.id}"

    done = await client.v1.checkout.sessions.retrieve_async(session.id)
    assert (done.status, done.customer) == ("complete", customer.id)
    intent = await client.v1.setup_intents.retrieve_async(done.setup_intent)
    assert isinstance(intent, stripe.SetupIntent)
    assert (intent.status, intent.usage, intent.customer) == ("succeeded", "off_session", customer.id)
    assert intent.metadata.to_dict() == {"wallet_id": "wal_x"}
    card = await client.v1.payment_methods.retrieve_async(intent.payment_method)
    assert (card.customer, card.type, card.card.brand, card.card.last4) == (
        customer.id,
        "card",
        "visa",
        "4242",
    )
    assert card.card.exp_year > 2000 and 1 <= card.card.exp_month <= 12
    listed = await client.v1.customers.payment_methods.list_async(customer.id)
    assert [pm.id for pm in listed.data] == [card.id]
    listed = await client.v1.payment_methods.list_async({"customer": customer.id, "type": "card"})
    assert [pm.id for pm in listed.data] == [card.id]
    for query, status in (({"type": "card"}, 400), ({"customer": "cus_missing"}, 400)):
        with pytest.raises(stripe.InvalidRequestError) as caught:
            await client.v1.payment_methods.list_async(query)
        assert (caught.value.http_status, caught.value.param) == (status, "customer")
    with pytest.raises(stripe.InvalidRequestError) as caught:
        await client.v1.customers.payment_methods.list_async("cus_missing")
    assert (caught.value.http_status, caught.value.param) == (404, "id")
    with pytest.raises(stripe.InvalidRequestError) as caught:
        await client.v1.payment_methods.list_async({"customer": customer.id, "type": "sepa_debit"})
    assert caught.value.param == "type"

    # The page sends what the gateway subscribes to; the rest is in the account's events.
    (completed,) = await receiver.of_type("checkout.session.completed")
    assert completed.data.object.setup_intent == intent.id
    assert [e.type for e in receiver.events] == ["checkout.session.completed"]
    assert [e["type"] for e in double.events][-3:] == [
        "payment_method.attached",
        "setup_intent.succeeded",
        "checkout.session.completed",
    ]
    for event, cls in zip(
        double.events[-3:], (stripe.PaymentMethod, stripe.SetupIntent, stripe.checkout.Session), strict=True
    ):
        assert set(event["data"]["object"]) <= declared(cls), set(event["data"]["object"]) - declared(cls)


async def test_a_declined_card_is_refused_on_the_page_and_the_session_stays_open(
    client: stripe.StripeClient, double: StripeDouble, receiver: Receiver
) -> None:
    customer = await client.v1.customers.create_async({})
    session = await client.v1.checkout.sessions.create_async(setup_params(customer.id))
    async with aiohttp.ClientSession() as browser:
        for number, status, shown in (
            (DECLINED, 402, "Your card was declined."),
            ("4111 1111 1111 1111", 402, "not one of the test cards"),
        ):
            async with browser.post(session.url, data={"card": number}, allow_redirects=False) as r:
                page = await r.text()
            assert r.status == status and shown in page, page
            assert f'value="{number}"' in page  # the form again, with what was typed
        assert (await client.v1.checkout.sessions.retrieve_async(session.id)).status == "open"
        assert (await client.v1.customers.payment_methods.list_async(customer.id)).data == []
        assert receiver.events == []
        async with browser.post(session.url, data={"card": DECLINED_LATER}, allow_redirects=False) as r:
            assert r.status == 303
    (saved,) = (await client.v1.customers.payment_methods.list_async(customer.id)).data
    assert saved.card.last4 == "0341"


async def test_a_payment_with_setup_future_usage_saves_its_card(
    client: stripe.StripeClient, double: StripeDouble
) -> None:
    customer = await client.v1.customers.create_async({"email": "alice@example.com"})
    session = await client.v1.checkout.sessions.create_async(
        {
            "mode": "payment",
            "customer": customer.id,
            "line_items": [
                {
                    "quantity": 1,
                    "price_data": {
                        "currency": "usd",
                        "unit_amount": 1000,
                        "product_data": {"name": "credit"},
                    },
                }
            ],
            "payment_intent_data": {"setup_future_usage": "off_session", "metadata": {"wallet_id": "wal_x"}},
            "success_url": "http://gw.test/ok",
        }
    )
    double.complete(session.id, card=AUTHENTICATION)  # the person did 3-D Secure on the page
    paid = await client.v1.checkout.sessions.retrieve_async(session.id)
    intent = await client.v1.payment_intents.retrieve_async(paid.payment_intent)
    assert (intent.status, intent.customer, intent.setup_future_usage, intent.amount_received) == (
        "succeeded",
        customer.id,
        "off_session",
        1000,
    )
    card = await client.v1.payment_methods.retrieve_async(intent.payment_method)
    assert (card.customer, card.card.last4) == (customer.id, "3184")

    # Without setup_future_usage the card is used once and not saved.
    once = await client.v1.checkout.sessions.create_async(
        {**session_params_of(paid), "payment_intent_data": {"metadata": {"wallet_id": "wal_x"}}}
    )
    double.complete(once.id)
    assert len((await client.v1.customers.payment_methods.list_async(customer.id)).data) == 1


async def test_checkout_makes_the_customer_when_asked_to(
    client: stripe.StripeClient, double: StripeDouble
) -> None:
    """``customer_creation=always``: the card is saved to a Customer made for the session; without
    a Customer at all the card is saved to nobody (Stripe's guest checkout)."""
    made = await client.v1.checkout.sessions.create_async(
        setup_params("", customer_creation="always", customer_email="carol@example.com")
    )
    guest = await client.v1.checkout.sessions.create_async(setup_params(""))
    assert made.customer is None and made.customer_creation == "always"
    double.complete(made.id)
    double.complete(guest.id)
    made, guest = [await client.v1.checkout.sessions.retrieve_async(s.id) for s in (made, guest)]
    customer = await client.v1.customers.retrieve_async(made.customer)
    assert customer.email == "carol@example.com"
    (saved,) = (await client.v1.customers.payment_methods.list_async(customer.id)).data
    assert saved.id == (await client.v1.setup_intents.retrieve_async(made.setup_intent)).payment_method
    assert guest.customer is None
    unsaved = await client.v1.payment_methods.retrieve_async(
        (await client.v1.setup_intents.retrieve_async(guest.setup_intent)).payment_method
    )
    assert unsaved.customer is None


def session_params_of(session: stripe.checkout.Session) -> dict[str, Any]:
    return {
        "mode": "payment",
        "customer": session.customer,
        "line_items": [
            {
                "quantity": 1,
                "price_data": {"currency": "usd", "unit_amount": 500, "product_data": {"name": "x"}},
            }
        ],
        "success_url": "http://gw.test/ok",
    }


async def test_an_off_session_charge_of_the_good_card_succeeds_and_sends_a_signed_event(
    client: stripe.StripeClient, double: StripeDouble, receiver: Receiver, saved_card
) -> None:
    customer, card = await saved_card(OK)
    intent = await client.v1.payment_intents.create_async(
        recharge_params(customer, card), {"idempotency_key": "recharge-wal_x-1"}
    )
    assert isinstance(intent, stripe.PaymentIntent) and intent.id.startswith("pi_")
    assert (intent.status, intent.amount, intent.amount_received, intent.customer, intent.payment_method) == (
        "succeeded",
        1000,
        1000,
        customer,
        card,
    )
    assert intent.metadata.to_dict() == {"wallet_id": "wal_x", "purpose": "billingproxy_recharge"}
    charge = double.charges[intent.latest_charge]
    assert (charge["status"], charge["paid"], charge["customer"]) == ("succeeded", True, customer)
    (event,) = await receiver.of_type("payment_intent.succeeded")
    assert isinstance(event.data.object, stripe.PaymentIntent) and event.data.object.id == intent.id
    assert set(intent.to_dict()) <= declared(stripe.PaymentIntent)
    assert set(charge) <= declared(stripe.Charge)


@pytest.mark.parametrize(
    ("number", "code", "decline_code"),
    [
        (DECLINED_LATER, "card_declined", "generic_decline"),
        (AUTHENTICATION, "authentication_required", "authentication_required"),
    ],
)
async def test_an_off_session_charge_that_fails_raises_the_sdks_card_error(
    client: stripe.StripeClient,
    double: StripeDouble,
    receiver: Receiver,
    saved_card,
    number: str,
    code: str,
    decline_code: str,
) -> None:
    customer, card = await saved_card(number)
    with pytest.raises(stripe.CardError) as caught:
        await client.v1.payment_intents.create_async(recharge_params(customer, card))
    error = caught.value
    assert (error.http_status, error.code, error.error.decline_code) == (402, code, decline_code)
    assert error.error.type == "card_error" and error.error.doc_url.endswith(code.replace("_", "-"))
    failed = error.error.payment_intent
    assert (failed.status, failed.customer, failed.last_payment_error.code) == (
        "requires_payment_method",
        customer,
        code,
    )
    assert error.error.payment_method.id == card
    assert double.charges[error.error.charge]["status"] == "failed"
    assert set(error.json_body["error"]) <= declared(stripe.ErrorObject)
    (event,) = await receiver.of_type("payment_intent.payment_failed")
    assert (
        event.data.object.id == failed.id
        and event.data.object.last_payment_error.decline_code == decline_code
    )
    assert (await client.v1.payment_intents.retrieve_async(failed.id)).status == "requires_payment_method"


async def test_a_card_that_is_always_declined_cannot_be_saved(client: stripe.StripeClient) -> None:
    customer = await client.v1.customers.create_async({})
    with pytest.raises(stripe.CardError) as caught:
        await client.v1.payment_methods.attach_async("pm_card_chargeDeclined", {"customer": customer.id})
    assert (caught.value.code, caught.value.error.decline_code) == ("card_declined", "generic_decline")
    attached = await client.v1.payment_methods.attach_async("pm_card_visa", {"customer": customer.id})
    assert (attached.customer, attached.card.last4) == (customer.id, "4242")
    other = await client.v1.customers.create_async({})
    with pytest.raises(stripe.InvalidRequestError, match="already been attached"):
        await client.v1.payment_methods.attach_async(attached.id, {"customer": other.id})


async def test_stripes_test_payment_methods_work_without_a_customer(client: stripe.StripeClient) -> None:
    """``pm_card_visa`` & co. (Stripe's tokens for API tests): each use is a fresh card; confirming
    on-session with the 3-D Secure card waits for the customer (``requires_action``)."""
    paid = await client.v1.payment_intents.create_async(
        {"amount": 700, "currency": "usd", "payment_method": "pm_card_visa", "confirm": True}
    )
    assert (paid.status, paid.customer) == ("succeeded", None)
    waiting = await client.v1.payment_intents.create_async(
        {
            "amount": 700,
            "currency": "usd",
            "payment_method": "pm_card_authenticationRequired",
            "confirm": True,
        }
    )
    assert (waiting.status, waiting.next_action.type, waiting.latest_charge) == (
        "requires_action",
        "use_stripe_sdk",
        None,
    )
    unconfirmed = await client.v1.payment_intents.create_async({"amount": 700, "currency": "usd"})
    assert unconfirmed.status == "requires_payment_method"


async def test_idempotency_keys_replay_charges_and_their_failures(
    client: stripe.StripeClient, double: StripeDouble, receiver: Receiver, saved_card
) -> None:
    customer, card = await saved_card(OK)
    first = await client.v1.payment_intents.create_async(
        recharge_params(customer, card), {"idempotency_key": "recharge-1"}
    )
    replay = await client.v1.payment_intents.create_async(
        recharge_params(customer, card), {"idempotency_key": "recharge-1"}
    )
    assert replay.id == first.id and replay.last_response.headers["idempotent-replayed"] == "true"
    # The first answer, as it was then (Stripe replays the response, not the object's state now).
    double.payment_intents[first.id]["description"] = "changed since"
    again = await client.v1.payment_intents.create_async(
        recharge_params(customer, card), {"idempotency_key": "recharge-1"}
    )
    assert again.to_dict() == first.to_dict()
    with pytest.raises(stripe.IdempotencyError, match="same parameters"):
        await client.v1.payment_intents.create_async(
            recharge_params(customer, card, amount=2000), {"idempotency_key": "recharge-1"}
        )

    declined_customer, declined_card = await saved_card(DECLINED_LATER)
    failures = []
    for _ in range(2):
        with pytest.raises(stripe.CardError) as caught:
            await client.v1.payment_intents.create_async(
                recharge_params(declined_customer, declined_card), {"idempotency_key": "recharge-2"}
            )
        failures.append(caught.value.error.payment_intent.id)
    assert failures[0] == failures[1]
    # One charge attempt per key: two intents in all, and one event each.
    assert len(double.payment_intents) == 2
    await receiver.of_type("payment_intent.payment_failed")
    await receiver.of_type("payment_intent.succeeded")
    assert sorted(e.type for e in receiver.events) == [
        "payment_intent.payment_failed",
        "payment_intent.succeeded",
    ]


async def test_the_sdks_module_level_calls_work_against_the_double(double: StripeDouble) -> None:
    """``stripe.Customer.create`` … with ``stripe.api_base`` pointed at the double (the blocking
    client, so in a thread: the double answers in this loop)."""

    def recharge_declined() -> tuple[str, stripe.CardError]:
        with global_sdk(double):
            customer = stripe.Customer.create(email="bob@example.com")
            card = stripe.PaymentMethod.attach("pm_card_chargeCustomerFail", customer=customer.id)
            try:
                stripe.PaymentIntent.create(
                    amount=1000,
                    currency="usd",
                    customer=customer.id,
                    payment_method=card.id,
                    off_session=True,
                    confirm=True,
                )
            except stripe.CardError as error:
                return customer.id, error
            raise AssertionError("the charge should have been declined")

    double.send_webhooks = False
    customer, error = await asyncio.to_thread(recharge_declined)
    assert (error.code, error.error.decline_code, error.error.payment_intent.customer) == (
        "card_declined",
        "generic_decline",
        customer,
    )


def object_counts(double: StripeDouble) -> dict[str, int]:
    kinds = (
        "customers",
        "payment_methods",
        "setup_intents",
        "sessions",
        "payment_intents",
        "charges",
        "events",
    )
    return {kind: len(getattr(double, kind)) for kind in kinds}


@pytest.mark.parametrize(
    ("path", "params", "param"),
    [
        ("payment_intents", {"currency": "usd"}, "amount"),
        ("payment_intents", {"amount": 49, "currency": "usd"}, "amount"),
        ("payment_intents", {"amount": "ten", "currency": "usd"}, "amount"),
        ("payment_intents", {"amount": 500, "currency": "eur"}, "currency"),
        ("payment_intents", {"amount": 500}, "currency"),
        ("payment_intents", {"amount": 500, "currency": "usd", "off_session": True}, "off_session"),
        ("payment_intents", {"amount": 500, "currency": "usd", "confirm": "yes"}, "confirm"),
        ("payment_intents", {"amount": 500, "currency": "usd", "confirm": True}, "payment_method"),
        ("payment_intents", {"amount": 500, "currency": "usd", "customer": "cus_missing"}, "customer"),
        (
            "payment_intents",
            {"amount": 500, "currency": "usd", "payment_method": "pm_missing"},
            "payment_method",
        ),
        (
            "payment_intents",
            {"amount": 500, "currency": "usd", "payment_method": "pm_card_visa", "metadata": "flat"},
            "metadata",
        ),
        ("payment_methods/pm_card_visa/attach", {"customer": "cus_missing"}, "customer"),
        ("checkout/sessions", setup_params("cus_missing"), "customer"),
        ("checkout/sessions", setup_params("", currency=None), "currency"),
        ("checkout/sessions", setup_params("", currency="eur"), "currency"),
        ("checkout/sessions", {**setup_params(""), "line_items": [{"quantity": 1}]}, "line_items"),
        (
            "checkout/sessions",
            {**setup_params(""), "payment_intent_data": {"description": "x"}},
            "payment_intent_data",
        ),
        (
            "checkout/sessions",
            {**setup_params(""), "setup_intent_data": {"setup_future_usage": "soon"}},
            "setup_intent_data[setup_future_usage]",
        ),
        ("customers", {"email": "x" * 513}, "email"),
        ("customers", {"metadata": "flat"}, "metadata"),
    ],
)
async def test_bad_requests_raise_invalid_request_error_and_change_nothing(
    client: stripe.StripeClient, double: StripeDouble, path: str, params: dict[str, Any], param: str
) -> None:
    before = object_counts(double)
    with pytest.raises(stripe.InvalidRequestError) as caught:
        await client.raw_request_async("post", f"/v1/{path}", **params)
    assert (caught.value.http_status, caught.value.param) == (400, param), caught.value
    assert object_counts(double) == before


async def test_a_payment_method_of_another_customer_cannot_be_charged(
    client: stripe.StripeClient, saved_card
) -> None:
    _, card = await saved_card(OK)
    stranger = await client.v1.customers.create_async({})
    with pytest.raises(stripe.InvalidRequestError) as caught:
        await client.v1.payment_intents.create_async(recharge_params(stranger.id, card))
    assert caught.value.param == "payment_method"
    with pytest.raises(stripe.InvalidRequestError) as caught:
        await client.v1.checkout.sessions.create_async(
            setup_params(stranger.id, customer_email="x@example.com")
        )
    assert caught.value.param == "customer_email"


def test_the_test_cards_are_stripes_documented_ones() -> None:
    """Each number passes the Luhn check, and each token names the same card."""
    for number, card in model.TEST_CARDS.items():
        digits = [int(d) for d in reversed(number)]
        assert (
            sum(d if i % 2 == 0 else (2 * d - 9 if d > 4 else 2 * d) for i, d in enumerate(digits)) % 10 == 0
        )
        assert model.card_number(f"{number[:4]} {number[4:8]} {number[8:12]} {number[12:]}") is card
    with pytest.raises(model.DoubleError) as caught:
        model.card_number("4242")
    assert (caught.value.status, caught.value.code) == (402, "incorrect_number")
