"""The Stripe test double's account: its objects, their life, and the events they send.

Why apart from the HTTP face (:mod:`.server`): this is what tests drive. A test creates a session
through the API as the gateway does, then moves the payment through its life here (paid at once
or after an async bank debit, refunded, disputed, the dispute won or lost); every step updates the
objects, in Stripe's JSON shapes (``checkout.session``, ``payment_intent``, ``charge``,
``dispute``, ``customer``, ``payment_method``, ``setup_intent``, ``event``), and returns the event
Stripe would send, which the test can deliver, duplicate, reorder or sign with a wrong secret.

Saved cards (auto-recharge): a Checkout Session in ``setup`` mode, or in ``payment`` mode with
``payment_intent_data[setup_future_usage]``, saves the card paid with to the session's Customer;
an off-session PaymentIntent (``off_session=true``, ``confirm=true``) then charges it. What happens
is decided by the card, as in Stripe's test mode: :data:`TEST_CARDS` holds the documented test
numbers the double knows and what each does when saved, paid with by a person, and charged later.

Sharp edges: every id and object says test mode (``cs_test_…``, ``livemode: false``); an event
is a deep copy of its object at that moment, as Stripe's are, so a later change never shows in
an earlier event; objects are kept in memory up to ``OBJECTS_MAX`` (a long ``billingproxy up``
sheds its oldest events, and refuses new sessions once full).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
import secrets
import string
import time
from dataclasses import dataclass
from typing import Any

import stripe

logger = logging.getLogger(__name__)

API_VERSION = stripe.api_version
SESSION_TTL_S = 24 * 3600
# Stripe's bounds for a USD charge, in cents.
AMOUNT_MIN_CENTS, AMOUNT_MAX_CENTS = 50, 99_999_999
OBJECTS_MAX = 10_000
DISPUTE_CLOSED = frozenset({"won", "lost", "warning_closed", "prevented"})
_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class TestCard:
    """One of Stripe's documented test cards (https://docs.stripe.com/testing) and what it does.

    Each outcome is ``None`` (it succeeds) or the failure Stripe answers: ``card_declined`` (with
    ``decline_code: generic_decline``) or ``authentication_required`` (3-D Secure is needed and
    nobody is there to do it). A person at the checkout page always completes 3-D Secure, so
    ``paid_by_person`` never needs authentication; charging off-session may.
    """

    __test__ = False  # not a pytest class, despite its name

    number: str
    token: str  # Stripe's test PaymentMethod for the same card, for API calls (``pm_card_visa``)
    label: str
    saved: str | None  # saving it (setup mode) or a person paying with it at Checkout …
    paid_by_person: str | None
    charged_off_session: str | None  # … and charging it later with nobody present
    brand: str = "visa"


TEST_CARDS: dict[str, TestCard] = {
    card.number: card
    for card in (
        TestCard("4242424242424242", "pm_card_visa", "succeeds", None, None, None),
        TestCard(
            "4000000000000002",
            "pm_card_chargeDeclined",
            "is declined",
            "card_declined",
            "card_declined",
            "card_declined",
        ),
        TestCard(
            "4000002760003184",
            "pm_card_authenticationRequired",
            "requires authentication on every payment",
            None,
            None,
            "authentication_required",
        ),
        TestCard(
            "4000000000000341",
            "pm_card_chargeCustomerFail",
            "is saved, then declined when charged",
            None,
            "card_declined",
            "card_declined",
        ),
    )
}
CARD_OK = "4242424242424242"
_CARD_BY_TOKEN = {card.token: card for card in TEST_CARDS.values()}
_DECLINES = {
    "card_declined": ("generic_decline", "Your card was declined."),
    "authentication_required": (
        "authentication_required",
        "Your card was declined. This transaction requires authentication.",
    ),
}


class DoubleError(Exception):
    """A Stripe API error; the server answers it in Stripe's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        # More fields of Stripe's error object: a card error's decline_code, payment_intent, …
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        """The ``error`` object of Stripe's answer."""
        body: dict[str, Any] = {"message": self.message, "type": self.type}
        if self.param:
            body["param"] = self.param
        if self.code:
            body["code"] = self.code
        return {**body, **self.extra}


def missing(kind: str, object_id: str, param: str, *, status: int = 404) -> DoubleError:
    """Stripe's answer for an id it does not know (404 in the path, 400 as a parameter)."""
    return DoubleError(status, f"No such {kind}: '{object_id}'", param=param, code="resource_missing")


def card_number(value: str) -> TestCard:
    """The test card typed into the checkout page (spaces allowed), or a clear refusal."""
    card = TEST_CARDS.get(re.sub(r"[\s-]", "", value))
    if card is None:
        known = ", ".join(f"{n[:4]} {n[4:8]} {n[8:12]} {n[12:]}" for n in TEST_CARDS)
        raise DoubleError(
            402,
            f"Your card number is not one of the test cards the double knows ({known}).",
            type_="card_error",
            param="number",
            code="incorrect_number",
        )
    return card


