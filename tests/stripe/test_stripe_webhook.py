"""The sidecar's Stripe routes over HTTP (the public app in-process, the real SDK talking to the
test double): signature checks, duplicates, unknown wallets, top-up validation, the top-up page,
the double's checkout page, and 503 when Stripe is not configured."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import sqlalchemy as sa

from authz_sidecar import json_body
from billing import tables, topups, wallets
from billing.settings import Settings
from billingproxy.devstack.local_stack import free_port
from billingproxy.devstack.stripe_double import StripeDouble
from stripe_testkit import SECRET_KEY, TEN_USD_NANO, WEBHOOK_SECRET, Db, stripe_settings

# --- the webhook ---------------------------------------------------------------------------------


async def test_a_signed_event_is_verified_recorded_and_credited(
    db: Db, double: StripeDouble, sidecar, new_session
) -> None:
    wallet_id, _ = await db.new_wallet()
    event = double.complete(await new_session(wallet_id))
    payload = double.payload(event)
    status, body = await sidecar.post_event(payload, double.sign(payload))
    assert (status, body) == (
        200,
        {"received": True, "event_id": event["id"], "outcome": "credited", "duplicate": False},
    )
    assert await db.balance(wallet_id) == TEN_USD_NANO


async def test_bad_signatures_are_refused_and_nothing_is_written(
    db: Db, double: StripeDouble, sidecar, new_session
) -> None:
    wallet_id, _ = await db.new_wallet()
    event = double.complete(await new_session(wallet_id))
    payload = double.payload(event)
    other = double.payload({**event, "id": "evt_other"})
    before = await db.row_counts()
    now = int(time.time())
    cases = {
        "wrong secret": double.sign(payload, secret="whsec_not_ours"),
        "signed another body": double.sign(other),
        "stale timestamp": double.sign(payload, timestamp=now - 301),
        "garbage": "t=abc,v1=def",
        "no v1 signature": f"t={now}",
        "empty": "",
        "missing": None,
    }
    for name, signature in cases.items():
        status, body = await sidecar.post_event(payload, signature)
        assert status == 400, name
        assert body["error"]["code"] == "invalid_signature", (name, body)
    assert await db.row_counts() == before
    # Within the tolerance, an older signature still verifies.
    status, body = await sidecar.post_event(payload, double.sign(payload, timestamp=now - 250))
    assert (status, body["outcome"]) == (200, "credited")


async def test_a_verified_body_that_is_not_an_event_is_refused(db: Db, double: StripeDouble, sidecar) -> None:
    before = await db.row_counts()
    for payload in ("not json", "[]", json.dumps({"object": "event"})):
        status, body = await sidecar.post_event(payload, double.sign(payload))
        assert status == 400 and body["error"]["code"] == "invalid_payload", payload
    assert await db.row_counts() == before


async def test_duplicates_sequential_and_concurrent_credit_once(
    db: Db, double: StripeDouble, sidecar, new_session
) -> None:
    wallet_id, _ = await db.new_wallet()
    event = double.complete(await new_session(wallet_id))
    payload = double.payload(event)
    answers = await asyncio.gather(*(sidecar.post_event(payload, double.sign(payload)) for _ in range(20)))
    assert {status for status, _ in answers} == {200}
    assert sorted(body["duplicate"] for _, body in answers) == [False] + [True] * 19
    assert {body["outcome"] for _, body in answers} == {"credited"}
    status, body = await sidecar.post_event(payload, double.sign(payload))
    assert (status, body["duplicate"]) == (200, True)
    assert await db.balance(wallet_id) == TEN_USD_NANO
    assert len(await db.events()) == 1


async def test_an_event_for_a_session_we_did_not_create_is_answered_2xx_and_recorded(
    db: Db, double: StripeDouble, sidecar, new_session
) -> None:
    event = double.complete(await new_session("wal_nobody", recorded=False))
    payload = double.payload(event)
    status, body = await sidecar.post_event(payload, double.sign(payload))
    assert (status, body["outcome"]) == (200, "not_ours")
    [recorded] = await db.events()
    assert (recorded.id, recorded.outcome, recorded.wallet_id) == (event["id"], "not_ours", None)
    assert await db.count(tables.ledger_entries) == 0


async def test_signatures_dated_ahead_beyond_the_tolerance_are_refused(
    db: Db, double: StripeDouble, sidecar, new_session
) -> None:
    wallet_id, _ = await db.new_wallet()
    event = double.complete(await new_session(wallet_id))
    payload = double.payload(event)
    before = await db.row_counts()
    now = int(time.time())
    for ahead in (310, 86_400):
        status, body = await sidecar.post_event(payload, double.sign(payload, timestamp=now + ahead))
        assert (status, body["error"]["code"]) == (400, "invalid_signature"), ahead
        assert "future" in body["error"]["message"]
    assert await db.row_counts() == before
    status, body = await sidecar.post_event(payload, double.sign(payload, timestamp=now + 250))
    assert (status, body["outcome"]) == (200, "credited")


# --- POST /billing/topup -------------------------------------------------------------------------


async def test_topup_creates_a_checkout_session_for_the_keys_wallet(
    db: Db, double: StripeDouble, sidecar
) -> None:
    wallet_id, api_key = await db.new_wallet(grant_nano=0)  # an empty wallet may top up
    assert (await db.wallet(wallet_id)).state is wallets.WalletState.EMPTY
    status, body = await sidecar.topup(api_key, {"amount_usd": "10.00"})
    assert status == 200, body
    session = double.sessions[body["session_id"]]
    assert body == {
        "checkout_url": session["url"],
        "session_id": session["id"],
        "amount_usd": "10.000000",
        "expires_at": session["expires_at"],
    }
    assert body["checkout_url"].startswith(double.url + "/c/pay/cs_test_")
    assert (session["mode"], session["amount_total"], session["currency"]) == ("payment", 1000, "usd")
    assert session["client_reference_id"] == wallet_id
    assert session["metadata"] == {
        "wallet_id": wallet_id,
        "amount_usd": "10.00",
        "purpose": "billingproxy_topup",
    }
    assert (
        session["success_url"]
        == "http://gateway.test:8080/billing/topup/success?session_id={CHECKOUT_SESSION_ID}"
    )
    assert session["cancel_url"] == "http://gateway.test:8080/billing/topup/cancelled"
    assert session["customer_email"] == (await db.wallet(wallet_id)).email
    # The payment intent will carry the wallet too.
    assert double._pi_metadata[session["id"]] == {"wallet_id": wallet_id, "purpose": "billingproxy_topup"}
    async with db.engine.connect() as conn:
        assert await topups.open_checkout_sessions(conn, limit=10) == [session["id"]]


async def test_topup_with_an_idempotency_key_answers_the_same_session(
    db: Db, double: StripeDouble, sidecar
) -> None:
    _, api_key = await db.new_wallet()
    first = await sidecar.topup(api_key, {"amount_usd": "25"}, **{"idempotency-key": "order-1"})
    again = await sidecar.topup(api_key, {"amount_usd": "25"}, **{"idempotency-key": "order-1"})
    assert first[0] == again[0] == 200
    assert first[1]["session_id"] == again[1]["session_id"]
    other_amount = await sidecar.topup(api_key, {"amount_usd": "30"}, **{"idempotency-key": "order-1"})
    assert other_amount[0] == 409 and other_amount[1]["error"]["code"] == "idempotency_conflict"
    without = [await sidecar.topup(api_key, {"amount_usd": "25"}) for _ in range(2)]
    assert without[0][1]["session_id"] != without[1][1]["session_id"]
    assert len(double.sessions) == 3
    assert await db.count(tables.stripe_checkout_sessions) == 3


async def test_topup_refuses_bad_amounts_and_keys(db: Db, double: StripeDouble, sidecar) -> None:
    _, api_key = await db.new_wallet()
    for amount in ("4.99", "500.01", "10.001", "ten", 10.5, None, "-10"):
        status, body = await sidecar.topup(api_key, {"amount_usd": amount})
        assert (status, body["error"]["code"], body["error"]["param"]) == (
            400,
            "invalid_amount",
            "amount_usd",
        ), amount
    status, body = await sidecar.topup(api_key, {})
    assert (status, body["error"]["code"]) == (400, "invalid_amount")
    async with sidecar.http.post(
        sidecar.url + "/billing/topup",
        data=b"{not json",
        headers={"authorization": f"Bearer {api_key}", "content-type": "application/json"},
    ) as r:
        assert (r.status, (await r.json())["error"]["code"]) == (400, "invalid_json")
    assert (await sidecar.topup(None, {"amount_usd": "10"}))[1]["error"]["code"] == "missing_api_key"
    assert (await sidecar.topup("sk-litellm-nope", {"amount_usd": "10"}))[1]["error"][
        "code"
    ] == "invalid_api_key"
    revoked_wallet, revoked_key = await db.new_wallet()
    async with db.engine.begin() as conn:
        await conn.execute(
            sa.update(tables.api_keys)
            .where(tables.api_keys.c.wallet_id == revoked_wallet)
            .values(revoked_at=sa.func.now())
        )
    status, body = await sidecar.topup(revoked_key, {"amount_usd": "10"})
    assert (status, body["error"]["code"]) == (401, "revoked_api_key")
    assert double.sessions == {}


async def test_topup_and_signup_answer_a_body_the_same_way(db: Db, double: StripeDouble, sidecar) -> None:
    """One reader for both routes: the size bound and the two error codes are the API's."""
    _, api_key = await db.new_wallet()
    headers = {"authorization": f"Bearer {api_key}", "content-type": "application/json"}
    padding = "x" * json_body.BODY_BYTES_MAX
    answers = {}
    for route, body in (
        ("/billing/topup", {"amount_usd": "10.00", "padding": padding}),
        ("/user/signup", {"email": "big@example.com", "padding": padding}),
    ):
        async with sidecar.http.post(
            sidecar.url + route, data=json.dumps(body).encode(), headers=headers
        ) as r:
            answers[route] = (r.status, (await r.json())["error"])
    assert answers["/billing/topup"] == answers["/user/signup"]
    assert answers["/billing/topup"][0] == 413
    assert answers["/billing/topup"][1]["code"] == "body_too_large"
    for route in ("/billing/topup", "/user/signup"):
        async with sidecar.http.post(sidecar.url + route, data=b"[]", headers=headers) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (400, "invalid_json"), route
    assert double.sessions == {}


