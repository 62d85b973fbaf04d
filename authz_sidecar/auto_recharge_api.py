"""Auto-recharge on the public HTTP API (docs/stripe.md), authenticated like /billing/balance: the
Bearer key names the wallet, so no route takes a wallet id and none can reach another's.

- ``PUT /billing/auto-recharge`` — ``{"threshold_usd": "2.00", "amount_usd": "10.00",
  "monthly_cap_usd": "50.00"?}``: set (or change, or resume) it. Without a saved card the answer
  carries ``checkout_url``, a Checkout Session in setup mode for the wallet's Stripe Customer
  (made on first use); recharges start once the card is saved there.
- ``GET /billing/auto-recharge`` — the setting, the card's brand and last 4 digits, the month's
  total, the last recharge with its outcome, and why it is paused if it is.
- ``DELETE /billing/auto-recharge`` — turn it off (a recharge in flight finishes).
- ``GET /billing/auto-recharge/saved`` — where the setup Checkout sends its owner back.

Bad input is a specific 400 and writes nothing: the body is checked whole, and Stripe is called,
before the one transaction that writes the setting, the Customer and the setup session.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import stripe
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from authz_sidecar import api_errors, json_body, stripe_api
from authz_sidecar.key_lookup import KeyLookup
from billing import money, recharges, wallets
from billing.settings import Settings

logger = logging.getLogger(__name__)

PUT_FIELDS = ("threshold_usd", "amount_usd", "monthly_cap_usd")
EXAMPLE = '{"threshold_usd": "2.00", "amount_usd": "10.00", "monthly_cap_usd": "50.00"}'


def _not_configured() -> api_errors.ApiError:
    return api_errors.ApiError(
        404,
        "auto_recharge_not_configured",
        "This wallet has no auto-recharge; set one with PUT /billing/auto-recharge.",
    )


def _recharge_json(r: recharges.Recharge) -> dict[str, Any]:
    return {
        "seq": r.seq,
        "amount_usd": money.format_usd(r.amount_nano),
        "state": r.state,
        "payment_intent": r.payment_intent,
        "failure_code": r.failure_code,
        "failure_message": r.failure_message,
        "created_at": r.created_at.isoformat(),
        "updated_at": r.updated_at.isoformat(),
    }


def _status_json(s: recharges.Status) -> dict[str, Any]:
    card = None
    if s.payment_method is not None:
        card = {"brand": s.card_brand, "last4": s.card_last4}
    return {
        "object": "auto_recharge",
        "enabled": s.enabled,
        "threshold_usd": money.format_usd(s.threshold_nano),
        "amount_usd": money.format_usd(s.amount_nano),
        "monthly_cap_usd": None if s.monthly_cap_nano is None else money.format_usd(s.monthly_cap_nano),
        "month_total_usd": money.format_usd(s.month_total_nano),
        "card": card,
        "paused": s.paused_reason is not None,
        "paused_reason": s.paused_reason,
        "consecutive_failures": s.consecutive_failures,
        "last_recharge": None if s.last is None else _recharge_json(s.last),
    }


@dataclasses.dataclass
class AutoRechargeRoutes:
    settings: Settings
    engine: AsyncEngine
    key_lookup: KeyLookup
    stripe_routes: stripe_api.StripeRoutes

    async def _wallet_id(self, request: web.Request) -> str:
        key = await self.key_lookup.authenticate(request.headers.get("authorization"))
        return key.wallet_id

    def setting_from(self, body: dict[str, Any]) -> recharges.Setting:
        """The fields of a PUT (or the account page's form) as a setting; 400 for what is wrong."""
        unknown = sorted(set(body) - set(PUT_FIELDS))
        if unknown:
            raise api_errors.ApiError(
                400,
                "unknown_parameter",
                f"Unknown field {unknown[0]!r}; the fields are {', '.join(PUT_FIELDS)}.",
                extra={"param": unknown[0]},
            )
        for required in ("threshold_usd", "amount_usd"):
            if required not in body:
                raise api_errors.ApiError(
                    400, "missing_parameter", f"{required} is required.", extra={"param": required}
                )
        s = self.settings
        try:
            return recharges.parse_setting(
                threshold=body["threshold_usd"],
                amount=body["amount_usd"],
                monthly_cap=body.get("monthly_cap_usd"),
                amount_min_nano=s.topup_nano_min,
                amount_max_nano=s.topup_nano_max,
            )
        except recharges.InvalidSetting as exc:
            raise api_errors.ApiError(400, "invalid_amount", f"{exc}.", extra={"param": exc.param}) from None

    async def put(self, request: web.Request) -> web.Response:
        wallet_id = await self._wallet_id(request)
        body = await json_body.read_object(request, example=EXAMPLE)
        now, session = await self.apply(wallet_id, self.setting_from(body))
        answer = _status_json(now)
        if session is not None:
            answer["checkout_url"] = session.url
            answer["setup_session_id"] = session.id
        return web.json_response(answer)

    async def apply(
        self, wallet_id: str, setting: recharges.Setting, *, return_path: str = "/billing/auto-recharge/saved"
    ) -> tuple[recharges.Status, Any]:
        """Set (or change, or resume) the wallet's auto-recharge; with no saved card yet, also the
        setup Checkout Session the owner must complete (else None). Stripe is called before the
        one transaction that writes, so a refusal writes nothing. The API and the account page
        both set it here."""
        checkout = self.stripe_routes.require_stripe()
        async with self.engine.connect() as conn:
            before = await recharges.status(conn, wallet_id)
            wallet = await wallets.get_wallet(conn, wallet_id)
        assert wallet is not None, "a key always belongs to a wallet (foreign key)"
        session = None
        customer = before.stripe_customer_id if before is not None else None
        if before is None or before.payment_method is None:
            try:
                if customer is None:
                    customer = (await checkout.create_customer(wallet=wallet)).id
                session = await checkout.create_setup_session(
                    wallet_id=wallet_id, customer=customer, return_path=return_path
                )
            except (stripe.APIConnectionError, stripe.RateLimitError) as exc:
                logger.warning("Stripe unreachable while setting up auto-recharge: %s", exc)
                raise api_errors.payments_unavailable() from None
            except stripe.StripeError as exc:
                logger.error("Stripe refused to set up auto-recharge: %s", exc)
                raise api_errors.payments_refused("The payment provider refused; try again later.") from None
        async with self.engine.begin() as conn:
            await recharges.put_setting(conn, wallet_id, setting)
            if session is not None and customer is not None:
                customer = await recharges.record_customer(conn, wallet_id, customer)
                await recharges.record_setup_session(
                    conn, session_id=session.id, wallet_id=wallet_id, customer=customer
                )
            now = await recharges.status(conn, wallet_id)
        assert now is not None
        return now, session

    async def get(self, request: web.Request) -> web.Response:
        wallet_id = await self._wallet_id(request)
        async with self.engine.connect() as conn:
            now = await recharges.status(conn, wallet_id)
        if now is None:
            raise _not_configured()
        return web.json_response(_status_json(now))

    async def delete(self, request: web.Request) -> web.Response:
        wallet_id = await self._wallet_id(request)
        async with self.engine.begin() as conn:
            done = await recharges.disable(conn, wallet_id)
        if not done:
            raise _not_configured()
        return web.json_response({"object": "auto_recharge", "deleted": True})

    async def saved_page(self, request: web.Request) -> web.Response:
        session_id = request.query.get("session_id", "")
        found = None
        if session_id and "\x00" not in session_id:
            async with self.engine.connect() as conn:
                found = await recharges.setup_session(conn, session_id)
        if found is None:
            return stripe_api.html_page(
                "Auto-recharge", "<p>We do not know this setup session.</p>", status=404
            )
        if found.payment_method is not None:
            body = "<p id=status data-state=saved>Your card is saved: auto-recharge is on.</p>"
        else:
            body = (
                "<p id=status data-state=pending>Thank you. Auto-recharge starts as soon as Stripe confirms "
                "the card (usually within seconds). Reload this page to check.</p>"
            )
        return stripe_api.html_page("Auto-recharge", body)


def add_routes(
    app: web.Application,
    *,
    settings: Settings,
    engine: AsyncEngine,
    key_lookup: KeyLookup,
    stripe_routes: stripe_api.StripeRoutes,
) -> AutoRechargeRoutes:
    """Register the auto-recharge routes on the public app."""
    routes = AutoRechargeRoutes(settings, engine, key_lookup, stripe_routes)
    app.router.add_put("/billing/auto-recharge", routes.put)
    app.router.add_get("/billing/auto-recharge", routes.get)
    app.router.add_delete("/billing/auto-recharge", routes.delete)
    app.router.add_get("/billing/auto-recharge/saved", routes.saved_page)
    return routes
