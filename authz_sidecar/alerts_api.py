"""Low-balance alerts on the public HTTP API (docs/alerts.md), authenticated like /billing/balance:
the Bearer key names the wallet, so no route takes a wallet id and none can reach another's.

- ``PUT /billing/alerts`` — ``{"url": "https://…", "thresholds_usd": ["5.00", "0"]?,
  "rotate_secret": false?}``: register or replace the wallet's webhook. The signing secret is in
  the answer only when it is new (the first PUT, or ``rotate_secret``).
- ``GET /billing/alerts`` — the endpoint, its thresholds, the secret's last 4 characters and the
  latest events with their delivery state.
- ``DELETE /billing/alerts`` — stop alerts: the endpoint goes, its undelivered events are given up.
- ``POST /billing/alerts/test`` — queue an ``alert.test`` event; the answer (202) names it.

Bad input is a specific 400 and writes nothing: the body is checked whole before the database is
touched.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from typing import Any

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from authz_sidecar import alert_delivery, api_errors, json_body, metrics
from authz_sidecar.key_lookup import KeyLookup
from billing import alerts, money
from billing.settings import Settings

RECENT_EVENTS_MAX = 10
PUT_FIELDS = ("url", "thresholds_usd", "rotate_secret")
EXAMPLE = '{"url": "https://example.com/hooks/billing", "thresholds_usd": ["5.00", "0"]}'


async def checked_url(url: object, *, allow_private: bool) -> str:
    """The URL if the gateway may post to it, its name resolved now (and again at every
    delivery), else a 400 ``invalid_url``. The API and the account page both register with it."""
    try:
        checked = alerts.check_url(url, allow_private=allow_private)
        host = urllib.parse.urlsplit(checked).hostname or ""
        await alert_delivery.check_name(host, allow_private=allow_private)
    except (alerts.InvalidUrl, alert_delivery.AddressRefused) as exc:
        message = alerts.PRIVATE_ADDRESS if isinstance(exc, alert_delivery.AddressRefused) else str(exc)
        raise api_errors.ApiError(400, "invalid_url", f"{message}.", extra={"param": "url"}) from None
    except OSError:
        raise api_errors.ApiError(
            400, "invalid_url", "url names a host that does not resolve.", extra={"param": "url"}
        ) from None
    return checked


def _not_configured() -> api_errors.ApiError:
    return api_errors.ApiError(
        404,
        "alerts_not_configured",
        "This wallet has no alert webhook; register one with PUT /billing/alerts.",
    )


def _endpoint_json(endpoint: alerts.Endpoint) -> dict[str, Any]:
    return {
        "object": "alert_endpoint",
        "url": endpoint.url,
        "thresholds_usd": [money.format_usd(n) for n in endpoint.effective_thresholds_nano],
        "thresholds_default": endpoint.thresholds_nano is None,
        "signing_secret_last4": endpoint.secret_last4,
    }


def _event_json(event: alerts.EventRecord) -> dict[str, Any]:
    return {
        "id": event.id,
        "type": event.type,
        "threshold_usd": None if event.threshold_nano is None else money.format_usd(event.threshold_nano),
        "balance_usd": money.format_usd(event.balance_nano),
        "created_at": event.created_at.isoformat(),
        "attempts": event.attempts,
        "state": event.state,
        "last_error": event.last_error,
    }


@dataclasses.dataclass
class AlertRoutes:
    settings: Settings
    engine: AsyncEngine
    key_lookup: KeyLookup

    async def _wallet_id(self, request: web.Request) -> str:
        key = await self.key_lookup.authenticate(request.headers.get("authorization"))
        return key.wallet_id

    async def put(self, request: web.Request) -> web.Response:
        wallet_id = await self._wallet_id(request)
        body = await json_body.read_object(request, example=EXAMPLE)
        unknown = sorted(set(body) - set(PUT_FIELDS))
        if unknown:
            raise api_errors.ApiError(
                400,
                "unknown_parameter",
                f"Unknown field {unknown[0]!r}; the fields are {', '.join(PUT_FIELDS)}.",
                extra={"param": unknown[0]},
            )
        url = await checked_url(body.get("url"), allow_private=self.settings.alert_allow_private)
        thresholds = body.get("thresholds_usd")
        try:
            thresholds_nano = None if thresholds is None else alerts.check_thresholds(thresholds)
        except ValueError as exc:
            raise api_errors.ApiError(
                400, "invalid_thresholds", f"{exc}.", extra={"param": "thresholds_usd"}
            ) from None
        rotate = body.get("rotate_secret", False)
        if not isinstance(rotate, bool):
            raise api_errors.ApiError(
                400,
                "invalid_parameter",
                "rotate_secret must be true or false.",
                extra={"param": "rotate_secret"},
            )
        async with self.engine.begin() as conn:
            endpoint, secret = await alerts.register(
                conn, wallet_id, url=url, thresholds_nano=thresholds_nano, rotate_secret=rotate
            )
        answer = _endpoint_json(endpoint)
        if secret is not None:
            answer["signing_secret"] = secret
        return web.json_response(answer)

    async def get(self, request: web.Request) -> web.Response:
        wallet_id = await self._wallet_id(request)
        async with self.engine.connect() as conn:
            endpoint = await alerts.endpoint(conn, wallet_id)
            events = await alerts.recent_events(conn, wallet_id, limit=RECENT_EVENTS_MAX)
        if endpoint is None:
            raise _not_configured()
        return web.json_response(
            {**_endpoint_json(endpoint), "recent_events": [_event_json(e) for e in events]}
        )

    async def delete(self, request: web.Request) -> web.Response:
        wallet_id = await self._wallet_id(request)
        async with self.engine.begin() as conn:
            removed = await alerts.remove(conn, wallet_id)
        if not removed:
            raise _not_configured()
        return web.json_response({"object": "alert_endpoint", "deleted": True})

    async def test(self, request: web.Request) -> web.Response:
        wallet_id = await self._wallet_id(request)
        try:
            async with self.engine.begin() as conn:
                event_id = await alerts.queue_test_event(conn, wallet_id)
        except alerts.NotConfigured:
            raise _not_configured() from None
        except alerts.TooManyTestEvents:
            raise api_errors.ApiError(
                429,
                "test_events_pending",
                f"{alerts.TEST_EVENTS_PENDING_MAX} test events are still waiting for delivery; "
                "see GET /billing/alerts.",
                "rate_limit_error",
            ) from None
        metrics.alert_events.labels(alerts.EventType.TEST).inc()
        return web.json_response({"object": "alert_test", "event_id": event_id}, status=202)


def add_routes(
    app: web.Application, *, settings: Settings, engine: AsyncEngine, key_lookup: KeyLookup
) -> AlertRoutes:
    """Register the alert routes on the public app."""
    routes = AlertRoutes(settings, engine, key_lookup)
    app.router.add_put("/billing/alerts", routes.put)
    app.router.add_get("/billing/alerts", routes.get)
    app.router.add_delete("/billing/alerts", routes.delete)
    app.router.add_post("/billing/alerts/test", routes.test)
    return routes
