"""Issue 10, finding 3, end to end: every dimension an answer reports is charged at its own price
(Anthropic's cache writes and reads, audio tokens, reasoning), never folded into another or billed
$0 — checked against litellm's prices, worked out here by hand."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest

from billing import money, pricing, wallets

pytestmark = pytest.mark.integration

NANO = Decimal(10**9)


@pytest.fixture(scope="module")
async def stack(launch_stack) -> AsyncIterator[Any]:
    async with launch_stack() as running:
        yield running


async def funded(stack, usd: str = "20.00") -> tuple[str, str]:
    async with stack.db.engine.begin() as conn:
        account = await wallets.signup(
            conn, email=f"dims-{uuid.uuid4().hex[:10]}@example.com", grant_nano=money.parse_usd(usd)
        )
    return account.wallet.id, account.key.plaintext


async def charged(stack, wallet_id: str) -> dict[str, Any]:
    """The wallet's one usage entry, once settled."""
    await stack.db.settled(wallet_id)
    entries = [e for e in await stack.db.ledger(wallet_id) if e.kind == "usage"]
    assert len(entries) == 1, entries
    return {"nano": -entries[0].amount_nano, **entries[0].details}


async def post(stack, key: str, path: str, body: dict[str, Any], **headers: str) -> str:
    headers = {"content-type": "application/json", "x-api-key": key, **headers}
    async with stack.http.post(stack.gateway + path, data=json.dumps(body), headers=headers) as response:
        text = await response.text()
        assert response.status == 200, text
        return text


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_anthropic_cache_writes_and_reads_are_each_charged_their_price(stack, stream: bool) -> None:
    wallet_id, key = await funded(stack)
    prompt = "word " * 40  # 40 words + 3 per message = 43 prompt tokens in all
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 20,
        "stream": stream,
        "messages": [{"role": "user", "content": prompt}],
    }
    await post(
        stack,
        key,
        "/v1/messages",
        body,
        **{
            "x-demo-cached-tokens": "10",
            "x-demo-cache-write-tokens": "20",
            "x-demo-cache-write-1h-tokens": "5",
        },
    )
    # claude-sonnet-4-5: input 3e-6, cache read 3e-7, 5-minute write 3.75e-6, 1-hour write 6e-6,
    # output 1.5e-5 per token; 43 - 10 - 20 - 5 = 8 uncached input tokens; 20 output tokens.
    expected = (
        8 * Decimal("3e-6")
        + 10 * Decimal("3e-7")
        + 20 * Decimal("3.75e-6")
        + 5 * Decimal("6e-6")
        + 20 * Decimal("1.5e-5")
    )
    entry = await charged(stack, wallet_id)
    assert entry["nano"] == int(expected * NANO)  # exact: no rounding needed here
    assert (
        entry["input_text"],
        entry["input_cached"],
        entry["input_cache_write_5m"],
        entry["input_cache_write_1h"],
        entry["output_text"],
    ) == (8, 10, 20, 5, 20)


async def test_reasoning_tokens_are_charged_as_output(stack) -> None:
    wallet_id, key = await funded(stack)
    # No output limit: the demo's reasoning comes on top of its 16-word answer, where a real
    # provider counts it inside max_completion_tokens; the hold is then the model's limit.
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a b c"}]}
    await post(stack, key, "/v1/chat/completions", body, **{"x-demo-reasoning-tokens": "30"})
    # 3 words + 3 = 6 prompt tokens at 1.5e-7; 16 text + 30 reasoning tokens at 6e-7.
    expected = 6 * Decimal("1.5e-7") + 46 * Decimal("6e-7")
    entry = await charged(stack, wallet_id)
    assert entry["nano"] == int(expected * NANO)
    assert (entry["output_text"], entry["output_reasoning"]) == (16, 30)


async def test_audio_tokens_are_charged_at_the_audio_price(stack) -> None:
    wallet_id, key = await funded(stack)
    body = {
        "model": "azure/gpt-audio-mini",
        "max_tokens": 4,
        "modalities": ["text", "audio"],
        "audio": {"voice": "alloy", "format": "wav"},
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hello there"},
                    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                ],
            }
        ],
    }
    await post(stack, key, "/v1/chat/completions", body)
    entry = await charged(stack, wallet_id)
    price = pricing.load().price("azure/gpt-audio-mini")
    assert price is not None
    # 2 words + 3 = 5 text prompt tokens, 10 audio prompt tokens; 4 text + 8 audio completion tokens.
    assert (entry["input_text"], entry["input_audio"], entry["output_text"], entry["output_audio"]) == (
        5,
        10,
        4,
        8,
    )
    expected = (
        5 * price.per_token["input_text"]
        + 10 * price.per_token["input_audio"]
        + 4 * price.per_token["output_text"]
        + 8 * price.per_token["output_audio"]
    )
    assert price.per_token["input_audio"] > price.per_token["input_text"]  # the point of the test
    assert entry["nano"] == math.ceil(expected * NANO)
