"""Settlement through the sidecar's real gRPC access-log service (as Envoy reaches it, with the
access-log secret): an entry delivered twice charges once, a backend failure charges nothing and
releases the hold, and a revoked key stops working within a second. Forged reports:
tests/e2e/adversarial/test_forged_access_log.py."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import grpc
import openai
import pytest
import sqlalchemy as sa
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from support.waiting import wait_until_within

from authz_sidecar.contract import ACCESS_LOG_SECRET_HEADER
from billing import api_keys, holds

pytestmark = pytest.mark.integration

MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "count my tokens please"}]
INPUT_USD_PER_TOKEN = Decimal("1.5e-07")  # litellm's gpt-4o-mini prices
OUTPUT_USD_PER_TOKEN = Decimal("6e-07")
ALREADY_POSTED = ("billingproxy_settlements_total", {"outcome": "already_posted"})


def cost_nano(prompt_tokens: int, completion_tokens: int) -> int:
    return math.ceil((prompt_tokens * INPUT_USD_PER_TOKEN + completion_tokens * OUTPUT_USD_PER_TOKEN) * 10**9)


@pytest.fixture(scope="module")
async def stack(launch_stack) -> AsyncIterator[Any]:
    async with launch_stack() as running:
        yield running


def log_entry(
    request_id: str, user: dict[str, Any], *, status: int, prompt: int, completion: int
) -> accesslog_pb2.HTTPAccessLogEntry:
    """An entry shaped as Envoy sends it: ext_authz's metadata and the Lua filter's usage (the
    provider's usage object as JSON text, and whether the answer finished)."""
    entry = accesslog_pb2.HTTPAccessLogEntry()
    metadata = entry.common_properties.metadata.filter_metadata
    # ext_authz files the Check answer's x-billingproxy-* headers under their names, as strings.
    metadata["envoy.filters.http.ext_authz"].update(
        {
            "x-billingproxy-wallet-id": user["wallet_id"],
            "x-billingproxy-key-id": user["key_id"],
            "x-billingproxy-hold-id": request_id,
            "x-billingproxy-model": MODEL,
            "x-billingproxy-format": "openai_chat",
        }
    )
    metadata["billingproxy.usage"].update(
        {"usage": json.dumps({"prompt_tokens": prompt, "completion_tokens": completion}), "finished": True}
    )
    entry.request.request_id = request_id
    entry.request.path = "/v1/chat/completions"
    entry.response.response_code.value = status
    return entry


async def deliver(stack, *entries: accesslog_pb2.HTTPAccessLogEntry) -> None:
    """One access-log stream, as Envoy opens it (with the access-log secret in its initial
    metadata), carrying ``entries`` in one message."""
    message = als_pb2.StreamAccessLogsMessage(
        identifier=als_pb2.StreamAccessLogsMessage.Identifier(log_name="billingproxy"),
        http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(log_entry=list(entries)),
    )
    secret = ((ACCESS_LOG_SECRET_HEADER, stack.settings.access_log_secret),)
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        stub = als_pb2_grpc.AccessLogServiceStub(channel)
        await stub.StreamAccessLogs(iter([message]), metadata=secret, timeout=10)


async def wait_replays(stack, wait_until, before: float, more: int) -> None:
    """Wait until the sidecar has recognised ``more`` entries as already settled (the outcome
    `already_posted` of /metrics, docs/architecture.md)."""
    name, labels = ALREADY_POSTED

    async def counted() -> bool:
        return await stack.metric(name, **labels) >= before + more

    await wait_until(counted, 10.0, f"{more} replayed entries to be recognised")


async def usage_entries(stack, wallet_id: str, request_id: str) -> list[Any]:
    return [e for e in await stack.db.ledger(wallet_id) if e.idempotency_key == f"usage:{request_id}"]


async def test_an_entry_delivered_twice_charges_once(stack, wait_until) -> None:
    user = await stack.signup()
    wallet_id = user["wallet_id"]
    grant = await stack.db.balance(wallet_id)
    request_id = f"e2e-{uuid.uuid4()}"
    async with stack.db.engine.begin() as conn:
        refusal = await holds.place(
            conn,
            request_id=request_id,
            wallet_id=wallet_id,
            key_id=user["key_id"],
            model=MODEL,
            amount_nano=500_000,
            ttl_s=600,
            strict=False,
        )
    assert refusal is None
    assert (await stack.db.wallet(wallet_id)).reserved_nano == 500_000
    cost = cost_nano(120, 30)

    entry = log_entry(request_id, user, status=200, prompt=120, completion=30)
    await deliver(stack, entry)

    async def posted() -> bool:
        return (await stack.db.hold(request_id)).state == "posted"

    await wait_until(posted, 10.0, "the first delivery to be settled")

    # Envoy reconnects and sends the same entry again; a third copy even claims other usage.
    name, labels = ALREADY_POSTED
    replays = await stack.metric(name, **labels)
    await deliver(stack, entry)
    await deliver(stack, log_entry(request_id, user, status=200, prompt=9_000, completion=9_000))
    await wait_replays(stack, wait_until, replays, 2)

    (charge,) = await usage_entries(stack, wallet_id, request_id)
    assert charge.amount_nano == -cost
    assert await stack.db.balance(wallet_id) == grant - cost
    assert (await stack.db.wallet(wallet_id)).reserved_nano == 0
    hold = await stack.db.hold(request_id)
    assert (hold.state, hold.posted_nano) == ("posted", cost)
    assert await stack.metric(name, **labels) == replays + 2


async def test_replaying_envoys_own_entry_changes_nothing(stack, wait_until) -> None:
    user = await stack.signup()
    wallet_id = user["wallet_id"]
    with stack.openai(user["api_key"]) as client:
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
    usage = raw.parse().usage
    request_id = raw.headers["x-request-id"]
    await stack.db.settled(wallet_id)
    ledger_before = await stack.db.ledger(wallet_id)
    (charge,) = await usage_entries(stack, wallet_id, request_id)
    assert charge.amount_nano == -cost_nano(usage.prompt_tokens, usage.completion_tokens)

    name, labels = ALREADY_POSTED
    replays = await stack.metric(name, **labels)
    entry = log_entry(
        request_id, user, status=200, prompt=usage.prompt_tokens, completion=usage.completion_tokens
    )
    await deliver(stack, entry, entry)  # twice in one message
    await wait_replays(stack, wait_until, replays, 2)
    assert await stack.db.ledger(wallet_id) == ledger_before
    assert await stack.metric(name, **labels) == replays + 2


async def test_a_backend_error_charges_nothing_and_releases_the_hold(stack, wait_until) -> None:
    user = await stack.signup()
    wallet_id = user["wallet_id"]
    grant = await stack.db.balance(wallet_id)
    with stack.openai(user["api_key"]) as client, pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_headers={"x-demo-status": "500"})
    assert failed.value.status_code == 500
    request_id = failed.value.response.headers["x-request-id"]

    async def voided() -> bool:
        hold = await stack.db.hold(request_id)
        return hold is not None and hold.state == "voided"

    await wait_until(voided, 10.0, "the failed request's hold to be voided")
    assert await usage_entries(stack, wallet_id, request_id) == []
    wallet = await stack.db.wallet(wallet_id)
    assert (wallet.balance_nano, wallet.reserved_nano) == (grant, 0)
    assert [e.kind for e in await stack.db.ledger(wallet_id)] == ["grant"]


