"""Stripe top-ups on the public HTTP API: Checkout links, the top-up page, verified webhooks.

Routes (all through Envoy, ext_authz off for them; see docs/stripe.md):

- ``POST /billing/topup`` — JSON ``{"amount_usd": "10.00"}`` with ``Authorization: Bearer sk-litellm-…``
  creates a Stripe Checkout Session and answers ``{"checkout_url", "session_id", …}``. The same
  route takes the top-up page's HTML form (``api_key``, ``amount_usd``) and answers it with a
  303 to Checkout.
- ``GET /billing/topup`` — the page behind the 403's ``top_up_url``. A browser following a link
  cannot send a Bearer key, so the link leads to a small form (key + amount) instead of a 401.
- ``GET /billing/topup/success`` and ``/billing/topup/cancelled`` — where Checkout sends the
  customer back; the first says whether the wallet is credited yet.
- ``POST /stripe/webhook`` — verifies ``Stripe-Signature`` on the raw body
  (``stripe.Webhook.construct_event``, signed no more than 300 s ago, and no more than 300 s in
  the future, which the SDK does not check), then hands the event, as plain JSON, to
  :mod:`billing.payments`, which owns every rule about money. 400 on a bad signature with nothing
  written; 2xx for every verified event, duplicates and events about unknown wallets included,
  so Stripe stops retrying.

With no Stripe keys configured every route here answers 503 with a message that says so, and the
rest of the gateway works as before.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import html
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
import stripe
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

import billing_stripe
from authz_sidecar import api_errors, json_body, metrics
from authz_sidecar.key_lookup import KeyLookup
from billing import money, payments, recharges, topups, wallets
from billing.settings import Settings

if TYPE_CHECKING:
    from stripe.params import CustomerCreateParams
    from stripe.params.checkout import SessionCreateParams

logger = logging.getLogger(__name__)

# Stripe's own limit for an Idempotency-Key; a client's key is hashed into ours anyway.
CLIENT_IDEMPOTENCY_KEY_MAX = 255
WEBHOOK_TOLERANCE_S = 300
PRODUCT_NAME = "BillingProxy prepaid credit"


class CheckoutClient:
    """The one Stripe API call the gateway makes: create a Checkout Session."""

    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        self._settings = settings
        self._client = billing_stripe.make_client(
            secret_key=settings.stripe_secret_key, api_base=settings.stripe_api_base, session=session
        )

    async def create_session(
        self,
        *,
        wallet: wallets.Wallet,
        amount_nano: int,
        idempotency_key: str,
        return_path: str = "/billing/topup/success",
    ) -> stripe.checkout.Session:
        """``return_path``: where Checkout sends the customer back (the session id appended)."""
        s = self._settings
        amount_usd = money.format_usd_cents(amount_nano)
        params: SessionCreateParams = {
            "mode": "payment",
            "line_items": [
                {
                    "quantity": 1,
                    "price_data": {
                        "currency": payments.CURRENCY,
                        "unit_amount": topups.cents_from_nano(amount_nano),
                        "product_data": {
                            "name": PRODUCT_NAME,
                            "description": f"{amount_usd} USD of API credit",
                        },
                    },
                }
            ],
            "client_reference_id": wallet.id,
            "metadata": {"wallet_id": wallet.id, "amount_usd": amount_usd, "purpose": "billingproxy_topup"},
            "payment_intent_data": {"metadata": {"wallet_id": wallet.id, "purpose": "billingproxy_topup"}},
            "success_url": f"{s.public_url}{return_path}?session_id={{CHECKOUT_SESSION_ID}}",
            "cancel_url": f"{s.public_url}/billing/topup/cancelled",
        }
        if wallet.email:
            params["customer_email"] = wallet.email
        return await self._client.v1.checkout.sessions.create_async(
            params, {"idempotency_key": idempotency_key}
        )

    # --- auto-recharge (authz_sidecar/auto_recharge_api.py) ------------------------------------

    async def create_customer(self, *, wallet: wallets.Wallet) -> stripe.Customer:
        """The wallet's Stripe Customer; ``customer:<wallet>`` makes a retry answer the same one."""
        params: CustomerCreateParams = {"metadata": {"wallet_id": wallet.id}}
        if wallet.email:
            params["email"] = wallet.email
        return await self._client.v1.customers.create_async(
            params, {"idempotency_key": f"customer:{wallet.id}"}
        )

    async def create_setup_session(
        self, *, wallet_id: str, customer: str, return_path: str = "/billing/auto-recharge/saved"
    ) -> stripe.checkout.Session:
        """A Checkout Session in setup mode: the owner saves a card for off-session recharges.
        ``return_path``: where Checkout sends the owner back (the session id appended)."""
        s = self._settings
        params: SessionCreateParams = {
            "mode": "setup",
            "currency": payments.CURRENCY,
            "customer": customer,
            "client_reference_id": wallet_id,
            "metadata": {"wallet_id": wallet_id, "purpose": "billingproxy_auto_recharge"},
            "setup_intent_data": {"metadata": {"wallet_id": wallet_id}},
            "success_url": f"{s.public_url}{return_path}?session_id={{CHECKOUT_SESSION_ID}}",
            "cancel_url": f"{s.public_url}/billing/topup/cancelled",
        }
        return await self._client.v1.checkout.sessions.create_async(
            params, {"idempotency_key": f"billingproxy-setup-{uuid.uuid4()}"}
        )

    async def expand_setup_intent(self, setup_intent_id: str) -> dict[str, Any]:
        """The SetupIntent with its PaymentMethod expanded (Stripe's ``expand`` shape)."""
        intent = (
            await self._client.v1.setup_intents.retrieve_async(
                setup_intent_id, {"expand": ["payment_method"]}
            )
        ).to_dict()
        method = intent.get("payment_method")
        if isinstance(method, str):
            intent["payment_method"] = (
                await self._client.v1.payment_methods.retrieve_async(method)
            ).to_dict()
        return intent


