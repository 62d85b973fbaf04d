"""Auto-recharge against the Stripe test double, with the sidecar's HTTP app and its recharge
worker in this process (rounds driven by the test): the setup Checkout saves the card, a wallet
below its threshold gets one off-session PaymentIntent, credited once by its webhook; a
declining card pauses it after N failures; Stripe unreachable — even after it made the
PaymentIntent — is retried with the same key, so one PaymentIntent; and what an attacker with
one key can send (bad amounts, another wallet's card, forged and replayed events) changes nothing."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
import stripe
from support.waiting import wait_until

from authz_sidecar import recharge_worker
from billing import alerts, database, ledger, money, payments, recharges, tables
from billingproxy.devstack.stripe_double import StripeDouble
from stripe_testkit import Db

pytestmark = pytest.mark.integration

OK, DECLINED_LATER, AUTHENTICATION = "4242 4242 4242 4242", "4000 0000 0000 0341", "4000 0027 6000 3184"
TEN_USD = 10 * money.NANO_PER_USD


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def put(sidecar, key: str, body: Any) -> tuple[int, dict[str, Any]]:
    async with sidecar.http.put(sidecar.url + "/billing/auto-recharge", json=body, headers=auth(key)) as r:
        return r.status, await r.json()


async def get(sidecar, key: str) -> tuple[int, dict[str, Any]]:
    async with sidecar.http.get(sidecar.url + "/billing/auto-recharge", headers=auth(key)) as r:
        return r.status, await r.json()


async def save_card(sidecar, double: StripeDouble, key: str, card: str, **setting: str) -> dict[str, Any]:
    """PUT the setting, save ``card`` on the setup Checkout, wait for its webhook."""
    status, answer = await put(sidecar, key, {"threshold_usd": "2.00", "amount_usd": "10.00", **setting})
    assert status == 200, answer
    assert answer["card"] is None and answer["checkout_url"].startswith(double.url)
    event = double.complete(answer["setup_session_id"], card=card)
    assert await double.deliver(event) == 200

    async def saved() -> dict[str, Any] | None:
        _, now = await get(sidecar, key)
        return now if now["card"] is not None else None

    return await wait_until(saved, 10, "the card saved")


class Worker:
    """The sidecar's recharge worker on the test's database and the double, one round at a time."""

    def __init__(self, db: Db, client: stripe.StripeClient, settings) -> None:
        self.worker = recharge_worker.RechargeWorker(settings, db.engine)
        self.intents: recharge_worker.PaymentIntents = recharge_worker.StripePaymentIntents(client)

    async def round(self) -> int:
        return await self.worker.round(self.intents)


@pytest.fixture
async def worker(db: Db, client: stripe.StripeClient, sidecar) -> AsyncIterator[Worker]:
    yield Worker(db, client, sidecar.settings.replace(auto_recharge_retry_base_ms=10))


async def recharge_rows(db: Db, wallet_id: str) -> list[sa.Row]:
    async with db.engine.connect() as conn:
        return list(
            (
                await conn.execute(
                    sa.select(tables.recharges)
                    .where(tables.recharges.c.wallet_id == wallet_id)
                    .order_by(tables.recharges.c.seq)
                )
            ).all()
        )


async def test_the_journey_one_recharge_credited_once(db: Db, double: StripeDouble, sidecar, worker) -> None:
    wallet, key = await db.new_wallet(grant_nano=3 * money.NANO_PER_USD)
    shown = await save_card(sidecar, double, key, OK, monthly_cap_usd="50.00")
    assert shown["card"] == {"brand": "visa", "last4": "4242"}
    assert (shown["threshold_usd"], shown["amount_usd"], shown["monthly_cap_usd"]) == (
        "2.000000",
        "10.000000",
        "50.000000",
    )
    (customer,) = double.customers.values()
    assert customer["metadata"] == {"wallet_id": wallet}

    assert await worker.round() == 0, "above the threshold"
    await db_spend(db, wallet, 2 * money.NANO_PER_USD)  # 1.00 left: below 2.00
    assert await worker.round() == 1
    assert await worker.round() == 0, "in flight: no second"

    async def credited() -> bool:
        return await db.balance(wallet) == money.NANO_PER_USD + TEN_USD

    await wait_until(credited, 10, "the recharge credited by its webhook")
    (row,) = await recharge_rows(db, wallet)
    assert (row.seq, row.state, row.attempts) == (1, "succeeded", 1)
    (pi,) = double.payment_intents.values()
    assert (pi["id"], pi["amount"], pi["customer"], pi["status"]) == (
        row.payment_intent,
        1000,
        customer["id"],
        "succeeded",
    )
    assert pi["metadata"] == {"wallet_id": wallet, "recharge_seq": "1", "purpose": recharges.PURPOSE}
    (credit,) = [e for e in await db.entries(wallet) if e.kind == "topup"]
    assert credit.idempotency_key == payments.credit_key(row.payment_intent)
    assert await worker.round() == 0, "above again"

    _, shown = await get(sidecar, key)
    assert shown["last_recharge"]["state"] == "succeeded" and shown["month_total_usd"] == "10.000000"

    # The webhook again (Stripe retries): nothing more.
    (event,) = [e for e in double.events if e["type"] == "payment_intent.succeeded"]
    assert await double.deliver(event) == 200
    assert await db.balance(wallet) == money.NANO_PER_USD + TEN_USD

    # A refund of the recharge behaves as for a Checkout top-up.
    assert await double.deliver(double.refund(row.payment_intent, 400)) == 200
    assert await db.balance(wallet) == money.NANO_PER_USD + TEN_USD - 4 * money.NANO_PER_USD


async def db_spend(db: Db, wallet_id: str, nano: int) -> None:
    async with db.engine.begin() as conn:
        await ledger.post_entry(
            conn,
            wallet_id=wallet_id,
            kind="adjustment",
            amount_nano=-nano,
            idempotency_key=f"t:{uuid.uuid4().hex}",
        )


@pytest.mark.parametrize(
    ("card", "code"), [(DECLINED_LATER, "card_declined"), (AUTHENTICATION, "authentication_required")]
)
async def test_a_failing_card_pauses_after_n_failures_with_alerts(
    db: Db, double: StripeDouble, sidecar, worker, card: str, code: str
) -> None:
    wallet, key = await db.new_wallet()
    async with db.engine.begin() as conn:
        await alerts.register(
            conn, wallet, url="https://example.com/hook", thresholds_nano=[], rotate_secret=False
        )
    await save_card(sidecar, double, key, card)
    for n in range(1, 4):
        assert await worker.round() == 1
        _, shown = await get(sidecar, key)
        assert shown["last_recharge"]["state"] == "failed" and shown["last_recharge"]["failure_code"] == code
        assert shown["consecutive_failures"] == n
    assert shown["paused"] and code in shown["paused_reason"]
    assert await worker.round() == 0, "paused"
    assert len(double.payment_intents) == 3
    assert await db.balance(wallet) == 0
    async with db.engine.connect() as conn:
        events = await alerts.recent_events(conn, wallet, limit=20)
    assert sorted(e.type for e in events) == [alerts.EventType.RECHARGE_FAILED] * 3 + [
        alerts.EventType.RECHARGE_PAUSED
    ]

    # The failure webhooks arrive too (after, or before, the create's answer): recorded once.
    async def failed_events() -> int:
        return sum(1 for e in await db.events() if e.type == "payment_intent.payment_failed")

    await wait_until(lambda: _at_least(failed_events, 3), 10, "the three failure webhooks")
    assert len(await recharge_rows(db, wallet)) == 3

    # A PUT resumes it.
    status, resumed = await put(sidecar, key, {"threshold_usd": "2.00", "amount_usd": "10.00"})
    assert status == 200 and not resumed["paused"] and "checkout_url" not in resumed
    assert await worker.round() == 1


async def _at_least(count, n: int) -> bool:
    return await count() >= n


class LostAnswers:
    """Stripe makes the PaymentIntent, but the first ``lost`` answers never arrive."""

    def __init__(self, inner: recharge_worker.PaymentIntents, lost: int) -> None:
        self.inner = inner
        self.lost = lost
        self.keys: list[str] = []

    async def create(self, params: dict[str, Any], idempotency_key: str) -> Any:
        self.keys.append(idempotency_key)
        answer = await self.inner.create(params, idempotency_key)
        if self.lost:
            self.lost -= 1
            raise stripe.APIConnectionError("connection reset (test)")
        return answer


async def test_stripe_unreachable_is_retried_with_the_same_key_one_payment_intent(
    db: Db, double: StripeDouble, sidecar, worker
) -> None:
    wallet, key = await db.new_wallet()
    await save_card(sidecar, double, key, OK)
    faulty = LostAnswers(worker.intents, lost=2)
    worker.intents = faulty
    double.send_webhooks = False  # only the retries can learn what happened
    assert await worker.round() == 1
    (row,) = await recharge_rows(db, wallet)
    assert (row.state, row.payment_intent) == ("creating", None)

    async def retried() -> bool:
        await worker.round()
        return len(faulty.keys) >= 3

    await wait_until(retried, 10, "two retries")
    assert set(faulty.keys) == {f"recharge:{wallet}:1"}
    (pi,) = double.payment_intents
    (row,) = await recharge_rows(db, wallet)
    assert (row.state, row.payment_intent, row.attempts) == ("pending", pi, 3)
    _, shown = await get(sidecar, key)
    assert shown["consecutive_failures"] == 0 and shown["last_recharge"]["state"] == "pending"
    assert await worker.round() == 0

    (event,) = [e for e in double.events if e["type"] == "payment_intent.succeeded"]
    assert await double.deliver(event) == 200
    assert await db.balance(wallet) == TEN_USD
    _, shown = await get(sidecar, key)
    assert shown["last_recharge"]["state"] == "succeeded"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"threshold_usd": "2.00", "amount_usd": 10.5}, "amount_usd"),
        ({"threshold_usd": "2.00", "amount_usd": "10.005"}, "amount_usd"),
        ({"threshold_usd": "2.00", "amount_usd": "-10.00"}, "amount_usd"),
        ({"threshold_usd": "2.00", "amount_usd": "4.99"}, "amount_usd"),
        ({"threshold_usd": "2.00", "amount_usd": "500.01"}, "amount_usd"),
        ({"threshold_usd": "2.00", "amount_usd": "1e3"}, "amount_usd"),
        ({"threshold_usd": "2.00", "amount_usd": True}, "amount_usd"),
        ({"threshold_usd": 2.5, "amount_usd": "10.00"}, "threshold_usd"),
        ({"threshold_usd": "-1", "amount_usd": "10.00"}, "threshold_usd"),
        ({"threshold_usd": "9999999999999", "amount_usd": "10.00"}, "threshold_usd"),
        ({"threshold_usd": "2", "amount_usd": "10", "monthly_cap_usd": "9.99"}, "monthly_cap_usd"),
        ({"threshold_usd": "2", "amount_usd": "10", "monthly_cap_usd": 50.0}, "monthly_cap_usd"),
        ({"threshold_usd": "2", "amount_usd": "10", "wallet_id": "wal_other"}, "wallet_id"),
        ({"amount_usd": "10"}, "threshold_usd"),
    ],
)
async def test_bad_settings_are_a_specific_400_and_change_nothing(
    db: Db, double: StripeDouble, sidecar, body: dict[str, Any], param: str
) -> None:
    _, key = await db.new_wallet()
    status, answer = await put(sidecar, key, body)
    assert status == 400 and answer["error"]["param"] == param, answer
    assert answer["error"]["type"] == "invalid_request_error"
    assert await db.count(tables.auto_recharges) == 0 and double.customers == {} and double.sessions == {}


async def test_another_wallets_key_sees_and_changes_nothing_of_it(
    db: Db, double: StripeDouble, sidecar
) -> None:
    alice, alice_key = await db.new_wallet()
    _, mallory_key = await db.new_wallet()
    await save_card(sidecar, double, alice_key, OK)
    assert (await get(sidecar, mallory_key))[0] == 404
    async with sidecar.http.delete(sidecar.url + "/billing/auto-recharge", headers=auth(mallory_key)) as r:
        assert r.status == 404
    assert (await get(sidecar, alice_key))[1]["enabled"]
    assert (await get(sidecar, "sk-litellm-" + "x" * 40))[0] == 401
    # Mallory's own setting gets its own Customer and setup session, never Alice's card.
    status, answer = await put(sidecar, mallory_key, {"threshold_usd": "1", "amount_usd": "5"})
    assert status == 200 and answer["card"] is None and len(double.customers) == 2
    async with sidecar.http.delete(sidecar.url + "/billing/auto-recharge", headers=auth(alice_key)) as r:
        assert r.status == 200 and (await r.json())["deleted"]
    assert not (await get(sidecar, alice_key))[1]["enabled"]


def signed(double: StripeDouble, type_: str, obj: dict[str, Any]) -> tuple[str, str]:
    event = double.event(type_, obj)
    payload = double.payload(event)
    return payload, double.sign(payload)


async def test_payment_intents_not_ours_credit_nothing(db: Db, double: StripeDouble, sidecar, worker) -> None:
    wallet, key = await db.new_wallet()
    await save_card(sidecar, double, key, OK)
    (customer,) = double.customers.values()
    base = {
        "id": f"pi_{uuid.uuid4().hex}",
        "object": "payment_intent",
        "amount": 1000,
        "currency": "usd",
        "customer": customer["id"],
        "status": "succeeded",
        "metadata": {"wallet_id": wallet, "recharge_seq": "1"},
    }
    for obj in (
        base,  # names a recharge that was never started
        {**base, "metadata": {"wallet_id": wallet, "recharge_seq": "one"}},
        {**base, "metadata": {}},
    ):
        status, answer = await sidecar.post_event(*signed(double, "payment_intent.succeeded", obj))
        assert status == 200 and answer["outcome"] == "not_ours", answer
    # Started now: a PaymentIntent of another customer or amount naming it is not its payment.
    double.send_webhooks = False
    assert await worker.round() == 1
    (row,) = await recharge_rows(db, wallet)
    for obj in (
        {**base, "id": "pi_other_amount", "amount": 50000},
        {**base, "id": "pi_other_cus", "customer": "cus_x"},
    ):
        status, answer = await sidecar.post_event(*signed(double, "payment_intent.succeeded", obj))
        assert answer["outcome"] in ("amount_mismatch", "not_ours"), answer
    assert await db.balance(wallet) == 0
    # The real one, twice: credited once.
    real = double.payment_intents[row.payment_intent]
    payload, signature = signed(double, "payment_intent.succeeded", real)
    assert (await sidecar.post_event(payload, signature))[1]["outcome"] == "credited"
    status, answer = await sidecar.post_event(payload, signature)
    assert answer["duplicate"]
    assert await db.balance(wallet) == TEN_USD
    # A forged signature: 400, nothing recorded.
    events_before = len(await db.events())
    status, _ = await sidecar.post_event(
        json.dumps(double.event("payment_intent.succeeded", real)), "t=1,v1=00"
    )
    assert status == 400 and len(await db.events()) == events_before


async def test_a_setup_session_not_ours_saves_no_card(db: Db, double: StripeDouble, sidecar, client) -> None:
    wallet, key = await db.new_wallet()
    status, _ = await put(sidecar, key, {"threshold_usd": "2.00", "amount_usd": "10.00"})
    (customer,) = double.customers.values()
    foreign = await client.v1.checkout.sessions.create_async(
        {
            "mode": "setup",
            "currency": "usd",
            "customer": customer["id"],
            "success_url": "http://elsewhere.test/ok",
            "metadata": {"wallet_id": wallet},
        }
    )
    event = double.complete(foreign.id, card=OK)
    assert await double.deliver(event) == 200
    (recorded,) = [e for e in await db.events() if e.object_id == foreign.id]
    assert recorded.outcome == "not_ours"
    assert (await get(sidecar, key))[1]["card"] is None


async def test_a_card_declined_at_setup_is_not_saved(db: Db, double: StripeDouble, sidecar) -> None:
    """4000 0000 0000 0002 is declined on the setup page itself (Stripe's behaviour): no card, no
    event, and the session stays open for another card."""
    _, key = await db.new_wallet()
    status, answer = await put(sidecar, key, {"threshold_usd": "2.00", "amount_usd": "10.00"})
    assert status == 200
    async with sidecar.http.post(
        answer["checkout_url"], data={"card": "4000 0000 0000 0002"}, allow_redirects=False
    ) as r:
        assert r.status == 402 and "declined" in await r.text()
    assert (await get(sidecar, key))[1]["card"] is None
    assert double.sessions[answer["setup_session_id"]]["status"] == "open"
    assert await db.count(tables.recharges) == 0


async def test_a_sidecar_that_died_after_the_insert_leaves_a_recharge_the_next_round_charges_once(
    db: Db, double: StripeDouble, sidecar, worker
) -> None:
    """The insert committed, the call never made (the process died): when the lease ends another
    worker calls Stripe with the recharge's own key — one PaymentIntent, credited once."""
    wallet, key = await db.new_wallet()
    await save_card(sidecar, double, key, OK)
    async with database.acquire(db.engine) as conn:
        (orphan,) = await recharges.start_due(conn, lease_s=0)  # and then the sidecar died
    assert await worker.round() == 1, "the retry of the orphan, not a new recharge"
    (pi,) = double.payment_intents.values()
    assert pi["metadata"]["recharge_seq"] == str(orphan.seq)

    async def credited() -> bool:
        return await db.balance(wallet) == TEN_USD

    await wait_until(credited, 10, "credited once")
    (row,) = await recharge_rows(db, wallet)
    assert (row.seq, row.state, row.attempts, row.payment_intent) == (1, "succeeded", 2, pi["id"])


async def test_a_saved_card_event_while_stripe_is_unreachable_is_answered_503_and_recorded_later(
    db: Db, double: StripeDouble, sidecar
) -> None:
    """The card's brand and last 4 must be retrieved from Stripe; unreachable, the event is
    answered 503 with nothing recorded, so Stripe's retry is processed as new."""
    _, key = await db.new_wallet()
    status, answer = await put(sidecar, key, {"threshold_usd": "2.00", "amount_usd": "10.00"})
    event = double.complete(answer["setup_session_id"], card=OK)
    payload = double.payload(event)
    url = double.url
    await double.stop()
    status, body = await sidecar.post_event(payload, double.sign(payload))
    assert status == 503 and body["error"]["code"] == "payments_unavailable", body
    assert await db.events() == [] and (await get(sidecar, key))[1]["card"] is None
    port = int(url.rsplit(":", 1)[1])
    await double.start(port=port)
    status, body = await sidecar.post_event(payload, double.sign(payload))
    assert (status, body["outcome"]) == (200, "card_saved"), body
    assert (await get(sidecar, key))[1]["card"] == {"brand": "visa", "last4": "4242"}
