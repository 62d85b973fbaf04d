"""Envoy's metrics listener (``BILLINGPROXY_METRICS_PORT``), the way Prometheus reaches the
sidecar's loopback /metrics, as an attacker on the network sees it: GET /metrics and GET
/metrics/envoy answer, and nothing else does — no other method, no other path of the sidecar's
admin or of Envoy's, nothing billable, no normalisation trick. The gateway port does not serve
the metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
import yarl
from prometheus_client.parser import text_string_to_metric_families
from support import chart

from billingproxy.devstack.local_stack import free_port

pytestmark = pytest.mark.integration

# (method, path) a scraper never needs; each must be a 404 on the metrics port.
REFUSED = [
    ("POST", "/metrics"),
    ("PUT", "/metrics"),
    ("DELETE", "/metrics"),
    ("HEAD", "/metrics"),
    ("POST", "/metrics/envoy"),
    ("GET", "/metrics/"),
    ("GET", "/Metrics"),
    ("GET", "/metrics/envoy/"),
    ("GET", "/readyz"),
    ("GET", "/healthz"),
    ("GET", "/metrics/../readyz"),
    ("GET", "/metrics/%2e%2e/healthz"),
    ("GET", "//healthz"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/models"),
    ("POST", "/user/signup"),
    ("GET", "/billing/balance"),
    ("GET", "/openapi.json"),
    ("GET", "/stats/prometheus"),
    ("GET", "/stats"),
    ("GET", "/config_dump"),
    ("GET", "/clusters"),
    ("POST", "/quitquitquit"),
    ("POST", "/drain_listeners"),
    ("GET", "/"),
]


@pytest.fixture(scope="module")
async def stack(launch_stack) -> AsyncIterator[Any]:
    async with launch_stack(BILLINGPROXY_METRICS_PORT=str(free_port())) as running:
        yield running


def metrics_url(stack, path: str) -> str:
    return f"http://127.0.0.1:{stack.settings.metrics_port}{path}"


async def scrape(stack, path: str) -> dict[str, Any]:
    async with stack.http.get(metrics_url(stack, path)) as response:
        assert response.status == 200, await response.text()
        assert response.headers["content-type"].startswith("text/plain")
        text = await response.text()
    return {family.name: family for family in text_string_to_metric_families(text)}


def total(families: dict[str, Any], name: str, **labels: str) -> float:
    return sum(
        sample.value
        for family in families.values()
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


async def test_metrics_are_the_sidecars(stack) -> None:
    name = "billingproxy_check_decisions_total"
    before = total(await scrape(stack, "/metrics"), name, result="invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        await asyncio.to_thread(stack.openai("sk-litellm-not-a-key").models.list)
    families = await scrape(stack, "/metrics")
    assert total(families, name, result="invalid_api_key") == before + 1
    assert {"billingproxy_settlements", "billingproxy_holds_pending"} <= families.keys()
    assert total(families, name, result="invalid_api_key") == await stack.metric(
        name, result="invalid_api_key"
    )


async def test_envoys_own_statistics_come_from_its_admin(stack) -> None:
    families = await scrape(stack, "/metrics/envoy")
    # The access log's health, which the chart's alerts ask for.
    assert set(chart.ENVOY_METRICS_ALERTED) <= families.keys()
    assert total(families, "envoy_http_downstream_rq_total", envoy_http_conn_manager_prefix="gateway") > 0
    assert not any(name.startswith("billingproxy_") for name in families)


@pytest.mark.parametrize(("method", "path"), REFUSED, ids=[f"{m} {p}" for m, p in REFUSED])
async def test_nothing_else_answers_on_the_metrics_port(stack, method: str, path: str) -> None:
    holds_before = (await stack.db.row_counts())["holds"]
    checks_before = await stack.metric("billingproxy_check_decisions_total")
    user = await stack.signup()
    async with stack.http.request(
        method,
        yarl.URL(metrics_url(stack, path), encoded=True),  # the path as written, `..` and all
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        if method in ("POST", "PUT")
        else None,
        headers={"authorization": f"Bearer {user['api_key']}"},
        skip_auto_headers=("content-type",) if method not in ("POST", "PUT") else (),
    ) as response:
        body = await response.read()
    assert response.status == 404, body
    assert b"billingproxy_" not in body and b"envoy_" not in body
    assert (await stack.db.row_counts())["holds"] == holds_before
    assert await stack.metric("billingproxy_check_decisions_total") == checks_before


@pytest.mark.parametrize("path", ["/metrics", "/metrics/envoy", "/stats/prometheus"])
async def test_the_gateway_port_does_not_serve_metrics(stack, path: str) -> None:
    async with stack.http.get(stack.gateway + path) as response:
        body = await response.read()
    assert response.status == 404, body
    assert b"billingproxy_" not in body and b"envoy_" not in body
