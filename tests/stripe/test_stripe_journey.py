"""The journey's phases 3 → 4 → 2 through Envoy, on the whole gateway
(`billingproxy.devstack.local_stack.Stack`): an empty wallet gets 403 with a top-up link, the user
pays, Stripe's signed webhook credits +$10.00, and the next request is served within a second,
with nobody in between."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import sqlalchemy as sa
from support.waiting import wait_until_within

from billing import tables
from billingproxy.devstack import local_stack
from stripe_testkit import TEN_USD_NANO, Gateway


async def test_empty_wallet_pays_through_the_local_double_and_is_served_again(default_stack) -> None:
    stack, db = default_stack
    assert stack.stripe_double_url.startswith("http://127.0.0.1:")  # no keys → the double runs
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        gateway = Gateway(stack.gateway_url, http)
        user = await gateway.signup()
        refusal = await gateway.exhaust(user["api_key"])
        assert refusal["error"]["code"] == "insufficient_funds"
        assert refusal["error"]["message"] == "Insufficient funds. Please top up."
        top_up_url = refusal["error"]["top_up_url"]
        assert top_up_url == f"{stack.gateway_url}/account/top-up"

        # The link itself is a page a person can use (a browser cannot send a Bearer key): the
        # account page's sign-in, which leads on to the top-up form.
        async with http.get(top_up_url) as r:
            page = await r.text()
            assert r.status == 200 and 'name="next" value="/account/top-up"' in page
        # A program posts to it.
        topup = await gateway.topup(user["api_key"], "10.00")
        assert topup["checkout_url"].startswith(f"{stack.stripe_double_url}/c/pay/cs_test_")

        async with http.get(topup["checkout_url"]) as r:
            page = await r.text()
        assert "TEST MODE" in page and "$10.00" in page
        before = await db.balance(user["wallet_id"])
        async with http.post(topup["checkout_url"], allow_redirects=False) as r:
            # The double has delivered checkout.session.completed, signed, through Envoy.
            assert r.status == 303, await r.text()
            success = r.headers["location"]
        paid_at = time.monotonic()
        assert success == f"{stack.gateway_url}/billing/topup/success?session_id={topup['session_id']}"

        async def served() -> bool:
            status, body = await gateway.chat(user["api_key"])
            assert status in (200, 403), body
            return status == 200

        # Every request sent a second or more after the credit is served, however slow the machine.
        await wait_until_within(
            served, since=paid_at, bound_s=1.0, what="the first request after the credit being served"
        )
        async with http.get(success) as r:
            assert "data-state=credited" in await r.text()
        entries = await db.entries(user["wallet_id"])
        topups = [e for e in entries if e.kind == "topup"]
        assert [(e.amount_nano, e.balance_after_nano) for e in topups] == [
            (TEN_USD_NANO, before + TEN_USD_NANO)
        ]
        balance = await gateway.balance(user["api_key"])
        assert balance["state"] == "active"


async def test_webhooks_through_envoy_verified_once_and_unblocking(keyed_stack) -> None:
    stack, db, double = keyed_stack
    assert stack.stripe_double_url == ""  # keys configured → no double of the stack's own
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        gateway = Gateway(stack.gateway_url, http)
        user = await gateway.signup()
        await gateway.exhaust(user["api_key"])
        topup = await gateway.topup(user["api_key"], "10.00")
        event = double.complete(topup["session_id"])
        payload = double.payload(event)
        url = stack.gateway_url + "/stripe/webhook"

        async def deliver(signature: str) -> tuple[int, dict]:
            async with http.post(
                url,
                data=payload.encode(),
                headers={"content-type": "application/json", "stripe-signature": signature},
            ) as r:
                return r.status, await r.json()

        status, body = await deliver(double.sign(payload, secret="whsec_forged"))
        assert (status, body["error"]["code"]) == (400, "invalid_signature")
        status, body = await deliver(double.sign(payload, timestamp=int(time.time()) - 400))
        assert (status, body["error"]["code"]) == (400, "invalid_signature")
        assert (await gateway.chat(user["api_key"]))[0] == 403

        answers = await asyncio.gather(*(deliver(double.sign(payload)) for _ in range(8)))
        assert [status for status, _ in answers] == [200] * 8
        assert sorted(body["duplicate"] for _, body in answers) == [False] + [True] * 7
        assert (await gateway.chat(user["api_key"]))[0] == 200
        topups = [e for e in await db.entries(user["wallet_id"]) if e.kind == "topup"]
        assert [e.amount_nano for e in topups] == [TEN_USD_NANO]

        # A session this gateway never created, naming a wallet it does not have: recorded, 2xx.
        stranger = double.create_session(
            {
                **double.sessions[topup["session_id"]],
                "client_reference_id": None,
                "metadata": {"wallet_id": "wal_elsewhere"},
                "line_items": [
                    {
                        "quantity": "1",
                        "price_data": {
                            "currency": "usd",
                            "unit_amount": "1000",
                            "product_data": {"name": "x"},
                        },
                    }
                ],
            }
        )
        assert await double.deliver(double.complete(stranger["id"])) == 200
        [recorded] = [e for e in await db.events() if e.object_id == stranger["id"]]
        assert (recorded.outcome, recorded.wallet_id) == ("not_ours", None)


async def test_a_dispute_through_envoy_holds_the_wallet_until_it_closes(keyed_stack) -> None:
    """A dispute delivered through Envoy puts the wallet on hold (403 payment_disputed, no top-up
    link: paying in does not resolve it), independently of the operator's switch; its closing
    serves the wallet again."""
    stack, db, double = keyed_stack
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        gateway = Gateway(stack.gateway_url, http)
        user = await gateway.signup()
        api_key, wallet_id = user["api_key"], user["wallet_id"]
        paid = double.complete((await gateway.topup(api_key, "10.00"))["session_id"])
        assert await double.deliver(paid) == 200
        assert (await gateway.chat(api_key))[0] == 200

        dispute = double.dispute(paid["data"]["object"]["payment_intent"])
        assert await double.deliver(dispute) == 200
        disputed = {
            "message": "This wallet is on hold while a payment dispute is open.",
            "type": "permission_error",
            "code": "payment_disputed",
        }
        assert await gateway.chat(api_key) == (403, {"error": disputed})
        wallet = await db.wallet(wallet_id)
        assert (wallet.disputed, wallet.suspended) == (True, False)
        assert (await gateway.balance(api_key))["state"] == "disputed"

        # Topping up does not lift the hold: the money is credited, the wallet stays held.
        again = double.complete((await gateway.topup(api_key, "10.00"))["session_id"])
        assert await double.deliver(again) == 200
        assert await db.balance(wallet_id) > 0
        assert await gateway.chat(api_key) == (403, {"error": disputed})
        assert (await gateway.balance(api_key))["state"] == "disputed"  # held, not empty

        # The operator's switch on top of it is reported first, and lifting it leaves the dispute's hold.
        async with db.engine.begin() as conn:
            await conn.execute(
                sa.update(tables.wallets).where(tables.wallets.c.id == wallet_id).values(suspended=True)
            )
        status, body = await gateway.chat(api_key)
        assert (status, body["error"]["code"]) == (403, "wallet_suspended")
        assert (await gateway.balance(api_key))["state"] == "suspended"
        async with db.engine.begin() as conn:
            await conn.execute(
                sa.update(tables.wallets).where(tables.wallets.c.id == wallet_id).values(suspended=False)
            )
        assert await gateway.chat(api_key) == (403, {"error": disputed})

        won = double.update_dispute(dispute["data"]["object"]["id"], "won")
        assert await double.deliver(won) == 200
        assert (await gateway.chat(api_key))[0] == 200
        assert (await gateway.balance(api_key))["state"] == "active"


async def test_billingproxy_up_says_how_to_pay_and_forward_webhooks(default_stack, keyed_stack) -> None:
    for stack in (default_stack[0], keyed_stack[0]):
        text = local_stack._greeting(stack)
        assert f"stripe listen --forward-to {stack.gateway_url}/stripe/webhook" in text
        assert f"{stack.gateway_url}/billing/topup" in text
        assert f"open {stack.gateway_url}/account and sign in" in text
        assert f"{stack.gateway_url}/account/top-up in a browser" in text
    assert "TEST MODE" in local_stack._greeting(default_stack[0])
    assert "TEST MODE" not in local_stack._greeting(keyed_stack[0])