async def test_topup_bounds_come_from_the_settings(db: Db, double: StripeDouble, start_sidecar) -> None:
    settings = stripe_settings(double.url, topup_nano_min=10**9, topup_nano_max=2 * 10**9)
    _, api_key = await db.new_wallet()
    async with start_sidecar(settings) as running:
        assert (await running.topup(api_key, {"amount_usd": "1.00"}))[0] == 200
        status, body = await running.topup(api_key, {"amount_usd": "2.01"})
    assert status == 400 and "from 1.00 to 2.00 USD" in body["error"]["message"]


async def test_when_stripe_cannot_be_reached_topup_answers_503(db: Db, start_sidecar) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    settings = Settings(
        stripe_secret_key=SECRET_KEY, stripe_webhook_secret=WEBHOOK_SECRET, stripe_api_base=closed
    )
    _, api_key = await db.new_wallet()
    async with start_sidecar(settings) as running:
        status, body = await running.topup(api_key, {"amount_usd": "10.00"})
    assert (status, body["error"]["code"]) == (503, "payments_unavailable")
    assert await db.count(tables.stripe_checkout_sessions) == 0


async def test_when_stripe_refuses_the_key_topup_answers_502(
    db: Db, double: StripeDouble, start_sidecar
) -> None:
    settings = Settings(
        stripe_secret_key="sk_test_wrong", stripe_webhook_secret=WEBHOOK_SECRET, stripe_api_base=double.url
    )
    _, api_key = await db.new_wallet()
    async with start_sidecar(settings) as running:
        status, body = await running.topup(api_key, {"amount_usd": "10.00"})
    assert (status, body["error"]["code"]) == (502, "payments_error")


