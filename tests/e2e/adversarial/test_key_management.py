"""Attacks on self-service key management (GET/POST /billing/keys, DELETE /billing/keys/{key_id}),
through the real gateway (Envoy, the sidecar, PostgreSQL):

- one wallet's key tampering with key ids cannot list or revoke another wallet's keys, nor learn
  that an id exists (a foreign id answers exactly as an unknown one);
- a revoked key mints no key and revokes none, even while the sidecar's key cache would still
  admit it; a key revoked through the API is refused by the gateway within the cache's TTL;
- bad ids and bodies get a specific 4xx and write nothing;
- a wallet keeps its last active key, even when two keys revoke each other at once;
- the per-wallet cap holds when 30 creations race;
- a wallet whose keys belong to the operator (Kubernetes, admin) cannot manage them here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from support.waiting import wait_until_within

from billing import api_keys, key_format, wallets

pytestmark = pytest.mark.integration

KEYS_MAX = 5
KEY_CACHE_TTL_MS = 1000  # the longest allowed: the window in which the cache still admits a revoked key
CHAT = "/v1/chat/completions"
CHAT_BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
async def stack(launch_stack) -> AsyncIterator[Any]:
    async with launch_stack(
        BILLINGPROXY_KEYS_PER_WALLET_MAX=str(KEYS_MAX), BILLINGPROXY_KEY_CACHE_TTL_MS=str(KEY_CACHE_TTL_MS)
    ) as running:
        yield running


async def call(
    stack, method: str, path: str, key: str | None, headers: dict[str, str] | None = None, **kwargs: Any
) -> tuple[int, Any]:
    headers = {**(headers or {}), **({"Authorization": f"Bearer {key}"} if key else {})}
    async with stack.http.request(method, stack.gateway + path, headers=headers, **kwargs) as response:
        assert response.content_type == "application/json", await response.text()
        return response.status, await response.json()


def assert_error(status: int, body: Any, expected_status: int, code: str) -> dict[str, Any]:
    assert status == expected_status, body
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert body["error"]["message"] and body["error"]["type"], body
    return body["error"]


async def keys_snapshot(stack) -> list[Any]:
    """Every key row's id and revocation: what "nothing written" means for key management."""
    rows = await stack.db.rows("SELECT id, wallet_id, revoked_at FROM api_keys ORDER BY id")
    return [tuple(row) for row in rows]


async def active_keys(stack, wallet_id: str) -> int:
    return await stack.db.scalar(
        "SELECT count(*) FROM api_keys WHERE wallet_id = :w AND revoked_at IS NULL", w=wallet_id
    )


async def test_a_key_cannot_reach_another_wallets_keys(stack) -> None:
    alice, mallory = await stack.signup(), await stack.signup()
    status, body = await call(stack, "POST", "/billing/keys", alice["api_key"], json={})
    assert status == 201, body
    alice_second = body

    status, listing = await call(stack, "GET", "/billing/keys", mallory["api_key"])
    assert status == 200 and [k["id"] for k in listing["data"]] == [mallory["key_id"]]

    before = await keys_snapshot(stack)
    unknown_id = key_format.random_id(key_format.ID_PREFIX)
    answers = {}
    for target in (alice["key_id"], alice_second["id"], unknown_id):
        status, body = await call(stack, "DELETE", f"/billing/keys/{target}", mallory["api_key"])
        error = assert_error(status, body, 404, "key_not_found")
        answers[target] = {**error, "message": error["message"].replace(target, "<id>")}
    # An id of another wallet answers exactly as an id nobody has.
    assert answers[alice["key_id"]] == answers[alice_second["id"]] == answers[unknown_id]
    assert await keys_snapshot(stack) == before
    # Alice's keys still work.
    with stack.openai(alice_second["api_key"]) as client:
        client.chat.completions.create(**CHAT_BODY)
    await stack.db.settled(alice["wallet_id"])


