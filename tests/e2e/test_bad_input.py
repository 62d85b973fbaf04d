"""Every 4xx a client can cause, through real Envoy: the status, the error code in OpenAI's shape,
and nothing written (wallets, keys, ledger entries and holds all keep their row counts)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from yarl import URL

from billing import api_keys, key_format, wallets

pytestmark = pytest.mark.integration

SIGNUP_LIMIT = 3
TAKEN_EMAIL = "taken@example.com"
CHAT = "/v1/chat/completions"
GOOD_BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module", params=["http", "grpc"], ids=["http-check", "grpc-check"])
async def stack(launch_stack, request) -> AsyncIterator[Any]:
    """Every refusal through both of ext_authz's flavours (BILLINGPROXY_CHECK_TRANSPORT)."""
    async with launch_stack(
        BILLINGPROXY_SIGNUP_RATE_PER_MINUTE=str(SIGNUP_LIMIT), BILLINGPROXY_CHECK_TRANSPORT=request.param
    ) as running:
        yield running


@pytest.fixture(scope="module")
async def keyring(stack) -> dict[str, str]:
    """Keys in every state, made in the database (not by signup, which is rate limited here)."""
    async with stack.db.engine.begin() as conn:
        owner = await wallets.signup(conn, email="owner@example.com", grant_nano=10**9)
        wallet_id = owner.wallet.id
        limited = await api_keys.issue_key(
            conn, wallet_id=wallet_id, source="admin", allowed_models=["gpt-4o"]
        )
        revoked = await api_keys.issue_key(conn, wallet_id=wallet_id, source="admin")
        await api_keys.revoke_key(conn, revoked.key_id)
        await wallets.signup(conn, email=TAKEN_EMAIL, grant_nano=10**9)
    good = owner.key.plaintext
    other_char = "A" if good[-1] != "A" else "B"
    return {
        "good": good,
        "limited": limited.plaintext,
        "revoked": revoked.plaintext,
        "unknown": key_format.generate().plaintext,  # well formed, never stored
        "malformed": "sk-litellm-not-a-key",
        "bad_checksum": good[:-1] + other_char,
    }


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str
    status: int
    code: str
    key: str | None = None  # a name in keyring, or None for no Authorization header
    body: bytes | None = None
    authorization: str | None = None  # a raw Authorization header, instead of a key

    def __str__(self) -> str:
        return self.id


def chat(**fields: Any) -> bytes:
    return json.dumps({**GOOD_BODY, **fields}).encode()


def body_without(name: str) -> bytes:
    return json.dumps({k: v for k, v in GOOD_BODY.items() if k != name}).encode()


CASES = [
    # ext_authz Check on /v1/*
    Case("missing key", "POST", CHAT, 401, "missing_api_key", body=chat()),
    Case("empty bearer", "POST", CHAT, 401, "missing_api_key", body=chat(), authorization="Bearer "),
    Case(
        "not a bearer", "POST", CHAT, 401, "missing_api_key", body=chat(), authorization="Basic dXNlcjpwdw=="
    ),
    Case("malformed key", "POST", CHAT, 401, "invalid_api_key", key="malformed", body=chat()),
    Case("bad checksum", "POST", CHAT, 401, "invalid_api_key", key="bad_checksum", body=chat()),
    Case("unknown key", "POST", CHAT, 401, "invalid_api_key", key="unknown", body=chat()),
    Case("revoked key", "POST", CHAT, 401, "revoked_api_key", key="revoked", body=chat()),
    Case("unknown key on GET", "GET", "/v1/models", 401, "invalid_api_key", key="unknown"),
    Case(
        "unpriced model",
        "POST",
        CHAT,
        400,
        "model_not_priced",
        key="good",
        body=chat(model="no-such-model-9"),
    ),
    Case("model not allowed", "POST", CHAT, 400, "model_not_allowed", key="limited", body=chat()),
    Case("non-JSON body", "POST", CHAT, 400, "invalid_json", key="good", body=b"model=gpt-4o-mini"),
    Case("JSON array body", "POST", CHAT, 400, "invalid_json", key="good", body=b"[1, 2]"),
    Case("empty body", "POST", CHAT, 400, "invalid_json", key="good", body=b""),
    Case("missing model", "POST", CHAT, 400, "model_required", key="good", body=body_without("model")),
    Case("model not a string", "POST", CHAT, 400, "model_required", key="good", body=chat(model=4)),
    # the sidecar's HTTP API
    Case("bad email", "POST", "/user/signup", 400, "invalid_email", body=b'{"email": "not-an-email"}'),
    Case("no email", "POST", "/user/signup", 400, "invalid_email", body=b'{"mail": "a@example.com"}'),
    Case("email not a string", "POST", "/user/signup", 400, "invalid_email", body=b'{"email": 42}'),
    Case(
        "email taken",
        "POST",
        "/user/signup",
        409,
        "email_taken",
        body=json.dumps({"email": TAKEN_EMAIL.upper()}).encode(),
    ),
    Case("signup invalid JSON", "POST", "/user/signup", 400, "invalid_json", body=b'{"email": '),
    Case("signup JSON not an object", "POST", "/user/signup", 400, "invalid_json", body=b'"a@example.com"'),
    Case("balance without key", "GET", "/billing/balance", 401, "missing_api_key"),
    Case("balance revoked key", "GET", "/billing/balance", 401, "revoked_api_key", key="revoked"),
    Case("usage limit zero", "GET", "/billing/usage?limit=0", 400, "invalid_parameter", key="good"),
    Case("usage limit text", "GET", "/billing/usage?limit=ten", 400, "invalid_parameter", key="good"),
    Case("usage limit too big", "GET", "/billing/usage?limit=101", 400, "invalid_parameter", key="good"),
    Case("usage before negative", "GET", "/billing/usage?before=-5", 400, "invalid_parameter", key="good"),
    # routing
    Case("unknown path", "GET", "/nope", 404, "not_found"),
    Case("unknown API version", "POST", "/v2/chat/completions", 404, "not_found", key="good", body=chat()),
    Case("unknown billing path", "GET", "/billing/nope", 404, "not_found", key="good"),
    Case("dot-dot out of /v1", "POST", "/v1/../admin/keys", 404, "not_found", key="good", body=chat()),
]