async def test_without_stripe_keys_topups_answer_503_and_the_rest_works(db: Db, start_sidecar) -> None:
    async with start_sidecar(Settings()) as running:
        async with running.http.post(
            running.url + "/user/signup", json={"email": "nostripe@example.com"}
        ) as r:
            assert r.status == 201
            api_key = (await r.json())["api_key"]
        async with running.http.get(
            running.url + "/billing/balance", headers={"authorization": f"Bearer {api_key}"}
        ) as r:
            assert r.status == 200
        status, body = await running.topup(api_key, {"amount_usd": "10.00"})
        assert (status, body["error"]["code"]) == (503, "payments_unconfigured")
        assert "Stripe is not configured" in body["error"]["message"]
        status, body = await running.post_event("{}", "t=1,v1=x")
        assert (status, body["error"]["code"]) == (503, "payments_unconfigured")
        async with running.http.get(running.url + "/billing/topup") as r:
            assert r.status == 503 and "Stripe is not configured" in await r.text()
    assert await db.count(tables.stripe_events) == 0


# --- the pages -----------------------------------------------------------------------------------


async def test_the_top_up_link_is_a_page_whose_form_leads_to_checkout(
    db: Db, double: StripeDouble, sidecar
) -> None:
    wallet_id, api_key = await db.new_wallet()
    async with sidecar.http.get(sidecar.url + "/billing/topup") as r:
        page = await r.text()
        assert r.status == 200 and r.content_type == "text/html"
        assert r.headers["cache-control"] == "no-store"
    assert (
        '<form method=post action="/billing/topup">' in page
        and "name=api_key" in page
        and "name=amount_usd" in page
    )
    form = {"api_key": api_key, "amount_usd": "10.00"}
    async with sidecar.http.post(sidecar.url + "/billing/topup", data=form, allow_redirects=False) as r:
        assert r.status == 303
        location = r.headers["location"]
    [session] = double.sessions.values()
    assert location == session["url"] and session["client_reference_id"] == wallet_id

    async with sidecar.http.post(
        sidecar.url + "/billing/topup",
        data={"api_key": "sk-litellm-nope", "amount_usd": "10"},
        allow_redirects=False,
    ) as r:
        assert r.status == 401 and r.content_type == "text/html"
        assert "Incorrect API key provided." in await r.text()
    async with sidecar.http.post(
        sidecar.url + "/billing/topup",
        data={"api_key": api_key, "amount_usd": "<b>1</b>"},
        allow_redirects=False,
    ) as r:
        text = await r.text()
        assert (
            r.status == 400
            and "amount_usd" in text
            and "<b>1</b>" not in text
            and "&lt;b&gt;1&lt;/b&gt;" in text
        )
    assert len(double.sessions) == 1


