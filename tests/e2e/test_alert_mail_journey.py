"""Alert mail through the whole stack: a wallet signed up through the gateway, with no webhook,
spends one request through Envoy below its default threshold, and the sidecar mails the signup
address once, through a real SMTP server (aiosmtpd, in this process)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from billingproxy.devstack.mail_sink import MailSink

pytestmark = pytest.mark.integration

MODEL = "gpt-4o-mini"
TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
async def sink() -> AsyncIterator[MailSink]:
    async with MailSink() as sink:
        yield sink


@pytest.fixture(scope="module")
async def stack(launch_stack, sink: MailSink) -> AsyncIterator[Any]:
    async with launch_stack(
        BILLINGPROXY_SMTP_URL=sink.url,
        BILLINGPROXY_SMTP_FROM="BillingProxy <billing@example.com>",
        BILLINGPROXY_ALERT_INTERVAL_MS="100",
        # Just above the $1 default threshold of a wallet never topped up: one request crosses it.
        BILLINGPROXY_FREE_GRANT_USD="1.000001",
    ) as running:
        yield running


async def test_a_crossing_is_mailed_to_the_signup_address(stack, sink: MailSink, wait_until) -> None:
    owner = await stack.signup()

    async def watched() -> bool:
        return bool(
            await stack.db.scalar(
                "SELECT count(*) FROM alert_endpoints WHERE wallet_id = :w AND url IS NULL",
                w=owner["wallet_id"],
            )
        )

    await wait_until(watched, TIMEOUT_S, "the wallet to be watched for its mail")
    async with stack.http.post(
        stack.gateway + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {owner['api_key']}"},
    ) as response:
        assert response.status == 200, await response.text()
    await stack.db.settled(owner["wallet_id"])

    [mail] = await sink.wait_for(1, TIMEOUT_S)
    assert mail.rcpt_tos == [owner["email"]]
    assert mail.subject == "[BillingProxy] Your balance is low"
    assert owner["wallet_id"] in mail.body and "/billing/topup" in mail.body
    assert owner["api_key"] not in mail.raw.decode()

    async def counted() -> bool:
        delivered = await stack.metric(
            "billingproxy_alert_deliveries_total", channel="mail", outcome="delivered"
        )
        recent = await stack.metric("billingproxy_alert_events_recent", type="wallet.balance_low")
        return delivered == 1 and recent == 1

    await wait_until(counted, TIMEOUT_S, "the mail and its event to show in the metrics")
    assert (
        await stack.db.scalar(
            "SELECT count(*) FROM alert_deliveries WHERE channel = 'mail' AND delivered_at IS NOT NULL"
        )
        == 1
    )
    assert len(sink.received) == 1