async def test_a_revoked_key_mints_nothing_even_inside_the_cache_ttl(stack) -> None:
    user = await stack.signup()
    status, doomed = await call(stack, "POST", "/billing/keys", user["api_key"])
    assert status == 201, doomed
    # The doomed key lists the wallet's keys: it is in the sidecar's key cache now.
    status, _ = await call(stack, "GET", "/billing/keys", doomed["api_key"])
    assert status == 200

    status, body = await call(stack, "DELETE", f"/billing/keys/{doomed['id']}", user["api_key"])
    assert status == 200 and body["state"] == "revoked", body
    before = await keys_snapshot(stack)
    # At once, well inside the cache's TTL: the route reads the key again before it writes.
    status, body = await call(stack, "POST", "/billing/keys", doomed["api_key"])
    assert_error(status, body, 401, "revoked_api_key")
    status, body = await call(stack, "DELETE", f"/billing/keys/{user['key_id']}", doomed["api_key"])
    assert_error(status, body, 401, "revoked_api_key")
    assert await keys_snapshot(stack) == before
    assert await active_keys(stack, user["wallet_id"]) == 1


async def test_a_new_key_revoked_is_refused_within_the_cache_ttl(stack) -> None:
    user = await stack.signup()
    status, created = await call(stack, "POST", "/billing/keys", user["api_key"])
    assert status == 201, created
    status, _ = await call(stack, "POST", CHAT, created["api_key"], json=CHAT_BODY)
    assert status == 200
    await stack.db.settled(user["wallet_id"])

    revoked_at = time.monotonic()
    status, body = await call(stack, "DELETE", f"/billing/keys/{created['id']}", user["api_key"])
    assert status == 200, body

    async def refused() -> bool:
        status, body = await call(stack, "POST", CHAT, created["api_key"], json=CHAT_BODY)
        return status == 401 and body["error"]["code"] == "revoked_api_key"

    # Half a second of margin for the DELETE's own answer to arrive after its commit.
    await wait_until_within(
        refused, since=revoked_at, bound_s=KEY_CACHE_TTL_MS / 1000 + 0.5, what="refusal of the revoked key"
    )
    await stack.db.settled(user["wallet_id"])


