"""Per-key spend limits through the real gateway (Envoy, the sidecar, PostgreSQL): a user caps one
of their keys with ``PUT /billing/keys/{key_id}/limit``; the capped key is refused 403
``key_limit_reached`` (which limit, which window, when it resets, and no top-up link) while the
wallet's other key keeps working; many concurrent requests on the capped key never take its
spend past the limit (strict: never, at any moment); the refusal queues one alert per window;
bad input and another wallet's key answer a specific 4xx and change nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from support.alert_receiver import Receiver, running_receiver
from support.waiting import wait_until, wait_until_within

from billing import key_limits, money

pytestmark = pytest.mark.integration

# A bounded answer, so every request's hold is the same small amount.
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
SETTINGS = {
    "BILLINGPROXY_ADMISSION": "strict",
    "BILLINGPROXY_ALERT_ALLOW_PRIVATE": "true",
    "BILLINGPROXY_ALERT_INTERVAL_MS": "100",
    "BILLINGPROXY_KEY_CACHE_TTL_MS": "500",
}
KEY_CACHE_TTL_MS = 500
TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
async def stack(launch_stack) -> AsyncIterator[Any]:
    async with launch_stack(**SETTINGS) as running:
        yield running


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with running_receiver() as receiver:
        yield receiver


async def call(stack, method: str, path: str, key: str, status: int, **kwargs: Any) -> Any:
    headers = {"Authorization": f"Bearer {key}"}
    async with stack.http.request(method, stack.gateway + path, headers=headers, **kwargs) as response:
        body = await response.json()
        assert response.status == status, body
        return body


async def chat(stack, key: str) -> tuple[int, dict[str, Any]]:
    async with stack.http.post(
        stack.gateway + "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        return response.status, await response.json()


async def user_with_two_keys(stack) -> tuple[dict[str, Any], dict[str, Any]]:
    user = await stack.signup()
    second = await call(stack, "POST", "/billing/keys", user["api_key"], 201)
    return user, second


async def hold_of_one_request(stack, user: dict[str, Any]) -> int:
    """What the Check holds for :data:`CHAT` (the same for every such request)."""
    status, body = await chat(stack, user["api_key"])
    assert status == 200, body
    await stack.db.settled(user["wallet_id"])
    holds = await stack.db.holds(user["wallet_id"])
    return int(holds[-1].amount_nano)


async def key_row(stack, key_id: str) -> Any:
    [row] = await stack.db.rows(
        "SELECT limit_nano, limit_window, window_start, spent_nano, reserved_nano "
        "FROM api_keys WHERE id = :k",
        k=key_id,
    )
    return row


async def test_a_capped_key_is_refused_with_its_limit_and_the_other_key_works(stack) -> None:
    user, second = await user_with_two_keys(stack)
    limited = await call(
        stack,
        "PUT",
        f"/billing/keys/{second['id']}/limit",
        user["api_key"],
        200,
        json={"usd": "0.000001", "window": "daily"},
    )
    tomorrow = key_limits.calendar_start(key_limits.Window.DAILY, dt.datetime.now(dt.UTC)) + dt.timedelta(
        days=1
    )
    assert limited["limit"] == {
        "usd": "0.000001",
        "window": "daily",
        "spent_usd": "0.000000",
        "reserved_usd": "0.000000",
        "window_start": key_limits.iso(tomorrow - dt.timedelta(days=1)),
        "resets_at": key_limits.iso(tomorrow),
    }

    status, body = await chat(stack, second["api_key"])
    assert status == 403, body
    error = body["error"]
    assert error["code"] == "key_limit_reached" and "top_up_url" not in error
    assert (error["limit_usd"], error["window"], error["resets_at"]) == (
        "0.000001",
        "daily",
        key_limits.iso(tomorrow),
    )
    assert (
        "daily spend limit of $0.000001" in error["message"] and key_limits.iso(tomorrow) in error["message"]
    )

    status, body = await chat(stack, user["api_key"])  # the wallet's other key
    assert status == 200, body
    await stack.db.settled(user["wallet_id"])

    cleared = await call(stack, "DELETE", f"/billing/keys/{second['id']}/limit", user["api_key"], 200)
    assert cleared["limit"] is None
    status, body = await chat(stack, second["api_key"])
    assert status == 200, body
    await stack.db.settled(user["wallet_id"])


async def test_a_limit_set_on_a_key_in_use_applies_within_the_key_cache_ttl(stack) -> None:
    """The sidecar's key cache says whether a key has a limit (an unlimited key's hold never reads
    the key's row): a limit set on a key in use applies within the cache's TTL, as a revocation."""
    user = await stack.signup()
    status, body = await chat(stack, user["api_key"])  # the key is in the sidecar's cache now
    assert status == 200, body
    await stack.db.settled(user["wallet_id"])
    limited_at = time.monotonic()
    await call(
        stack,
        "PUT",
        f"/billing/keys/{user['key_id']}/limit",
        user["api_key"],
        200,
        json={"usd": "0", "window": "daily"},
    )

    async def refused() -> bool:
        status, body = await chat(stack, user["api_key"])
        return status == 403 and body["error"]["code"] == "key_limit_reached"

    await wait_until_within(
        refused, since=limited_at, bound_s=KEY_CACHE_TTL_MS / 1000 + 0.5, what="refusal of the capped key"
    )
    await stack.db.settled(user["wallet_id"])


async def test_the_list_shows_the_windows_spend_from_the_keys_sums(stack) -> None:
    user, second = await user_with_two_keys(stack)
    hold = await hold_of_one_request(stack, user)
    await call(
        stack,
        "PUT",
        f"/billing/keys/{second['id']}/limit",
        user["api_key"],
        200,
        json={"usd": money.format_usd(10 * hold), "window": "monthly"},
    )
    for _ in range(2):
        status, body = await chat(stack, second["api_key"])
        assert status == 200, body
    await stack.db.settled(user["wallet_id"])
    listed = {k["id"]: k for k in (await call(stack, "GET", "/billing/keys", user["api_key"], 200))["data"]}
    spend = money.format_usd(await stack.db.key_spend(second["id"]))
    assert listed[second["id"]]["limit"]["spent_usd"] == spend == listed[second["id"]]["spend_usd"]
    assert listed[second["id"]]["limit"]["reserved_usd"] == "0.000000"
    assert listed[user["key_id"]]["limit"] is None


async def test_concurrent_requests_on_a_capped_key_never_overrun_it(stack) -> None:
    """30 requests at once on a key capped at five holds' worth, with the other key busy too: at
    no moment do the key's spend and reservations pass the limit, and it ends within it."""
    user, second = await user_with_two_keys(stack)
    hold = await hold_of_one_request(stack, user)
    limit_nano = 5 * hold
    await call(
        stack,
        "PUT",
        f"/billing/keys/{second['id']}/limit",
        user["api_key"],
        200,
        json={"usd": money.format_usd(limit_nano), "window": "total"},
    )
    seen: list[int] = []
    storm_over = asyncio.Event()

    async def watch() -> None:
        while not storm_over.is_set():
            row = await key_row(stack, second["id"])
            seen.append(row.spent_nano + row.reserved_nano)
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    outcomes = await asyncio.gather(
        *(chat(stack, second["api_key"]) for _ in range(30)),
        *(chat(stack, user["api_key"]) for _ in range(5)),
    )
    await stack.db.settled(user["wallet_id"])
    storm_over.set()
    await watcher

    on_capped = outcomes[:30]
    admitted = sum(status == 200 for status, _ in on_capped)
    refused = [body["error"]["code"] for status, body in on_capped if status != 200]
    assert admitted >= 5 and set(refused) <= {"key_limit_reached"}, (admitted, refused)
    assert all(status == 200 for status, _ in outcomes[30:])  # the other key: never refused
    assert seen and max(seen) <= limit_nano
    row = await key_row(stack, second["id"])
    assert row.reserved_nano == 0 and row.spent_nano <= limit_nano
    assert row.spent_nano == await stack.db.key_spend(second["id"])


