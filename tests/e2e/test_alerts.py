"""Low-balance alerts through the whole stack: requests through Envoy spend a wallet below its
threshold, the sidecar's worker posts one signed event to a real receiver on loopback (allowed by
BILLINGPROXY_ALERT_ALLOW_PRIVATE), Stripe's own verifier accepts the signature, a failing receiver
is retried until it answers, a credit re-arms the threshold, and two sidecars on one database
send each crossing once. Retries are fast because the back-off base is a setting (50 ms here)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import stripe
from support.alert_receiver import auth

from billing import money

pytestmark = pytest.mark.integration

MODEL = "gpt-4o-mini"
ALERT_SETTINGS = {
    "BILLINGPROXY_ALERT_ALLOW_PRIVATE": "true",
    "BILLINGPROXY_ALERT_INTERVAL_MS": "100",
    "BILLINGPROXY_ALERT_RETRY_BASE_MS": "50",
}
# Just under the free grant: the first request crosses it.
THRESHOLD_USD = "0.4999999"
TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
async def stack(launch_stack) -> AsyncIterator[Any]:
    async with launch_stack(**ALERT_SETTINGS) as running:
        yield running


async def register(stack, key: str, url: str, thresholds: list[str] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"url": url}
    if thresholds is not None:
        body["thresholds_usd"] = thresholds
    async with stack.http.put(stack.gateway + "/billing/alerts", json=body, headers=auth(key)) as response:
        answer = await response.json()
        assert response.status == 200, answer
    return answer


async def spend(stack, owner: dict[str, Any], gateway: str | None = None) -> None:
    """One request through Envoy, settled."""
    async with stack.http.post(
        (gateway or stack.gateway) + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        headers=auth(owner["api_key"]),
    ) as response:
        assert response.status == 200, await response.text()
    await stack.db.settled(owner["wallet_id"])


async def swept(stack, wallet_id: str) -> bool:
    """The sweep has seen the wallet's balance as it is now (so any crossing is recorded)."""
    return bool(
        await stack.db.scalar(
            "SELECT e.observed_balance_nano = w.balance_nano FROM alert_endpoints e "
            "JOIN wallets w ON w.id = e.wallet_id WHERE e.wallet_id = :w",
            w=wallet_id,
        )
    )


async def undelivered(stack, wallet_id: str) -> int:
    return int(
        await stack.db.scalar(
            "SELECT count(*) FROM alert_events WHERE wallet_id = :w AND delivered_at IS NULL", w=wallet_id
        )
    )


async def settle_alerts(stack, wait_until, wallet_id: str) -> None:
    """Wait until the sweep saw the balance and every event of the wallet was delivered."""

    async def done() -> bool:
        return await swept(stack, wallet_id) and await undelivered(stack, wallet_id) == 0

    await wait_until(done, TIMEOUT_S, "the alerts to be swept and delivered")