BAD_REQUESTS = [
    # (id, method, path, body, content type, status, code)
    ("malformed id", "DELETE", "/billing/keys/not-a-key", None, None, 400, "invalid_key_id"),
    ("id with a quote", "DELETE", "/billing/keys/key_abc'--", None, None, 400, "invalid_key_id"),
    ("id too long", "DELETE", "/billing/keys/key_" + "a" * 65, None, None, 400, "invalid_key_id"),
    ("unknown id", "DELETE", "/billing/keys/key_" + "a" * 20, None, None, 404, "key_not_found"),
    ("no id", "DELETE", "/billing/keys/", None, None, 404, "not_found"),
    ("PUT on the list", "PUT", "/billing/keys", b"{}", "application/json", 405, "method_not_allowed"),
    ("body not JSON", "POST", "/billing/keys", b"name=x", "application/json", 400, "invalid_json"),
    ("body an array", "POST", "/billing/keys", b"[]", "application/json", 400, "invalid_json"),
    ("body truncated", "POST", "/billing/keys", b'{"a": ', "application/json", 400, "invalid_json"),
    (
        "a field",
        "POST",
        "/billing/keys",
        b'{"name": "ci"}',
        "application/json",
        400,
        "parameter_not_supported",
    ),
    (
        "a limit",
        "POST",
        "/billing/keys",
        b'{"limit_usd": "5.00"}',
        "application/json",
        400,
        "parameter_not_supported",
    ),
    (
        "body too large",
        "POST",
        "/billing/keys",
        b"{" + b" " * 70_000 + b"}",
        "application/json",
        413,
        "body_too_large",
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "content_type", "status", "code"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
async def test_bad_input_gets_its_4xx_and_writes_nothing(
    stack, method: str, path: str, body: bytes | None, content_type: str | None, status: int, code: str
) -> None:
    user = await stack.signup()
    counts, before = await stack.db.row_counts(), await keys_snapshot(stack)
    headers = {"Content-Type": content_type} if content_type else {}
    answer_status, answer = await call(stack, method, path, user["api_key"], data=body, headers=headers)
    error = assert_error(answer_status, answer, status, code)
    if code in ("invalid_key_id", "key_not_found"):
        assert error["param"] == "key_id"
    assert await stack.db.row_counts() == counts
    assert await keys_snapshot(stack) == before


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
@pytest.mark.parametrize(
    ("authorization", "code"),
    [(None, "missing_api_key"), ("sk-litellm-nope", "invalid_api_key"), ("unknown", "invalid_api_key")],
)
async def test_no_usable_key_is_401(stack, method: str, authorization: str | None, code: str) -> None:
    user = await stack.signup()
    key = key_format.generate().plaintext if authorization == "unknown" else authorization
    path = "/billing/keys" if method != "DELETE" else f"/billing/keys/{user['key_id']}"
    before = await keys_snapshot(stack)
    assert_error(*await call(stack, method, path, key), 401, code)
    assert await keys_snapshot(stack) == before


async def test_the_last_key_cannot_be_revoked(stack) -> None:
    user = await stack.signup()
    before = await keys_snapshot(stack)
    status, body = await call(stack, "DELETE", f"/billing/keys/{user['key_id']}", user["api_key"])
    assert_error(status, body, 409, "last_key")
    assert await keys_snapshot(stack) == before

    # With a second key, a key may revoke itself; then the other is the last.
    status, second = await call(stack, "POST", "/billing/keys", user["api_key"])
    assert status == 201, second
    status, body = await call(stack, "DELETE", f"/billing/keys/{second['id']}", second["api_key"])
    assert status == 200 and body["current"] is True and body["state"] == "revoked", body
    assert await active_keys(stack, user["wallet_id"]) == 1


async def test_two_keys_revoking_each_other_at_once_leave_one(stack) -> None:
    for _ in range(5):
        user = await stack.signup()
        status, second = await call(stack, "POST", "/billing/keys", user["api_key"])
        assert status == 201, second
        answers = await asyncio.gather(
            call(stack, "DELETE", f"/billing/keys/{second['id']}", user["api_key"]),
            call(stack, "DELETE", f"/billing/keys/{user['key_id']}", second["api_key"]),
        )
        statuses = sorted(status for status, _ in answers)
        # One revokes; the other finds its own key revoked (401) or the other key the last (409).
        assert statuses[0] == 200 and statuses[1] in (401, 409), answers
        assert await active_keys(stack, user["wallet_id"]) == 1


async def test_the_cap_holds_when_thirty_creations_race(stack) -> None:
    user = await stack.signup()
    answers = await asyncio.gather(
        *(call(stack, "POST", "/billing/keys", user["api_key"]) for _ in range(30))
    )
    created = [body for status, body in answers if status == 201]
    refused = [body for status, body in answers if status != 201]
    assert len(created) == KEYS_MAX - 1, answers  # the signup's key is the first
    for body in refused:
        assert body["error"]["code"] == "too_many_keys", body
    assert await active_keys(stack, user["wallet_id"]) == KEYS_MAX
    status, listing = await call(stack, "GET", "/billing/keys", user["api_key"])
    assert status == 200 and len(listing["data"]) == KEYS_MAX

    # Revoking one makes room for exactly one.
    status, _ = await call(stack, "DELETE", f"/billing/keys/{created[0]['id']}", user["api_key"])
    assert status == 200
    assert (await call(stack, "POST", "/billing/keys", user["api_key"]))[0] == 201
    assert_error(*await call(stack, "POST", "/billing/keys", user["api_key"]), 409, "too_many_keys")


async def test_an_operator_managed_wallet_cannot_manage_its_keys_here(stack) -> None:
    async with stack.db.engine.begin() as conn:
        wallet = await wallets.create_wallet(conn, source="admin", grant_nano=10**9)
        issued = await api_keys.issue_key(conn, wallet_id=wallet.id, source="admin")
        await api_keys.issue_key(conn, wallet_id=wallet.id, source="admin")
    before = await keys_snapshot(stack)
    for method, path in (
        ("GET", "/billing/keys"),
        ("POST", "/billing/keys"),
        ("DELETE", f"/billing/keys/{issued.key_id}"),
    ):
        assert_error(*await call(stack, method, path, issued.plaintext), 403, "keys_managed_elsewhere")
    assert await keys_snapshot(stack) == before
