"""200 requests at once on one wallet, through real Envoy: holds keep the balance at or above
−(the wallet's overdraft limit) (and at zero in strict mode), and every charge is accounted for."""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from billing import ledger

pytestmark = pytest.mark.integration

REQUESTS = 200
BACKEND_DELAY_MS = 500  # every admitted request stays in flight while the others are checked
INPUT_USD_PER_TOKEN = Decimal("1.5e-07")  # litellm's gpt-4o-mini prices
OUTPUT_USD_PER_TOKEN = Decimal("6e-07")
MAX_TOKENS = 16
# 300 two-letter words: the demo backend counts 300 + 3 prompt tokens, close to the gateway's
# size-based estimate, so a hold is only a little above the real cost, and a wallet credited
# with four holds and a nano-USD admits five requests whose cost really does overdraw it.
WORDS = 300
BODY = json.dumps(
    {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": " ".join(["ab"] * WORDS)}],
        "max_tokens": MAX_TOKENS,
    }
).encode()
COST_NANO = math.ceil(((WORDS + 3) * INPUT_USD_PER_TOKEN + MAX_TOKENS * OUTPUT_USD_PER_TOKEN) * 10**9)
HOLDS_CREDITED = 4
HOLDS_OVERDRAFT = 2  # the wallet's overdraft limit, in holds


@pytest.fixture(scope="module")
async def overdraft_stack(launch_stack) -> AsyncIterator[Any]:
    async with launch_stack(BILLINGPROXY_FREE_GRANT_USD="0", BILLINGPROXY_ADMISSION="overdraft") as stack:
        yield stack


@pytest.fixture(scope="module")
async def strict_stack(launch_stack) -> AsyncIterator[Any]:
    async with launch_stack(BILLINGPROXY_FREE_GRANT_USD="0", BILLINGPROXY_ADMISSION="strict") as stack:
        yield stack


async def storm(stack, api_key: str, count: int = REQUESTS) -> Counter[tuple[int, str]]:
    """Send ``count`` identical completions at once; count the answers by (status, error code)."""
    headers = {
        "Authorization": f"Bearer {api_key}",
        "Content-Type": "application/json",
        "x-demo-delay-ms": str(BACKEND_DELAY_MS),
    }
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> tuple[int, str]:
            async with session.post(
                stack.gateway + "/v1/chat/completions", data=BODY, headers=headers
            ) as response:
                body = await response.json(content_type=None)
                if response.status == 200:
                    assert body["usage"]["prompt_tokens"] == WORDS + 3
                    return 200, ""
                if response.status == 429:
                    assert int(response.headers["Retry-After"]) >= 1
                return response.status, body["error"]["code"]

        answers = await asyncio.gather(*(one() for _ in range(count)))
    return Counter(answers)


async def credit(stack, wallet_id: str, amount_nano: int, reference: str) -> None:
    async with stack.db.engine.begin() as conn:
        await ledger.post_entry(
            conn,
            wallet_id=wallet_id,
            kind="credit",
            amount_nano=amount_nano,
            idempotency_key=f"credit:{reference}",
        )


async def measured_hold(stack, body: bytes = BODY, cost_nano: int = COST_NANO) -> int:
    """What the gateway reserves for ``body`` (which costs ``cost_nano``), measured with one request
    on a wallet of its own."""
    probe = await stack.signup()
    await credit(stack, probe["wallet_id"], 10**9, "probe")
    async with stack.http.post(
        stack.gateway + "/v1/chat/completions",
        data=body,
        headers={"Authorization": f"Bearer {probe['api_key']}", "Content-Type": "application/json"},
    ) as response:
        assert response.status == 200, await response.text()
    await stack.db.settled(probe["wallet_id"])
    (hold,) = await stack.db.holds(probe["wallet_id"])
    assert hold.posted_nano == cost_nano
    assert hold.amount_nano >= cost_nano, "a hold below the real cost cannot bound an overdraft"
    return hold.amount_nano


async def run_storm(stack) -> tuple[Counter, int, int, list[Any], str, int, int]:
    """A wallet holding four holds' worth and a nano-USD, with an overdraft limit of two holds
    (set with the real command), then REQUESTS at once on it."""
    hold = await measured_hold(stack)
    user = await stack.signup()
    wallet_id = user["wallet_id"]
    start = HOLDS_CREDITED * hold + 1
    await credit(stack, wallet_id, start, "storm")
    assert await stack.db.balance(wallet_id) == start
    limit = HOLDS_OVERDRAFT * hold
    done = await stack.db.acli("wallet", "set-overdraft", wallet_id, format(Decimal(limit) / 10**9, "f"))
    assert done.returncode == 0, done.stderr
    assert (await stack.db.wallet(wallet_id)).reserved_nano == 0

    answers = await storm(stack, user["api_key"])
    await stack.db.settled(wallet_id)
    final = await stack.db.balance(wallet_id)
    usage = [e for e in await stack.db.ledger(wallet_id) if e.kind == "usage"]

    assert set(answers) <= {(200, ""), (403, "insufficient_funds"), (429, "funds_reserved")}, answers
    assert sum(answers.values()) == REQUESTS
    # Every request ends in one charge of exactly its price-table cost, or in none.
    assert len(usage) == answers[(200, "")]
    assert all(e.amount_nano == -COST_NANO for e in usage), {e.amount_nano for e in usage}
    assert sum(e.amount_nano for e in usage) == final - start
    holds = await stack.db.holds(wallet_id)
    assert len(holds) == answers[(200, "")], "a refused request left a hold"
    assert all(h.state == "posted" and h.posted_nano == COST_NANO for h in holds)
    assert (await stack.db.wallet(wallet_id)).reserved_nano == 0
    return answers, start, final, usage, user["api_key"], limit, hold


def assert_mostly_refused(answers: Counter) -> None:
    """Far more requests than money: most are refused, and at least the covered ones served."""
    assert answers[(200, "")] >= HOLDS_CREDITED
    assert answers[(429, "funds_reserved")] + answers[(403, "insufficient_funds")] >= REQUESTS // 2


async def test_overdraft_is_bounded_by_the_wallets_limit(overdraft_stack) -> None:
    answers, start, final, usage, api_key, limit, hold = await run_storm(overdraft_stack)
    assert final >= -limit, f"overdrawn by {-final} nano-USD, more than the wallet's limit ({limit})"
    assert all(e.balance_after_nano >= -limit for e in usage), [e.balance_after_nano for e in usage]
    # Admission takes holds while balance − reserved − hold ≥ −limit: six at least (four
    # credited, two of overdraft), and settling never lowers what is left (a hold ≥ its cost).
    assert_mostly_refused(answers)
    assert answers[(200, "")] >= HOLDS_CREDITED + HOLDS_OVERDRAFT
    if start < (HOLDS_CREDITED + HOLDS_OVERDRAFT) * COST_NANO:
        assert final < 0  # the limit was used, so the bound was tested
    if final + limit < hold:
        # What is left fits no such request, and nothing is in flight: the 403, not a 429.
        assert await storm(overdraft_stack, api_key, count=1) == {(403, "insufficient_funds"): 1}


async def test_strict_mode_never_goes_below_zero(strict_stack) -> None:
    """The same wallet, its overdraft limit included: strict mode takes every limit as 0."""
    answers, _, final, usage, _, _, _ = await run_storm(strict_stack)
    assert final >= 0
    assert all(e.balance_after_nano >= 0 for e in usage), [e.balance_after_nano for e in usage]
    assert_mostly_refused(answers)
    assert answers[(200, "")] >= HOLDS_CREDITED
