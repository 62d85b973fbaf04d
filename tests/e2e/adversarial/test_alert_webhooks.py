"""Attacks on low-balance alert webhooks (docs/decisions/0033-low-balance-alerts.md).

The webhook URL is the user's, and the sidecar POSTs to it from inside the pod: it must never
become a way to reach loopback (the sidecar's own ports), the cloud's metadata service or the
private network — not by a literal address, not by a name resolving there (at registration or
later), not by a redirect. And a key reaches only its own wallet's settings; a bad body is a
specific 400 that writes nothing. The gateway here runs with the production default
(BILLINGPROXY_ALERT_ALLOW_PRIVATE off)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from support.alert_receiver import auth

from authz_sidecar import alert_delivery
from billing import alerts
from billing.settings import Settings

pytestmark = pytest.mark.integration

# A public address: accepted at registration without DNS (nothing is ever sent to it here).
PUBLIC_URL = "https://93.184.215.14/hooks/billing"
TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
async def stack(launch_stack) -> AsyncIterator[Any]:
    async with launch_stack(
        BILLINGPROXY_ALERT_INTERVAL_MS="100", BILLINGPROXY_ALERT_RETRY_BASE_MS="50"
    ) as running:
        yield running


async def put(stack, key: str, body: Any) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with stack.http.put(
        stack.gateway + "/billing/alerts",
        data=data,
        headers={**auth(key), "content-type": "application/json"},
    ) as response:
        return response.status, await response.json()


async def endpoints_of(stack, wallet_id: str) -> int:
    return int(
        await stack.db.scalar("SELECT count(*) FROM alert_endpoints WHERE wallet_id = :w", w=wallet_id)
    )


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/hook",
        "https://127.0.0.1:9090/metrics",  # the sidecar's own admin port
        "https://169.254.169.254/latest/meta-data/",  # the cloud's metadata service
        "https://10.0.0.5/hook",
        "https://192.168.1.1/hook",
        "https://172.16.0.1/hook",
        "https://100.64.0.1/hook",  # carrier-grade NAT
        "https://0.0.0.0/hook",
        "https://[::1]/hook",
        "https://[::ffff:127.0.0.1]/hook",  # IPv4-mapped loopback
        "https://[fe80::1]/hook",
        "https://[fd00::1]/hook",
        "https://localhost/hook",  # a name resolving to loopback
        "https://2130706433/hook",  # 127.0.0.1 written as one number: resolves to loopback
        "http://93.184.215.14/hook",  # not https
        "ftp://93.184.215.14/hook",
        "https://user:secret@93.184.215.14/hook",
        "https:///hook",
        "https://93.184.215.14:99999/hook",
        "https://93.184.215.14/" + "a" * alerts.URL_CHARS_MAX,
        "https://93.184.215.14/hook\r\nX-Injected: 1",
    ],
)
async def test_urls_the_gateway_must_not_post_to_are_refused(stack, url: str) -> None:
    owner = await stack.signup()
    status, answer = await put(stack, owner["api_key"], {"url": url})
    assert (status, answer["error"]["code"], answer["error"]["param"]) == (400, "invalid_url", "url"), answer
    assert await endpoints_of(stack, owner["wallet_id"]) == 0


async def test_a_name_repointed_at_loopback_after_registration_is_refused_at_delivery(
    stack, receiver, wait_until
) -> None:
    owner = await stack.signup()
    assert (await put(stack, owner["api_key"], {"url": PUBLIC_URL}))[0] == 200
    # As if the name's DNS record changed after it was checked: it now resolves to loopback,
    # where a receiver listens (standing in for the sidecar's own ports).
    port = receiver.url.rsplit(":", 1)[1]
    async with stack.db.engine.begin() as conn:
        await conn.execute(
            sa.text("UPDATE alert_endpoints SET url = :u WHERE wallet_id = :w"),
            {"u": f"https://localhost:{port}/hook", "w": owner["wallet_id"]},
        )
    refused_before = await stack.metric("billingproxy_alert_deliveries_total", outcome="refused_address")
    async with stack.http.post(
        stack.gateway + "/billing/alerts/test", headers=auth(owner["api_key"])
    ) as response:
        assert response.status == 202

    async def refused() -> str | None:
        return await stack.db.scalar(
            "SELECT max(last_error) FROM alert_events WHERE wallet_id = :w", w=owner["wallet_id"]
        )

    error = await wait_until(refused, TIMEOUT_S, "the delivery to be refused")
    assert "does not post to" in error
    assert receiver.received == []
    assert (
        await stack.metric("billingproxy_alert_deliveries_total", outcome="refused_address") > refused_before
    )


def claimed_test_event(url: str) -> alerts.Delivery:
    """A claimed alert.test event for ``url``, for the worker's ``deliver`` alone."""
    return alerts.Delivery(
        event_id=alerts.new_event_id(),
        wallet_id="wal_x",
        type=alerts.EventType.TEST,
        threshold_nano=None,
        balance_nano=0,
        created_at=dt.datetime.now(dt.UTC),
        attempt=1,
        url=url,
        signing_secret=alerts.new_signing_secret(),
    )