@dataclasses.dataclass
class StripeRoutes:
    settings: Settings
    engine: AsyncEngine
    key_lookup: KeyLookup
    checkout: CheckoutClient | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    async def lifespan(self, _app: web.Application) -> AsyncIterator[None]:
        if not self.settings.stripe_configured:
            logger.info("Stripe is not configured (STRIPE_SECRET_KEY): top-ups answer 503")
            yield
            return
        async with aiohttp.ClientSession() as session:
            self.checkout = CheckoutClient(self.settings, session)
            target = self.settings.stripe_api_base or "api.stripe.com"
            logger.info("Stripe top-ups on (API: %s)", target)
            yield
            self.checkout = None

    def require_stripe(self) -> CheckoutClient:
        if self.checkout is None:
            raise api_errors.ApiError(
                503,
                "payments_unconfigured",
                "Top-ups are not available on this gateway: Stripe is not configured "
                "(STRIPE_SECRET_KEY and STRIPE_WEBHOOK_SECRET).",
                "api_error",
            )
        return self.checkout

    # --- POST /billing/topup -----------------------------------------------------------------

    async def topup(self, request: web.Request) -> web.StreamResponse:
        if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            return await self._topup_form(request)
        checkout = self.require_stripe()
        key = await self.key_lookup.authenticate(request.headers.get("authorization"))
        body = await json_body.read_object(request, example='{"amount_usd": "10.00"}')
        amount_nano = self._amount(body.get("amount_usd"))
        session = await self._create(
            checkout, key.wallet_id, amount_nano, request.headers.get("idempotency-key")
        )
        return web.json_response(
            {
                "checkout_url": session.url,
                "session_id": session.id,
                "amount_usd": money.format_usd(amount_nano),
                "expires_at": session.expires_at,
            },
            dumps=_dumps,
        )

    async def _topup_form(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        amount = form.get("amount_usd")
        api_key = form.get("api_key")
        try:
            checkout = self.require_stripe()
            amount_nano = self._amount(amount if isinstance(amount, str) else None)
            key = await self.key_lookup.authenticate(
                f"Bearer {api_key}" if isinstance(api_key, str) else None
            )
            session = await self._create(checkout, key.wallet_id, amount_nano, None)
        except api_errors.ApiError as error:
            return self._page(
                request,
                error=error.message,
                amount=amount if isinstance(amount, str) else "",
                status=error.status,
            )
        raise web.HTTPSeeOther(session.url)

    async def checkout_for_account(self, wallet_id: str, amount: object, *, return_path: str) -> str:
        """The account page's top-up: a Checkout Session for the signed-in wallet, its URL.
        :class:`~authz_sidecar.api_errors.ApiError` for what the top-up API would refuse."""
        checkout = self.require_stripe()
        amount_nano = self._amount(amount)
        session = await self._create(checkout, wallet_id, amount_nano, None, return_path=return_path)
        return str(session.url)

    def _amount(self, value: object) -> int:
        s = self.settings
        try:
            return topups.parse_topup_amount(value, min_nano=s.topup_nano_min, max_nano=s.topup_nano_max)
        except topups.TopupAmountError as exc:
            metrics.stripe_checkout_sessions.labels("invalid_amount").inc()
            raise api_errors.ApiError(
                400, "invalid_amount", str(exc), extra={"param": "amount_usd"}
            ) from None

    async def _create(
        self,
        checkout: CheckoutClient,
        wallet_id: str,
        amount_nano: int,
        client_key: str | None,
        *,
        return_path: str = "/billing/topup/success",
    ) -> Any:
        if client_key is not None and not 0 < len(client_key) <= CLIENT_IDEMPOTENCY_KEY_MAX:
            raise api_errors.ApiError(
                400,
                "invalid_idempotency_key",
                f"Idempotency-Key must be 1 to {CLIENT_IDEMPOTENCY_KEY_MAX} characters.",
            )
        # A client's retry (same Idempotency-Key) gets the same session; without one, every call
        # is a new session, and the SDK's own retries still reuse this key.
        idempotency_key = (
            "billingproxy-topup-" + hashlib.sha256(f"{wallet_id}\0{client_key}".encode()).hexdigest()
            if client_key
            else f"billingproxy-topup-{uuid.uuid4()}"
        )
        async with self.engine.connect() as conn:
            wallet = await wallets.get_wallet(conn, wallet_id)
        assert wallet is not None, "a key always belongs to a wallet (foreign key)"
        try:
            session = await checkout.create_session(
                wallet=wallet,
                amount_nano=amount_nano,
                idempotency_key=idempotency_key,
                return_path=return_path,
            )
        except stripe.IdempotencyError:
            metrics.stripe_checkout_sessions.labels("idempotency_conflict").inc()
            raise api_errors.ApiError(
                409, "idempotency_conflict", "This Idempotency-Key was used for a different top-up."
            ) from None
        except (stripe.APIConnectionError, stripe.RateLimitError) as exc:
            logger.warning("Stripe unreachable while creating a Checkout Session: %s", exc)
            metrics.stripe_checkout_sessions.labels("payments_unavailable").inc()
            raise api_errors.payments_unavailable() from None
        except stripe.StripeError as exc:
            logger.error("Stripe refused to create a Checkout Session: %s", exc)
            metrics.stripe_checkout_sessions.labels("payments_error").inc()
            raise api_errors.payments_refused(
                "The payment provider refused the top-up; try again later."
            ) from None
        expires_at = None
        if isinstance(session.expires_at, int):
            expires_at = dt.datetime.fromtimestamp(session.expires_at, dt.UTC)
        async with self.engine.begin() as conn:
            await topups.record_checkout_session(
                conn,
                session_id=session.id,
                wallet_id=wallet.id,
                amount_nano=amount_nano,
                expires_at=expires_at,
            )
        metrics.stripe_checkout_sessions.labels("created").inc()
        logger.info(
            "top-up: Checkout Session %s for %s USD, wallet %s",
            session.id,
            money.format_usd(amount_nano),
            wallet.id,
        )
        return session

    # --- POST /stripe/webhook ----------------------------------------------------------------

    async def webhook(self, request: web.Request) -> web.Response:
        self.require_stripe()
        payload = await request.read()
        try:
            stripe.Webhook.construct_event(
                payload,
                request.headers.get("stripe-signature"),
                self.settings.stripe_webhook_secret,
                tolerance=WEBHOOK_TOLERANCE_S,
                api_key=self.settings.stripe_secret_key,
            )
            _refuse_future(request.headers["stripe-signature"], now=time.time())
        except stripe.SignatureVerificationError as exc:
            metrics.stripe_webhook_rejections.labels("invalid_signature").inc()
            logger.warning("webhook refused: %s", exc.user_message or exc)
            raise api_errors.ApiError(
                400, "invalid_signature", f"Stripe-Signature does not verify: {exc.user_message or exc}"
            ) from None
        except (ValueError, AttributeError, TypeError):
            # Raised after the signature verified: not UTF-8, not JSON, or JSON but not an object
            # (the SDK's parser then fails with AttributeError).
            metrics.stripe_webhook_rejections.labels("invalid_payload").inc()
            raise api_errors.ApiError(
                400, "invalid_payload", "The body is not a Stripe event (JSON)."
            ) from None
        event = json.loads(payload)
        await self._expand_setup_session(event)
        try:
            async with self.engine.begin() as conn:
                result = await payments.process_event(
                    conn, event, failures_max=self.settings.auto_recharge_failures_max
                )
        except payments.InvalidEvent as exc:
            metrics.stripe_webhook_rejections.labels("invalid_payload").inc()
            raise api_errors.ApiError(400, "invalid_payload", str(exc)) from None
        metrics.stripe_webhook_events.labels("duplicate" if result.duplicate else result.outcome).inc()
        logger.info(
            "webhook %s %s: %s%s %s",
            event.get("type"),
            event.get("id"),
            result.outcome,
            " (duplicate)" if result.duplicate else "",
            result.detail,
        )
        return web.json_response(
            {
                "received": True,
                "event_id": event["id"],
                "outcome": result.outcome,
                "duplicate": result.duplicate,
            },
            dumps=_dumps,
        )

    async def _expand_setup_session(self, event: Any) -> None:
        """A completed setup session of ours names its SetupIntent by id; the card's brand and last
        4 digits are on its PaymentMethod. Both are retrieved and put in the event as Stripe's
        ``expand`` would, before the money rules see it. Stripe unreachable: 503 with nothing
        recorded, so Stripe delivers the event again."""
        data = event.get("data") if isinstance(event, dict) else None
        session = data.get("object") if isinstance(data, dict) else None
        if not (
            event.get("type") == "checkout.session.completed"
            and isinstance(session, dict)
            and session.get("mode") == "setup"
            and isinstance(session.get("id"), str)
            and isinstance(session.get("setup_intent"), str)
            and "\x00" not in session["id"]
        ):
            return
        async with self.engine.connect() as conn:
            if await recharges.setup_session(conn, session["id"]) is None:
                return  # not ours: recorded as such, without asking Stripe about it
        checkout = self.require_stripe()
        try:
            session["setup_intent"] = await checkout.expand_setup_intent(session["setup_intent"])
        except stripe.StripeError as exc:
            logger.warning("webhook %s: cannot retrieve setup intent: %s", event.get("id"), exc)
            raise api_errors.payments_unavailable() from None

    # --- pages for people --------------------------------------------------------------------

    async def topup_page(self, request: web.Request) -> web.Response:
        return self._page(request, amount="10.00", status=200 if self.checkout else 503)

    def _page(self, request: web.Request, *, amount: str, status: int, error: str = "") -> web.Response:
        s = self.settings
        lo, hi = money.format_usd_cents(s.topup_nano_min), money.format_usd_cents(s.topup_nano_max)
        if self.checkout is None:
            body = "<p class=error>Top-ups are not available on this gateway: Stripe is not configured.</p>"
            return _html("Top up", body, status=503)
        notice = f"<p class=error role=alert>{html.escape(error)}</p>" if error else ""
        api = html.escape(
            f'curl -s {s.public_url}/billing/topup -H "authorization: Bearer $KEY" '
            f"-H 'content-type: application/json' -d '{{\"amount_usd\": \"10.00\"}}'"
        )
        body = f"""{notice}
<form method=post action="/billing/topup">
  <label>API key <input name=api_key type=password autocomplete=off required \
placeholder="sk-litellm-…"></label>
  <label>Amount (USD, {lo}–{hi}) <input name=amount_usd inputmode=decimal required \
value="{html.escape(amount)}"></label>
  <button id=continue type=submit>Continue to payment</button>
</form>
<p>You will pay on Stripe Checkout; your wallet is credited as soon as Stripe confirms the payment.</p>
<p>From a program: <code>{api}</code> answers with a <code>checkout_url</code>.</p>"""
        return _html("Top up your wallet", body, status=status)

    async def success_page(self, request: web.Request) -> web.Response:
        session_id = request.query.get("session_id", "")
        status = None
        # PostgreSQL text cannot hold NUL, so no session has one; asking would be a 500.
        if session_id and "\x00" not in session_id:
            async with self.engine.connect() as conn:
                status = await topups.checkout_session_status(conn, session_id)
        if status is None:
            return _html("Top-up", "<p>We do not know this checkout session.</p>", status=404)
        amount = html.escape(money.format_usd_cents(status.amount_nano))
        if status.credited:
            body = (
                f"<p id=status data-state=credited>Payment received: {amount} USD "
                "credited to your wallet.</p>"
            )
        else:
            body = (
                f"<p id=status data-state=pending>Thank you. {amount} USD will be credited as soon as "
                "Stripe confirms the payment (usually within seconds). Reload this page to check.</p>"
            )
        return _html("Top-up", body)

    async def cancelled_page(self, request: web.Request) -> web.Response:
        return _html(
            "Top-up cancelled", '<p>Nothing was charged. <a href="/billing/topup">Try again</a>.</p>'
        )


def _refuse_future(header: str, *, now: float) -> None:
    """Refuse a verified signature dated more than the tolerance ahead of our clock.

    The SDK refuses only stale timestamps; a signature dated ahead would stay replayable until
    that date plus the tolerance. Its timestamp is the header's first ``t=``, as the SDK reads it
    (so this is the very value the signature covers).
    """
    items = [item.split("=", 2) for item in header.split(",")]
    timestamp = int([item[1] for item in items if item[0] == "t"][0])  # verified, so it parses
    if timestamp > now + WEBHOOK_TOLERANCE_S:
        raise stripe.SignatureVerificationError(  # type: ignore[no-untyped-call]  # stripe leaves it unannotated
            f"Timestamp {timestamp} is more than {WEBHOOK_TOLERANCE_S} s in the future", header
        )


def _dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"))


_CSS = """\
body{font-family:system-ui,sans-serif;max-width:34rem;margin:3rem auto;padding:0 1rem;line-height:1.5}
label{display:block;margin:.8rem 0}input{display:block;width:100%;padding:.4rem;font-size:1rem}
button{margin-top:1rem;padding:.6rem 1.2rem;font-size:1rem}.error{color:#b00020}code{word-break:break-all}"""


def html_page(title: str, body: str, *, status: int = 200) -> web.Response:
    """A page for people (the top-up and auto-recharge pages): no scripts, nothing cached."""
    return _html(title, body, status=status)


def _html(title: str, body: str, *, status: int = 200) -> web.Response:
    page = f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><meta name=viewport content="width=device-width,initial-scale=1">
<title>{html.escape(title)} · BillingProxy</title><style>{_CSS}</style></head>
<body><h1>{html.escape(title)}</h1>
{body}
</body></html>
"""
    return web.Response(
        status=status,
        text=page,
        content_type="text/html",
        headers={
            "cache-control": "no-store",
            "content-security-policy": (
                "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; frame-ancestors 'none'"
            ),
            "referrer-policy": "no-referrer",
            "x-content-type-options": "nosniff",
        },
    )


def add_routes(
    app: web.Application, *, settings: Settings, engine: AsyncEngine, key_lookup: KeyLookup
) -> StripeRoutes:
    """Register the top-up and webhook routes on the public app (and the Stripe client's lifetime)."""
    routes = StripeRoutes(settings, engine, key_lookup)
    app.cleanup_ctx.append(routes.lifespan)
    app.router.add_get("/billing/topup", routes.topup_page)
    app.router.add_post("/billing/topup", routes.topup)
    app.router.add_get("/billing/topup/success", routes.success_page)
    app.router.add_get("/billing/topup/cancelled", routes.cancelled_page)
    app.router.add_post("/stripe/webhook", routes.webhook)
    return routes
