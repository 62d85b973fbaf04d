"""The account page's routes: sign-in, overview, spend, keys (docs/decisions/0037-account-page.md).

Every route but sign-in works on the wallet of the session (``billing.account_sessions``), never
on an id from the request: an id in a URL (a key to revoke) is looked up within that wallet, and
another wallet's id answers 404 exactly like an unknown one. Every POST must come from the
gateway's own origin (``Origin``, else ``Referer``) and, once signed in, carry the session's CSRF
token; either failing answers 403 and changes nothing. Pages that show account data are
``Cache-Control: no-store``.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from authz_sidecar import alerts_api, api_errors, auto_recharge_api, stripe_api
from authz_sidecar.account import spend_chart
from authz_sidecar.key_lookup import KeyLookup
from billing import (
    account_sessions,
    alerts,
    api_keys,
    key_limits,
    key_management,
    ledger,
    money,
    recharges,
    spend,
    topups,
    wallets,
)
from billing.settings import Settings

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
STATIC_FILES = {"account.css": "text/css", "account.js": "text/javascript", "favicon.svg": "image/svg+xml"}
ENTRIES_PAGE = 25
RECHARGES_SHOWN = 10
CSV_ROWS_MAX = 100_000
CSRF_FIELD = "csrf_token"
# The only third-party origin a form may lead to: Stripe Checkout (a 303 after our own POST).
CHECKOUT_ORIGIN = "https://checkout.stripe.com"


def content_security_policy(form_targets: str) -> str:
    """No inline code, everything from the gateway itself; forms may also lead to ``form_targets``
    (Stripe Checkout, which the top-up and card-setup forms redirect to)."""
    form_action = " ".join(["'self'", *form_targets.split()])
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        f"connect-src 'self'; form-action {form_action}; frame-ancestors 'none'; base-uri 'none'"
    )


SECURITY_HEADERS = {
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


@dataclasses.dataclass
class AccountPages:
    settings: Settings
    engine: AsyncEngine
    key_lookup: KeyLookup
    limiter_admit: Callable[[str], Any]
    client_address: Callable[[web.Request], str]
    payments: stripe_api.StripeRoutes
    auto_recharge: auto_recharge_api.AutoRechargeRoutes
    templates: jinja2.Environment = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("authz_sidecar.account", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.templates.filters["usd"] = money.format_usd
        public = urllib.parse.urlsplit(self.settings.public_url)
        self.origin = f"{public.scheme}://{public.netloc}"
        self.secure = public.scheme == "https"
        # __Host-: the browser keeps it only if Secure, Path=/ and no Domain (no sibling can set it).
        self.cookie_name = "__Host-bp_session" if self.secure else "bp_session"
        # Stripe's test double (STRIPE_API_BASE) serves its checkout page from its own origin.
        checkout = self.settings.stripe_api_base or CHECKOUT_ORIGIN
        self.csp = content_security_policy(checkout if self.settings.stripe_configured else "")

    # --- plumbing -------------------------------------------------------------------------------

    def render(self, name: str, *, status: int = 200, **context: Any) -> web.Response:
        html = self.templates.get_template(name).render(**context)
        response = web.Response(text=html, status=status, content_type="text/html", charset="utf-8")
        response.headers.update(SECURITY_HEADERS)
        response.headers["content-security-policy"] = self.csp
        return response

    def _same_origin(self, request: web.Request) -> bool:
        origin = request.headers.get("origin")
        if origin is None:
            referer = urllib.parse.urlsplit(request.headers.get("referer", ""))
            origin = f"{referer.scheme}://{referer.netloc}" if referer.netloc else None
        return origin == self.origin

    async def _session(self, request: web.Request) -> account_sessions.Session | None:
        async with self.engine.begin() as conn:
            return await account_sessions.use(conn, request.cookies.get(self.cookie_name))

    async def _signed_in(self, request: web.Request) -> account_sessions.Session:
        session = await self._session(request)
        if session is None:
            raise web.HTTPSeeOther("/account")
        return session

    async def _form(self, request: web.Request, session: account_sessions.Session | None) -> dict[str, str]:
        """The POST's fields, after the origin and CSRF checks (403, nothing changed, otherwise)."""
        if not self._same_origin(request):
            raise self._forbidden("This form was not sent from this gateway's own page.")
        form = {name: value for name, value in (await request.post()).items() if isinstance(value, str)}
        if session is not None and not account_sessions.csrf_matches(session, form.get(CSRF_FIELD)):
            raise self._forbidden("This form has expired; open the page again and resend it.")
        return form

    def _forbidden(self, message: str) -> web.HTTPException:
        html = self.templates.get_template("message.html").render(
            title="Not allowed", message=message, session=None
        )
        error = web.HTTPForbidden(text=html, content_type="text/html")
        error.headers.update(SECURITY_HEADERS)
        error.headers["content-security-policy"] = self.csp
        return error

    def _set_cookie(self, response: web.StreamResponse, token: str) -> None:
        response.set_cookie(
            self.cookie_name, token, httponly=True, samesite="Strict", secure=self.secure, path="/"
        )

    async def _wallet(self, session: account_sessions.Session) -> wallets.Wallet:
        async with self.engine.connect() as conn:
            wallet = await wallets.get_wallet(conn, session.wallet_id)
        assert wallet is not None, "a session's wallet exists (foreign key)"
        return wallet

    def _wallet_view(self, wallet: wallets.Wallet) -> dict[str, Any]:
        strict = self.settings.strict
        return {
            "id": wallet.id,
            "email": wallet.email,
            "balance_nano": wallet.balance_nano,
            "reserved_nano": wallet.reserved_nano,
            "available_nano": wallet.available_nano,
            "state": wallet.state_in(strict=strict).value,
        }

    # --- sign-in and out ------------------------------------------------------------------------

    async def home(self, request: web.Request) -> web.Response:
        session = await self._session(request)
        if session is None:
            return self.render("sign_in.html", session=None, error=None, next=None)
        wallet = await self._wallet(session)
        topup = await self._topup_status(session, request.query.get("session_id"))
        return self.render(
            "overview.html",
            session=session,
            wallet=self._wallet_view(wallet),
            stripe=self.settings.stripe_configured,
            topup=topup,
        )

    async def _topup_status(
        self, session: account_sessions.Session, checkout_session_id: str | None
    ) -> topups.SessionStatus | None:
        """The wallet's own Checkout Session named by the return URL; None for anything else."""
        if not checkout_session_id or len(checkout_session_id) > 255 or not checkout_session_id.isprintable():
            return None
        async with self.engine.connect() as conn:
            return await topups.checkout_session_status(
                conn, checkout_session_id, wallet_id=session.wallet_id
            )

    async def sign_in(self, request: web.Request) -> web.StreamResponse:
        form = await self._form(request, None)
        next_path = _local_page(form.get("next"))
        refusal = self.limiter_admit(self.client_address(request))
        if refusal is not None:
            response = self.render(
                "sign_in.html",
                status=429,
                session=None,
                error="Too many sign-in attempts from this address; wait a minute and try again.",
                next=next_path,
            )
            response.headers["retry-after"] = str(refusal.retry_after_s)
            return response
        try:
            key = await self.key_lookup.authenticate("Bearer " + form.get("api_key", "").strip())
        except api_errors.ApiError:
            # One message for malformed, unknown, revoked and suspended keys alike.
            return self.render(
                "sign_in.html", status=401, session=None, error="That key is not valid.", next=next_path
            )
        async with self.engine.begin() as conn:
            started = await account_sessions.start(conn, key)
        if started is None:  # revoked since the key cache read it
            return self.render(
                "sign_in.html", status=401, session=None, error="That key is not valid.", next=next_path
            )
        logger.info("account: wallet %s signed in with key %s", key.wallet_id, key.id)
        response = web.HTTPSeeOther(next_path or "/account")
        self._set_cookie(response, started.token)
        return response

    async def sign_out(self, request: web.Request) -> web.StreamResponse:
        session = await self._session(request)
        if session is not None:
            await self._form(request, session)
            async with self.engine.begin() as conn:
                await account_sessions.end(conn, request.cookies.get(self.cookie_name))
        response = web.HTTPSeeOther("/account")
        response.del_cookie(self.cookie_name, path="/")
        return response

    # --- data -----------------------------------------------------------------------------------

    async def balance_json(self, request: web.Request) -> web.Response:
        session = await self._session(request)
        if session is None:
            raise api_errors.ApiError(401, "not_signed_in", "Sign in at /account first.")
        wallet = self._wallet_view(await self._wallet(session))
        topup = await self._topup_status(session, request.query.get("session_id"))
        response = web.json_response(
            {
                "balance_usd": money.format_usd(wallet["balance_nano"]),
                "reserved_usd": money.format_usd(wallet["reserved_nano"]),
                "available_usd": money.format_usd(wallet["available_nano"]),
                "state": wallet["state"],
                "topup_credited": None if topup is None else topup.credited,
            }
        )
        response.headers["cache-control"] = "no-store"
        return response

    async def spend_page(self, request: web.Request) -> web.Response:
        session = await self._signed_in(request)
        before = _positive_int(request.query.get("before"))
        today = dt.datetime.now(dt.UTC).date()
        async with self.engine.connect() as conn:
            rows = await spend.by_day(conn, session.wallet_id, today=today)
            page = await ledger.entries(conn, session.wallet_id, limit=ENTRIES_PAGE + 1, before_id=before)
            keys = await key_management.list_keys(conn, session.wallet_id, include_revoked=True)
        prefixes = {view.record.id: view.record.display_prefix for view in keys}
        return self.render(
            "spend.html",
            session=session,
            chart=spend_chart.render(rows, today=today),
            key_chart=spend_chart.render(rows, today=today, by="key_id", labels=prefixes),
            by_key=[(prefixes.get(k, k), nano) for k, nano in spend.totals(rows, "key_id").items()],
            by_model=list(spend.totals(rows, "model").items()),
            entries=page[:ENTRIES_PAGE],
            next_before=page[ENTRIES_PAGE - 1].id if len(page) > ENTRIES_PAGE else None,
        )

    async def entries_csv(self, request: web.Request) -> web.StreamResponse:
        session = await self._signed_in(request)
        response = web.StreamResponse(
            headers={
                "content-type": "text/csv; charset=utf-8",
                "content-disposition": 'attachment; filename="ledger.csv"',
                **SECURITY_HEADERS,
            }
        )
        await response.prepare(request)
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(
            ["id", "created_at", "kind", "amount_usd", "balance_after_usd", "model", "key_id", "request_id"]
        )
        written, before = 0, None
        async with self.engine.connect() as conn:
            while written < CSV_ROWS_MAX:
                page = await ledger.entries(conn, session.wallet_id, limit=1000, before_id=before)
                if not page:
                    break
                for entry in page:
                    details = entry.details or {}
                    writer.writerow(
                        [
                            entry.id,
                            entry.created_at.isoformat(),
                            entry.kind,
                            money.format_usd(entry.amount_nano),
                            money.format_usd(entry.balance_after_nano),
                            *(_csv_safe(str(details.get(f, ""))) for f in ("model", "key_id", "request_id")),
                        ]
                    )
                written += len(page)
                before = page[-1].id
                await response.write(out.getvalue().encode())
                out.seek(0)
                out.truncate()
        await response.write_eof()
        return response

    # --- top-up ---------------------------------------------------------------------------------

    async def topup_page(self, request: web.Request) -> web.Response:
        """The 403's ``top_up_url``: the amount form, after signing in if need be."""
        session = await self._session(request)
        if session is None:
            return self.render("sign_in.html", session=None, error=None, next="/account/top-up")
        return self._topup_form(session, amount="10.00", error=None)

    def _topup_form(
        self, session: account_sessions.Session, *, amount: str, error: str | None, status: int = 200
    ) -> web.Response:
        s = self.settings
        return self.render(
            "top_up.html",
            status=status if s.stripe_configured else 503,
            session=session,
            stripe=s.stripe_configured,
            amount=amount,
            error=error,
            low=money.format_usd_cents(s.topup_nano_min),
            high=money.format_usd_cents(s.topup_nano_max),
        )

    async def topup(self, request: web.Request) -> web.StreamResponse:
        session = await self._signed_in(request)
        form = await self._form(request, session)
        amount = form.get("amount_usd", "")
        try:
            url = await self.payments.checkout_for_account(session.wallet_id, amount, return_path="/account")
        except api_errors.ApiError as error:
            return self._topup_form(session, amount=amount, error=error.message, status=error.status)
        raise web.HTTPSeeOther(url)

    # --- auto-recharge --------------------------------------------------------------------------

    async def auto_recharge_page(self, request: web.Request) -> web.Response:
        session = await self._signed_in(request)
        return await self._auto_recharge(session)

    async def _auto_recharge(
        self,
        session: account_sessions.Session,
        *,
        error: str | None = None,
        notice: str | None = None,
        form: dict[str, str] | None = None,
        status: int = 200,
    ) -> web.Response:
        async with self.engine.connect() as conn:
            setting = await recharges.status(conn, session.wallet_id)
            history = await recharges.recent(conn, session.wallet_id, limit=RECHARGES_SHOWN)
        if form is None:
            form = {"threshold_usd": "2.00", "amount_usd": "10.00", "monthly_cap_usd": ""}
            if setting is not None:
                form = {
                    "threshold_usd": money.format_usd_cents(setting.threshold_nano),
                    "amount_usd": money.format_usd_cents(setting.amount_nano),
                    "monthly_cap_usd": ""
                    if setting.monthly_cap_nano is None
                    else money.format_usd_cents(setting.monthly_cap_nano),
                }
        return self.render(
            "auto_recharge.html",
            status=status if self.settings.stripe_configured else 503,
            session=session,
            stripe=self.settings.stripe_configured,
            setting=setting,
            history=history,
            form=form,
            error=error,
            notice=notice,
            low=money.format_usd_cents(self.settings.topup_nano_min),
            high=money.format_usd_cents(self.settings.topup_nano_max),
            failures_max=self.settings.auto_recharge_failures_max,
        )

    async def save_auto_recharge(self, request: web.Request) -> web.StreamResponse:
        session = await self._signed_in(request)
        form = await self._form(request, session)
        fields = {
            name: form.get(name, "").strip() for name in ("threshold_usd", "amount_usd", "monthly_cap_usd")
        }
        body: dict[str, Any] = {name: value for name, value in fields.items() if value}
        try:
            setting = self.auto_recharge.setting_from(body)
            _, setup = await self.auto_recharge.apply(
                session.wallet_id, setting, return_path="/account/auto-recharge"
            )
        except api_errors.ApiError as error:
            return await self._auto_recharge(session, error=error.message, form=fields, status=error.status)
        if setup is not None:  # no saved card yet: Stripe's page saves one, then back here
            raise web.HTTPSeeOther(str(setup.url))
        return await self._auto_recharge(session, notice="Saved: auto-recharge is on.")

    async def disable_auto_recharge(self, request: web.Request) -> web.StreamResponse:
        session = await self._signed_in(request)
        await self._form(request, session)
        async with self.engine.begin() as conn:
            await recharges.disable(conn, session.wallet_id)
        raise web.HTTPSeeOther("/account/auto-recharge")

    # --- alerts ---------------------------------------------------------------------------------

    async def alerts_page(self, request: web.Request) -> web.Response:
        session = await self._signed_in(request)
        return await self._alerts(session)

    async def _alerts(
        self,
        session: account_sessions.Session,
        *,
        error: str | None = None,
        notice: str | None = None,
        secret: str | None = None,
        form: dict[str, str] | None = None,
        status: int = 200,
    ) -> web.Response:
        async with self.engine.connect() as conn:
            endpoint = await alerts.endpoint(conn, session.wallet_id)
            events = await alerts.recent_events(conn, session.wallet_id, limit=alerts_api.RECENT_EVENTS_MAX)
            wallet = await wallets.get_wallet(conn, session.wallet_id)
        assert wallet is not None
        thresholds = (
            ""
            if endpoint is None or endpoint.thresholds_nano is None
            else ", ".join(money.format_usd(n) for n in endpoint.thresholds_nano)
        )
        return self.render(
            "alerts.html",
            status=status,
            session=session,
            endpoint=endpoint if endpoint is not None and endpoint.url else None,
            effective=[] if endpoint is None else endpoint.effective_thresholds_nano,
            events=events,
            mail_to=wallet.email if self.settings.smtp_url else None,
            form=form or {"url": endpoint.url if endpoint and endpoint.url else "", "thresholds": thresholds},
            error=error,
            notice=notice,
            secret=secret,
        )

    async def save_alerts(self, request: web.Request) -> web.Response:
        session = await self._signed_in(request)
        form = await self._form(request, session)
        url_text, thresholds_text = form.get("url", "").strip(), form.get("thresholds", "").strip()
        fields = {"url": url_text, "thresholds": thresholds_text}
        try:
            url = await alerts_api.checked_url(url_text, allow_private=self.settings.alert_allow_private)
            thresholds = None
            if thresholds_text:
                thresholds = alerts.check_thresholds([t.strip() for t in thresholds_text.split(",")])
        except api_errors.ApiError as error:
            return await self._alerts(session, error=error.message, form=fields, status=400)
        except ValueError as exc:
            return await self._alerts(session, error=f"Thresholds: {exc}.", form=fields, status=400)
        async with self.engine.begin() as conn:
            _, secret = await alerts.register(
                conn,
                session.wallet_id,
                url=url,
                thresholds_nano=thresholds,
                rotate_secret=form.get("rotate") == "yes",
            )
        return await self._alerts(session, notice="Saved.", secret=secret)

    async def remove_alerts(self, request: web.Request) -> web.StreamResponse:
        session = await self._signed_in(request)
        await self._form(request, session)
        async with self.engine.begin() as conn:
            await alerts.remove(conn, session.wallet_id)
        raise web.HTTPSeeOther("/account/alerts")

    async def test_alert(self, request: web.Request) -> web.Response:
        session = await self._signed_in(request)
        await self._form(request, session)
        try:
            async with self.engine.begin() as conn:
                await alerts.queue_test_event(conn, session.wallet_id)
        except alerts.NotConfigured:
            return await self._alerts(session, error="Register a webhook first.", status=404)
        except alerts.TooManyTestEvents:
            return await self._alerts(
                session, error="Test events are still waiting for delivery; see below.", status=429
            )
        return await self._alerts(session, notice="A test event is on its way.", status=202)

    # --- keys -----------------------------------------------------------------------------------

    async def keys_page(self, request: web.Request) -> web.Response:
        session = await self._signed_in(request)
        return await self._keys(session)

    async def _keys(
        self,
        session: account_sessions.Session,
        *,
        created: str | None = None,
        error: str | None = None,
        notice: str | None = None,
        status: int = 200,
    ) -> web.Response:
        async with self.engine.connect() as conn:
            views = await key_management.list_keys(conn, session.wallet_id)
            wallet = await wallets.get_wallet(conn, session.wallet_id)
        assert wallet is not None
        now = dt.datetime.now(dt.UTC)
        return self.render(
            "keys.html",
            status=status,
            session=session,
            keys=[
                {
                    "id": v.record.id,
                    "prefix": v.record.display_prefix,
                    "created_at": v.created_at,
                    "last_used_at": v.last_used_at,
                    "spend_nano": v.spend_nano,
                    "limit_nano": v.limit.limit_nano if v.limit is not None else None,
                    "limit_window": v.limit.window.value if v.limit is not None else None,
                    "window_spent_nano": v.limit.spent_nano if v.limit is not None else None,
                    "resets_at": v.limit.resets_at if v.limit is not None else None,
                    "state": v.state(now),
                    "current": v.record.id == session.key_id,
                }
                for v in views
            ],
            self_service=wallet.source == "signup",
            created=created,
            error=error,
            notice=notice,
            windows=key_limits.WINDOWS,
        )

    async def set_key_limit(self, request: web.Request) -> web.Response:
        """One form for every key: ``key_id``, ``usd`` (empty: no limit) and ``window``."""
        session = await self._signed_in(request)
        form = await self._form(request, session)
        error = await self._self_service_refusal(session)
        if error:
            return await self._keys(session, error=error, status=403)
        key_id, usd = form.get("key_id", ""), form.get("usd", "").strip()
        limit_nano: int | None = None
        window = None
        if usd:
            try:
                limit_nano, window = key_limits.parse({"usd": usd, "window": form.get("window", "")})
            except key_limits.InvalidLimit as exc:
                return await self._keys(session, error=f"Limit: {exc}", status=400)
        if not key_management.is_key_id(key_id):
            return await self._keys(session, error="This wallet has no such active key.", status=404)
        try:
            async with self.engine.begin() as conn:
                await key_management.set_limit(
                    conn,
                    wallet_id=session.wallet_id,
                    requester_id=session.key_id,
                    key_id=key_id,
                    limit_nano=limit_nano,
                    window=window,
                )
        except (api_keys.KeyNotFound, key_management.RequesterRefused):
            return await self._keys(session, error="This wallet has no such active key.", status=404)
        except key_limits.InvalidLimit as exc:
            return await self._keys(session, error=f"Limit: {exc}", status=400)
        logger.info("account: key %s of wallet %s limit set", key_id, session.wallet_id)
        return await self._keys(session, notice="Saved. Limits apply within a second.")

    async def create_key(self, request: web.Request) -> web.Response:
        session = await self._signed_in(request)
        await self._form(request, session)
        error = await self._self_service_refusal(session)
        if error:
            return await self._keys(session, error=error, status=403)
        try:
            async with self.engine.begin() as conn:
                issued, _ = await key_management.create_key(
                    conn,
                    wallet_id=session.wallet_id,
                    requester_id=session.key_id,
                    cap=self.settings.keys_per_wallet_max,
                )
        except key_management.TooManyKeys as exc:
            return await self._keys(
                session, error=f"This wallet already has {exc.cap} active keys; revoke one first.", status=409
            )
        logger.info("account: key %s created for wallet %s", issued.key_id, session.wallet_id)
        return await self._keys(session, created=issued.plaintext, status=201)

    async def revoke_key(self, request: web.Request) -> web.Response:
        session = await self._signed_in(request)
        form = await self._form(request, session)
        key_id = request.match_info["key_id"]
        error = await self._self_service_refusal(session)
        if error:
            return await self._keys(session, error=error, status=403)
        if not key_management.is_key_id(key_id):
            raise web.HTTPNotFound()
        async with self.engine.connect() as conn:
            views = {v.record.id: v for v in await key_management.list_keys(conn, session.wallet_id)}
        if key_id not in views:
            return await self._keys(session, error="This wallet has no such active key.", status=404)
        if form.get("confirm") != "yes":
            return self.render("key_revoke.html", session=session, key=views[key_id].record)
        try:
            async with self.engine.begin() as conn:
                await key_management.revoke_key(
                    conn, wallet_id=session.wallet_id, requester_id=session.key_id, key_id=key_id
                )
        except key_management.LastKey:
            return await self._keys(
                session, error="This is the wallet's last active key; create another first.", status=409
            )
        except (api_keys.KeyNotFound, key_management.RequesterRefused):
            return await self._keys(session, error="This wallet has no such active key.", status=404)
        logger.info("account: key %s of wallet %s revoked", key_id, session.wallet_id)
        raise web.HTTPSeeOther("/account/keys")

    async def _self_service_refusal(self, session: account_sessions.Session) -> str | None:
        wallet = await self._wallet(session)
        if wallet.source != "signup":
            return "This wallet's keys are managed by the gateway's operator."
        return None

    # --- static ---------------------------------------------------------------------------------

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC_FILES:
            raise web.HTTPNotFound()
        response = web.Response(
            body=(STATIC_DIR / name).read_bytes(), content_type=STATIC_FILES[name], charset="utf-8"
        )
        response.headers["cache-control"] = "public, max-age=300"
        response.headers["x-content-type-options"] = "nosniff"
        return response


