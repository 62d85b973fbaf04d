"""The user journey, end to end through real Envoy, the sidecar and PostgreSQL, driven with the
`openai` SDK: signup → the free grant → a plain and a streamed completion, each charged exactly
the price-table cost → depletion → 403 → `billingproxy wallet credit` → served again."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import openai
import pytest

pytestmark = pytest.mark.integration

GRANT_USD = "0.0005"  # small, so that a few requests empty the wallet
# litellm's per-token prices for gpt-4o-mini (model_prices_and_context_window_backup.json).
INPUT_USD_PER_TOKEN = Decimal("1.5e-07")
OUTPUT_USD_PER_TOKEN = Decimal("6e-07")
MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Say hello to the billing proxy"}]
# The demo backend's documented arithmetic: words + 3 per message.
PROMPT_TOKENS = 6 + 3


def cost_nano(prompt_tokens: int, completion_tokens: int) -> int:
    usd = prompt_tokens * INPUT_USD_PER_TOKEN + completion_tokens * OUTPUT_USD_PER_TOKEN
    return math.ceil(usd * 10**9)


def usd_to_nano(text: str) -> int:
    value = Decimal(text) * 10**9
    assert value == value.to_integral_value(), text
    return int(value)


@pytest.fixture(scope="module", params=["http", "grpc"], ids=["http-check", "grpc-check"])
async def stack(launch_stack, request) -> AsyncIterator[Any]:
    """The journey through both of ext_authz's flavours (BILLINGPROXY_CHECK_TRANSPORT)."""
    async with launch_stack(
        BILLINGPROXY_FREE_GRANT_USD=GRANT_USD, BILLINGPROXY_CHECK_TRANSPORT=request.param
    ) as running:
        yield running


async def balance(stack, api_key: str) -> dict[str, Any]:
    async with stack.http.get(
        stack.gateway + "/billing/balance", headers={"Authorization": f"Bearer {api_key}"}
    ) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def charged(stack, wallet_id: str, request_id: str) -> int:
    """Wait for the request's settlement; return what its one ledger entry charged."""
    await stack.db.settled(wallet_id)
    entries = [e for e in await stack.db.ledger(wallet_id) if e.idempotency_key == f"usage:{request_id}"]
    assert len(entries) == 1, entries
    assert entries[0].kind == "usage"
    return -entries[0].amount_nano


async def test_signup_spend_deplete_credit_and_spend_again(stack) -> None:
    grant_nano = usd_to_nano(GRANT_USD)
    user = await stack.signup()
    assert user["balance_usd"] == f"{Decimal(GRANT_USD):.6f}" == "0.000500"
    key, wallet_id = user["api_key"], user["wallet_id"]
    assert key.startswith("sk-litellm-")
    shown = await balance(stack, key)
    assert (shown["balance_usd"], shown["reserved_usd"], shown["state"]) == ("0.000500", "0.000000", "active")
    assert await stack.db.balance(wallet_id) == grant_nano

    with stack.openai(key) as client:
        # 1. A plain completion, charged exactly what the usage costs at the price table. (Its
        # max_tokens keeps its worst case within the small grant: a self-service wallet has no
        # overdraft, and without one the hold assumes thousands of output tokens.)
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=16)
        completion = raw.parse()
        request_id = raw.headers["x-request-id"]
        assert completion.choices[0].message.content.startswith("token")
        assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (PROMPT_TOKENS, 16)
        first_cost = cost_nano(completion.usage.prompt_tokens, completion.usage.completion_tokens)
        assert await charged(stack, wallet_id, request_id) == first_cost
        expected = grant_nano - first_cost
        assert await stack.db.balance(wallet_id) == expected
        assert usd_to_nano((await balance(stack, key))["balance_usd"]) == expected

        # The backend saw the gateway's credential, never the client's key.
        seen = await stack.backend_last_request()
        assert seen["headers"]["authorization"] == f"Bearer {stack.settings.backend_api_key}"
        assert key not in repr(seen)
        # The Check's answer headers became metadata for the access log, not request headers.
        assert not [h for h in seen["headers"] if h.startswith(("x-billingproxy-", "x-envoy-auth"))], seen[
            "headers"
        ]

        # 2. A streamed completion; the client does not ask for usage, the gateway does.
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=5, stream=True
        )
        request_id = raw.headers["x-request-id"]
        usage, text = None, ""
        with raw.parse() as stream:
            for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    text += choice.delta.content or ""
        assert text == " ".join(["token"] * 5)
        assert usage is not None, "the gateway did not add stream_options.include_usage"
        assert (usage.prompt_tokens, usage.completion_tokens) == (PROMPT_TOKENS, 5)
        assert (await stack.backend_last_request())["body"]["stream_options"] == {"include_usage": True}
        stream_cost = cost_nano(usage.prompt_tokens, usage.completion_tokens)
        assert await charged(stack, wallet_id, request_id) == stream_cost
        expected -= stream_cost
        assert await stack.db.balance(wallet_id) == expected

        # 3. Spend until the money is gone: served while the request's worst case (its hold) fits
        # in the balance, then 403 — a self-service wallet never goes below zero.
        big_cost = cost_nano(PROMPT_TOKENS, 256)
        big_hold = None
        served = 0
        for _ in range(math.ceil(expected / big_cost) + 3):
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=MESSAGES, max_tokens=256
                )
            except openai.PermissionDeniedError as refused:
                denial = refused
                break
            served += 1
            assert await charged(stack, wallet_id, raw.headers["x-request-id"]) == big_cost
            big_hold = (await stack.db.hold(raw.headers["x-request-id"])).amount_nano
            assert big_hold >= big_cost
            assert expected >= big_hold, "admitted with less than its worst case left"
            expected -= big_cost
            assert await stack.db.balance(wallet_id) == expected
        else:
            pytest.fail("the wallet was never refused")
        assert served >= 1 and big_hold is not None
        assert 0 <= expected < big_hold

        assert denial.status_code == 403
        error = denial.response.json()["error"]
        assert error["message"] == "Insufficient funds. Please top up."
        assert error["code"] == "insufficient_funds" == denial.code
        assert error["top_up_url"].startswith(stack.gateway + "/")
        shown = await balance(stack, key)
        assert usd_to_nano(shown["balance_usd"]) == expected
        assert shown["overdraft_limit_usd"] == "0.000000"
        # Money is left, only not enough for this request's worst case: still active.
        assert shown["state"] == ("active" if expected > 0 else "empty")
        counts = await stack.db.row_counts()
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert await stack.db.row_counts() == counts, "a refused request wrote something"

        # 4. An operator credits the wallet with the real command; the next request is served.
        done = await stack.db.acli("wallet", "credit", user["email"], "1.00", "--reference", "r1")
        assert done.returncode == 0, done.stderr
        assert "credited 1.000000 USD" in done.stdout
        expected += 1_000_000_000
        assert await stack.db.balance(wallet_id) == expected

        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
        completion = raw.parse()
        last_cost = cost_nano(completion.usage.prompt_tokens, completion.usage.completion_tokens)
        assert last_cost == first_cost
        assert await charged(stack, wallet_id, raw.headers["x-request-id"]) == last_cost
        expected -= last_cost
        assert await stack.db.balance(wallet_id) == expected
        assert (await balance(stack, key))["state"] == "active"

    kinds = [e.kind for e in await stack.db.ledger(wallet_id)]
    assert kinds == ["grant", "usage", "usage"] + ["usage"] * served + ["credit", "usage"]
    assert sum(e.amount_nano for e in await stack.db.ledger(wallet_id)) == expected

    # And it was the flavour this run asked for that Envoy called (its cluster counters).
    checks = await envoy_counter(stack, "cluster.billing_sidecar_check.upstream_rq_total")
    assert (checks > 0) == (stack.settings.check_transport == "http"), (
        stack.settings.check_transport,
        checks,
    )


