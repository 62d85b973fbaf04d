"""Alert mail through the sidecar's alert worker, against a real PostgreSQL and a real SMTP server
(aiosmtpd, in this process): a balance crossing and a queue_event-made event are mailed to the
wallet's address once each, a server answering 451 is retried until it takes the mail, the webhook
and the mail are tracked apart (each delivered once when both are on, one failing resends nothing
on the other), nothing is mailed without SMTP, and an address with a line break in it cannot add
a header or a recipient."""

from __future__ import annotations

import asyncio
import smtplib
import uuid
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from support.alert_receiver import Receiver, running_receiver

from authz_sidecar import alert_delivery
from billing import alert_mail, alerts, database, ledger, money, wallets
from billing.settings import Settings
from billingproxy.devstack.mail_sink import REFUSAL, MailSink

pytestmark = pytest.mark.integration

USD = money.NANO_PER_USD
PUBLIC_URL = "https://gateway.example.com"


@pytest.fixture
async def sink() -> AsyncIterator[MailSink]:
    async with MailSink() as sink:
        yield sink


def settings_for(sink: MailSink | None) -> Settings:
    mail = {} if sink is None else {"smtp_url": sink.url, "smtp_from": "BillingProxy <billing@example.com>"}
    return Settings(
        public_url=PUBLIC_URL,
        alert_allow_private=True,
        alert_retry_base_ms=10,
        **mail,  # type: ignore[arg-type]
    )