async def test_the_first_refusal_in_a_window_queues_one_alert(stack, receiver: Receiver) -> None:
    user, second = await user_with_two_keys(stack)
    await call(stack, "PUT", "/billing/alerts", user["api_key"], 200, json={"url": receiver.url + "/hook"})
    await call(
        stack,
        "PUT",
        f"/billing/keys/{second['id']}/limit",
        user["api_key"],
        200,
        json={"usd": "0", "window": "weekly"},
    )
    for _ in range(3):
        status, body = await chat(stack, second["api_key"])
        assert (status, body["error"]["code"]) == (403, "key_limit_reached")

    async def events() -> list[Any]:
        return await stack.db.rows(
            "SELECT data FROM alert_events WHERE wallet_id = :w AND type = 'key.limit_reached'",
            w=user["wallet_id"],
        )

    await wait_until(events, TIMEOUT_S, "the key.limit_reached event")
    [event] = await events()
    data = event.data if isinstance(event.data, dict) else json.loads(event.data)
    week = key_limits.calendar_start(key_limits.Window.WEEKLY, dt.datetime.now(dt.UTC))
    assert data == {
        "key_id": second["id"],
        "limit_usd": "0.000000",
        "window": "weekly",
        "window_start": key_limits.iso(week),
        "resets_at": key_limits.iso(week + dt.timedelta(days=7)),
    }
    # Another refusal in the same window adds no second event.
    status, _ = await chat(stack, second["api_key"])
    assert status == 403
    await stack.db.settled(user["wallet_id"])
    assert len(await events()) == 1


