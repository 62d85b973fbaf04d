"""The Stripe test double's account: its objects, their life, and the events they send.

Why apart from the HTTP face (:mod:`.server`): this is what tests drive. A test creates a session
through the API as the gateway does, then moves the payment through its life here (paid at once
or after an async bank debit, refunded, disputed, the dispute won or lost); every step updates the
objects, in Stripe's JSON shapes (``checkout.session``, ``payment_intent``, ``charge``,
``dispute``, ``event``), and returns the event Stripe would send, which the test can deliver,
duplicate, reorder or sign with a wrong secret.

Sharp edges: every id and object says test mode (``cs_test_…``, ``livemode: false``); an event
is a deep copy of its object at that moment, as Stripe's are, so a later change never shows in
an earlier event; objects are kept in memory up to ``OBJECTS_MAX`` (a long ``billingproxy up``
sheds its oldest events, and refuses new sessions once full).
"""

from __future__ import annotations

import copy
import json
import logging
import re
import secrets
import string
import time
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
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def random_chars(n: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def new_id(prefix: str) -> str:
    """Ids shaped like Stripe's: ``cs_test_`` + 58 characters for sessions, ``pi_`` + 24 …"""
    return f"{prefix}_test_{random_chars(58)}" if prefix == "cs" else f"{prefix}_{random_chars(24)}"


def int_param(value: Any, param: str, *, lo: int = 0) -> int:
    if not isinstance(value, str) or not value.isdigit() or int(value) < lo:
        raise DoubleError(400, f"Invalid integer: {value}", param=param)
    return int(value)


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
        self.events: list[dict[str, Any]] = []
        # payment_intent_data[metadata] per session: what its payment intent will carry.
        self._pi_metadata: dict[str, dict[str, str]] = {}

    def _session(self, session_id: str) -> dict[str, Any]:
        session = self.sessions.get(session_id)
        if session is None:
            raise DoubleError(
                404, f"No such checkout.session: '{session_id}'", param="session", code="resource_missing"
            )
        return session

    def create_session(self, params: dict[str, Any]) -> dict[str, Any]:
        """Validate like Stripe (for what the double supports) and store a new open session."""
        if len(self.sessions) >= OBJECTS_MAX:
            raise DoubleError(
                429, "The test double holds too many sessions; restart it.", type_="rate_limit_error"
            )
        if params.get("mode") != "payment":
            raise DoubleError(400, "The test double supports only mode=payment.", param="mode")
        for param in ("success_url", "cancel_url"):
            value = params.get(param)
            if param == "success_url" and not value:
                raise DoubleError(
                    400, "Missing required param: success_url.", param="success_url", code="parameter_missing"
                )
            if value is not None and not (isinstance(value, str) and re.fullmatch(r"https?://\S+", value)):
                raise DoubleError(400, f"Not a valid URL: {value}", param=param, code="url_invalid")
        items = params.get("line_items")
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
        if not AMOUNT_MIN_CENTS <= total <= AMOUNT_MAX_CENTS:
            raise DoubleError(
                400,
                "The Checkout Session's total amount due must add up to at least $0.50 usd"
                if total < AMOUNT_MIN_CENTS
                else "Amount must be no more than $999,999.99",
                param="line_items",
                code="amount_too_small" if total < AMOUNT_MIN_CENTS else "amount_too_large",
            )
        reference = params.get("client_reference_id")
        if reference is not None and (not isinstance(reference, str) or len(reference) > 200):
            raise DoubleError(
                400, "client_reference_id must be at most 200 characters.", param="client_reference_id"
            )
        pi_data = params.get("payment_intent_data") or {}
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
            "customer": None,
            "customer_creation": "if_required",
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
            "mode": "payment",
            "payment_intent": None,
            "payment_link": None,
            "payment_method_collection": "if_required",
            "payment_method_configuration_details": None,
            "payment_method_options": {"card": {"request_three_d_secure": "automatic"}},
            "payment_method_types": ["card"],
            "payment_status": "unpaid",
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
            "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
            "ui_mode": "hosted",
            "url": f"{self.url}/c/pay/{session_id}",
            "wallet_options": None,
        }
        self._pi_metadata[session_id] = _metadata(
            pi_data.get("metadata") if isinstance(pi_data, dict) else None, "payment_intent_data[metadata]"
        )
        self.sessions[session_id] = session
        logger.info("test double: Checkout Session %s for %d cents", session_id, total)
        return session

    # --- the life of a payment (what Stripe would do, returning the events it would send) -------

    def complete(self, session_id: str, *, async_payment: bool = False) -> dict[str, Any]:
        """The customer pays. Card: paid at once. ``async_payment``: a bank debit, still processing
        (``payment_status: unpaid``) until :meth:`async_result`."""
        session = self._session(session_id)
        if session["status"] != "open":
            raise DoubleError(400, f"This Checkout Session is {session['status']}.")
        now = int(time.time())
        pi_id, ch_id = new_id("pi"), new_id("ch")
        amount = session["amount_total"]
        method = "us_bank_account" if async_payment else "card"
        self.payment_intents[pi_id] = {
            "id": pi_id,
            "object": "payment_intent",
            "amount": amount,
            "amount_capturable": 0,
            "amount_details": {"tip": {}},
            "amount_received": 0 if async_payment else amount,
            "application": None,
            "application_fee_amount": None,
            "automatic_payment_methods": None,
            "canceled_at": None,
            "cancellation_reason": None,
            "capture_method": "automatic_async",
            "client_secret": f"{pi_id}_secret_{random_chars(25)}",
            "confirmation_method": "automatic",
            "created": now,
            "currency": session["currency"],
            "customer": None,
            "description": None,
            "last_payment_error": None,
            "latest_charge": ch_id,
            "livemode": False,
            "metadata": dict(self._pi_metadata.get(session_id, {})),
            "next_action": None,
            "on_behalf_of": None,
            "payment_method": new_id("pm"),
            "payment_method_configuration_details": None,
            "payment_method_options": {},
            "payment_method_types": [method],
            "processing": None,
            "receipt_email": session["customer_email"],
            "review": None,
            "setup_future_usage": None,
            "shipping": None,
            "source": None,
            "statement_descriptor": None,
            "statement_descriptor_suffix": None,
            "status": "processing" if async_payment else "succeeded",
            "transfer_data": None,
            "transfer_group": None,
        }
        self.charges[ch_id] = {
            "id": ch_id,
            "object": "charge",
            "amount": amount,
            "amount_captured": 0 if async_payment else amount,
            "amount_refunded": 0,
            "application": None,
            "application_fee": None,
            "application_fee_amount": None,
            "balance_transaction": None if async_payment else new_id("txn"),
            "billing_details": {
                "address": None,
                "email": session["customer_email"],
                "name": None,
                "phone": None,
            },
            "calculated_statement_descriptor": "BILLINGPROXY",
            "captured": not async_payment,
            "created": now,
            "currency": session["currency"],
            "customer": None,
            "description": None,
            "disputed": False,
            "failure_balance_transaction": None,
            "failure_code": None,
            "failure_message": None,
            "fraud_details": {},
            "livemode": False,
            "metadata": {},
            "on_behalf_of": None,
            "outcome": {
                "network_status": "approved_by_network",
                "reason": None,
                "risk_level": "normal",
                "seller_message": "Payment complete.",
                "type": "authorized",
            },
            "paid": not async_payment,
            "payment_intent": pi_id,
            "payment_method": self.payment_intents[pi_id]["payment_method"],
            "payment_method_details": {"type": method},
            "receipt_email": session["customer_email"],
            "receipt_number": None,
            "receipt_url": None,
            "refunded": False,
            "review": None,
            "shipping": None,
            "source": None,
            "source_transfer": None,
            "statement_descriptor": None,
            "statement_descriptor_suffix": None,
            "status": "pending" if async_payment else "succeeded",
            "transfer_data": None,
            "transfer_group": None,
        }
        session.update(
            status="complete",
            payment_status="unpaid" if async_payment else "paid",
            payment_intent=pi_id,
            customer_details={
                "address": None,
                "email": session["customer_email"],
                "name": None,
                "phone": None,
                "tax_exempt": "none",
                "tax_ids": [],
            },
        )
        return self.event("checkout.session.completed", session)

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