async def envoy_counter(stack, name: str) -> int:
    (line,) = (await stack.stack.envoy.admin_get("/stats", {"filter": f"^{name}$"})).strip().splitlines()
    return int(line.split(": ")[1])


async def test_without_a_backend_credential_the_clients_key_never_reaches_the_backend(launch_stack) -> None:
    """No BILLINGPROXY_BACKEND_API_KEY: the Check tells Envoy to remove the client's key."""
    async with launch_stack(BILLINGPROXY_BACKEND_API_KEY="") as bare:
        user = await bare.signup()
        client = openai.AsyncOpenAI(api_key=user["api_key"], base_url=bare.gateway + "/v1", max_retries=0)
        completion = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
        await client.close()
        assert completion.usage.completion_tokens == 2
        seen = await bare.backend_last_request()
        assert "authorization" not in seen["headers"]
        assert user["api_key"] not in repr(seen)
        await bare.db.settled(user["wallet_id"])


async def test_the_responses_api_is_charged_its_exact_cost_streamed_or_not(stack) -> None:
    """OpenAI's Responses API names usage input_tokens / output_tokens; both shapes are billed
    from the backend's own count, never the hold's estimate."""
    user = await stack.signup()
    client = openai.AsyncOpenAI(api_key=user["api_key"], base_url=stack.gateway + "/v1", max_retries=0)
    try:
        raw = await client.responses.with_raw_response.create(
            model=MODEL, input="Say hello to the billing proxy", max_output_tokens=5
        )
        reply = raw.parse()
        assert (reply.usage.input_tokens, reply.usage.output_tokens) == (PROMPT_TOKENS, 5)
        assert await charged(stack, user["wallet_id"], raw.headers["x-request-id"]) == cost_nano(
            PROMPT_TOKENS, 5
        )

        raw = await client.responses.with_raw_response.create(
            model=MODEL, input="Say hello to the billing proxy", max_output_tokens=3, stream=True
        )
        events = [event async for event in raw.parse()]
        completed = [e for e in events if e.type == "response.completed"]
        assert len(completed) == 1 and completed[0].response.usage.output_tokens == 3
        assert await charged(stack, user["wallet_id"], raw.headers["x-request-id"]) == cost_nano(
            PROMPT_TOKENS, 3
        )
    finally:
        await client.close()
    entries = [e for e in await stack.db.ledger(user["wallet_id"]) if e.kind == "usage"]
    assert {e.details["usage_source"] for e in entries} == {"response"}
