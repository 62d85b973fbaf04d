"""The public HTTP API (reached through Envoy): signup, balance, usage, the wallet's keys, and its
OpenAPI document.

Every answer is JSON; every error is OpenAI-shaped (:mod:`authz_sidecar.api_errors`) with a
specific status and code, from a single middleware, so no handler can leak a traceback. Money is
shown as USD decimal strings, never numbers.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import ipaddress
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, overload

import yaml
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from authz_sidecar import alerts_api, api_errors, auto_recharge_api, json_body, metrics, stripe_api
from authz_sidecar.account import pages
from authz_sidecar.key_lookup import KeyLookup
from billing import api_keys, database, key_limits, key_management, ledger, money, wallets
from billing.settings import Settings

logger = logging.getLogger(__name__)

OPENAPI_PATH = Path(__file__).with_name("openapi.yaml")
_RATE_WINDOW_S = 60.0

SETTINGS = web.AppKey("settings", Settings)
ENGINE = web.AppKey("engine", AsyncEngine)
KEYS = web.AppKey("keys", KeyLookup)
SIGNUP_LIMITER: web.AppKey[SignupLimiter] = web.AppKey("signup_limiter")
OPENAPI = web.AppKey("openapi", dict)
LIMIT_EXAMPLE = '{"usd": "5.00", "window": "monthly"}'

signup_refusals = Counter(
    "billingproxy_signup_refusals",
    "Signups refused by a rate limit, by scope (client: one address; gateway: the sidecar's total).",
    ["scope"],
    registry=metrics.registry,
)


@dataclasses.dataclass(frozen=True)
class SignupRefusal:
    """Why a signup must wait: ``scope`` is "client" (this address) or "gateway" (everyone)."""

    scope: str
    retry_after_s: int


class SignupLimiter:
    """Two sliding one-minute windows: one per client address, and one for the whole sidecar.

    Why both: the per-client window stops one address from collecting free grants; the gateway
    window bounds the grants given per minute when many addresses each stay within theirs (a
    botnet, an IPv6 block, or a caller at the sidecar's own port claiming any address). A refused
    attempt counts in neither window, so a flood from one address cannot spend everyone's budget.
    Only admitted signups are remembered, so memory stays bounded by the gateway window: stale
    clients are swept once the table holds twice that many.
    """

    def __init__(self, per_client: int, per_gateway: int) -> None:
        self._per_client = per_client
        self._per_gateway = per_gateway
        self._clients: dict[str, collections.deque[float]] = {}
        self._gateway: collections.deque[float] = collections.deque()

    def admit(self, client: str, now: float | None = None) -> SignupRefusal | None:
        """None if admitted (and counted), else which limit refused and for how long."""
        now = time.monotonic() if now is None else now
        horizon = now - _RATE_WINDOW_S
        times = self._clients.get(client)
        if times is not None:
            _expire(times, horizon)
            if len(times) >= self._per_client:
                return SignupRefusal("client", _retry_after(times[0], now))
        _expire(self._gateway, horizon)
        if len(self._gateway) >= self._per_gateway:
            return SignupRefusal("gateway", _retry_after(self._gateway[0], now))
        if times is None:
            if len(self._clients) >= 2 * self._per_gateway + 16:
                self._sweep(horizon)
            times = self._clients[client] = collections.deque()
        times.append(now)
        self._gateway.append(now)
        return None

    def _sweep(self, horizon: float) -> None:
        for client in [c for c, times in self._clients.items() if times[-1] <= horizon]:
            del self._clients[client]


def _expire(times: collections.deque[float], horizon: float) -> None:
    while times and times[0] <= horizon:
        times.popleft()


def _retry_after(oldest: float, now: float) -> int:
    return max(1, math.ceil(oldest + _RATE_WINDOW_S - now))


def client_address(request: web.Request) -> str:
    """The address the per-client signup limit counts against.

    Envoy computes the trusted client address (its peer, or with ``xff_num_trusted_hops`` = N
    the Nth address from the right of X-Forwarded-For) and, because it uses the remote address
    and no address is internal, sets ``x-envoy-external-address`` to it on every request,
    replacing any the client sent. Without that header (a caller at the sidecar's own port), the
    peer counts. An IPv6 client is its /64, the block one subscriber usually holds.
    """
    raw = request.headers.get("x-envoy-external-address", "").strip() or request.remote or ""
    try:
        address = ipaddress.ip_address(raw)
    except ValueError:
        return raw[:64] or "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network((address, 64), strict=False))
    return str(address)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, separators=(",", ":")))


def _error(error: api_errors.ApiError) -> web.Response:
    return web.Response(
        status=error.status, body=error.body(), content_type="application/json", headers=error.headers
    )


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except api_errors.ApiError as error:
        return _error(error)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
            exc.status, "http_error"
        )
        return _error(api_errors.ApiError(exc.status, code, exc.reason))
    except Exception as exc:
        if database.is_unreachable(exc):
            logger.exception("database unavailable during %s %s", request.method, request.path)
            return _error(api_errors.BILLING_UNAVAILABLE)
        logger.exception("unexpected error during %s %s", request.method, request.path)
        return _error(api_errors.ApiError(500, "internal_error", "Internal error.", "api_error"))


async def signup(request: web.Request) -> web.Response:
    body = await json_body.read_object(request)
    try:
        email = wallets.normalize_email(body.get("email"))
    except wallets.EmailInvalid as exc:
        raise api_errors.ApiError(400, "invalid_email", str(exc), extra={"param": "email"}) from None
    refusal = request.app[SIGNUP_LIMITER].admit(client_address(request))
    if refusal is not None:
        signup_refusals.labels(refusal.scope).inc()
        who = "from this address" if refusal.scope == "client" else "on this gateway right now"
        raise api_errors.ApiError(
            429,
            "rate_limited",
            f"Too many signups {who}; try again later.",
            "rate_limit_error",
            headers={"retry-after": str(refusal.retry_after_s)},
        )
    settings = request.app[SETTINGS]
    try:
        async with request.app[ENGINE].begin() as conn:
            created = await wallets.signup(
                conn,
                email=email,
                grant_nano=settings.free_grant_nano,
                email_policy=settings.signup_email_policy,
            )
    except wallets.EmailTaken:
        raise api_errors.ApiError(
            409,
            "email_taken",
            "This email address, or another address of the same mailbox, already has a wallet.",
            extra={"param": "email"},
        ) from None
    logger.info("signup: wallet %s, key %s", created.wallet.id, created.key.key_id)
    return _json(
        {
            "api_key": created.key.plaintext,
            "key_id": created.key.key_id,
            "wallet_id": created.wallet.id,
            "balance_usd": money.format_usd(created.wallet.balance_nano),
        },
        status=201,
    )


async def _caller(request: web.Request) -> tuple[api_keys.KeyRecord, wallets.Wallet]:
    """The request's key (401 if it is not usable) and the wallet it spends from."""
    key = await request.app[KEYS].authenticate(request.headers.get("authorization"))
    async with request.app[ENGINE].connect() as conn:
        wallet = await wallets.get_wallet(conn, key.wallet_id)
    assert wallet is not None, "a key always belongs to a wallet (foreign key)"
    return key, wallet


async def _wallet_of(request: web.Request) -> wallets.Wallet:
    _, wallet = await _caller(request)
    return wallet


async def balance(request: web.Request) -> web.Response:
    wallet = await _wallet_of(request)
    strict = request.app[SETTINGS].strict
    return _json(
        {
            "wallet_id": wallet.id,
            "balance_usd": money.format_usd(wallet.balance_nano),
            "reserved_usd": money.format_usd(wallet.reserved_nano),
            "available_usd": money.format_usd(wallet.available_nano),
            # The limit admission applies (0 in strict mode): the balance never goes below minus it.
            "overdraft_limit_usd": money.format_usd(wallet.overdraft_limit_in(strict=strict)),
            "state": wallet.state_in(strict=strict).value,
        }
    )


@overload
def _query_int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int: ...
@overload
def _query_int(request: web.Request, name: str, default: None, lo: int, hi: int) -> int | None: ...
def _query_int(request: web.Request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        raise api_errors.ApiError(
            400,
            "invalid_parameter",
            f"{name} must be a whole number from {lo} to {hi}.",
            extra={"param": name},
        )
    return int(raw)


async def usage(request: web.Request) -> web.Response:
    page_max = request.app[SETTINGS].usage_page_size_max
    limit = _query_int(request, "limit", min(20, page_max), 1, page_max)
    before = _query_int(request, "before", None, 1, 2**63 - 1)
    wallet = await _wallet_of(request)
    async with request.app[ENGINE].connect() as conn:
        page = await ledger.entries(conn, wallet.id, limit=limit + 1, before_id=before)
    has_more = len(page) > limit
    page = page[:limit]
    return _json(
        {
            "object": "list",
            "data": [
                {
                    "id": entry.id,
                    "kind": entry.kind,
                    "amount_usd": money.format_usd(entry.amount_nano),
                    "balance_after_usd": money.format_usd(entry.balance_after_nano),
                    "created_at": entry.created_at.isoformat(),
                    "details": entry.details,
                }
                for entry in page
            ],
            "has_more": has_more,
            "next_before": page[-1].id if has_more else None,
        }
    )


# --- The wallet's keys (billing/key_management.py; docs/decisions/0032-self-service-keys.md) ------


async def _key_manager(request: web.Request) -> tuple[api_keys.KeyRecord, wallets.Wallet]:
    """The caller, if its wallet's keys are its own to manage: a self-service wallet's. The keys
    of a Kubernetes or admin wallet belong to their ApiKey resources or to the admin CLI, which
    would otherwise find keys changed under them."""
    key, wallet = await _caller(request)
    if wallet.source != "signup":
        raise api_errors.ApiError(
            403,
            "keys_managed_elsewhere",
            "This wallet's keys are managed by the gateway's operator (ApiKey resources or the admin CLI).",
            "permission_error",
        )
    return key, wallet


def _key_json(view: key_management.KeyView, caller: api_keys.KeyRecord) -> dict[str, Any]:
    record = view.record
    return {
        "object": "api_key",
        "id": record.id,
        "prefix": record.display_prefix,
        "created_at": view.created_at.isoformat(),
        "last_used_at": view.last_used_at.isoformat() if view.last_used_at else None,
        "spend_usd": money.format_usd(view.spend_nano),
        "limit": None if view.limit is None else _limit_json(view.limit),
        "state": view.state(dt.datetime.now(dt.UTC)),
        "revoked_at": record.revoked_at.isoformat() if record.revoked_at else None,
        "current": record.id == caller.id,
    }


def _limit_json(limit: key_limits.KeyLimit) -> dict[str, Any]:
    reset = limit.resets_at
    return {
        "usd": money.format_usd(limit.limit_nano),
        "window": limit.window.value,
        "spent_usd": money.format_usd(limit.spent_nano),
        "reserved_usd": money.format_usd(limit.reserved_nano),
        "window_start": None
        if limit.window is key_limits.Window.TOTAL
        else key_limits.iso(limit.window_start),
        "resets_at": None if reset is None else key_limits.iso(reset),
    }


@contextlib.asynccontextmanager
async def _key_change(request: web.Request) -> AsyncIterator[AsyncConnection]:
    """The transaction of one key change; each refusal of the key rules becomes its 4xx."""
    try:
        async with request.app[ENGINE].begin() as conn:
            yield conn
    except key_management.RequesterRefused as exc:
        # The key passed the cache but was revoked (or expired) since: answered as the Check would.
        raise api_errors.key_refused(exc.reason) from None
    except key_management.TooManyKeys as exc:
        raise api_errors.ApiError(
            409,
            "too_many_keys",
            f"This wallet already has {exc.cap} active keys, the most it may have; revoke one first.",
        ) from None
    except api_keys.KeyNotFound as exc:
        # A key of another wallet answers exactly as no key at all: its existence is not revealed.
        raise api_errors.ApiError(
            404, "key_not_found", f"This wallet has no key {exc}.", extra={"param": "key_id"}
        ) from None
    except key_management.LastKey:
        raise api_errors.ApiError(
            409,
            "last_key",
            "This is the wallet's last active key; create another before revoking it.",
            extra={"param": "key_id"},
        ) from None


async def list_keys(request: web.Request) -> web.Response:
    caller, wallet = await _key_manager(request)
    async with request.app[ENGINE].connect() as conn:
        views = await key_management.list_keys(conn, wallet.id)
    return _json({"object": "list", "data": [_key_json(view, caller) for view in views]})


async def create_key(request: web.Request) -> web.Response:
    caller, wallet = await _key_manager(request)
    # No fields yet; a body, if sent, must be a JSON object without any, so a client that sends
    # a field this gateway does not know (a name, a limit) hears so instead of being ignored.
    if request.can_read_body:
        body = await json_body.read_object(request, example="{}")
        if body:
            field = sorted(body)[0]
            raise api_errors.ApiError(
                400,
                "parameter_not_supported",
                f"POST /billing/keys takes no fields; {field!r} is not supported.",
                extra={"param": field},
            )
    async with _key_change(request) as conn:
        issued, view = await key_management.create_key(
            conn, wallet_id=wallet.id, requester_id=caller.id, cap=request.app[SETTINGS].keys_per_wallet_max
        )
    logger.info("key %s created for wallet %s by key %s", issued.key_id, wallet.id, caller.id)
    return _json({**_key_json(view, caller), "api_key": issued.plaintext}, status=201)


def _key_id(request: web.Request) -> str:
    key_id = request.match_info["key_id"]
    if not key_management.is_key_id(key_id):
        raise api_errors.ApiError(
            400,
            "invalid_key_id",
            "A key id is 'key_' followed by letters and digits, as GET /billing/keys lists them.",
            extra={"param": "key_id"},
        )
    return key_id


async def revoke_key(request: web.Request) -> web.Response:
    caller, wallet = await _key_manager(request)
    key_id = _key_id(request)
    async with _key_change(request) as conn:
        view, revoked = await key_management.revoke_key(
            conn, wallet_id=wallet.id, requester_id=caller.id, key_id=key_id
        )
    if revoked:
        logger.info("key %s of wallet %s revoked by key %s", key_id, wallet.id, caller.id)
    return _json(_key_json(view, caller))


async def set_key_limit(request: web.Request) -> web.Response:
    """``PUT /billing/keys/{key_id}/limit {"usd": "5.00", "window": "monthly"}``: the whole body
    is checked before anything is read or written (billing/key_limits.py)."""
    caller, wallet = await _key_manager(request)
    key_id = _key_id(request)
    body = await json_body.read_object(request, example=LIMIT_EXAMPLE)
    try:
        limit_nano, window = key_limits.parse(body)
    except key_limits.InvalidLimit as exc:
        raise api_errors.ApiError(400, "invalid_limit", str(exc), extra={"param": exc.param}) from None
    async with _key_change(request) as conn:
        view = await key_management.set_limit(
            conn,
            wallet_id=wallet.id,
            requester_id=caller.id,
            key_id=key_id,
            limit_nano=limit_nano,
            window=window,
        )
    logger.info("key %s of wallet %s limited to %d nano-USD %s", key_id, wallet.id, limit_nano, window.value)
    return _json(_key_json(view, caller))


async def clear_key_limit(request: web.Request) -> web.Response:
    caller, wallet = await _key_manager(request)
    key_id = _key_id(request)
    async with _key_change(request) as conn:
        view = await key_management.set_limit(
            conn, wallet_id=wallet.id, requester_id=caller.id, key_id=key_id, limit_nano=None
        )
    return _json(_key_json(view, caller))


async def openapi(request: web.Request) -> web.Response:
    return _json(request.app[OPENAPI])


def load_openapi() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(OPENAPI_PATH.read_text(encoding="utf-8"))
    return document


def make_app(settings: Settings, engine: AsyncEngine, key_lookup: KeyLookup) -> web.Application:
    app = web.Application(middlewares=[errors_as_json], client_max_size=json_body.BODY_BYTES_MAX)
    app[SETTINGS] = settings
    app[ENGINE] = engine
    app[KEYS] = key_lookup
    app[SIGNUP_LIMITER] = SignupLimiter(
        settings.signup_rate_per_minute, settings.signup_rate_global_per_minute
    )
    app[OPENAPI] = load_openapi()
    app.router.add_post("/user/signup", signup)
    app.router.add_get("/billing/balance", balance)
    app.router.add_get("/billing/usage", usage)
    app.router.add_get("/billing/keys", list_keys)
    app.router.add_post("/billing/keys", create_key)
    app.router.add_delete("/billing/keys/{key_id}", revoke_key)
    app.router.add_put("/billing/keys/{key_id}/limit", set_key_limit)
    app.router.add_delete("/billing/keys/{key_id}/limit", clear_key_limit)
    app.router.add_get("/openapi.json", openapi)
    stripe_routes = stripe_api.add_routes(app, settings=settings, engine=engine, key_lookup=key_lookup)
    alerts_api.add_routes(app, settings=settings, engine=engine, key_lookup=key_lookup)
    # Sign-in attempts count against their own limiter, at the signup rates.
    sign_in_limiter = SignupLimiter(settings.signup_rate_per_minute, settings.signup_rate_global_per_minute)
    auto_recharge = auto_recharge_api.add_routes(
        app, settings=settings, engine=engine, key_lookup=key_lookup, stripe_routes=stripe_routes
    )
    pages.add_routes(
        app,
        settings=settings,
        engine=engine,
        key_lookup=key_lookup,
        limiter_admit=sign_in_limiter.admit,
        client_address=client_address,
        payments=stripe_routes,
        auto_recharge=auto_recharge,
    )
    return app