async def test_paying_on_the_doubles_page_sends_a_signed_webhook_and_credits(
    db: Db, double: StripeDouble, sidecar
) -> None:
    wallet_id, api_key = await db.new_wallet()
    _, body = await sidecar.topup(api_key, {"amount_usd": "10.00"})
    async with aiohttp.ClientSession() as browser:
        async with browser.get(body["checkout_url"]) as r:
            page = await r.text()
            assert r.status == 200
        assert "TEST MODE" in page and "$10.00" in page and ">Pay (test)</button>" in page
        async with browser.post(body["checkout_url"], allow_redirects=False) as r:
            assert r.status == 303
            assert (
                r.headers["location"]
                == f"http://gateway.test:8080/billing/topup/success?session_id={body['session_id']}"
            )
        # Paid sessions cannot be paid twice.
        async with browser.post(body["checkout_url"], allow_redirects=False) as r:
            assert r.status == 409
    assert double.deliveries == [(double.events[-1]["id"], 200)]
    assert await db.balance(wallet_id) == TEN_USD_NANO
    async with sidecar.http.get(sidecar.url + f"/billing/topup/success?session_id={body['session_id']}") as r:
        assert r.status == 200 and "data-state=credited" in await r.text()
    async with sidecar.http.get(sidecar.url + "/billing/topup/success?session_id=cs_test_unknown") as r:
        assert r.status == 404
    # A NUL, which PostgreSQL text cannot hold, is unknown too, not a 500 (found by test_openapi_fuzz.py).
    async with sidecar.http.get(sidecar.url + "/billing/topup/success?session_id=cs_%00") as r:
        assert r.status == 404
    async with sidecar.http.get(sidecar.url + "/billing/topup/cancelled") as r:
        assert r.status == 200 and "Nothing was charged" in await r.text()


async def test_the_double_reports_a_webhook_it_could_not_deliver(
    db: Db, double: StripeDouble, sidecar
) -> None:
    _, api_key = await db.new_wallet()
    _, body = await sidecar.topup(api_key, {"amount_usd": "10.00"})
    double.webhook_url = f"http://127.0.0.1:{free_port()}/stripe/webhook"
    async with (
        aiohttp.ClientSession() as browser,
        browser.post(body["checkout_url"], allow_redirects=False) as r,
    ):
        assert r.status == 502 and "answered nothing" in await r.text()