async def send(
    session: aiohttp.ClientSession, url: str, case: Case, keyring: dict[str, str]
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if case.key is not None:
        headers["Authorization"] = f"Bearer {keyring[case.key]}"
    if case.authorization is not None:
        headers["Authorization"] = case.authorization
    async with session.request(case.method, url, data=case.body, headers=headers) as response:
        assert response.content_type == "application/json", (response.content_type, await response.text())
        return response.status, await response.json()


def assert_openai_error(body: Any, code: str) -> dict[str, Any]:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert error["code"] == code, body
    assert isinstance(error["message"], str) and error["message"], body
    assert isinstance(error["type"], str) and error["type"], body
    return error


@pytest.mark.parametrize("case", CASES, ids=str)
async def test_refused_with_its_code_and_nothing_written(stack, keyring, case: Case) -> None:
    counts = await stack.db.row_counts()
    # yarl would normalise "/v1/../admin" away before Envoy saw it.
    url = URL(stack.gateway + case.path, encoded=True)
    status, body = await send(stack.http, url, case, keyring)
    assert status == case.status, body
    error = assert_openai_error(body, case.code)
    if case.code in ("model_not_priced", "model_not_allowed"):
        assert error["param"] == "model"
    if case.code == "invalid_parameter":
        assert error["param"] in ("limit", "before")
    assert await stack.db.row_counts() == counts, f"{case} wrote something"
    assert await stack.db.pending_holds() == 0


async def test_signups_are_rate_limited_per_client_address(stack) -> None:
    # A loopback address of its own: Envoy appends the peer address to X-Forwarded-For, and
    # the limit counts per that last hop, so this client's budget is untouched by other tests.
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=connector) as session:

        async def signup(n: int, forwarded_for: str) -> tuple[int, Any, Any]:
            async with session.post(
                stack.gateway + "/user/signup",
                json={"email": f"burst-{n}@example.com"},
                headers={"X-Forwarded-For": forwarded_for},
            ) as response:
                return response.status, await response.json(), response.headers.get("Retry-After")

        for n in range(SIGNUP_LIMIT):
            # A made-up X-Forwarded-For does not buy a new budget: the last hop is Envoy's.
            status, body, _ = await signup(n, f"10.0.0.{n}")
            assert status == 201, body
        counts = await stack.db.row_counts()
        status, body, retry_after = await signup(SIGNUP_LIMIT, "10.9.9.9")
        assert status == 429, body
        assert_openai_error(body, "rate_limited")
        assert retry_after is not None and int(retry_after) >= 1
        assert await stack.db.row_counts() == counts
        assert not await stack.db.rows(
            "SELECT 1 FROM wallets WHERE email = :e", e=f"burst-{SIGNUP_LIMIT}@example.com"
        )

    # Another address still signs up.
    user = await stack.signup()
    assert user["balance_usd"] == "0.500000"
