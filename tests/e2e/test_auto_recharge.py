"""Auto-recharge through the whole stack (Envoy, the sidecar and its recharge worker, the local
Stripe test double): sign up, save a card on the setup Checkout page, spend below the threshold
→ exactly one off-session recharge → credited by its webhook → requests never refused; a card
that declines → signed failure alerts at a local receiver, paused after N failures, then 403 at
zero; two sidecars on one database crossing the threshold together → one PaymentIntent per
crossing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import stripe
from support.alert_receiver import Receiver, running_receiver

from billing import ledger, money, payments

pytestmark = pytest.mark.integration

MODEL = "gpt-4o-mini"
SETTINGS = {
    "BILLINGPROXY_AUTO_RECHARGE_INTERVAL_MS": "100",
    "BILLINGPROXY_ALERT_ALLOW_PRIVATE": "true",
    "BILLINGPROXY_ALERT_INTERVAL_MS": "100",
    "BILLINGPROXY_ALERT_RETRY_BASE_MS": "50",
}
# Just under the free grant: the first request takes the wallet below it.
THRESHOLD_USD = "0.4999999"
AMOUNT_USD = "5.00"
OK, DECLINED_LATER = "4242424242424242", "4000000000000341"
TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
async def stack(launch_stack) -> AsyncIterator[Any]:
    async with launch_stack(**SETTINGS) as running:
        yield running


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with running_receiver() as receiver:
        yield receiver


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def auto_recharge(stack, key: str) -> dict[str, Any]:
    async with stack.http.get(stack.gateway + "/billing/auto-recharge", headers=auth(key)) as r:
        assert r.status == 200
        return await r.json()


async def save_card(
    stack, owner: dict[str, Any], card: str, wait_until, cap_usd: str = "100.00"
) -> dict[str, Any]:
    """PUT the setting (curl's way, through Envoy), then pay the setup Checkout page with ``card``."""
    body = {"threshold_usd": THRESHOLD_USD, "amount_usd": AMOUNT_USD, "monthly_cap_usd": cap_usd}
    async with stack.http.put(
        stack.gateway + "/billing/auto-recharge", json=body, headers=auth(owner["api_key"])
    ) as r:
        answer = await r.json()
        assert r.status == 200, answer
    assert answer["card"] is None
    async with stack.http.post(answer["checkout_url"], data={"card": card}, allow_redirects=False) as r:
        assert r.status == 303, await r.text()
        saved_page = r.headers["location"]
    assert saved_page.endswith(f"/billing/auto-recharge/saved?session_id={answer['setup_session_id']}")

    async def saved() -> dict[str, Any] | None:
        shown = await auto_recharge(stack, owner["api_key"])
        return shown if shown["card"] else None

    shown = await wait_until(saved, TIMEOUT_S, "the card saved by the webhook")
    async with stack.http.get(
        stack.gateway + f"/billing/auto-recharge/saved?session_id={answer['setup_session_id']}"
    ) as r:
        assert r.status == 200 and "data-state=saved" in await r.text()
    return shown


async def chat(stack, key: str, gateway: str | None = None) -> int:
    async with stack.http.post(
        (gateway or stack.gateway) + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        headers=auth(key),
    ) as r:
        await r.read()
        return r.status


async def recharges_of(stack, wallet_id: str) -> list[Any]:
    return await stack.db.rows(
        "SELECT seq, state, payment_intent, failure_code FROM recharges WHERE wallet_id = :w ORDER BY seq",
        w=wallet_id,
    )


async def test_the_journey_one_recharge_credited_and_requests_never_refused(stack, wait_until) -> None:
    owner = await stack.signup()
    wallet = owner["wallet_id"]
    shown = await save_card(stack, owner, OK, wait_until)
    assert shown["card"] == {"brand": "visa", "last4": "4242"} and shown["last_recharge"] is None

    statuses = []
    for _ in range(3):
        statuses.append(await chat(stack, owner["api_key"]))
        await stack.db.settled(wallet)

    async def credited() -> Any:
        (row,) = await recharges_of(stack, wallet) or [None]
        return row if row is not None and row.state == "succeeded" else None

    row = await wait_until(credited, TIMEOUT_S, "one recharge, succeeded")
    for _ in range(5):
        statuses.append(await chat(stack, owner["api_key"]))
    await stack.db.settled(wallet)
    assert statuses == [200] * 8, "never refused"
    assert [r.seq for r in await recharges_of(stack, wallet)] == [1], "exactly one"
    credits = [e for e in await stack.db.ledger(wallet) if e.kind == "topup"]
    assert [(e.idempotency_key, e.amount_nano) for e in credits] == [
        (payments.credit_key(row.payment_intent), money.parse_usd(AMOUNT_USD))
    ]
    assert await stack.db.balance(wallet) > money.parse_usd(AMOUNT_USD)
    shown = await auto_recharge(stack, owner["api_key"])
    assert shown["last_recharge"]["state"] == "succeeded"
    assert await stack.metric("billingproxy_recharge_calls_total", outcome="created") >= 1
    assert shown["month_total_usd"] == money.format_usd(money.parse_usd(AMOUNT_USD))


async def test_a_declining_card_alerts_pauses_after_three_then_403(stack, receiver, wait_until) -> None:
    owner = await stack.signup()
    wallet, key = owner["wallet_id"], owner["api_key"]
    async with stack.http.put(
        stack.gateway + "/billing/alerts",
        json={"url": receiver.url + "/hook", "thresholds_usd": ["0"]},
        headers=auth(key),
    ) as r:
        registered = await r.json()
        assert r.status == 200, registered
    await save_card(stack, owner, DECLINED_LATER, wait_until)
    assert await chat(stack, key) == 200
    await stack.db.settled(wallet)

    def recharge_events() -> list[dict[str, Any]]:
        return [e for e in receiver.events() if e["type"].startswith("auto_recharge.")]

    async def paused_alert_delivered() -> bool:
        return any(e["type"] == "auto_recharge.paused" for e in recharge_events())

    await wait_until(paused_alert_delivered, TIMEOUT_S, "the paused alert")
    shown = await auto_recharge(stack, key)
    assert shown["paused"] and shown["consecutive_failures"] == 3
    assert shown["last_recharge"]["failure_code"] == "card_declined"
    assert [(r.seq, r.state) for r in await recharges_of(stack, wallet)] == [(n, "failed") for n in (1, 2, 3)]

    async def all_delivered() -> bool:
        return len(recharge_events()) == 4

    await wait_until(all_delivered, TIMEOUT_S, "three failure alerts and the pause")
    assert sorted(e["type"] for e in recharge_events()) == ["auto_recharge.failed"] * 3 + [
        "auto_recharge.paused"
    ]
    for received in receiver.received:
        stripe.WebhookSignature.verify_header(
            received.body.decode(),
            received.headers["BillingProxy-Signature"],
            registered["signing_secret"],
            tolerance=300,
        )
    failed = [e for e in recharge_events() if e["type"] == "auto_recharge.failed"]
    assert sorted(e["data"]["recharge_seq"] for e in failed) == ["1", "2", "3"]
    assert {e["data"]["failure_code"] for e in failed} == {"card_declined"}

    # Paused: the wallet runs dry and is refused, with no recharge started.
    left = await stack.db.balance(wallet)
    async with stack.db.engine.begin() as conn:
        await ledger.post_entry(
            conn,
            wallet_id=wallet,
            kind="adjustment",
            amount_nano=-left,
            idempotency_key=f"t:{uuid.uuid4().hex}",
        )
    assert await chat(stack, key) == 403
    assert len(await recharges_of(stack, wallet)) == 3


async def test_two_sidecars_crossing_together_make_one_payment_intent_per_crossing_within_the_cap(
    stack, launch_replica, wait_until
) -> None:
    """Two crossings, each by concurrent requests through both gateways: one recharge each. The cap
    (two recharges) then holds: a third crossing starts none, which is known once a round that
    began after it started another wallet's recharge (one statement judges both wallets)."""
    owner = await stack.signup()
    wallet, key = owner["wallet_id"], owner["api_key"]
    await save_card(stack, owner, OK, wait_until, cap_usd="10.00")
    async with launch_replica(stack, **SETTINGS) as replica:
        gateways = (stack.gateway, replica.gateway)
        for crossing in (1, 2, 3):
            statuses = await asyncio.gather(*(chat(stack, key, gateways[n % 2]) for n in range(12)))
            assert set(statuses) == {200}, "never refused"
            await stack.db.settled(wallet)
            if crossing < 3:

                async def succeeded(seq: int = crossing) -> bool:
                    rows = await recharges_of(stack, wallet)
                    return len(rows) >= seq and rows[seq - 1].state == "succeeded"

                await wait_until(succeeded, TIMEOUT_S, f"recharge {crossing} credited")
                rows = await recharges_of(stack, wallet)
                assert [r.seq for r in rows] == list(range(1, crossing + 1)), "one per crossing"
            # Back below the threshold for the next crossing.
            left = await stack.db.balance(wallet)
            async with stack.db.engine.begin() as conn:
                await ledger.post_entry(
                    conn,
                    wallet_id=wallet,
                    kind="adjustment",
                    amount_nano=-(left - money.parse_usd(THRESHOLD_USD) + 10_000),
                    idempotency_key=f"t:{uuid.uuid4().hex}",
                )
        # A round after the last crossing: another wallet's recharge starts in it.
        other = await stack.signup()
        await save_card(stack, other, OK, wait_until)
        assert await chat(stack, other["api_key"], replica.gateway) == 200
        await stack.db.settled(other["wallet_id"])
        await wait_until(lambda: _has(stack, other["wallet_id"], 1), TIMEOUT_S, "the other wallet's recharge")
    rows = await recharges_of(stack, wallet)
    assert [(r.seq, r.state) for r in rows] == [(1, "succeeded"), (2, "succeeded")], "the cap holds"
    assert len({r.payment_intent for r in rows}) == 2
    credits = [e for e in await stack.db.ledger(wallet) if e.kind == "topup"]
    assert sorted(e.idempotency_key for e in credits) == sorted(
        payments.credit_key(r.payment_intent) for r in rows
    )
    shown = await auto_recharge(stack, key)
    assert shown["month_total_usd"] == shown["monthly_cap_usd"] == "10.000000"


async def _has(stack, wallet_id: str, count: int) -> bool:
    rows = await recharges_of(stack, wallet_id)
    return len(rows) >= count and all(r.state == "succeeded" for r in rows)
