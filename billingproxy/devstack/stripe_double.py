"""A local Stripe test double — TEST MODE, loopback only, no real money.

Why it exists: phase 4 of the journey (pay → webhook → credit → served) must work on one machine
with no Stripe account, and the tests must run it too. The double answers the few Stripe API calls
the gateway's SDK makes, in Stripe's JSON shapes (``checkout.session``, ``payment_intent``,
``charge``, ``dispute``, ``event``), and serves a small checkout page whose "Pay (test)" button
sends a ``checkout.session.completed`` event, signed with Stripe's scheme
(``stripe.WebhookSignature``), to the webhook URL — what Stripe does after a real payment.

Why it can never take part in production: it binds loopback addresses only (anything else is
refused), every id and object says test mode (``cs_test_…``, ``livemode: false``), the page says
TEST MODE, and ``billingproxy up`` starts it only when no Stripe key is configured.

Stripe API endpoints (form-encoded requests, JSON answers, Stripe's error shape):

- ``POST /v1/checkout/sessions`` — create (``mode=payment`` with ``price_data`` line items);
  ``Idempotency-Key`` honoured like Stripe: a replay answers the first session, the same key with
  other parameters is an ``idempotency_error``.
- ``GET /v1/checkout/sessions/{id}``, ``GET /v1/checkout/sessions``, and
  ``POST /v1/checkout/sessions/{id}/expire``.

Pages: ``GET /c/pay/{id}`` (checkout), ``POST /c/pay/{id}`` (pay), ``GET /healthz``.

Tests drive the rest of a payment's life with :class:`StripeDouble`'s methods (async payment
results, refunds, disputes): each updates the objects and returns the event Stripe would send,
which the test can deliver, duplicate, reorder or sign with a wrong secret.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import hashlib
import html
import ipaddress
import json
import logging
import os
import re
import secrets
import string
import time
from collections.abc import Iterable, Sequence
from typing import Any

import aiohttp
import stripe
from aiohttp import web

logger = logging.getLogger(__name__)

API_VERSION = stripe.api_version
SESSION_TTL_S = 24 * 3600
# Stripe's bounds for a USD charge, in cents.
AMOUNT_MIN_CENTS, AMOUNT_MAX_CENTS = 50, 99_999_999
WEBHOOK_ATTEMPTS = 3
WEBHOOK_TIMEOUT_S = 10
OBJECTS_MAX = 10_000
DISPUTE_CLOSED = frozenset({"won", "lost", "warning_closed", "prevented"})
_ALPHABET = string.ascii_letters + string.digits


class DoubleError(Exception):
    """A Stripe API error, answered in Stripe's shape."""

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

    def response(self) -> web.Response:
        error: dict[str, Any] = {"message": self.message, "type": self.type}
        if self.param:
            error["param"] = self.param
        if self.code:
            error["code"] = self.code
        return web.json_response({"error": error}, status=self.status, headers={"request-id": _request_id()})