async def test_redirects_are_not_followed(receiver) -> None:
    delivery = claimed_test_event(receiver.url + "/redirect")
    async with alert_delivery.client_session(Settings(alert_allow_private=True)) as session:
        outcome = await alert_delivery.deliver(session, delivery, allow_private=True)
    assert outcome == ("failed", "the receiver answered HTTP 307")
    assert [r.path for r in receiver.received] == ["/redirect"]


async def test_the_resolver_refuses_a_name_with_any_private_address(receiver) -> None:
    port = receiver.url.rsplit(":", 1)[1]
    delivery = claimed_test_event(f"https://localhost:{port}/hook")
    async with alert_delivery.client_session(Settings()) as session:
        outcome, error = await alert_delivery.deliver(session, delivery, allow_private=False)
    assert outcome == "refused_address" and error is not None and "localhost" in error
    assert receiver.received == []


async def test_a_key_reaches_only_its_own_wallets_alerts(stack) -> None:
    alice, mallory = await stack.signup(), await stack.signup()
    status, registered = await put(stack, alice["api_key"], {"url": PUBLIC_URL})
    assert status == 200

    async with stack.http.get(
        stack.gateway + "/billing/alerts", headers=auth(mallory["api_key"])
    ) as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "alerts_not_configured"
    async with stack.http.post(
        stack.gateway + "/billing/alerts/test", headers=auth(mallory["api_key"])
    ) as response:
        assert response.status == 404
    async with stack.http.delete(
        stack.gateway + "/billing/alerts", headers=auth(mallory["api_key"])
    ) as response:
        assert response.status == 404
    # Mallory's PUT (with alice's wallet named in the body) changes mallory's wallet only.
    status, answer = await put(
        stack, mallory["api_key"], {"url": PUBLIC_URL, "wallet_id": alice["wallet_id"]}
    )
    assert (status, answer["error"]["code"]) == (400, "unknown_parameter")
    status, _ = await put(stack, mallory["api_key"], {"url": "https://93.184.215.15/mine"})
    assert status == 200
    async with stack.http.get(stack.gateway + "/billing/alerts", headers=auth(alice["api_key"])) as response:
        shown = await response.json()
    assert (shown["url"], shown["signing_secret_last4"]) == (PUBLIC_URL, registered["signing_secret"][-4:])

    for headers in ({}, auth("sk-litellm-" + "0" * 43), {"authorization": "Basic x"}):
        async with stack.http.get(stack.gateway + "/billing/alerts", headers=headers) as response:
            assert response.status == 401
        async with stack.http.put(
            stack.gateway + "/billing/alerts", json={"url": PUBLIC_URL}, headers=headers
        ) as r:
            assert r.status == 401


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"not json", 400, "invalid_json"),
        (b"[]", 400, "invalid_json"),
        ({}, 400, "invalid_url"),
        ({"url": 5}, 400, "invalid_url"),
        ({"url": PUBLIC_URL, "thresholds_usd": "5.00"}, 400, "invalid_thresholds"),
        ({"url": PUBLIC_URL, "thresholds_usd": []}, 400, "invalid_thresholds"),
        ({"url": PUBLIC_URL, "thresholds_usd": [5]}, 400, "invalid_thresholds"),
        ({"url": PUBLIC_URL, "thresholds_usd": ["-1"]}, 400, "invalid_thresholds"),
        ({"url": PUBLIC_URL, "thresholds_usd": ["1e3"]}, 400, "invalid_thresholds"),
        ({"url": PUBLIC_URL, "thresholds_usd": ["0.0000000001"]}, 400, "invalid_thresholds"),
        ({"url": PUBLIC_URL, "thresholds_usd": ["2000000"]}, 400, "invalid_thresholds"),
        ({"url": PUBLIC_URL, "thresholds_usd": [str(n) for n in range(6)]}, 400, "invalid_thresholds"),
        ({"url": PUBLIC_URL, "rotate_secret": "yes"}, 400, "invalid_parameter"),
        ({"url": PUBLIC_URL, "secret": "mine"}, 400, "unknown_parameter"),
        (b'{"url": "' + b"a" * 70_000 + b'"}', 413, "body_too_large"),
    ],
)
async def test_bad_bodies_get_a_specific_4xx_and_write_nothing(
    stack, body: Any, status: int, code: str
) -> None:
    owner = await stack.signup()
    answered, answer = await put(stack, owner["api_key"], body)
    assert (answered, answer["error"]["code"]) == (status, code), answer
    assert await endpoints_of(stack, owner["wallet_id"]) == 0