async def test_one_signed_delivery_per_crossing_rearmed_by_a_credit(stack, receiver, wait_until) -> None:
    owner = await stack.signup()
    registered = await register(stack, owner["api_key"], receiver.url + "/hook", [THRESHOLD_USD])
    secret = registered["signing_secret"]

    await spend(stack, owner)
    await settle_alerts(stack, wait_until, owner["wallet_id"])
    [delivered] = receiver.received
    # Stripe's own verifier accepts the signature: the scheme is Stripe's.
    stripe.WebhookSignature.verify_header(
        delivered.body.decode(), delivered.headers["BillingProxy-Signature"], secret, tolerance=300
    )
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(
            delivered.body.decode(), delivered.headers["BillingProxy-Signature"], "whsec_other", tolerance=300
        )
    event = delivered.event
    assert delivered.headers["BillingProxy-Event-Id"] == event["id"]
    balance = await stack.db.balance(owner["wallet_id"])
    assert event["type"] == "wallet.balance_low"
    assert event["data"] == {
        "wallet_id": owner["wallet_id"],
        "threshold_usd": money.format_usd(money.parse_usd(THRESHOLD_USD)),
        "balance_usd": money.format_usd(balance),
    }

    await spend(stack, owner)  # still below: no second event
    await settle_alerts(stack, wait_until, owner["wallet_id"])
    assert len(receiver.received) == 1

    # A credit lifts the balance above the threshold again: re-armed.
    above = money.parse_usd(THRESHOLD_USD) - await stack.db.balance(owner["wallet_id"]) + 1000
    credit = await stack.db.acli(
        "wallet", "credit", owner["wallet_id"], money.format_usd(above), "--reference", uuid.uuid4().hex
    )
    assert credit.returncode == 0, credit.stderr
    await settle_alerts(stack, wait_until, owner["wallet_id"])
    assert len(receiver.received) == 1
    await spend(stack, owner)
    await settle_alerts(stack, wait_until, owner["wallet_id"])
    assert [e["type"] for e in receiver.events()] == ["wallet.balance_low"] * 2
    assert len({e["id"] for e in receiver.events()}) == 2


async def test_a_failing_receiver_is_retried_until_it_answers(stack, receiver, wait_until) -> None:
    owner = await stack.signup()
    await register(stack, owner["api_key"], receiver.url + "/hook", [THRESHOLD_USD])
    receiver.fail_first = 3
    failed_before = await stack.metric("billingproxy_alert_deliveries_total", outcome="failed")

    await spend(stack, owner)
    await settle_alerts(stack, wait_until, owner["wallet_id"])
    assert len(receiver.received) == 4
    assert len({r.body for r in receiver.received}) == 1, "every attempt sends the same event"
    assert len({r.headers["BillingProxy-Event-Id"] for r in receiver.received}) == 1
    [row] = await stack.db.rows(
        "SELECT attempts, delivered_at IS NOT NULL AS delivered FROM alert_events WHERE wallet_id = :w",
        w=owner["wallet_id"],
    )
    assert (row.attempts, row.delivered) == (4, True)
    assert await stack.metric("billingproxy_alert_deliveries_total", outcome="failed") >= failed_before + 3


async def test_the_test_endpoint_delivers_a_test_event(stack, receiver, wait_until) -> None:
    owner = await stack.signup()
    await register(stack, owner["api_key"], receiver.url + "/hook")
    async with stack.http.post(
        stack.gateway + "/billing/alerts/test", headers=auth(owner["api_key"])
    ) as response:
        assert response.status == 202
        event_id = (await response.json())["event_id"]
    await settle_alerts(stack, wait_until, owner["wallet_id"])
    assert [(e["id"], e["type"]) for e in receiver.events()] == [(event_id, "alert.test")]
    async with stack.http.get(stack.gateway + "/billing/alerts", headers=auth(owner["api_key"])) as response:
        shown = await response.json()
    assert shown["thresholds_default"] is True
    assert shown["thresholds_usd"] == ["0.000000", "1.000000"]
    assert [(e["id"], e["state"], e["attempts"]) for e in shown["recent_events"]] == [
        (event_id, "delivered", 1)
    ]
    assert "signing_secret" not in shown


async def test_two_sidecars_on_one_database_send_each_crossing_once(
    stack, launch_replica, receiver, wait_until
) -> None:
    owners = [await stack.signup() for _ in range(6)]
    for owner in owners:
        await register(stack, owner["api_key"], receiver.url + "/hook", [THRESHOLD_USD])
    async with launch_replica(stack, **ALERT_SETTINGS) as replica:
        for number, owner in enumerate(owners):
            await spend(stack, owner, gateway=(stack.gateway, replica.gateway)[number % 2])
        for owner in owners:
            await settle_alerts(stack, wait_until, owner["wallet_id"])
    by_wallet = sorted(e["data"]["wallet_id"] for e in receiver.events())
    assert by_wallet == sorted(o["wallet_id"] for o in owners)
