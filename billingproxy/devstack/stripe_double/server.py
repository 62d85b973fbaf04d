"""The Stripe test double's HTTP face — TEST MODE, loopback only, no real money.

Why it exists: phase 4 of the journey (pay → webhook → credit → served) must work on one machine
with no Stripe account, and the tests must run it too. The server answers the few Stripe API
calls the gateway's SDK makes, on the account of :mod:`.model`, and serves a small checkout page
whose "Pay (test)" button sends a ``checkout.session.completed`` event, signed with Stripe's
scheme (``stripe.WebhookSignature``), to the webhook URL — what Stripe does after a real payment.

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
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import html
import ipaddress
import logging
import os
import re
import secrets
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from billingproxy.devstack.stripe_double import model

logger = logging.getLogger(__name__)

WEBHOOK_ATTEMPTS = 3
WEBHOOK_TIMEOUT_S = 10


def _error_response(error: model.DoubleError) -> web.Response:
    body: dict[str, Any] = {"message": error.message, "type": error.type}
    if error.param:
        body["param"] = error.param
    if error.code:
        body["code"] = error.code
    return web.json_response({"error": body}, status=error.status, headers={"request-id": _request_id()})


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
        self._idempotency: dict[str, tuple[str, dict[str, Any]]] = {}
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

    async def _api_create_session(self, request: web.Request) -> web.Response:
        raw = await request.text()
        params = decode_form((await request.post()).items())
        key = request.headers.get("idempotency-key")
        fingerprint = hashlib.sha256(raw.encode()).hexdigest()
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
