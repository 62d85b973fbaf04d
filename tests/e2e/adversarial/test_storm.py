"""Issue 10's concurrency proof: 200 adversarial requests at once on one small wallet, every
variant the review found (confused output fields, `n`, streams that hang up, streams that turn
usage off, lists of prompts, bad values), through real Envoy. However they interleave, the
wallet never goes below −(its overdraft limit), strict mode never below zero, every hold is
settled and the books balance."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa

from billing import key_limits, money, wallets

pytestmark = pytest.mark.integration

REQUESTS = 200
BACKEND_DELAY_MS = 300  # admitted requests stay in flight while the others are checked
MESSAGES = [{"role": "user", "content": "ab " * 50}]

# (path, body, whether to hang up after the first bytes of the answer)
VARIANTS: list[tuple[str, dict[str, Any], bool]] = [
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 16}, False),
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": MESSAGES}, False),  # no limit: the model's
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": MESSAGES, "max_output_tokens": 1}, False),
    (
        "/v1/chat/completions",
        {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 100, "n": 10},
        False,
    ),
    (
        "/v1/chat/completions",
        {
            "model": "gpt-4o-mini",
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": False},
        },
        False,
    ),
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}, True),
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": True}, False),
    ("/v1/chat/completions", {"model": "o1-pro", "messages": MESSAGES}, False),
    ("/v1/responses", {"model": "gpt-4o-mini", "input": "ab " * 50, "max_output_tokens": 50}, False),
    ("/v1/responses", {"model": "gpt-4o-mini", "input": "ab " * 50, "stream": True}, True),
    (
        "/v1/completions",
        {"model": "gpt-3.5-turbo-instruct", "prompt": ["a", "b", "c"], "max_tokens": 20},
        False,
    ),
    ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "ab " * 50}, False),
]


async def storm(stack, api_key: str) -> Counter[tuple[int, str]]:
    headers = {
        "authorization": f"Bearer {api_key}",
        "content-type": "application/json",
        "x-demo-delay-ms": str(BACKEND_DELAY_MS),
    }
    pick = random.Random(10)  # the same interleaving of variants every run
    plan = [pick.choice(VARIANTS) for _ in range(REQUESTS)]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def one(path: str, body: dict[str, Any], hang_up: bool) -> tuple[int, str]:
            async with session.post(stack.gateway + path, data=json.dumps(body), headers=headers) as response:
                if response.status == 200:
                    if hang_up:
                        await response.content.read(1)
                        response.close()  # the client goes away mid-answer
                    else:
                        await response.read()
                    return 200, ""
                return response.status, (await response.json(content_type=None))["error"]["code"]

        answers = await asyncio.gather(*(one(*variant) for variant in plan))
    return Counter(answers)


async def small_wallet(stack, balance_usd: str, overdraft_usd: str) -> tuple[str, str]:
    async with stack.db.engine.begin() as conn:
        account = await wallets.signup(
            conn, email=f"storm-{uuid.uuid4().hex[:10]}@example.com", grant_nano=money.parse_usd(balance_usd)
        )
        await conn.execute(
            sa.text("UPDATE wallets SET overdraft_limit_nano = :limit WHERE id = :id"),
            {"limit": money.parse_usd(overdraft_usd), "id": account.wallet.id},
        )
    return account.wallet.id, account.key.plaintext


@pytest.fixture(scope="module")
async def overdraft_stack(launch_stack) -> AsyncIterator[Any]:
    async with launch_stack(BILLINGPROXY_ADMISSION="overdraft") as stack:
        yield stack


@pytest.fixture(scope="module")
async def strict_stack(launch_stack) -> AsyncIterator[Any]:
    async with launch_stack(BILLINGPROXY_ADMISSION="strict") as stack:
        yield stack


@pytest.mark.parametrize("overdraft_usd", ["0", "0.005"])
async def test_the_overdraft_limit_holds_under_an_adversarial_storm(
    overdraft_stack, overdraft_usd: str
) -> None:
    wallet_id, key = await small_wallet(overdraft_stack, "0.02", overdraft_usd)
    answers = await storm(overdraft_stack, key)
    await overdraft_stack.db.settled(wallet_id)
    balance = await overdraft_stack.db.balance(wallet_id)
    assert balance >= -money.parse_usd(overdraft_usd), (money.format_usd(balance), answers)
    # Some were served and some refused as too large or empty: the storm did reach the bound.
    assert answers[(200, "")] > 0 and answers[(403, "insufficient_funds")] > 0, answers
    assert answers[(400, "invalid_parameter")] > 0 and answers[(400, "parameter_not_supported")] > 0, answers
    assert not [status for status, _ in answers if status >= 500], answers


async def test_strict_mode_never_goes_below_zero_under_an_adversarial_storm(strict_stack) -> None:
    wallet_id, key = await small_wallet(strict_stack, "0.02", "0.05")  # strict ignores the limit
    answers = await storm(strict_stack, key)
    await strict_stack.db.settled(wallet_id)
    balance = await strict_stack.db.balance(wallet_id)
    assert balance >= 0, (money.format_usd(balance), answers)
    assert answers[(200, "")] > 0, answers
    assert not [status for status, _ in answers if status >= 500], answers


@pytest.mark.parametrize("stack_name", ["overdraft_stack", "strict_stack"])
async def test_a_key_limit_holds_under_an_adversarial_storm(
    request: pytest.FixtureRequest, stack_name: str
) -> None:
    """One capped key in a rich wallet: the same 200 adversarial requests at once never take the
    key's charges past its limit, in either admission mode (a key's limit has no overdraft), and
    the wallet pays exactly what the key was charged."""
    stack = request.getfixturevalue(stack_name)
    wallet_id, key = await small_wallet(stack, "50", "0.005")
    limit_nano = money.parse_usd("0.003")
    async with stack.db.engine.begin() as conn:
        key_id = await conn.scalar(sa.text("SELECT id FROM api_keys WHERE wallet_id = :w"), {"w": wallet_id})
        await key_limits.set_limit(conn, key_id, limit_nano, key_limits.Window.TOTAL)
    answers = await storm(stack, key)
    await stack.db.settled(wallet_id)
    charged = await stack.db.key_spend(key_id)
    assert 0 < charged <= limit_nano, (money.format_usd(charged), answers)
    assert money.parse_usd("50") - await stack.db.balance(wallet_id) == charged
    assert answers[(200, "")] > 0 and answers[(403, "key_limit_reached")] > 0, answers
    assert answers[(403, "insufficient_funds")] == 0, "the wallet never ran dry: the key's cap refused"
    assert not [status for status, _ in answers if status >= 500], answers
    findings = await stack.db.invariants()
    assert not [f for f in findings if f.check == "key_limits"], findings