PAGES = (
    "/account",
    "/account/top-up",
    "/account/spend",
    "/account/keys",
    "/account/alerts",
    "/account/auto-recharge",
)


def _local_page(path: str | None) -> str | None:
    """``path`` if it is one of this page's own (a sign-in's way back), else None: never another
    site (``//evil.example``) nor another part of the gateway."""
    if path in PAGES:
        return path
    return None


def _positive_int(text: str | None) -> int | None:
    if text is None or not text.isdigit() or len(text) > 18:
        return None
    return int(text) or None


def _csv_safe(text: str) -> str:
    """A cell a spreadsheet will not run as a formula (CSV injection): a leading =, +, - or @ is
    quoted away. Model names and ids come from requests, so they are the client's text."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_routes(
    app: web.Application,
    *,
    settings: Settings,
    engine: AsyncEngine,
    key_lookup: KeyLookup,
    limiter_admit: Callable[[str], Any],
    client_address: Callable[[web.Request], str],
    payments: stripe_api.StripeRoutes,
    auto_recharge: auto_recharge_api.AutoRechargeRoutes,
) -> AccountPages:
    pages = AccountPages(settings, engine, key_lookup, limiter_admit, client_address, payments, auto_recharge)
    app.router.add_get("/account", pages.home)
    app.router.add_post("/account/sign-in", pages.sign_in)
    app.router.add_post("/account/sign-out", pages.sign_out)
    app.router.add_get("/account/balance.json", pages.balance_json)
    app.router.add_get("/account/spend", pages.spend_page)
    app.router.add_get("/account/entries.csv", pages.entries_csv)
    app.router.add_get("/account/top-up", pages.topup_page)
    app.router.add_post("/account/top-up", pages.topup)
    app.router.add_get("/account/auto-recharge", pages.auto_recharge_page)
    app.router.add_post("/account/auto-recharge", pages.save_auto_recharge)
    app.router.add_post("/account/auto-recharge/off", pages.disable_auto_recharge)
    app.router.add_get("/account/alerts", pages.alerts_page)
    app.router.add_post("/account/alerts", pages.save_alerts)
    app.router.add_post("/account/alerts/remove", pages.remove_alerts)
    app.router.add_post("/account/alerts/test", pages.test_alert)
    app.router.add_get("/account/keys", pages.keys_page)
    app.router.add_post("/account/keys", pages.create_key)
    app.router.add_post("/account/keys/{key_id}/revoke", pages.revoke_key)
    app.router.add_post("/account/keys/limit", pages.set_key_limit)
    app.router.add_get("/account/static/{name}", pages.static)
    return pages
