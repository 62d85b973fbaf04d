"""Issue 10's last line: the threat model checked again by an adversarial run (room ``redteam``).

An attacker with one cheap key, through real Envoy and the demo backend. Each test here failed on
the code it was written against (da5ef45); each names what it found. Where the hole needs a real
provider's behaviour, the demo backend is told (``x-demo-usage``) to report what that provider
documents it would report for the same request — the gateway trusts that number and nothing caps
the charge at the hold, so the demo's report is enough to show the bound broken.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from billing import money, wallets

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
MESSAGES = "/v1/messages"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
async def stack(launch_stack) -> AsyncIterator[Any]:
    async with launch_stack() as running:
        yield running


async def new_wallet(stack, balance_usd: str) -> tuple[str, str]:
    """A self-service wallet (overdraft limit 0) holding ``balance_usd``: (wallet id, key)."""
    async with stack.db.engine.begin() as conn:
        account = await wallets.signup(
            conn,
            email=f"redteam-{uuid.uuid4().hex[:12]}@example.com",
            grant_nano=money.parse_usd(balance_usd),
        )
    return account.wallet.id, account.key.plaintext


async def post(stack, key: str, path: str, body: dict | bytes, **headers: str) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}", **headers}
    async with stack.http.post(stack.gateway + path, data=data, headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def backend_last(stack) -> dict[str, Any]:
    """The last /v1 request the demo backend saw ({} before the first)."""
    async with stack.http.get(stack.backend + "/_demo/last_request") as response:
        return await response.json() if response.status == 200 else {}


async def backend_fingerprint(stack) -> str:
    return json.dumps(await backend_last(stack), sort_keys=True)


# --- a model whose every call carries a per-query fee --------------------------------------------


@pytest.mark.parametrize("model", ["gpt-4o-mini-search-preview", "gpt-4o-search-preview", "gpt-5-search-api"])
async def test_a_model_that_always_searches_is_not_billed_tokens_only(stack, model: str) -> None:
    """OpenAI's search models search on every call (``web_search_options`` is optional for them)
    and bill a per-call fee ($25/1k calls for gpt-4o(-mini)-search-preview, $10/1k for
    gpt-5-search-api; litellm: ``search_context_cost_per_query``). The Check refuses the
    ``web_search_options`` field and treats the fee as "not applicable", so a plain request is
    admitted and billed tokens only: found $0.00001035 charged for a call that costs the operator
    ≥ $0.025 (≈2 400×). Expected: 400 model_not_priced naming the per-query dimension, nothing
    reaching the backend."""
    _, key = await new_wallet(stack, "0.50")
    seen = await backend_fingerprint(stack)
    status, answer = await post(stack, key, CHAT, {"model": model, "messages": HI, "max_tokens": 16})
    assert status == 400, f"served ({status}) and billed tokens only: {answer}"
    assert answer["error"]["code"] == "model_not_priced"
    assert await backend_fingerprint(stack) == seen, "the backend was reached"


# --- a request the backend served, voided because the client left first --------------------------


async def test_a_client_that_hangs_up_before_the_answer_is_not_voided(stack, wait_until) -> None:
    """A non-streamed request is forwarded, the backend works on it (a provider bills it: it
    does not stop a non-streamed generation when its caller leaves), and the client closes its
    connection before the answer's headers. Envoy logs status 0 (flag DC); the sidecar voids
    every non-2xx, so the hold is released and nothing is charged. Repeated, it spends the
    operator's backend credential for free (every request's full cost, e.g. 16 384 output tokens
    of gpt-4o-mini ≈ $0.0098 each, or a slow o1-pro answer). Expected: a request that reached
    the backend and has no answer status is charged its hold (the policy for unfinished answers),
    never voided."""
    wallet_id, key = await new_wallet(stack, "0.50")
    marker = f"hang-up {uuid.uuid4().hex}"
    body = json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": marker}], "max_tokens": 200}
    ).encode()
    gateway = urlsplit(stack.gateway)
    head = (
        f"POST {CHAT} HTTP/1.1\r\nhost: {gateway.hostname}\r\nauthorization: Bearer {key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\nx-demo-delay-ms: 1500\r\n\r\n"
    ).encode()

    async def reached() -> bool:
        return marker in json.dumps(await backend_last(stack))

    _, writer = await asyncio.open_connection(gateway.hostname, gateway.port)
    try:
        writer.write(head + body)
        await writer.drain()
        # The Check admitted it and the backend has it; its answer is x-demo-delay-ms away.
        await wait_until(reached, 5, "the request reaching the backend")
    finally:
        writer.close()
    await stack.db.settled(wallet_id)
    [hold] = await stack.db.holds(wallet_id)
    assert hold.state == "posted", (
        f"the backend served it, but the hold was {hold.state}: the wallet paid nothing "
        f"(balance {money.format_usd(await stack.db.balance(wallet_id))})"
    )


# --- settlement beyond the hold: the overdraft bound broken ---------------------------------------


async def test_a_long_context_beta_cannot_take_a_wallet_below_its_limit(stack) -> None:
    """``anthropic-beta`` is on the upstream allow-list, and ``context-1m-2025-08-07`` lifts
    claude-sonnet-4-5's window from 200k to 1M tokens (billed $6/$22.50 per M above 200k; this
    litellm map has no such tier for it). The Check caps the prompt bound at the map's 200k
    window, so a 1 MB prompt is held as 200k tokens ($1.20) while the provider reports 900k
    (≤ one per byte) and the gateway charges $2.70 (Anthropic bills $5.40). Found: a $1.25
    self-service wallet (overdraft limit $0) at −$1.45. Expected: never below −limit (refuse
    the beta, or hold the 1M window at the long-context rates)."""
    wallet_id, key = await new_wallet(stack, "1.25")
    prompt = "a " * 500_000  # 1 000 000 bytes of text: at most 1M tokens, within the beta's window
    status, answer = await post(
        stack,
        key,
        MESSAGES,
        {"model": "claude-sonnet-4-5", "max_tokens": 1, "messages": [{"role": "user", "content": prompt}]},
        **{
            "anthropic-beta": "context-1m-2025-08-07",
            "x-demo-usage": json.dumps({"input_tokens": 900_000, "output_tokens": 1}),
        },
    )
    await stack.db.settled(wallet_id)
    balance = await stack.db.balance(wallet_id)
    assert balance >= 0, (
        f"admitted ({status}), held at most $1.25 and charged more: balance {money.format_usd(balance)}"
    )


async def test_provider_injected_tool_prompts_cannot_take_a_wallet_below_its_limit(stack) -> None:
    """The prompt bound is one token per body byte, but Anthropic adds tokens that are not in the
    body: the tool-use system prompt (346 tokens), and for the computer-use tool a 466–499-token
    system prompt plus a 735-token tool definition (Anthropic's tool-use pricing table). The
    Check admits ``computer_*``/``bash_*``/``text_editor_*`` tools as client tools and holds the
    ~230-byte body as ~230 tokens ($0.0014); the provider reports 1 210 input tokens ($0.0036).
    Found: a $0.002 self-service wallet at −$0.0016 after one request (and −$0.0022 more per
    concurrent one). Expected: never below −limit (hold the documented overhead per tool)."""
    wallet_id, key = await new_wallet(stack, "0.002")
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1,
        "tools": [
            {
                "type": "computer_20250124",
                "name": "computer",
                "display_width_px": 1024,
                "display_height_px": 768,
            }
        ],
        "messages": [{"role": "user", "content": "x"}],
    }
    status, answer = await post(
        stack,
        key,
        MESSAGES,
        body,
        **{
            "anthropic-beta": "computer-use-2025-01-24",
            "x-demo-usage": json.dumps({"input_tokens": 1_210, "output_tokens": 1}),
        },
    )
    await stack.db.settled(wallet_id)
    balance = await stack.db.balance(wallet_id)
    assert balance >= 0, (
        f"admitted ({status}) on a $0.002 wallet and charged beyond its hold: balance "
        f"{money.format_usd(balance)}"
    )


# --- work the gateway cannot meter, or another tenant's stored objects ----------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        # A file stored at the provider (shared account: maybe another tenant's), read by id.
        (
            CHAT,
            {
                "model": "gpt-4o-mini",
                "max_tokens": 1,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "file", "file": {"file_id": "file-OtherTenant123"}}],
                    }
                ],
            },
        ),
        (
            RESPONSES,
            {
                "model": "gpt-4o-mini",
                "max_output_tokens": 16,
                "input": [
                    {"role": "user", "content": [{"type": "input_file", "file_id": "file-OtherTenant123"}]}
                ],
            },
        ),
        (
            RESPONSES,
            {
                "model": "gpt-4o-mini",
                "max_output_tokens": 16,
                "input": [
                    {"role": "user", "content": [{"type": "input_image", "file_id": "file-OtherTenant123"}]}
                ],
            },
        ),
        # Anthropic's Files API (anthropic-beta files-api-2025-04-14 is on the allow-list).
        (
            MESSAGES,
            {
                "model": "claude-sonnet-4-5",
                "max_tokens": 1,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "document", "source": {"type": "file", "file_id": "file_011Other"}}
                        ],
                    }
                ],
            },
        ),
        # Gemini's OpenAI endpoint reads extra_body.google.cached_content: a stored cache.
        (
            CHAT,
            {
                "model": "gemini/gemini-2.5-flash",
                "max_tokens": 1,
                "messages": HI,
                "extra_body": {"google": {"cached_content": "cachedContents/other-tenant"}},
            },
        ),
    ],
    ids=[
        "chat-file-id",
        "responses-input-file-id",
        "responses-input-image-file-id",
        "anthropic-document-file-id",
        "gemini-cached-content",
    ],
)
async def test_objects_stored_at_the_provider_are_refused(stack, path: str, body: dict) -> None:
    """billing/endpoints.py says references to objects stored at the provider are refused
    ("their tokens are not in the body, and they may belong to another tenant of the shared
    account"), but only Responses ``item_reference`` is: file ids and Gemini's cached content
    are admitted (held at the context window) and forwarded with the operator's credential.
    Expected: 400 parameter_not_supported, nothing reaching the backend."""
    _, key = await new_wallet(stack, "5.00")
    seen = await backend_fingerprint(stack)
    status, answer = await post(stack, key, path, body)
    assert status == 400, f"forwarded ({status}): {answer}"
    assert answer["error"]["code"] == "parameter_not_supported"
    assert await backend_fingerprint(stack) == seen, "the backend was reached"


async def test_litellm_client_side_fallbacks_are_refused(stack) -> None:
    """With a LiteLLM proxy as the backend (README: a supported backend), the body's
    ``fallbacks`` + ``mock_testing_fallbacks: true`` make LiteLLM serve another model group
    (LiteLLM docs, "Client-Side Fallbacks"). The Check prices the body's ``model``: ask for
    gpt-4o-mini ($0.15/$0.60 per M) with ``fallbacks: ["o1-pro"]`` ($150/$600 per M) and be
    served o1-pro at 1/1000 of its price. Today the body is admitted and forwarded as is.
    Expected: 400 parameter_not_supported for fields that choose another model."""
    _, key = await new_wallet(stack, "0.50")
    seen = await backend_fingerprint(stack)
    status, answer = await post(
        stack,
        key,
        CHAT,
        {
            "model": "gpt-4o-mini",
            "messages": HI,
            "max_tokens": 1,
            "fallbacks": ["o1-pro"],
            "mock_testing_fallbacks": True,
        },
    )
    assert status == 400, f"forwarded ({status}): {answer}"
    assert await backend_fingerprint(stack) == seen, "the backend was reached"


# --- 5xx and a traceback for one bad field ----------------------------------------------------------


@pytest.mark.parametrize("tier", [[], {}, ["default"]])
async def test_an_unhashable_service_tier_is_a_400_not_a_503(stack, tier: object) -> None:
    """``service_tier`` as a list or object makes ``tier not in frozenset`` raise TypeError in
    the Check: 503 billing_unavailable and a traceback in the sidecar's log per request (any key
    holder can fill the log). Expected: 400 invalid_parameter, nothing written."""
    _, key = await new_wallet(stack, "0.50")
    counts = await stack.db.row_counts()
    status, answer = await post(
        stack, key, CHAT, {"model": "gpt-4o-mini", "messages": HI, "service_tier": tier}
    )
    assert (status, answer["error"]["code"]) == (400, "invalid_parameter"), (status, answer)
    assert await stack.db.row_counts() == counts