async def new_wallet(engine: AsyncEngine, email: str | None = None) -> tuple[str, str]:
    email = email or f"owner-{uuid.uuid4().hex[:10]}@example.com"
    async with engine.begin() as conn:
        owner = await wallets.signup(conn, email=email, grant_nano=USD // 2)
    return owner.wallet.id, email


async def spend(engine: AsyncEngine, wallet_id: str, nano: int) -> None:
    async with engine.begin() as conn:
        await ledger.post_entry(
            conn,
            wallet_id=wallet_id,
            kind="adjustment",
            amount_nano=-nano,
            idempotency_key=f"test:{uuid.uuid4().hex}",
        )


async def rounds(worker: alert_delivery.AlertWorker, n: int, *, due_now: asyncpg.Pool | None = None) -> None:
    """``n`` rounds of the worker; with ``due_now``, retries are made due at once between them
    (the back-off itself is tested in test_alert_queue.py)."""
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            await worker.round(session)
            if due_now is not None:
                async with database.acquire(due_now) as conn:
                    await conn.execute("UPDATE alert_deliveries SET next_attempt_at = now()")
                    await conn.execute("UPDATE alert_events SET next_attempt_at = now()")


async def deliveries(pool: asyncpg.Pool, wallet_id: str) -> list[tuple[str, int, bool, bool]]:
    async with database.acquire(pool) as conn:
        rows = await conn.fetch(
            """SELECT d.channel, d.attempts, d.delivered_at IS NOT NULL AS delivered,
                      d.gave_up_at IS NOT NULL AS gave_up
                 FROM alert_deliveries d JOIN alert_events ev ON ev.id = d.event_id
                WHERE ev.wallet_id = $1 ORDER BY d.channel""",
            wallet_id,
        )
    return [tuple(r) for r in rows]


async def test_a_crossing_is_mailed_once_without_a_webhook(
    migrated_engine: AsyncEngine, migrated_pool: asyncpg.Pool, sink: MailSink
) -> None:
    worker = alert_delivery.AlertWorker(settings_for(sink), migrated_pool)
    wallet, email = await new_wallet(migrated_engine)
    await rounds(worker, 1)  # the wallet is watched from its balance now ($0.50; the default: $1 and $0)
    await spend(migrated_engine, wallet, USD // 2)  # $0: crosses $0
    await rounds(worker, 3)

    [mail] = sink.received
    assert mail.rcpt_tos == [email] and mail.message["To"] == email
    assert mail.mail_from == "billing@example.com"
    assert mail.subject == "[BillingProxy] Your balance is low"
    assert f"Wallet {wallet}" in mail.body and "$0.000000" in mail.body
    assert f"{PUBLIC_URL}/billing/topup" in mail.body
    assert await deliveries(migrated_pool, wallet) == [("mail", 1, True, False)]
    async with database.acquire(migrated_pool) as conn:
        webhook_state = await conn.fetchrow(
            "SELECT attempts, gave_up_at IS NOT NULL AS off, last_error FROM alert_events"
        )
    assert tuple(webhook_state) == (0, True, "no webhook was registered"), "no webhook: nothing to post"


async def test_an_event_queued_by_another_feature_is_mailed_with_its_data(
    migrated_engine: AsyncEngine, migrated_pool: asyncpg.Pool, sink: MailSink
) -> None:
    worker = alert_delivery.AlertWorker(settings_for(sink), migrated_pool)
    wallet, email = await new_wallet(migrated_engine)
    await rounds(worker, 1)
    async with database.acquire(migrated_pool) as conn:
        event_id = await alerts.queue_event(
            conn,
            wallet,
            alerts.EventType.RECHARGE_FAILED,
            occurrence="recharge:7",
            data={"amount_usd": "10.000000", "reason": "card_declined"},
        )
    assert event_id is not None, "a wallet watched for its mail takes events"
    await rounds(worker, 2)
    [mail] = sink.received
    assert mail.rcpt_tos == [email]
    assert mail.subject == "[BillingProxy] An automatic recharge failed"
    assert "amount usd: 10.000000" in mail.body and "reason: card_declined" in mail.body
    assert mail.message["Message-ID"] == f"<{event_id}@billingproxy>"


async def test_an_event_of_a_wallet_no_round_has_watched_yet_is_still_mailed(
    migrated_engine: AsyncEngine, migrated_pool: asyncpg.Pool, sink: MailSink
) -> None:
    """A card saved a second after signup recharges before any alert round has enrolled the
    wallet: its alert must not be lost (found walking the README with `billingproxy up`)."""
    worker = alert_delivery.AlertWorker(settings_for(sink), migrated_pool)
    wallet, email = await new_wallet(migrated_engine)
    async with database.acquire(migrated_pool) as conn:
        event_id = await alerts.queue_event(
            conn,
            wallet,
            alerts.EventType.RECHARGE_SUCCEEDED,
            occurrence="recharge:1",
            data={"amount_usd": "10.000000"},
        )
    assert event_id is not None
    await rounds(worker, 2)
    [mail] = sink.received
    assert mail.rcpt_tos == [email] and mail.message["Message-ID"] == f"<{event_id}@billingproxy>"


async def test_a_refusing_server_is_retried_until_it_takes_the_mail(
    migrated_engine: AsyncEngine, migrated_pool: asyncpg.Pool, sink: MailSink
) -> None:
    worker = alert_delivery.AlertWorker(settings_for(sink), migrated_pool)
    wallet, email = await new_wallet(migrated_engine)
    await rounds(worker, 1)
    sink.refusals = [f"451 4.7.1 {email} is greylisted", REFUSAL]
    await spend(migrated_engine, wallet, USD // 2)
    await rounds(worker, 2)
    async with database.acquire(migrated_pool) as conn:
        error = await conn.fetchval("SELECT last_error FROM alert_deliveries")
    assert "answered 451" in error and email not in error, "the address is not repeated in errors"
    await rounds(worker, 5, due_now=migrated_pool)
    assert len(sink.received) == 1, "refused twice, then taken once"
    assert await deliveries(migrated_pool, wallet) == [("mail", 3, True, False)]


async def test_both_channels_deliver_once_and_fail_apart(
    migrated_engine: AsyncEngine, migrated_pool: asyncpg.Pool, sink: MailSink
) -> None:
    worker = alert_delivery.AlertWorker(settings_for(sink), migrated_pool)
    wallet, _ = await new_wallet(migrated_engine)
    async with running_receiver() as receiver:
        await register(migrated_engine, wallet, receiver)
        receiver.fail_first = 2  # the webhook fails twice; the mail must not be sent again
        await spend(migrated_engine, wallet, USD // 2)
        await rounds(worker, 6, due_now=migrated_pool)
        assert len(receiver.events()) == 3 and len({e["id"] for e in receiver.events()}) == 1
    assert len(sink.received) == 1
    assert await deliveries(migrated_pool, wallet) == [("mail", 1, True, False)]

    sink.refusals = [REFUSAL] * 3  # now the mail server fails; the webhook is posted once
    async with running_receiver() as receiver:
        await register(migrated_engine, wallet, receiver)
        async with database.acquire(migrated_pool) as conn:
            await alerts.queue_event(
                conn, wallet, alerts.EventType.KEY_LIMIT_REACHED, occurrence="key:1", data={"key_id": "key_1"}
            )
        await rounds(worker, 6, due_now=migrated_pool)
        assert [e["type"] for e in receiver.events()] == ["key.limit_reached"]
    assert len(sink.received) == 2


async def register(engine: AsyncEngine, wallet_id: str, receiver: Receiver) -> None:
    async with engine.begin() as conn:
        await alerts.register(
            conn, wallet_id, url=receiver.url + "/hook", thresholds_nano=None, rotate_secret=False
        )


async def test_no_mail_without_smtp(
    migrated_engine: AsyncEngine, migrated_pool: asyncpg.Pool, sink: MailSink
) -> None:
    worker = alert_delivery.AlertWorker(settings_for(None), migrated_pool)
    wallet, _ = await new_wallet(migrated_engine)
    async with running_receiver() as receiver:
        await register(migrated_engine, wallet, receiver)
        await spend(migrated_engine, wallet, USD // 2)
        await rounds(worker, 3)
        assert len(receiver.events()) == 1
    assert sink.received == []
    assert await deliveries(migrated_pool, wallet) == []


@pytest.mark.parametrize(
    "address",
    [
        "victim@example.com\r\nBcc: many@example.org",
        "victim@example.com\nSubject: free money",
        "a@example.com, b@example.org",
        "Someone <a@example.com>",
        "ünï@example.com",
    ],
)
async def test_an_address_cannot_add_headers_or_recipients(
    migrated_engine: AsyncEngine, migrated_pool: asyncpg.Pool, sink: MailSink, address: str
) -> None:
    """Signup refuses such addresses; a Wallet resource's email or an admin's edit may not, so the
    mail itself must: no mail is sent, and the delivery is given up at once (no retry can help)."""
    worker = alert_delivery.AlertWorker(settings_for(sink), migrated_pool)
    wallet, _ = await new_wallet(migrated_engine)
    async with database.acquire(migrated_pool) as conn:
        await conn.execute("UPDATE wallets SET email = $2 WHERE id = $1", wallet, address)
    await rounds(worker, 1)
    await spend(migrated_engine, wallet, USD // 2)
    await rounds(worker, 3)
    assert sink.received == []
    assert await deliveries(migrated_pool, wallet) == [("mail", 1, False, True)]


async def test_a_password_is_never_sent_to_a_server_without_starttls(sink: MailSink) -> None:
    server = alert_mail.parse_smtp_url(f"smtp://user:hunter2@127.0.0.1:{sink.port}")
    msg = alert_mail.AlertMail("evt_1", "alert.test", "wal_1", 0, None, {}).message(
        sender="a@example.com", recipient="b@example.com", public_url=PUBLIC_URL
    )
    with pytest.raises(smtplib.SMTPNotSupportedError, match="offers no STARTTLS") as caught:
        await asyncio.to_thread(
            alert_mail.send, server, msg, sender="a@example.com", recipient="b@example.com"
        )
    assert "hunter2" not in str(caught.value)
    assert sink.received == []


async def test_two_sidecars_mail_each_event_once(
    migrated_engine: AsyncEngine, migrated_pool: asyncpg.Pool, sink: MailSink
) -> None:
    """Two alert workers (two sidecars) on one database, rounds racing: one mail per event."""
    workers = [alert_delivery.AlertWorker(settings_for(sink), migrated_pool) for _ in range(2)]
    owners = [await new_wallet(migrated_engine) for _ in range(12)]
    await rounds(workers[0], 1)
    sink.refusals = [REFUSAL] * 4  # some retries in the race too
    for wallet, _ in owners:
        await spend(migrated_engine, wallet, USD // 2)

    async with aiohttp.ClientSession() as session:
        for _ in range(6):
            await asyncio.gather(*(w.round(session) for w in workers for _ in range(2)))
            async with database.acquire(migrated_pool) as conn:
                await conn.execute("UPDATE alert_deliveries SET next_attempt_at = now()")
    assert sorted(r for m in sink.received for r in m.rcpt_tos) == sorted(email for _, email in owners)