def _rand(n: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def _request_id() -> str:
    return "req_" + _rand(14)


def new_id(prefix: str) -> str:
    """Ids shaped like Stripe's: ``cs_test_`` + 58 characters for sessions, ``pi_`` + 24 …"""
    return f"{prefix}_test_{_rand(58)}" if prefix == "cs" else f"{prefix}_{_rand(24)}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def decode_form(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Stripe's form encoding (``line_items[0][price_data][currency]=usd``) → nested dicts/lists."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        parts = re.findall(r"[^\[\]]+", key)
        if not parts:
            continue
        node = root
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise DoubleError(400, f"Invalid parameter: {key}", param=key)
            node = child
        node[parts[-1]] = value
    return _listify(root)


def _listify(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    items = {k: _listify(v) for k, v in node.items()}
    if items and all(k.isdigit() for k in items):
        return [items[k] for k in sorted(items, key=int)]
    return items


def _int_param(value: Any, param: str, *, lo: int = 0) -> int:
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


class StripeDouble:
    """One fake Stripe account: its objects, its API, its checkout pages, its webhook sender."""

    def __init__(self, *, secret_key: str, webhook_secret: str, webhook_url: str) -> None:
        if not secret_key or not webhook_secret:
            raise ValueError("the Stripe test double needs a secret key and a webhook secret")
        self.secret_key = secret_key
        self.webhook_secret = webhook_secret
        self.webhook_url = webhook_url
        self.url = ""
        self.sessions: dict[str, dict[str, Any]] = {}
        self.payment_intents: dict[str, dict[str, Any]] = {}
        self.charges: dict[str, dict[str, Any]] = {}
        self.disputes: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.deliveries: list[tuple[str, int]] = []  # (event id, HTTP status or 0 if unreachable)
        self._idempotency: dict[str, tuple[str, dict[str, Any]]] = {}
        # payment_intent_data[metadata] per session: what its payment intent will carry.
        self._pi_metadata: dict[str, dict[str, str]] = {}
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    # --- serving -------------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._stripe_errors], client_max_size=256 * 1024)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_post("/v1/checkout/sessions", self._api_create_session)
        app.router.add_get("/v1/checkout/sessions", self._api_list_sessions)
        app.router.add_get("/v1/checkout/sessions/{id}", self._api_get_session)
        app.router.add_post("/v1/checkout/sessions/{id}/expire", self._api_expire_session)
        app.router.add_get("/c/pay/{id}", self._checkout_page)
        app.router.add_post("/c/pay/{id}", self._pay)
        app.cleanup_ctx.append(self._http_session)
        return app

    async def _http_session(self, _app: web.Application):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_S)) as session:
            self._http = session
            yield
            self._http = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve in the running loop; returns the base URL (``STRIPE_API_BASE``)."""
        if not is_loopback(host):
            raise ValueError(f"the Stripe test double listens on loopback only, not {host!r}")
        self._runner = web.AppRunner(self.make_app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0][1]
        self.url = f"http://{host}:{bound}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _stripe_errors(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            if request.path.startswith("/v1/"):
                self._authenticate(request)
            return await handler(request)
        except DoubleError as error:
            return error.response()

    def _authenticate(self, request: web.Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), self.secret_key.encode()
        ):
            shown = f"{token[:8]}****{token[-4:]}" if len(token) > 12 else "****"
            raise DoubleError(401, f"Invalid API Key provided: {shown}")

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "mode": "test double"})

    # --- Stripe API ----------------------------------------------------------------------------

    async def _api_create_session(self, request: web.Request) -> web.Response:
        raw = await request.text()
        params = decode_form((await request.post()).items())
        key = request.headers.get("idempotency-key")
        fingerprint = hashlib.sha256(raw.encode()).hexdigest()
        if key is not None:
            first = self._idempotency.get(key)
            if first is not None:
                if first[0] != fingerprint:
                    raise DoubleError(
                        400,
                        "Keys for idempotent requests can only be used with the same parameters they "
                        "were first used with. Try using a key other than "
                        f"'{key}' if you meant to execute a different request.",
                        type_="idempotency_error",
                    )
                return web.json_response(
                    first[1], headers={"idempotent-replayed": "true", "request-id": _request_id()}
                )
        session = self.create_session(params)
        if key is not None:
            self._idempotency[key] = (fingerprint, session)
        return web.json_response(session, headers={"request-id": _request_id()})

    async def _api_get_session(self, request: web.Request) -> web.Response:
        return web.json_response(
            self._session(request.match_info["id"]), headers={"request-id": _request_id()}
        )

    async def _api_list_sessions(self, request: web.Request) -> web.Response:
        limit = _int_param(request.query.get("limit", "10"), "limit", lo=1)
        newest = sorted(self.sessions.values(), key=lambda s: s["created"], reverse=True)[: min(limit, 100)]
        return web.json_response(
            {
                "object": "list",
                "data": newest,
                "has_more": len(self.sessions) > len(newest),
                "url": "/v1/checkout/sessions",
            },
            headers={"request-id": _request_id()},
        )

    async def _api_expire_session(self, request: web.Request) -> web.Response:
        session = self._session(request.match_info["id"])
        if session["status"] != "open":
            raise DoubleError(
                400,
                'Only Checkout Sessions with a status in ["open"] can be expired. This Checkout Session has '
                f'a status of "{session["status"]}".',
            )
        self.expire(session["id"])
        return web.json_response(session, headers={"request-id": _request_id()})

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
            quantity = _int_param(item.get("quantity"), f"line_items[{i}][quantity]", lo=1)
            unit = _int_param(price.get("unit_amount"), f"line_items[{i}][price_data][unit_amount]")
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
            "client_secret": f"{pi_id}_secret_{_rand(25)}",
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
        return stripe.WebhookSignature.generate_signature_header(
            payload, secret or self.webhook_secret, timestamp
        )

    async def deliver(self, event: dict[str, Any]) -> int:
        """POST the event to the webhook URL like Stripe (a few quick retries); the last status."""
        payload = self.payload(event)
        session = self._http or aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_S))
        status = 0
        try:
            for attempt in range(WEBHOOK_ATTEMPTS):
                headers = {
                    "content-type": "application/json; charset=utf-8",
                    "stripe-signature": self.sign(payload),
                    "user-agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks) test-double",
                }
                try:
                    async with session.post(
                        self.webhook_url, data=payload.encode(), headers=headers
                    ) as response:
                        status = response.status
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    logger.warning(
                        "test double: webhook %s to %s failed: %s", event["id"], self.webhook_url, exc
                    )
                    status = 0
                if 200 <= status < 300:
                    break
                # Stripe backs off for hours; a test double only smooths over a restart.
                await asyncio.sleep(0.2 * (attempt + 1))
        finally:
            if session is not self._http:
                await session.close()
        self.deliveries.append((event["id"], status))
        logger.info("test double: delivered %s %s → %s", event["type"], event["id"], status)
        return status

    # --- the checkout page ---------------------------------------------------------------------

    async def _checkout_page(self, request: web.Request) -> web.Response:
        session = self.sessions.get(request.match_info["id"])
        if session is None:
            return _page("Unknown checkout session", "<p>This checkout link is not valid.</p>", status=404)
        amount = f"${session['amount_total'] // 100:,}.{session['amount_total'] % 100:02d}"
        if session["status"] != "open":
            body = f"<p>This checkout session is <strong>{html.escape(session['status'])}</strong>.</p>"
            return _page("Checkout", body, status=410 if session["status"] == "expired" else 200)
        cancel = html.escape(session["cancel_url"] or "/")
        body = f"""<p class=amount>Pay <strong id=amount>{amount}</strong> <span class=cur>USD</span></p>
