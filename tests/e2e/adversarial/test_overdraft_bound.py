"""Issue 10, finding 5 — "one free wallet, one unbounded request" — through real Envoy.

A wallet never goes below −(its overdraft limit), whatever one request asks for and however many
run at once; in strict mode never below zero. Self-service (free-tier) wallets have no overdraft
at all. A request whose worst case does not fit is refused before the backend is called (403
``insufficient_funds``), and nothing is charged or held for it.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from billing import ledger

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
# o1-pro: $150 per million prompt tokens, $600 per million output tokens, up to 100 000 of them
# (litellm's price map): the most expensive request a client can ask of one model.
EXPENSIVE = "o1-pro"
REQUESTS = 200
BACKEND_DELAY_MS = 300  # admitted requests stay in flight while the others are checked
BALANCE_NANO = 50_000_000  # $0.05 of credit
LIMIT_USD = "0.20"
LIMIT_NANO = 200_000_000


@pytest.fixture(scope="module", params=["overdraft", "strict"])
async def stack(launch_stack, request) -> AsyncIterator[Any]:
    """The gateway with the default free grant ($0.50), in each admission mode."""
    async with launch_stack(BILLINGPROXY_ADMISSION=request.param) as running:
        running.mode = request.param
        yield running


def body(max_tokens: int | None = None, words: int = 1, model: str = EXPENSIVE) -> bytes:
    request: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": " ".join(["ab"] * words)}],
    }
    if max_tokens is not None:
        request["max_tokens"] = max_tokens
    return json.dumps(request).encode()


async def post(stack, api_key: str, data: bytes, delay_ms: int = 0) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    if delay_ms:
        headers["x-demo-delay-ms"] = str(delay_ms)
    async with stack.http.post(stack.gateway + CHAT, data=data, headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def credit(stack, wallet_id: str, amount_nano: int, reference: str) -> None:
    async with stack.db.engine.begin() as conn:
        await ledger.post_entry(
            conn,
            wallet_id=wallet_id,
            kind="credit",
            amount_nano=amount_nano,
            idempotency_key=f"credit:{reference}",
        )


async def test_one_huge_request_on_a_fresh_free_wallet_is_refused_and_charges_nothing(stack) -> None:
    """The issue's case: a fresh $0.50 signup asks o1-pro for up to 100 000 output tokens ($60
    of output alone) with a long prompt. It was served and overdrew the wallet; it is refused."""
    user = await stack.signup()
    wallet_id, api_key = user["wallet_id"], user["api_key"]
    assert user["balance_usd"] == "0.500000"
    counts = await stack.db.row_counts()
    for huge in (body(max_tokens=100_000, words=5_000), body(words=5_000), body(max_tokens=100_000)):
        status, answer = await post(stack, api_key, huge)
        assert status == 403, answer
        assert answer["error"]["code"] == "insufficient_funds"
        assert answer["error"]["message"] == "Insufficient funds. Please top up."
        assert answer["error"]["top_up_url"].startswith(stack.gateway + "/")
    # Nothing charged, nothing held, nothing written; the backend was never asked.
    assert await stack.db.balance(wallet_id) == 500_000_000
    assert [e.kind for e in await stack.db.ledger(wallet_id)] == ["grant"]
    assert await stack.db.holds(wallet_id) == []
    assert await stack.db.row_counts() == counts
    assert (await stack.db.wallet(wallet_id)).reserved_nano == 0

    # The wallet is not blocked: a request of the same model whose worst case fits is served.
    status, answer = await post(stack, api_key, body(max_tokens=100))
    assert status == 200, answer
    await stack.db.settled(wallet_id)
    assert 0 <= await stack.db.balance(wallet_id) < 500_000_000


async def test_a_free_wallet_never_goes_below_zero(stack) -> None:
    """Self-service wallets have no overdraft in either mode: requests sized to just fit, one
    after another, drain the wallet to at least zero and never below."""
    user = await stack.signup()
    wallet_id, api_key = user["wallet_id"], user["api_key"]
    answers = Counter()
    for _ in range(10):  # each costs ≈ $0.061 of a worst case ≈ $0.074: the 9th does not fit
        status, answer = await post(stack, api_key, body(max_tokens=100))
        answers[(status, answer.get("error", {}).get("code", ""))] += 1
        await stack.db.settled(wallet_id)
    assert set(answers) == {(200, ""), (403, "insufficient_funds")}, answers
    assert await stack.db.balance(wallet_id) >= 0
    assert all(e.balance_after_nano >= 0 for e in await stack.db.ledger(wallet_id))


async def limited_wallet(stack) -> tuple[str, str]:
    """A self-service wallet given $0.05 of credit and an operator-set overdraft of $0.20."""
    user = await stack.signup()
    wallet_id = user["wallet_id"]
    # The free grant is spent by hand so that the storm starts from exactly BALANCE_NANO.
    async with stack.db.engine.begin() as conn:
        await ledger.post_entry(
            conn,
            wallet_id=wallet_id,
            kind="adjustment",
            amount_nano=-500_000_000,
            idempotency_key=f"adjustment:{wallet_id}",
        )
    await credit(stack, wallet_id, BALANCE_NANO, f"storm-{wallet_id}")
    done = await stack.db.acli("wallet", "set-overdraft", user["email"], LIMIT_USD)
    assert done.returncode == 0, done.stderr
    assert (
        await stack.db.scalar("SELECT overdraft_limit_nano FROM wallets WHERE id = :id", id=wallet_id)
        == LIMIT_NANO
    )
    assert await stack.db.balance(wallet_id) == BALANCE_NANO
    return wallet_id, user["api_key"]


async def test_the_wallets_overdraft_limit_admits_in_overdraft_mode_only(stack) -> None:
    """A request whose worst case exceeds the balance but fits within balance + limit."""
    wallet_id, api_key = await limited_wallet(stack)
    status, answer = await post(stack, api_key, body(max_tokens=200))  # worst case ≈ $0.13
    await stack.db.settled(wallet_id)
    if stack.mode == "overdraft":
        assert status == 200, answer
        assert -LIMIT_NANO <= await stack.db.balance(wallet_id) < 0
    else:
        assert (status, answer["error"]["code"]) == (403, "insufficient_funds")
        assert await stack.db.balance(wallet_id) == BALANCE_NANO


async def test_200_concurrent_requests_of_every_size_stay_within_the_limit(stack) -> None:
    """200 o1-pro requests at once, each asking for 1 to 256 output tokens (worst cases from
    $0.014 to $0.17, several times the $0.05 balance), on a wallet with a $0.20 overdraft."""
    wallet_id, api_key = await limited_wallet(stack)
    rng = random.Random(5)
    bodies = [body(max_tokens=rng.randint(1, 256), words=rng.randint(1, 20)) for _ in range(REQUESTS)]
    headers = {
        "Authorization": f"Bearer {api_key}",
        "Content-Type": "application/json",
        "x-demo-delay-ms": str(BACKEND_DELAY_MS),
    }
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=60)
    ) as session:

        async def one(data: bytes) -> tuple[int, str]:
            async with session.post(stack.gateway + CHAT, data=data, headers=headers) as response:
                answer = await response.json(content_type=None)
                return response.status, "" if response.status == 200 else answer["error"]["code"]

        answers = Counter(await asyncio.gather(*(one(b) for b in bodies)))
    await stack.db.settled(wallet_id)

    assert set(answers) <= {(200, ""), (403, "insufficient_funds"), (429, "funds_reserved")}, answers
    assert answers[(200, "")] >= 1 and answers[(200, "")] < REQUESTS, answers
    floor = -LIMIT_NANO if stack.mode == "overdraft" else 0
    final = await stack.db.balance(wallet_id)
    assert final >= floor, f"{stack.mode}: balance {final} below {floor}"
    entries = await stack.db.ledger(wallet_id)
    # Never below the floor at any point, not only at the end.
    assert all(e.balance_after_nano >= floor for e in entries), [e.balance_after_nano for e in entries]
    usage = [e for e in entries if e.kind == "usage"]
    holds = await stack.db.holds(wallet_id)
    assert len(usage) == len(holds) == answers[(200, "")], "a refused request left a hold or a charge"
    assert all(h.state == "posted" and h.posted_nano <= h.amount_nano for h in holds)
    assert (await stack.db.wallet(wallet_id)).reserved_nano == 0
    assert await stack.db.invariants() == []
