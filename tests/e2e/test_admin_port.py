"""The sidecar's admin port on a running stack: liveness, readiness, and the Prometheus metrics
docs/architecture.md promises — including that start-up froze the heap out of the garbage
collector's reach (a full collection used to stop every Check for ~45 ms)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

FAMILIES = (
    "billingproxy_check_decisions",
    "billingproxy_check_duration_seconds",
    "billingproxy_settlements",
    "billingproxy_holds_pending",
    "billingproxy_gc_pause_seconds",
    "billingproxy_gc_frozen_objects",
)


@pytest.fixture(scope="module")
async def stack(launch_stack) -> AsyncIterator[Any]:
    async with launch_stack() as running:
        yield running


async def test_health_and_readiness(stack) -> None:
    async with stack.http.get(stack.admin + "/healthz") as response:
        assert (response.status, await response.json()) == (200, {"status": "ok"})
    async with stack.http.get(stack.admin + "/readyz") as response:
        # Readiness asks what serves: the HTTP API's engine, the hot path's pool, the Check server.
        assert (response.status, await response.json()) == (
            200,
            {"status": "ready", "database": "ok", "hot_path": "ok", "check": "ok"},
        )


async def test_metrics_count_checks_and_garbage_collection(stack) -> None:
    before = await stack.metric("billingproxy_check_decisions_total", result="invalid_api_key")
    async with stack.http.post(
        stack.gateway + "/v1/chat/completions",
        json={"model": "gpt-4o-mini"},
        headers={"authorization": "Bearer sk-litellm-not-a-key"},
    ) as response:
        assert response.status == 401
    assert await stack.metric("billingproxy_check_decisions_total", result="invalid_api_key") == before + 1

    async with stack.http.get(stack.admin + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    assert set(FAMILIES) <= {family.name for family in text_string_to_metric_families(text)}
    assert await stack.metric("billingproxy_gc_frozen_objects") > 10_000