async def test_a_revoked_key_is_refused_within_one_second(stack) -> None:
    user = await stack.signup()
    headers = {"Authorization": f"Bearer {user['api_key']}"}

    async def models_status() -> int:
        async with stack.http.get(stack.gateway + "/v1/models", headers=headers) as response:
            return response.status

    # The key works, and a fresh look-up of it is in the sidecar's cache when it is revoked.
    with stack.openai(user["api_key"]) as client:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    await stack.db.settled(user["wallet_id"])
    assert await models_status() == 200
    async with stack.db.engine.begin() as conn:
        await api_keys.revoke_key(conn, user["key_id"])
    committed = time.monotonic()

    async def refused() -> bool:
        return await models_status() == 401

    # Every request sent a second or more after the commit is refused, however slow the machine.
    await wait_until_within(refused, since=committed, bound_s=1.0, what="the revoked key being refused")

    counts = await stack.db.row_counts()
    with stack.openai(user["api_key"]) as client, pytest.raises(openai.AuthenticationError) as denied:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert denied.value.code == "revoked_api_key"
    assert await stack.db.row_counts() == counts


async def test_a_check_that_failed_at_envoy_voids_its_late_hold(stack, wait_until) -> None:
    """Envoy gave up on the Check (503, no ext_authz metadata) after the sidecar had already
    placed the hold: the log entry voids it by request id instead of reserving until expiry."""
    user = await stack.signup()
    wallet_id = user["wallet_id"]
    request_id = f"e2e-{uuid.uuid4()}"
    async with stack.db.engine.begin() as conn:
        refusal = await holds.place(
            conn,
            request_id=request_id,
            wallet_id=wallet_id,
            key_id=user["key_id"],
            model=MODEL,
            amount_nano=400_000,
            ttl_s=600,
            strict=False,
        )
    assert refusal is None
    grant = await stack.db.balance(wallet_id)

    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.request.request_id = request_id
    entry.request.path = "/v1/chat/completions"
    entry.response.response_code.value = 503
    await deliver(stack, entry)

    async def voided() -> bool:
        return (await stack.db.hold(request_id)).state == "voided"

    await wait_until(voided, 10.0, "the orphaned hold to be voided")
    assert (await stack.db.wallet(wallet_id)).reserved_nano == 0
    assert await stack.db.balance(wallet_id) == grant
    assert await usage_entries(stack, wallet_id, request_id) == []


