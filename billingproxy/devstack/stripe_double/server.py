"""The Stripe test double's HTTP face — TEST MODE, loopback only, no real money.

Why it exists: phase 4 of the journey (pay → webhook → credit → served), and auto-recharge (save
a card, charge it off-session later), must work on one machine with no Stripe account, and the
tests must run it too. The server answers the Stripe API calls the gateway's SDK makes, on the
account of :mod:`.model`, and serves a small checkout page (a card-number field, prefilled with
``4242 4242 4242 4242``) whose "Pay (test)" button sends a ``checkout.session.completed`` event,
signed with Stripe's scheme (``stripe.WebhookSignature``), to the webhook URL — what Stripe does
after a real payment. An off-session PaymentIntent's ``payment_intent.succeeded`` or
``…payment_failed`` is sent the same way, after the API has answered, as Stripe does.

Why it can never take part in production: it binds loopback addresses only (anything else is
refused), every id and object says test mode (``cs_test_…``, ``livemode: false``), the page says
TEST MODE, and ``billingproxy up`` starts it only when no Stripe key is configured.

Stripe API endpoints (form-encoded requests, JSON answers, Stripe's error shape):

- ``POST /v1/checkout/sessions`` — create (``mode=payment`` with ``price_data`` line items, or
  ``mode=setup``; ``customer``, ``payment_intent_data[setup_future_usage]``);
  ``GET /v1/checkout/sessions/{id}``, ``GET /v1/checkout/sessions``, and
  ``POST /v1/checkout/sessions/{id}/expire``.
- ``POST /v1/customers``, ``GET``/``POST /v1/customers/{id}``,
  ``GET /v1/customers/{id}/payment_methods``, ``GET /v1/payment_methods?customer=…``;
  ``GET /v1/payment_methods/{id}``,
  ``POST /v1/payment_methods/{id}/attach``; ``GET /v1/setup_intents/{id}``.
- ``POST /v1/payment_intents`` (``off_session``, ``confirm``: a failed charge is Stripe's 402
  ``card_error`` with ``error.payment_intent``), ``GET /v1/payment_intents/{id}``.

Every ``POST`` honours ``Idempotency-Key`` like Stripe: a replay answers the first answer (a 402
card error too), the same key with other parameters is an ``idempotency_error``.

Pages: ``GET /c/pay/{id}`` (checkout), ``POST /c/pay/{id}`` (pay), ``GET /healthz``.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import hashlib
import html
import ipaddress
import logging
import os
import re
import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from billingproxy.devstack.stripe_double import model

logger = logging.getLogger(__name__)

WEBHOOK_ATTEMPTS = 3
WEBHOOK_TIMEOUT_S = 10
# The events the gateway's webhook endpoint is subscribed to, among those an API call makes (a
# Stripe endpoint receives only the types it subscribed to); the checkout page sends its own.
WEBHOOK_EVENTS = frozenset({"payment_intent.succeeded", "payment_intent.payment_failed"})
IDEMPOTENCY_KEYS_MAX = model.OBJECTS_MAX


def _error_response(error: model.DoubleError) -> web.Response:
    return web.json_response(
        {"error": error.body()}, status=error.status, headers={"request-id": _request_id()}
    )


def _request_id() -> str:
    return "req_" + model.random_chars(14)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def decode_form(pairs: Iterable[tuple[str, object]]) -> dict[str, Any]:
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
                raise model.DoubleError(400, f"Invalid parameter: {key}", param=key)
            node = child
        node[parts[-1]] = value
    return {key: _listify(value) for key, value in root.items()}


def _listify(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    items = {k: _listify(v) for k, v in node.items()}
    if items and all(k.isdigit() for k in items):
        return [items[k] for k in sorted(items, key=int)]
    return items


class StripeDouble(model.Account):
    """The account served: its API, its checkout pages, its webhook sender."""

    def __init__(self, *, secret_key: str, webhook_secret: str, webhook_url: str) -> None:
        if not secret_key or not webhook_secret:
            raise ValueError("the Stripe test double needs a secret key and a webhook secret")
        super().__init__(webhook_secret=webhook_secret)
        self.secret_key = secret_key
        self.webhook_url = webhook_url
        self.deliveries: list[tuple[str, int]] = []  # (event id, HTTP status or 0 if unreachable)
        # Off: API calls send no webhooks (a test then delivers, drops or reorders them itself).
        self.send_webhooks = True
        # Idempotency-Key → (fingerprint of the request, HTTP status, answer).
        self._idempotency: dict[str, tuple[str, int, dict[str, Any]]] = {}
        self._sending: set[asyncio.Task[int]] = set()
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
        app.router.add_post("/v1/customers", self._api_create_customer)
        app.router.add_get("/v1/customers/{id}", self._api_get_customer)
        app.router.add_post("/v1/customers/{id}", self._api_update_customer)
        app.router.add_get("/v1/customers/{id}/payment_methods", self._api_customer_payment_methods)
        app.router.add_get("/v1/payment_methods", self._api_list_payment_methods)
        app.router.add_get("/v1/payment_methods/{id}", self._api_get_payment_method)
        app.router.add_post("/v1/payment_methods/{id}/attach", self._api_attach_payment_method)
        app.router.add_get("/v1/setup_intents/{id}", self._api_get_setup_intent)
        app.router.add_post("/v1/payment_intents", self._api_create_payment_intent)
        app.router.add_get("/v1/payment_intents/{id}", self._api_get_payment_intent)
        app.router.add_get("/c/pay/{id}", self._checkout_page)
        app.router.add_post("/c/pay/{id}", self._pay)
        app.cleanup_ctx.append(self._http_session)
        return app

    async def _http_session(self, _app: web.Application) -> AsyncIterator[None]:
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
        for task in list(self._sending):
            task.cancel()
        await asyncio.gather(*self._sending, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _stripe_errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if request.path.startswith("/v1/"):
                self._authenticate(request)
            return await handler(request)
        except model.DoubleError as error:
            return _error_response(error)

    def _authenticate(self, request: web.Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), self.secret_key.encode()
        ):
            shown = f"{token[:8]}****{token[-4:]}" if len(token) > 12 else "****"
            raise model.DoubleError(401, f"Invalid API Key provided: {shown}")

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "mode": "test double"})

    # --- Stripe API ----------------------------------------------------------------------------

    async def _idempotent(
        self, request: web.Request, action: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> web.Response:
        """Run a ``POST``'s ``action`` once per ``Idempotency-Key``, as Stripe does: a replay gets
        the first answer (a card error too: the charge was attempted), the same key on another
        request is an ``idempotency_error``; a request refused before it ran (400) saves nothing."""
        raw = await request.text()
        params = decode_form((await request.post()).items())
        key = request.headers.get("idempotency-key")
        fingerprint = hashlib.sha256(f"{request.path}\n{raw}".encode()).hexdigest()
        if key is not None:
            first = self._idempotency.get(key)
            if first is not None:
                if first[0] != fingerprint:
                    raise model.DoubleError(
                        400,
                        "Keys for idempotent requests can only be used with the same parameters they "
                        "were first used with. Try using a key other than "
                        f"'{key}' if you meant to execute a different request.",
                        type_="idempotency_error",
                    )
                return web.json_response(
                    first[2],
                    status=first[1],
                    headers={"idempotent-replayed": "true", "request-id": _request_id()},
                )
        try:
            status, answer = 200, action(params)
        except model.DoubleError as error:
            if error.type != "card_error":
                raise
            status, answer = error.status, {"error": error.body()}
        if key is not None:
            if len(self._idempotency) >= IDEMPOTENCY_KEYS_MAX:
                del self._idempotency[next(iter(self._idempotency))]  # the oldest: Stripe keeps 24 h
            # A snapshot: a replay answers what the first request answered, not the object now.
            self._idempotency[key] = (fingerprint, status, copy.deepcopy(answer))
        return web.json_response(answer, status=status, headers={"request-id": _request_id()})

    @staticmethod
    def _answer(obj: dict[str, Any]) -> web.Response:
        return web.json_response(obj, headers={"request-id": _request_id()})

    async def _api_create_session(self, request: web.Request) -> web.Response:
        return await self._idempotent(request, self.create_session)

    async def _api_create_customer(self, request: web.Request) -> web.Response:
        return await self._idempotent(request, self.create_customer)

    async def _api_get_customer(self, request: web.Request) -> web.Response:
        return self._answer(self.customer(request.match_info["id"]))

    async def _api_update_customer(self, request: web.Request) -> web.Response:
        return await self._idempotent(
            request, lambda params: self.update_customer(request.match_info["id"], params)
        )

    async def _api_customer_payment_methods(self, request: web.Request) -> web.Response:
        customer_id = request.match_info["id"]
        return self._saved_cards(request, customer_id, "id", f"/v1/customers/{customer_id}/payment_methods")

    async def _api_list_payment_methods(self, request: web.Request) -> web.Response:
        """``GET /v1/payment_methods?customer=…`` (the double keeps no list of unsaved cards)."""
        customer_id = request.query.get("customer")
        if customer_id is None:
            raise model.DoubleError(
                400,
                "The test double lists only a customer's payment methods: pass customer.",
                param="customer",
                code="parameter_missing",
            )
        return self._saved_cards(request, customer_id, "customer", "/v1/payment_methods")

    def _saved_cards(self, request: web.Request, customer_id: str, param: str, url: str) -> web.Response:
        if request.query.get("type", "card") != "card":
            raise model.DoubleError(400, "The test double keeps only card payment methods.", param="type")
        limit = min(model.int_param(request.query.get("limit", "10"), "limit", lo=1), 100)
        saved = self.customer_payment_methods(customer_id, param=param)
        return self._answer(
            {"object": "list", "data": saved[:limit], "has_more": len(saved) > limit, "url": url}
        )

    async def _api_get_payment_method(self, request: web.Request) -> web.Response:
        return self._answer(self.payment_method(request.match_info["id"]))

    async def _api_attach_payment_method(self, request: web.Request) -> web.Response:
        return await self._idempotent(
            request,
            lambda params: self.attach_payment_method(request.match_info["id"], params.get("customer")),
        )

    async def _api_get_setup_intent(self, request: web.Request) -> web.Response:
        return self._answer(self.setup_intent(request.match_info["id"]))

    async def _api_create_payment_intent(self, request: web.Request) -> web.Response:
        return await self._idempotent(request, self._create_and_send_payment_intent)

    def _create_and_send_payment_intent(self, params: dict[str, Any]) -> dict[str, Any]:
        pi, events = self.create_payment_intent(params)
        if self.send_webhooks:
            for event in events:
                if event["type"] in WEBHOOK_EVENTS:
                    task = asyncio.get_running_loop().create_task(self.deliver(event))
                    self._sending.add(task)
                    task.add_done_callback(self._sending.discard)
        error = model.payment_error(pi)
        if error is not None:
            raise error
        return pi

    async def _api_get_payment_intent(self, request: web.Request) -> web.Response:
        return self._answer(self.payment_intent(request.match_info["id"]))

    async def _api_get_session(self, request: web.Request) -> web.Response:
        return web.json_response(
            self._session(request.match_info["id"]), headers={"request-id": _request_id()}
        )

    async def _api_list_sessions(self, request: web.Request) -> web.Response:
        limit = model.int_param(request.query.get("limit", "10"), "limit", lo=1)
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
            raise model.DoubleError(
                400,
                'Only Checkout Sessions with a status in ["open"] can be expired. This Checkout Session has '
                f'a status of "{session["status"]}".',
            )
        self.expire(session["id"])
        return web.json_response(session, headers={"request-id": _request_id()})

    # --- webhooks ------------------------------------------------------------------------------

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
        if session["status"] != "open":
            body = f"<p>This checkout session is <strong>{html.escape(session['status'])}</strong>.</p>"
            return _page("Checkout", body, status=410 if session["status"] == "expired" else 200)
        return _page("Checkout", _checkout_form(session, model.CARD_OK))

    async def _pay(self, request: web.Request) -> web.StreamResponse:
        session = self.sessions.get(request.match_info["id"])
        if session is None:
            return _page("Unknown checkout session", "<p>This checkout link is not valid.</p>", status=404)
        if session["status"] != "open":
            return _page(
                "Checkout", f"<p>This checkout session is {html.escape(session['status'])}.</p>", status=409
            )
        form = await request.post()
        card = form.get("card")
        card = card if isinstance(card, str) else model.CARD_OK
        try:
            event = self.complete(session["id"], card=card)
        except model.DoubleError as error:
            # Stripe's page shows the decline and keeps the session open for another card.
            return _page("Checkout", _checkout_form(session, card, error=error.message), status=error.status)
        status = await self.deliver(event)
        if not 200 <= status < 300:
            body = (
                f"<p class=error>The payment went through (test), but the webhook at "
                f"<code>{html.escape(self.webhook_url)}</code> answered {status or 'nothing'}.</p>"
            )
            return _page("Webhook delivery failed", body, status=502)
        raise web.HTTPSeeOther(session["success_url"].replace("{CHECKOUT_SESSION_ID}", session["id"]))


def _checkout_form(session: dict[str, Any], card: str, *, error: str | None = None) -> str:
    """The page's form: a plain POST, so it works without JavaScript."""
    if session["mode"] == "setup":
        headline = "<p class=amount>Save a card for later payments</p>"
        action, note = "Save card (test)", "Saving sends a signed <code>checkout.session.completed</code>"
    else:
        cents = session["amount_total"]
        headline = f"""<p class=amount>Pay <strong id=amount>${cents // 100:,}.{cents % 100:02d}</strong> \
<span class=cur>USD</span></p>"""
        action, note = (
            "Pay (test)",
            "No card is charged. Paying sends a signed <code>checkout.session.completed</code>",
        )
    cards = "".join(
        f"<li><code>{n[:4]} {n[4:8]} {n[8:12]} {n[12:]}</code> {html.escape(c.label)}</li>"
        for n, c in model.TEST_CARDS.items()
    )
    shown_error = f"<p class=error id=error>{html.escape(error)}</p>" if error else ""
    cancel = html.escape(session["cancel_url"] or "/")
    return f"""{headline}
<p>{html.escape(session["customer_email"] or "")}</p>
{shown_error}
<form method=post action="/c/pay/{html.escape(session["id"])}">
  <label for=card>Card number</label>
  <input id=card name=card value="{html.escape(card)}" inputmode=numeric autocomplete=cc-number size=24
    required>
  <button id=pay type=submit>{action}</button>
</form>
<p><a id=cancel href="{cancel}">Cancel</a></p>
<p class=note>Stripe's test cards (any future date, any CVC):</p><ul class=note>{cards}</ul>
<p class=note>{note} to the gateway's webhook.</p>"""


_CSS = """body{font-family:system-ui,sans-serif;max-width:30rem;margin:0 auto;padding:0 1rem;line-height:1.5}
.banner{background:#ffb300;color:#000;font-weight:700;text-align:center;padding:.5rem;margin:0 -1rem 1.5rem}
.amount{font-size:2rem}button{padding:.7rem 1.6rem;font-size:1.1rem}\
input{font:inherit;padding:.6rem;margin:0 .5rem 1rem 0;font-family:monospace}label{display:block}\
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