def random_chars(n: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def new_id(prefix: str) -> str:
    """Ids shaped like Stripe's: ``cs_test_`` + 58 characters for sessions, ``pi_`` + 24 …"""
    return f"{prefix}_test_{random_chars(58)}" if prefix == "cs" else f"{prefix}_{random_chars(24)}"


def int_param(value: Any, param: str, *, lo: int = 0) -> int:
    if not isinstance(value, str) or not value.isdigit() or int(value) < lo:
        raise DoubleError(400, f"Invalid integer: {value}", param=param)
    return int(value)


def bool_param(value: Any, param: str) -> bool:
    """A form-encoded boolean (the SDK sends ``true``/``false``); absent is false."""
    if value is None or value == "false":
        return False
    if value == "true":
        return True
    raise DoubleError(400, f"Invalid boolean: {value}", param=param)


def _enum(value: Any, param: str, allowed: tuple[str, ...]) -> Any:
    if value is not None and value not in allowed:
        raise DoubleError(400, f"Invalid {param}: must be one of {', '.join(allowed)}", param=param)
    return value


def _string(value: Any, param: str, *, max_len: int = 5000) -> str | None:
    if value is not None and (not isinstance(value, str) or len(value) > max_len):
        raise DoubleError(400, f"Invalid string: {param} must be at most {max_len} characters", param=param)
    return value


def _room_for(objects: dict[str, Any], kind: str) -> None:
    """Objects are kept in memory: past ``OBJECTS_MAX`` of a kind, new ones are refused."""
    if len(objects) >= OBJECTS_MAX:
        raise DoubleError(
            429, f"The test double holds too many {kind}; restart it.", type_="rate_limit_error"
        )


def _amount_in_bounds(cents: int, param: str) -> None:
    if not AMOUNT_MIN_CENTS <= cents <= AMOUNT_MAX_CENTS:
        raise DoubleError(
            400,
            "The Checkout Session's total amount due must add up to at least $0.50 usd"
            if param == "line_items" and cents < AMOUNT_MIN_CENTS
            else "Amount must be at least $0.50 usd"
            if cents < AMOUNT_MIN_CENTS
            else "Amount must be no more than $999,999.99",
            param=param,
            code="amount_too_small" if cents < AMOUNT_MIN_CENTS else "amount_too_large",
        )


def _metadata(value: Any, param: str) -> dict[str, str]:
    if value is None or value == "":
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise DoubleError(400, "Invalid object", param=param)
    if len(value) > 50:
        raise DoubleError(400, "Metadata can have at most 50 keys", param=param)
    return dict(value)


class Account:
    """One fake Stripe account: its objects, the changes Stripe would make, the events it sends."""

    def __init__(self, *, webhook_secret: str) -> None:
        self.webhook_secret = webhook_secret
        # The base URL its checkout pages are served at (set by the server): each session's ``url``.
        self.url = ""
        self.sessions: dict[str, dict[str, Any]] = {}
        self.payment_intents: dict[str, dict[str, Any]] = {}
        self.charges: dict[str, dict[str, Any]] = {}
        self.disputes: dict[str, dict[str, Any]] = {}
        self.customers: dict[str, dict[str, Any]] = {}
        self.payment_methods: dict[str, dict[str, Any]] = {}
        self.setup_intents: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        # payment_intent_data[metadata] (setup_intent_data[metadata] in setup mode) per session:
        # what its payment or setup intent will carry; and its setup_future_usage.
        self._pi_metadata: dict[str, dict[str, str]] = {}
        self._future_usage: dict[str, str | None] = {}
        # The test card behind each saved payment method: what charging it will do.
        self._cards: dict[str, TestCard] = {}

    def _session(self, session_id: str) -> dict[str, Any]:
        session = self.sessions.get(session_id)
        if session is None:
            raise missing("checkout.session", session_id, "session")
        return session

    def _line_items(self, items: Any) -> tuple[str | None, int]:
        """Payment mode's ``price_data`` lines: their one currency and their total in cents."""
        if not isinstance(items, list) or not items:
            raise DoubleError(
                400, "Missing required param: line_items.", param="line_items", code="parameter_missing"
            )
        currency, total = None, 0
        for i, item in enumerate(items):
            price = item.get("price_data") if isinstance(item, dict) else None
            if not isinstance(price, dict):
                raise DoubleError(
                    400,
                    "The test double supports only line_items with price_data.",
                    param=f"line_items[{i}][price_data]",
                )
            quantity = int_param(item.get("quantity"), f"line_items[{i}][quantity]", lo=1)
            unit = int_param(price.get("unit_amount"), f"line_items[{i}][price_data][unit_amount]")
            if not isinstance(price.get("product_data"), dict) or not price["product_data"].get("name"):
                raise DoubleError(
                    400,
                    "Missing required param: line_items[0][price_data][product_data][name].",
                    param=f"line_items[{i}][price_data][product_data][name]",
                    code="parameter_missing",
                )
            if currency not in (None, price.get("currency")):
                raise DoubleError(
                    400,
                    "All line items must use the same currency.",
                    param=f"line_items[{i}][price_data][currency]",
                )
            currency = price.get("currency")
            total += unit * quantity
        if currency != "usd":
            raise DoubleError(
                400, "The test double supports only usd.", param="line_items[0][price_data][currency]"
            )
        _amount_in_bounds(total, "line_items")
        return currency, total

    @staticmethod
    def _setup_currency(params: dict[str, Any]) -> str | None:
        """Setup mode takes no line items; Stripe wants a currency unless the method types are named."""
        if params.get("line_items") is not None:
            raise DoubleError(400, "You cannot pass `line_items` in `setup` mode.", param="line_items")
        currency, types = params.get("currency"), params.get("payment_method_types")
        if types is not None and types != ["card"]:
            raise DoubleError(
                400,
                "The test double supports only payment_method_types[]=card.",
                param="payment_method_types",
            )
        if currency is None and types is None:
            raise DoubleError(
                400,
                "currency is required in setup mode when payment_method_types is not set.",
                param="currency",
                code="parameter_missing",
            )
        if currency not in (None, "usd"):
            raise DoubleError(400, "The test double supports only usd.", param="currency")
        return currency

    def _session_customer(self, params: dict[str, Any]) -> tuple[str | None, str]:
        """The session's Customer (an existing one), and ``customer_creation``."""
        customer = _string(params.get("customer"), "customer", max_len=255)
        creation = _enum(params.get("customer_creation"), "customer_creation", ("always", "if_required"))
        if customer is not None:
            self.customer(customer, param="customer")
            for other in ("customer_email", "customer_creation"):
                if params.get(other) is not None:
                    raise DoubleError(
                        400, f"You may only specify one of these parameters: customer, {other}.", param=other
                    )
        return customer, creation or "if_required"

    def create_session(self, params: dict[str, Any]) -> dict[str, Any]:
        """Validate like Stripe (for what the double supports) and store a new open session."""
        _room_for(self.sessions, "sessions")
        mode = params.get("mode")
        if mode not in ("payment", "setup"):
            raise DoubleError(400, "The test double supports only mode=payment and mode=setup.", param="mode")
        for param in ("success_url", "cancel_url"):
            value = params.get(param)
            if param == "success_url" and not value:
                raise DoubleError(
                    400, "Missing required param: success_url.", param="success_url", code="parameter_missing"
                )
            if value is not None and not (isinstance(value, str) and re.fullmatch(r"https?://\S+", value)):
                raise DoubleError(400, f"Not a valid URL: {value}", param=param, code="url_invalid")
        total: int | None
        if mode == "payment":
            currency, total = self._line_items(params.get("line_items"))
        else:
            currency, total = self._setup_currency(params), None
        reference = params.get("client_reference_id")
        if reference is not None and (not isinstance(reference, str) or len(reference) > 200):
            raise DoubleError(
                400, "client_reference_id must be at most 200 characters.", param="client_reference_id"
            )
        customer, customer_creation = self._session_customer(params)
        intent_param = "payment_intent_data" if mode == "payment" else "setup_intent_data"
        other_param = "setup_intent_data" if mode == "payment" else "payment_intent_data"
        if params.get(other_param) is not None:
            raise DoubleError(400, f"You cannot pass `{other_param}` in `{mode}` mode.", param=other_param)
        intent_data = params.get(intent_param) or {}
        if not isinstance(intent_data, dict):
            raise DoubleError(400, "Invalid object", param=intent_param)
        future_usage = _enum(
            intent_data.get("setup_future_usage"),
            f"{intent_param}[setup_future_usage]",
            ("on_session", "off_session"),
        )
        now = int(time.time())
        session_id = new_id("cs")
        session = {
            "id": session_id,
            "object": "checkout.session",
            "adaptive_pricing": None,
            "after_expiration": None,
            "allow_promotion_codes": None,
            "amount_subtotal": total,
            "amount_total": total,
            "automatic_tax": {"enabled": False, "liability": None, "provider": None, "status": None},
            "billing_address_collection": None,
            "cancel_url": params.get("cancel_url"),
            "client_reference_id": reference,
            "client_secret": None,
            "collected_information": None,
            "consent": None,
            "consent_collection": None,
            "created": now,
            "currency": currency,
            "currency_conversion": None,
            "custom_fields": [],
            "custom_text": {
                "after_submit": None,
                "shipping_address": None,
                "submit": None,
                "terms_of_service_acceptance": None,
            },
            "customer": customer,
            "customer_creation": None if customer else customer_creation,
            "customer_details": None,
            "customer_email": params.get("customer_email"),
            "discounts": [],
            "expires_at": now + SESSION_TTL_S,
            "invoice": None,
            "invoice_creation": {
                "enabled": False,
                "invoice_data": {
                    "account_tax_ids": None,
                    "custom_fields": None,
                    "description": None,
                    "footer": None,
                    "issuer": None,
                    "metadata": {},
                    "rendering_options": None,
                },
            },
            "livemode": False,
            "locale": None,
            "metadata": _metadata(params.get("metadata"), "metadata"),
            "mode": mode,
            "payment_intent": None,
            "payment_link": None,
            "payment_method_collection": "if_required" if mode == "payment" else "always",
            "payment_method_configuration_details": None,
            "payment_method_options": {"card": {"request_three_d_secure": "automatic"}},
            "payment_method_types": ["card"],
            "payment_status": "unpaid" if mode == "payment" else "no_payment_required",
            "phone_number_collection": {"enabled": False},
            "recovered_from": None,
            "saved_payment_method_options": None,
            "setup_intent": None,
            "shipping_address_collection": None,
            "shipping_cost": None,
            "shipping_options": [],
            "status": "open",
            "submit_type": None,
            "subscription": None,
            "success_url": params["success_url"],
            "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0}
            if mode == "payment"
            else None,
            "ui_mode": "hosted",
            "url": f"{self.url}/c/pay/{session_id}",
            "wallet_options": None,
        }
        self._pi_metadata[session_id] = _metadata(intent_data.get("metadata"), f"{intent_param}[metadata]")
        self._future_usage[session_id] = future_usage if mode == "payment" else "off_session"
        self.sessions[session_id] = session
        logger.info("test double: Checkout Session %s (%s) for %s cents", session_id, mode, total)
        return session

    # --- customers and their saved cards ------------------------------------------------------

    def customer(self, customer_id: Any, *, param: str = "id") -> dict[str, Any]:
        customer = self.customers.get(customer_id) if isinstance(customer_id, str) else None
        if customer is None:
            raise missing("customer", str(customer_id), param, status=404 if param == "id" else 400)
        return customer

    def create_customer(self, params: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/customers``: email, name, description, metadata (all optional, as in Stripe)."""
        _room_for(self.customers, "customers")
        customer_id = new_id("cus")
        self.customers[customer_id] = {
            "id": customer_id,
            "object": "customer",
            "address": None,
            "balance": 0,
            "created": int(time.time()),
            "currency": None,
            "default_source": None,
            "delinquent": False,
            "description": _string(params.get("description"), "description"),
            "discount": None,
            "email": _string(params.get("email"), "email", max_len=512),
            "invoice_prefix": random_chars(8).upper(),
            "invoice_settings": {
                "custom_fields": None,
                "default_payment_method": None,
                "footer": None,
                "rendering_options": None,
            },
            "livemode": False,
            "metadata": _metadata(params.get("metadata"), "metadata"),
            "name": _string(params.get("name"), "name", max_len=256),
            "next_invoice_sequence": 1,
            "phone": None,
            "preferred_locales": [],
            "shipping": None,
            "tax_exempt": "none",
            "test_clock": None,
        }
        self.event("customer.created", self.customers[customer_id])
        return self.customers[customer_id]

    def update_customer(self, customer_id: str, params: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/customers/{id}``: metadata merges (``""`` removes a key, as in Stripe);
        ``invoice_settings[default_payment_method]`` must be one of the customer's cards."""
        customer = self.customer(customer_id)
        changes: dict[str, Any] = {}
        for field, max_len in (("email", 512), ("name", 256), ("description", 5000)):
            if field in params:
                changes[field] = _string(params[field], field, max_len=max_len) or None
        metadata = {**customer["metadata"], **_metadata(params.get("metadata"), "metadata")}
        settings = params.get("invoice_settings")
        if settings is not None:
            default = settings.get("default_payment_method") if isinstance(settings, dict) else None
            param = "invoice_settings[default_payment_method]"
            if (
                default not in (None, "")
                and self.payment_methods.get(default, {}).get("customer") != customer_id
            ):
                raise DoubleError(
                    400,
                    f"No such PaymentMethod: '{default}' among this customer's saved payment methods.",
                    param=param,
                    code="resource_missing",
                )
            changes["invoice_settings"] = {
                **customer["invoice_settings"],
                "default_payment_method": default or None,
            }
        customer.update(changes, metadata={k: v for k, v in metadata.items() if v != ""})
        self.event("customer.updated", customer)
        return customer

    def customer_payment_methods(self, customer_id: str, *, param: str = "id") -> list[dict[str, Any]]:
        """The customer's saved cards, newest first (``GET /v1/customers/{id}/payment_methods``)."""
        self.customer(customer_id, param=param)
        saved = [pm for pm in self.payment_methods.values() if pm["customer"] == customer_id]
        return sorted(saved, key=lambda pm: pm["created"], reverse=True)

    def payment_method(self, reference: Any, *, param: str = "id") -> dict[str, Any]:
        """A saved payment method, or a fresh one for a Stripe test token (``pm_card_visa`` …)."""
        token = _CARD_BY_TOKEN.get(reference) if isinstance(reference, str) else None
        if token is not None:
            return self._new_payment_method(token, customer=None)
        pm = self.payment_methods.get(reference) if isinstance(reference, str) else None
        if pm is None:
            raise missing("PaymentMethod", str(reference), param, status=404 if param == "id" else 400)
        return pm

    def attach_payment_method(self, reference: str, customer_id: Any) -> dict[str, Any]:
        """``POST /v1/payment_methods/{id}/attach``: a card that declines when saved is refused."""
        if customer_id is None:
            raise DoubleError(
                400, "Missing required param: customer.", param="customer", code="parameter_missing"
            )
        self.customer(customer_id, param="customer")  # before a test token makes a payment method
        pm = self.payment_method(reference)
        if pm["customer"] not in (None, customer_id):
            raise DoubleError(
                400,
                "The payment method you provided has already been attached to a customer.",
                param="payment_method",
            )
        failure = self._cards[pm["id"]].saved
        if failure is not None:
            raise _card_error(failure, extra={"payment_method": copy.deepcopy(pm)})
        self._save(pm, customer_id)
        return pm

    def _new_payment_method(self, card: TestCard, *, customer: str | None) -> dict[str, Any]:
        pm_id, year = new_id("pm"), time.gmtime().tm_year + 5
        self.payment_methods[pm_id] = {
            "id": pm_id,
            "object": "payment_method",
            "allow_redisplay": "unspecified",
            "billing_details": {"address": None, "email": None, "name": None, "phone": None},
            "card": {
                "brand": card.brand,
                "checks": {
                    "address_line1_check": None,
                    "address_postal_code_check": None,
                    "cvc_check": "pass",
                },
                "country": "US",
                "display_brand": card.brand,
                "exp_month": 12,
                "exp_year": year,
                "fingerprint": hashlib.sha256(card.number.encode()).hexdigest()[:16],
                "funding": "credit",
                "generated_from": None,
                "last4": card.number[-4:],
                "networks": {"available": [card.brand], "preferred": None},
                "regulated_status": "unregulated",
                "three_d_secure_usage": {"supported": True},
                "wallet": None,
            },
            "created": int(time.time()),
            "customer": None,
            "livemode": False,
            "metadata": {},
            "type": "card",
        }
        self._cards[pm_id] = card
        if customer is not None:
            self._save(self.payment_methods[pm_id], customer)
        return self.payment_methods[pm_id]

    def _save(self, pm: dict[str, Any], customer: str) -> None:
        pm["customer"] = customer
        self.event("payment_method.attached", pm)

    # --- payment intents ------------------------------------------------------------------------

    def payment_intent(self, pi_id: str) -> dict[str, Any]:
        pi = self.payment_intents.get(pi_id)
        if pi is None:
            raise missing("payment_intent", pi_id, "intent")
        return pi

    def setup_intent(self, seti_id: str) -> dict[str, Any]:
        seti = self.setup_intents.get(seti_id)
        if seti is None:
            raise missing("setup_intent", seti_id, "intent")
        return seti

    def create_payment_intent(self, params: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """``POST /v1/payment_intents``; with ``confirm=true`` the card is charged at once, and
        ``off_session=true`` says nobody is there to authenticate. Returns the intent and the events
        Stripe would send; a failed charge leaves it in ``requires_payment_method`` with its
        ``last_payment_error`` (the server answers that as the 402 card error, see
        :func:`payment_error`)."""
        _room_for(self.payment_intents, "payment intents")
        if params.get("amount") is None:
            raise DoubleError(
                400, "Missing required param: amount.", param="amount", code="parameter_missing"
            )
        amount = int_param(params["amount"], "amount")
        _amount_in_bounds(amount, "amount")
        if params.get("currency") is None:
            raise DoubleError(
                400, "Missing required param: currency.", param="currency", code="parameter_missing"
            )
        if params["currency"] != "usd":
            raise DoubleError(400, "The test double supports only usd.", param="currency")
        customer = params.get("customer")
        if customer is not None:
            self.customer(customer, param="customer")
        confirm = bool_param(params.get("confirm"), "confirm")
        off_session = bool_param(params.get("off_session"), "off_session")
        if off_session and not confirm:
            raise DoubleError(
                400, "You can only pass `off_session` when `confirm` is true.", param="off_session"
            )
        if confirm and params.get("payment_method") is None:
            raise DoubleError(
                400,
                "You cannot confirm this PaymentIntent because it's missing a payment method.",
                param="payment_method",
                code="payment_intent_unexpected_state",
            )
        metadata = _metadata(params.get("metadata"), "metadata")
        description = _string(params.get("description"), "description")
        future_usage = _enum(
            params.get("setup_future_usage"), "setup_future_usage", ("on_session", "off_session")
        )
        # Last: a test token (``pm_card_visa``) makes a new payment method, once all else is valid.
        pm = None
        if params.get("payment_method") is not None:
            pm = self.payment_method(params["payment_method"], param="payment_method")
            if pm["customer"] is not None and pm["customer"] != customer:
                raise DoubleError(
                    400,
                    f"The provided PaymentMethod belongs to Customer {pm['customer']}, "
                    f"not to {customer or 'no Customer'}: pass its Customer too.",
                    param="payment_method",
                )
        pi = self._new_payment_intent(
            amount,
            customer=customer,
            payment_method=pm["id"] if pm else None,
            metadata=metadata,
            description=description,
            setup_future_usage=future_usage,
        )
        events = [self.event("payment_intent.created", pi)]
        if pm is None or not confirm:
            pi["status"] = "requires_confirmation" if pm else "requires_payment_method"
            return pi, events
        card = self._cards[pm["id"]]
        failure = card.charged_off_session if off_session else card.paid_by_person
        if not off_session and card.charged_off_session == "authentication_required":
            # On-session: the customer's browser would now run 3-D Secure (Stripe.js).
            pi.update(
                status="requires_action",
                next_action={"type": "use_stripe_sdk", "use_stripe_sdk": {"type": "three_d_secure_redirect"}},
            )
            return pi, [*events, self.event("payment_intent.requires_action", pi)]
        charge = self._new_charge(pi, failure=failure)
        if failure is None:
            pi.update(status="succeeded", amount_received=amount)
            return pi, [*events, self.event("payment_intent.succeeded", pi)]
        decline_code, message = _DECLINES[failure]
        pi.update(
            status="requires_payment_method",
            last_payment_error={
                "charge": charge["id"],
                "code": failure,
                "decline_code": decline_code,
                "doc_url": _doc_url(failure),
                "message": message,
                "payment_method": copy.deepcopy(pm),
                "type": "card_error",
            },
        )
        return pi, [*events, self.event("payment_intent.payment_failed", pi)]

    def _new_payment_intent(
        self,
        amount: int,
        *,
        customer: str | None,
        payment_method: str | None,
        metadata: dict[str, str],
        method_type: str = "card",
        description: str | None = None,
        receipt_email: str | None = None,
        setup_future_usage: str | None = None,
    ) -> dict[str, Any]:
        pi_id = new_id("pi")
        self.payment_intents[pi_id] = {
            "id": pi_id,
            "object": "payment_intent",
            "amount": amount,
            "amount_capturable": 0,
            "amount_details": {"tip": {}},
            "amount_received": 0,
            "application": None,
            "application_fee_amount": None,
            "automatic_payment_methods": None,
            "canceled_at": None,
            "cancellation_reason": None,
            "capture_method": "automatic_async",
            "client_secret": f"{pi_id}_secret_{random_chars(25)}",
            "confirmation_method": "automatic",
            "created": int(time.time()),
            "currency": "usd",
            "customer": customer,
            "description": description,
            "last_payment_error": None,
            "latest_charge": None,
            "livemode": False,
            "metadata": metadata,
            "next_action": None,
            "on_behalf_of": None,
            "payment_method": payment_method,
            "payment_method_configuration_details": None,
            "payment_method_options": {},
            "payment_method_types": [method_type],
            "processing": None,
            "receipt_email": receipt_email,
            "review": None,
            "setup_future_usage": setup_future_usage,
            "shipping": None,
            "source": None,
            "statement_descriptor": None,
            "statement_descriptor_suffix": None,
            "status": "requires_payment_method",
            "transfer_data": None,
            "transfer_group": None,
        }
        return self.payment_intents[pi_id]

    def _new_charge(
        self, pi: dict[str, Any], *, failure: str | None = None, pending: bool = False
    ) -> dict[str, Any]:
        """The intent's charge: succeeded, ``pending`` (an async bank debit), or failed."""
        ch_id, amount, paid = new_id("ch"), pi["amount"], failure is None and not pending
        decline_code, message = _DECLINES.get(failure or "", (None, None))
        self.charges[ch_id] = {
            "id": ch_id,
            "object": "charge",
            "amount": amount,
            "amount_captured": amount if paid else 0,
            "amount_refunded": 0,
            "application": None,
            "application_fee": None,
            "application_fee_amount": None,
            "balance_transaction": new_id("txn") if paid else None,
            "billing_details": {"address": None, "email": pi["receipt_email"], "name": None, "phone": None},
            "calculated_statement_descriptor": "BILLINGPROXY",
            "captured": paid,
            "created": int(time.time()),
            "currency": pi["currency"],
            "customer": pi["customer"],
            "description": pi["description"],
            "disputed": False,
            "failure_balance_transaction": None,
            "failure_code": failure,
            "failure_message": message,
            "fraud_details": {},
            "livemode": False,
            "metadata": {},
            "on_behalf_of": None,
            "outcome": {
                "network_status": "approved_by_network" if failure is None else "declined_by_network",
                "reason": decline_code,
                "risk_level": "normal",
                "seller_message": "Payment complete."
                if failure is None
                else "The bank did not return any further details with this decline.",
                "type": "authorized" if failure is None else "issuer_declined",
            },
            "paid": paid,
            "payment_intent": pi["id"],
            "payment_method": pi["payment_method"],
            "payment_method_details": {"type": pi["payment_method_types"][0]},
            "receipt_email": pi["receipt_email"],
            "receipt_number": None,
            "receipt_url": None,
            "refunded": False,
            "review": None,
            "shipping": None,
            "source": None,
            "source_transfer": None,
            "statement_descriptor": None,
            "statement_descriptor_suffix": None,
            "status": "succeeded" if paid else "pending" if pending else "failed",
            "transfer_data": None,
            "transfer_group": None,
        }
        pi["latest_charge"] = ch_id
        return self.charges[ch_id]

    # --- the life of a payment (what Stripe would do, returning the events it would send) -------

    def complete(
        self, session_id: str, *, async_payment: bool = False, card: str = CARD_OK
    ) -> dict[str, Any]:
        """The customer pays (or, in setup mode, saves) with the test card ``card``. Card: paid at
        once. ``async_payment``: a bank debit, still processing (``payment_status: unpaid``) until
        :meth:`async_result`. A card that declines raises the card error and leaves the session
        open, as Stripe's page does. The card is saved to the session's Customer in setup mode and
        with ``setup_future_usage``."""
        session = self._session(session_id)
        if session["status"] != "open":
            raise DoubleError(400, f"This Checkout Session is {session['status']}.")
        test_card = card_number(card)
        setup = session["mode"] == "setup"
        failure = test_card.saved if setup else test_card.paid_by_person
        if failure is not None and not async_payment:
            raise _card_error(failure)
        customer = session["customer"]
        if customer is None and session["customer_creation"] == "always":
            customer = self.create_customer({"email": session["customer_email"]})["id"]
        details = {
            "address": None,
            "email": session["customer_email"],
            "name": None,
            "phone": None,
            "tax_exempt": "none",
            "tax_ids": [],
        }
        future_usage = self._future_usage.get(session_id)
        if setup:
            pm = self._new_payment_method(test_card, customer=customer)
            seti = self._new_setup_intent(session_id, customer, pm["id"])
            self.event("setup_intent.succeeded", seti)
            session.update(
                status="complete", setup_intent=seti["id"], customer=customer, customer_details=details
            )
            return self.event("checkout.session.completed", session)
        if async_payment:
            pm_id = new_id("pm")  # a bank account: not a card the double keeps
        else:
            pm_id = self._new_payment_method(test_card, customer=customer if future_usage else None)["id"]
        pi = self._new_payment_intent(
            session["amount_total"],
            customer=customer,
            payment_method=pm_id,
            metadata=dict(self._pi_metadata.get(session_id, {})),
            method_type="us_bank_account" if async_payment else "card",
            receipt_email=session["customer_email"],
            setup_future_usage=future_usage,
        )
        self._new_charge(pi, pending=async_payment)
        if async_payment:
            pi["status"] = "processing"
        else:
            pi.update(status="succeeded", amount_received=pi["amount"])
            self.event("payment_intent.succeeded", pi)
        session.update(
            status="complete",
            payment_status="unpaid" if async_payment else "paid",
            payment_intent=pi["id"],
            customer=customer,
            customer_details=details,
        )
        return self.event("checkout.session.completed", session)

    def _new_setup_intent(self, session_id: str, customer: str | None, pm_id: str) -> dict[str, Any]:
        seti_id = new_id("seti")
        self.setup_intents[seti_id] = {
            "id": seti_id,
            "object": "setup_intent",
            "application": None,
            "automatic_payment_methods": None,
            "cancellation_reason": None,
            "client_secret": f"{seti_id}_secret_{random_chars(25)}",
            "created": int(time.time()),
            "customer": customer,
            "description": None,
            "flow_directions": None,
            "last_setup_error": None,
            "latest_attempt": new_id("setatt"),
            "livemode": False,
            "mandate": None,
            "metadata": dict(self._pi_metadata.get(session_id, {})),
            "next_action": None,
            "on_behalf_of": None,
            "payment_method": pm_id,
            "payment_method_configuration_details": None,
            "payment_method_options": {
                "card": {"mandate_options": None, "network": None, "request_three_d_secure": "automatic"}
            },
            "payment_method_types": ["card"],
            "single_use_mandate": None,
            "status": "succeeded",
            "usage": "off_session",
        }
        return self.setup_intents[seti_id]

    def async_result(self, session_id: str, *, succeeded: bool) -> dict[str, Any]:
        """The bank debit of an async payment settles (or fails)."""
        session = self._session(session_id)
        pi = self.payment_intents[session["payment_intent"]]
        charge = self.charges[pi["latest_charge"]]
        if succeeded:
            session["payment_status"] = "paid"
            pi.update(status="succeeded", amount_received=pi["amount"])
            charge.update(
                status="succeeded",
                paid=True,
                captured=True,
                amount_captured=charge["amount"],
                balance_transaction=new_id("txn"),
            )
            return self.event("checkout.session.async_payment_succeeded", session)
        pi.update(
            status="requires_payment_method",
            last_payment_error={
                "code": "payment_method_not_available",
                "message": "The payment failed.",
                "type": "card_error",
            },
        )
        charge.update(
            status="failed", failure_code="insufficient_funds", failure_message="The payment failed."
        )
        return self.event("checkout.session.async_payment_failed", session)

    def expire(self, session_id: str) -> dict[str, Any]:
        session = self._session(session_id)
        session["status"] = "expired"
        return self.event("checkout.session.expired", session)

    def refund(self, payment_intent: str, amount: int | None = None) -> dict[str, Any]:
        """Refund ``amount`` cents more (all that is left by default): ``charge.refunded``."""
        charge = self.charges[self.payment_intents[payment_intent]["latest_charge"]]
        left = charge["amount_captured"] - charge["amount_refunded"]
        amount = left if amount is None else amount
        if not 0 < amount <= left:
            raise DoubleError(
                400,
                f"Refund amount ({amount}) is greater than unrefunded amount on charge ({left})",
                param="amount",
                code="amount_too_large",
            )
        charge["amount_refunded"] += amount
        charge["refunded"] = charge["amount_refunded"] == charge["amount_captured"]
        return self.event("charge.refunded", charge)

    def dispute(
        self, payment_intent: str, *, status: str = "needs_response", reason: str = "fraudulent"
    ) -> dict[str, Any]:
        """The cardholder disputes the payment: ``charge.dispute.created``."""
        charge = self.charges[self.payment_intents[payment_intent]["latest_charge"]]
        dispute_id = new_id("dp")
        now = int(time.time())
        self.disputes[dispute_id] = {
            "id": dispute_id,
            "object": "dispute",
            "amount": charge["amount"] - charge["amount_refunded"],
            "balance_transactions": [],
            "charge": charge["id"],
            "created": now,
            "currency": charge["currency"],
            "enhanced_eligibility_types": [],
            "evidence": {"customer_email_address": charge["receipt_email"], "uncategorized_text": None},
            "evidence_details": {
                "due_by": now + 7 * 86400,
                "enhanced_eligibility": {},
                "has_evidence": False,
                "past_due": False,
                "submission_count": 0,
            },
            "is_charge_refundable": False,
            "livemode": False,
            "metadata": {},
            "network_reason_code": None,
            "payment_intent": payment_intent,
            "payment_method_details": {
                "card": {"brand": "visa", "case_type": "chargeback", "network_reason_code": "10.4"},
                "type": "card",
            },
            "reason": reason,
            "status": status,
        }
        charge["disputed"] = True
        return self.event("charge.dispute.created", self.disputes[dispute_id])

    def update_dispute(self, dispute_id: str, status: str) -> dict[str, Any]:
        """A dispute moves on: ``charge.dispute.closed`` for won/lost/…, else ``…updated``."""
        dispute = self.disputes[dispute_id]
        dispute["status"] = status
        return self.event(
            "charge.dispute.closed" if status in DISPUTE_CLOSED else "charge.dispute.updated", dispute
        )

    def event(self, type_: str, obj: dict[str, Any]) -> dict[str, Any]:
        """An event as Stripe sends it: a snapshot of the object at this moment."""
        event = {
            "id": new_id("evt"),
            "object": "event",
            "api_version": API_VERSION,
            "created": int(time.time()),
            "data": {"object": copy.deepcopy(obj)},
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": type_,
        }
        if len(self.events) >= OBJECTS_MAX:
            del self.events[: OBJECTS_MAX // 2]
        self.events.append(event)
        return event

    # --- webhooks ------------------------------------------------------------------------------

    @staticmethod
    def payload(event: dict[str, Any]) -> str:
        return json.dumps(event, indent=2)  # Stripe sends pretty-printed JSON

    def sign(self, payload: str, *, timestamp: int | None = None, secret: str | None = None) -> str:
        """The ``Stripe-Signature`` header, by the SDK's own implementation of the scheme."""
        header: str = stripe.WebhookSignature.generate_signature_header(  # unannotated in the SDK
            payload, secret or self.webhook_secret, timestamp
        )
        return header


def _doc_url(code: str) -> str:
    return f"https://stripe.com/docs/error-codes/{code.replace('_', '-')}"


def _card_error(failure: str, *, extra: dict[str, Any] | None = None) -> DoubleError:
    decline_code, message = _DECLINES[failure]
    return DoubleError(
        402,
        message,
        type_="card_error",
        code=failure,
        extra={"decline_code": decline_code, "doc_url": _doc_url(failure), **(extra or {})},
    )


def payment_error(pi: dict[str, Any]) -> DoubleError | None:
    """The 402 ``card_error`` Stripe answers when confirming ``pi`` failed: its
    ``last_payment_error`` with the intent itself in ``error.payment_intent``."""
    error = pi["last_payment_error"]
    if error is None:
        return None
    extra = {k: v for k, v in error.items() if k not in ("message", "type", "code")}
    return DoubleError(
        402,
        error["message"],
        type_="card_error",
        code=error["code"],
        extra={**extra, "payment_intent": copy.deepcopy(pi)},
    )
