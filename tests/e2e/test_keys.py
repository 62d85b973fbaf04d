"""Self-service key management through the real gateway (Envoy, the sidecar, PostgreSQL): a
signed-up user lists, creates and revokes their keys (docs/decisions/0032-self-service-keys.md).

What a user relies on: the list shows each key's prefix, never the key or its hash; "last used"
and "spend" are the books' own (the spend is exactly the ledger's sum of the key's usage
entries); a new key is shown once and works with the OpenAI SDK; a revoked key stops working.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from support.waiting import wait_until_within

from billing import money

pytestmark = pytest.mark.integration

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
KEY_CACHE_TTL_MS = 500


@pytest.fixture(scope="module")
async def stack(launch_stack) -> AsyncIterator[Any]:
    async with launch_stack(BILLINGPROXY_KEY_CACHE_TTL_MS=str(KEY_CACHE_TTL_MS)) as running:
        yield running


async def call(stack, method: str, path: str, key: str, status: int, **kwargs: Any) -> Any:
    headers = {"Authorization": f"Bearer {key}"}
    async with stack.http.request(method, stack.gateway + path, headers=headers, **kwargs) as response:
        body = await response.json()
        assert response.status == status, body
        return body


async def usage_sum_usd(stack, key_id: str) -> str:
    """The ledger's exact sum of the key's usage entries, as the API shows money."""
    return money.format_usd(await stack.db.key_spend(key_id))


async def test_the_list_shows_prefix_dates_and_the_ledgers_spend(stack) -> None:
    user = await stack.signup()
    key, key_id = user["api_key"], user["key_id"]
    before = await call(stack, "GET", "/billing/keys", key, 200)
    assert before["object"] == "list"
    [fresh] = before["data"]
    assert fresh["id"] == key_id and fresh["current"] is True and fresh["state"] == "active"
    assert fresh["last_used_at"] is None and fresh["spend_usd"] == "0.000000" and fresh["limit"] is None
    assert key.startswith(fresh["prefix"]) and len(fresh["prefix"]) < len(key)

    with stack.openai(key) as client:
        for _ in range(3):
            client.chat.completions.create(**CHAT)
    await stack.db.settled(user["wallet_id"])

    [used] = (await call(stack, "GET", "/billing/keys", key, 200))["data"]
    spend = await usage_sum_usd(stack, key_id)
    assert money.parse_usd(spend) > 0
    assert used["spend_usd"] == spend
    newest_hold = await stack.db.scalar("SELECT max(created_at) FROM holds WHERE key_id = :k", k=key_id)
    assert dt.datetime.fromisoformat(used["last_used_at"]) == newest_hold
    assert dt.datetime.fromisoformat(used["created_at"]) <= newest_hold
    # Neither the key nor its hash is anywhere in the answer.
    stored_hash = await stack.db.scalar("SELECT key_hash FROM api_keys WHERE id = :k", k=key_id)
    listing = str(used)
    assert key not in listing and bytes(stored_hash).hex() not in listing


async def test_a_new_key_is_shown_once_and_works_through_envoy(stack) -> None:
    user = await stack.signup()
    created = await call(stack, "POST", "/billing/keys", user["api_key"], 201)
    new_key = created["api_key"]
    assert created["id"] != user["key_id"] and new_key != user["api_key"]
    assert new_key.startswith(created["prefix"]) and created["current"] is False
    assert created["state"] == "active" and created["spend_usd"] == "0.000000"

    with stack.openai(new_key) as client:
        reply = client.chat.completions.create(**CHAT)
    assert reply.usage is not None and reply.usage.total_tokens > 0
    await stack.db.settled(user["wallet_id"])

    listed = {k["id"]: k for k in (await call(stack, "GET", "/billing/keys", new_key, 200))["data"]}
    assert set(listed) == {user["key_id"], created["id"]}
    assert listed[created["id"]]["current"] is True
    assert listed[created["id"]]["spend_usd"] == await usage_sum_usd(stack, created["id"])
    assert listed[user["key_id"]]["spend_usd"] == "0.000000"
    # Shown once: no later answer carries a key's plaintext.
    assert all("api_key" not in k for k in listed.values())


async def test_a_revoked_key_is_refused_by_the_gateway(stack) -> None:
    user = await stack.signup()
    created = await call(stack, "POST", "/billing/keys", user["api_key"], 201)
    with stack.openai(created["api_key"]) as client:
        client.chat.completions.create(**CHAT)  # the key is in the sidecar's cache now
    await stack.db.settled(user["wallet_id"])

    revoked_at = time.monotonic()
    revoked = await call(stack, "DELETE", f"/billing/keys/{created['id']}", user["api_key"], 200)
    assert revoked["state"] == "revoked" and revoked["revoked_at"] is not None

    def refused() -> bool:
        with stack.openai(created["api_key"]) as client:
            try:
                client.chat.completions.create(**CHAT)
            except openai.AuthenticationError as exc:
                return exc.code == "revoked_api_key"
            return False

    async def refused_now() -> bool:
        return await asyncio.to_thread(refused)

    await wait_until_within(
        refused_now,
        since=revoked_at,
        bound_s=KEY_CACHE_TTL_MS / 1000 + 0.5,
        what="refusal of the revoked key",
    )
    await stack.db.settled(user["wallet_id"])
    listed = (await call(stack, "GET", "/billing/keys", user["api_key"], 200))["data"]
    assert [k["id"] for k in listed] == [user["key_id"]]

    # Revoking again changes nothing and answers the key as it is. (Its spend may have grown: a
    # request admitted within the key cache's TTL of the revocation is served and billed.)
    again = await call(stack, "DELETE", f"/billing/keys/{created['id']}", user["api_key"], 200)
    assert (again["state"], again["revoked_at"]) == ("revoked", revoked["revoked_at"])
