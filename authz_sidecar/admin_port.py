"""The admin port: liveness, readiness and Prometheus metrics.

Readiness asks what actually serves a request: the HTTP API's engine, the hot path's asyncpg
pool (the Check's holds, the access log's settlements) and the Check server itself. Never routed
through Envoy; probes and scrapers in the pod reach it on loopback.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import sqlalchemy as sa
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.ext.asyncio import AsyncEngine

from authz_sidecar import metrics

ENGINE = web.AppKey("engine", AsyncEngine)
# Further readiness checks by name: an async callable that raises when that part cannot serve.
Check = Callable[[], Awaitable[None]]
CHECKS = web.AppKey("checks", dict[str, Check])


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    async def database() -> None:
        async with request.app[ENGINE].connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    extra: dict[str, Check] = request.app[CHECKS]
    checks: dict[str, Check] = {"database": database, **extra}
    answer: dict[str, str] = {}
    for name, check in checks.items():
        try:
            await check()
        except Exception as exc:  # noqa: BLE001 (any failure means "not ready"; its type goes to the answer)
            answer[name] = type(exc).__name__
        else:
            answer[name] = "ok"
    ready = all(value == "ok" for value in answer.values())
    return web.json_response(
        {"status": "ready" if ready else "unavailable", **answer}, status=200 if ready else 503
    )


async def prometheus(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_app(engine: AsyncEngine, checks: dict[str, Check] | None = None) -> web.Application:
    """``checks``: more parts readiness asks (server.py: the hot path's pool, the Check server)."""
    app = web.Application()
    app[ENGINE] = engine
    app[CHECKS] = dict(checks or {})
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", prometheus)
    return app