<p>{html.escape(session["customer_email"] or "")}</p>
<form method=post action="/c/pay/{html.escape(session["id"])}">
  <button id=pay type=submit>Pay (test)</button>
</form>
<p><a id=cancel href="{cancel}">Cancel</a></p>
<p class=note>No card is charged. Paying sends a signed <code>checkout.session.completed</code> \
to the gateway's webhook.</p>"""
        return _page("Checkout", body)

    async def _pay(self, request: web.Request) -> web.StreamResponse:
        session = self.sessions.get(request.match_info["id"])
        if session is None:
            return _page("Unknown checkout session", "<p>This checkout link is not valid.</p>", status=404)
        if session["status"] != "open":
            return _page(
                "Checkout", f"<p>This checkout session is {html.escape(session['status'])}.</p>", status=409
            )
        event = self.complete(session["id"])
        status = await self.deliver(event)
        if not 200 <= status < 300:
            body = (
                f"<p class=error>The payment went through (test), but the webhook at "
                f"<code>{html.escape(self.webhook_url)}</code> answered {status or 'nothing'}.</p>"
            )
            return _page("Webhook delivery failed", body, status=502)
        raise web.HTTPSeeOther(session["success_url"].replace("{CHECKOUT_SESSION_ID}", session["id"]))


_CSS = """body{font-family:system-ui,sans-serif;max-width:30rem;margin:0 auto;padding:0 1rem;line-height:1.5}
.banner{background:#ffb300;color:#000;font-weight:700;text-align:center;padding:.5rem;margin:0 -1rem 1.5rem}
.amount{font-size:2rem}button{padding:.7rem 1.6rem;font-size:1.1rem}\
.note{color:#555;font-size:.9rem}.error{color:#b00020}"""


def _page(title: str, body: str, *, status: int = 200) -> web.Response:
    page = f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><meta name=viewport content="width=device-width,initial-scale=1">
<title>TEST MODE · {html.escape(title)}</title><style>{_CSS}</style></head>
<body><div class=banner id=test-mode>TEST MODE — local Stripe test double, no real money</div>
<h1>{html.escape(title)}</h1>
{body}
</body></html>
"""
    return web.Response(
        status=status, text=page, content_type="text/html", headers={"cache-control": "no-store"}
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m billingproxy.devstack.stripe_double``: secrets from STRIPE_SECRET_KEY and
    STRIPE_WEBHOOK_SECRET."""
    parser = argparse.ArgumentParser(prog="billingproxy-stripe-double", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address")
    parser.add_argument("--port", type=int, default=12111)
    parser.add_argument(
        "--webhook-url", required=True, help="where to send events, e.g. http://127.0.0.1:8080/stripe/webhook"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not is_loopback(args.host):
        parser.error(f"the Stripe test double listens on loopback only, not {args.host!r}")
    try:
        double = StripeDouble(
            secret_key=os.environ.get("STRIPE_SECRET_KEY", ""),
            webhook_secret=os.environ.get("STRIPE_WEBHOOK_SECRET", ""),
            webhook_url=args.webhook_url,
        )
    except ValueError as exc:
        parser.error(f"{exc} (set STRIPE_SECRET_KEY and STRIPE_WEBHOOK_SECRET)")
    double.url = f"http://{args.host}:{args.port}"
    logger.info("Stripe test double (TEST MODE) on %s, webhooks to %s", double.url, args.webhook_url)
    web.run_app(double.make_app(), host=args.host, port=args.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