async def test_a_check_landing_after_envoy_gave_up_and_after_its_report_places_no_hold(
    stack, wait_until
) -> None:
    """The late-hold race, put exactly there: the wallet row is locked, so the Check's hold
    statement waits; Envoy gives up after its 1 s ext_authz timeout and answers 503, and its
    access-log entry, finding no hold yet, leaves a void in the request id's place; then the lock
    goes and the Check's insert meets that void: no hold is placed, nothing is reserved, and the
    request Envoy refused is never charged."""
    user = await stack.signup()
    wallet_id = user["wallet_id"]
    grant = await stack.db.balance(wallet_id)
    headers = {"authorization": f"Bearer {user['api_key']}", "content-type": "application/json"}
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8}
    before = await stack.metric("billingproxy_settlements_total", outcome="voided_before_hold")
    async with stack.db.engine.connect() as locker:
        transaction = await locker.begin()
        await locker.execute(sa.text("SELECT 1 FROM wallets WHERE id = :id FOR UPDATE"), {"id": wallet_id})
        async with stack.http.post(
            stack.gateway + "/v1/chat/completions", json=body, headers=headers
        ) as response:
            assert response.status == 503, await response.text()
            assert (await response.json())["error"]["code"] == "billing_unavailable"
            request_id = response.headers["x-request-id"]

        async def void_came_first() -> bool:  # the 503's log entry found no hold to void
            return await stack.metric("billingproxy_settlements_total", outcome="voided_before_hold") > before

        await wait_until(void_came_first, 10.0, "the 503's access-log entry to be settled")
        void = await stack.db.hold(request_id)
        assert (void.state, void.wallet_id, void.amount_nano) == ("voided", None, 0)
        await transaction.rollback()  # now the Check's insert runs, after the void

    async def check_done() -> bool:  # the Check's statement, waiting on the lock until now, ended
        active = await stack.db.scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND state = 'active' AND query ILIKE '%INSERT INTO holds%'"
        )
        return active == 0

    await wait_until(check_done, 10.0, "the late Check to meet the void and place nothing")
    void = await stack.db.hold(request_id)
    assert (void.state, void.wallet_id, void.amount_nano) == ("voided", None, 0)
    assert (await stack.db.wallet(wallet_id)).reserved_nano == 0
    assert await stack.db.balance(wallet_id) == grant
    assert await usage_entries(stack, wallet_id, request_id) == []