# --- adversarial ----------------------------------------------------------------------------------


BAD_BODIES = [
    ({"usd": "-1.00", "window": "daily"}, "usd"),
    ({"usd": 5.0, "window": "daily"}, "usd"),
    ({"usd": 5, "window": "daily"}, "usd"),
    ({"usd": "5e2", "window": "daily"}, "usd"),
    ({"usd": "5.0000000001", "window": "daily"}, "usd"),
    ({"usd": "99999999999", "window": "daily"}, "usd"),
    ({"usd": "9999999999.999999999", "window": "daily"}, "usd"),
    ({"usd": None, "window": "daily"}, "usd"),
    ({"usd": ["5"], "window": "daily"}, "usd"),
    ({"usd": "NaN", "window": "daily"}, "usd"),
    ({"usd": " 5", "window": "daily"}, "usd"),
    ({"usd": "5.00", "window": "hourly"}, "window"),
    ({"usd": "5.00", "window": "Daily"}, "window"),
    ({"usd": "5.00", "window": 1}, "window"),
    ({"usd": "5.00"}, "window"),
    ({"window": "daily"}, "usd"),
    ({"usd": "5.00", "window": "daily", "wallet_id": "wal_x"}, "wallet_id"),
]


@pytest.mark.parametrize(("body", "param"), BAD_BODIES)
async def test_bad_limits_are_a_specific_400_and_change_nothing(stack, body: dict, param: str) -> None:
    user, second = await user_with_two_keys(stack)
    await call(
        stack,
        "PUT",
        f"/billing/keys/{second['id']}/limit",
        user["api_key"],
        200,
        json={"usd": "1", "window": "daily"},
    )
    before = await key_row(stack, second["id"])
    answer = await call(stack, "PUT", f"/billing/keys/{second['id']}/limit", user["api_key"], 400, json=body)
    assert (answer["error"]["code"], answer["error"]["param"]) == ("invalid_limit", param)
    assert await key_row(stack, second["id"]) == before


async def test_another_wallets_key_answers_exactly_as_a_missing_one(stack) -> None:
    attacker = await stack.signup()
    victim, victim_key = await user_with_two_keys(stack)
    before = await key_row(stack, victim_key["id"])
    missing = "key_" + "0" * 20
    answers = []
    for key_id in (victim_key["id"], missing):
        for method, kwargs in (("PUT", {"json": {"usd": "0", "window": "daily"}}), ("DELETE", {})):
            answer = await call(
                stack, method, f"/billing/keys/{key_id}/limit", attacker["api_key"], 404, **kwargs
            )
            answers.append(answer["error"]["message"].replace(key_id, "KEY"))
    assert len(set(answers)) == 1
    assert await key_row(stack, victim_key["id"]) == before
    status, body = await chat(stack, victim_key["api_key"])
    assert status == 200, body
    await stack.db.settled(victim["wallet_id"])


async def test_a_malformed_key_id_and_a_non_object_body_are_400s(stack) -> None:
    user, second = await user_with_two_keys(stack)
    answer = await call(
        stack,
        "PUT",
        "/billing/keys/not-a-key/limit",
        user["api_key"],
        400,
        json={"usd": "1", "window": "daily"},
    )
    assert answer["error"]["code"] == "invalid_key_id"
    answer = await call(
        stack, "PUT", f"/billing/keys/{second['id']}/limit", user["api_key"], 400, data=b"[1]"
    )
    assert answer["error"]["code"] == "invalid_json"
    assert (await key_row(stack, second["id"])).limit_nano is None
