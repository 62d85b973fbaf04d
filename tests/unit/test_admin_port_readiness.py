"""The admin port's readiness says "unavailable" (503, with the reason per part) when a part that
serves requests cannot — a real aiohttp app and a real, refused connection."""

from __future__ import annotations

import gc

import aiohttp
from aiohttp import web
from sqlalchemy.ext.asyncio import create_async_engine

from authz_sidecar import admin_port, metrics
from billingproxy.devstack.local_stack import free_port


async def test_readiness_fails_while_the_database_is_unreachable() -> None:
    async def check_server_down() -> None:
        raise ConnectionRefusedError("the Check server is not serving")

    async def pool_fine() -> None:
        return None

    engine = create_async_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/billingproxy")
    runner = web.AppRunner(admin_port.make_app(engine, {"hot_path": pool_fine, "check": check_server_down}))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                body = await response.json()
                assert response.status == 503
            async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                assert response.status == 200  # alive, just not ready
    finally:
        await runner.cleanup()
        await engine.dispose()
    assert body["status"] == "unavailable"
    assert body["database"] not in (
        "",
        "ok",
    )  # the exception's class name, never its message (no URL, no password)
    # Every part readiness asks is named, each with its own answer.
    assert (body["hot_path"], body["check"]) == ("ok", "ConnectionRefusedError")


def test_gc_pauses_are_timed_by_generation() -> None:
    metrics.watch_gc_pauses()
    metrics.watch_gc_pauses()  # idempotent: one hook
    assert gc.callbacks.count(metrics._on_gc) == 1
    full = metrics.gc_pause_seconds.labels("2")
    before = _count(full)
    gc.collect(2)
    assert _count(full) == before + 1


def _count(histogram) -> float:
    return next(s.value for m in histogram.collect() for s in m.samples if s.name.endswith("_count"))
