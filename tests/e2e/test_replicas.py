"""Two complete gateways (two sidecars, two Envoys) on one PostgreSQL, as the chart's two replicas
run: money stays right across them.

What the replicas share is the database alone; each has its own key cache and empty-wallet memo.
So the storm of tests/e2e/test_concurrency.py, sent through both at once with requests of two
sizes, must keep the same bounds as through one (−the wallet's limit; 0 in strict mode) and charge
every served request exactly once; a key revoked through one gateway's API, or in the database, is
refused by both within the key-cache period; and a top-up paid through one gateway's Stripe webhook
unblocks the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from support.waiting import wait_until_within

from test_concurrency import (
    BACKEND_DELAY_MS,
    HOLDS_CREDITED,
    HOLDS_OVERDRAFT,
    INPUT_USD_PER_TOKEN,
    OUTPUT_USD_PER_TOKEN,
    REQUESTS,
    credit,
    measured_hold,
)

pytestmark = pytest.mark.integration

# What the replicas promise (docs/kubernetes.md, "Several replicas"): one key-cache period (0.5 s
# by default) and the time to read the change, within a second.
PROPAGATION_BOUND_S = 1.0
ANSWERED = {(200, ""), (403, "insufficient_funds"), (429, "funds_reserved")}


@dataclass(frozen=True)
class Size:
    """A chat completion of ``words`` two-letter words asking for ``max_tokens``; the demo backend
    counts ``words + 3`` prompt tokens and answers ``max_tokens``, so its cost is known exactly."""

    words: int
    max_tokens: int

    @property
    def body(self) -> bytes:
        content = " ".join(["ab"] * self.words)
        return json.dumps(
            {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": content}],
                "max_tokens": self.max_tokens,
            }
        ).encode()

    @property
    def cost_nano(self) -> int:
        usd = (self.words + 3) * INPUT_USD_PER_TOKEN + self.max_tokens * OUTPUT_USD_PER_TOKEN
        return math.ceil(usd * 10**9)


SMALL = Size(words=300, max_tokens=16)
LARGE = Size(words=1200, max_tokens=64)
SIZES = (SMALL, LARGE)


@contextlib.asynccontextmanager
async def _pair(launch_stack, launch_replica, **settings: str) -> AsyncIterator[tuple[Any, Any]]:
    async with launch_stack(**settings) as first, launch_replica(first, **settings) as second:
        yield first, second


@pytest.fixture(scope="module")
async def overdraft_pair(launch_stack, launch_replica) -> AsyncIterator[tuple[Any, Any]]:
    settings = {"BILLINGPROXY_FREE_GRANT_USD": "0", "BILLINGPROXY_ADMISSION": "overdraft"}
    async with _pair(launch_stack, launch_replica, **settings) as pair:
        yield pair


@pytest.fixture(scope="module")
async def strict_pair(launch_stack, launch_replica) -> AsyncIterator[tuple[Any, Any]]:
    settings = {"BILLINGPROXY_FREE_GRANT_USD": "0", "BILLINGPROXY_ADMISSION": "strict"}
    async with _pair(launch_stack, launch_replica, **settings) as pair:
        yield pair


def bearer(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}


@dataclass(frozen=True)
class Answer:
    gateway: int
    size: Size
    status: int
    code: str


async def storm(gateways: tuple[Any, Any], api_key: str) -> list[Answer]:
    """REQUESTS at once, alternating sizes, each size split evenly over both gateways."""
    headers = {**bearer(api_key), "x-demo-delay-ms": str(BACKEND_DELAY_MS)}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def one(n: int) -> Answer:
            gateway, size = (n // 2) % 2, SIZES[n % 2]
            url = gateways[gateway].gateway + "/v1/chat/completions"
            async with session.post(url, data=size.body, headers=headers) as response:
                body = await response.json(content_type=None)
                if response.status == 200:
                    assert body["usage"]["prompt_tokens"] == size.words + 3
                    return Answer(gateway, size, 200, "")
                return Answer(gateway, size, response.status, body["error"]["code"])

        return await asyncio.gather(*(one(n) for n in range(REQUESTS)))


@dataclass(frozen=True)
class Storm:
    wallet_id: str
    start: int
    limit: int
    answers: list[Answer] = field(repr=False)
    final: int
    usage: list[Any] = field(repr=False)

    @property
    def served(self) -> Counter[int]:
        """The served requests' exact costs, counted."""
        return Counter(a.size.cost_nano for a in self.answers if a.status == 200)

    def served_by(self) -> str:
        """How many requests each gateway served, for failure messages."""
        counts = Counter(a.gateway for a in self.answers if a.status == 200)
        return f"served by the first gateway {counts[0]}, by the second {counts[1]}"


async def storm_through_both(pair: tuple[Any, Any]) -> Storm:
    """A wallet holding four large holds' worth and a nano-USD, with an overdraft limit of two
    large holds (set with the real command), then the storm through both gateways."""
    first, _ = pair
    hold = await measured_hold(first, LARGE.body, LARGE.cost_nano)
    user = await first.signup()
    wallet_id = user["wallet_id"]
    start = HOLDS_CREDITED * hold + 1
    await credit(first, wallet_id, start, f"storm-{wallet_id}")
    limit = HOLDS_OVERDRAFT * hold
    done = await first.db.acli("wallet", "set-overdraft", wallet_id, format(Decimal(limit) / 10**9, "f"))
    assert done.returncode == 0, done.stderr

    answers = await storm(pair, user["api_key"])
    await first.db.settled(wallet_id)
    final = await first.db.balance(wallet_id)
    usage = [e for e in await first.db.ledger(wallet_id) if e.kind == "usage"]
    return Storm(wallet_id, start, limit, answers, final, usage)


async def assert_charged_once(db, storm: Storm) -> None:
    """Every served request charged once, at its exact cost; nothing else charged or held."""
    outcomes = Counter((a.status, a.code) for a in storm.answers)
    assert set(outcomes) <= ANSWERED, outcomes
    assert Counter(-e.amount_nano for e in storm.usage) == storm.served, "charged twice, or never"
    assert sum(e.amount_nano for e in storm.usage) == storm.final - storm.start
    holds = await db.holds(storm.wallet_id)
    assert Counter(h.posted_nano for h in holds if h.state == "posted") == storm.served
    assert len(holds) == storm.served.total(), "a refused request left a hold"
    assert (await db.wallet(storm.wallet_id)).reserved_nano == 0
    # Far more requests than money: at least the covered ones served, most refused.
    assert storm.served.total() >= HOLDS_CREDITED
    assert outcomes[(429, "funds_reserved")] + outcomes[(403, "insufficient_funds")] >= REQUESTS // 2


async def test_the_overdraft_bound_holds_across_both_gateways(overdraft_pair) -> None:
    storm = await storm_through_both(overdraft_pair)
    floor = -storm.limit
    assert storm.final >= floor, (
        f"overdrawn by {-storm.final} nano-USD, more than the limit ({storm.limit}); {storm.served_by()}"
    )
    assert all(e.balance_after_nano >= floor for e in storm.usage), [
        e.balance_after_nano for e in storm.usage
    ]
    await assert_charged_once(overdraft_pair[0].db, storm)
    # Four large holds credited, two of overdraft: at least six requests of any size fit.
    assert storm.served.total() >= HOLDS_CREDITED + HOLDS_OVERDRAFT


async def status_of(stack, method: str, path: str, api_key: str, body: bytes | None = None) -> int:
    async with stack.http.request(method, stack.gateway + path, data=body, headers=bearer(api_key)) as r:
        return r.status


async def revoke_through_the_first_gateway(pair, user: dict[str, Any]) -> str:
    """Revoke a second key of ``user``'s wallet with ``DELETE /billing/keys/{id}`` through the first
    gateway (a wallet keeps its last key, so the signup key does the revoking); the revoked key."""
    first = pair[0]
    async with first.http.post(first.gateway + "/billing/keys", headers=bearer(user["api_key"])) as r:
        created = await r.json()
        assert r.status == 201, created
    for stack in pair:  # both key caches hold the new key
        assert await status_of(stack, "GET", "/v1/models", created["api_key"]) == 200
    path = f"/billing/keys/{created['id']}"
    async with first.http.delete(first.gateway + path, headers=bearer(user["api_key"])) as r:
        assert r.status == 200, await r.text()
    return str(created["api_key"])


async def revoke_in_the_database(pair, user: dict[str, Any]) -> str:
    """Revoke ``user``'s signup key with the admin CLI, straight in the shared database."""
    for stack in pair:  # both key caches hold the key
        assert await status_of(stack, "GET", "/v1/models", user["api_key"]) == 200
    done = await pair[0].db.acli("key", "revoke", user["key_id"])
    assert done.returncode == 0, done.stderr
    return str(user["api_key"])


@pytest.mark.parametrize("revoke", [revoke_through_the_first_gateway, revoke_in_the_database])
async def test_a_revoked_key_is_refused_by_both_gateways_within_a_second(overdraft_pair, revoke) -> None:
    pair = overdraft_pair
    user = await pair[0].signup()
    revoked_key = await revoke(pair, user)
    revoked_at = time.monotonic()

    for name, stack in zip(("first", "second"), pair, strict=True):

        async def refused(stack=stack) -> bool:
            status = await status_of(stack, "GET", "/v1/models", revoked_key)
            assert status in (200, 401), status
            return status == 401

        await wait_until_within(
            refused,
            since=revoked_at,
            bound_s=PROPAGATION_BOUND_S,
            what=f"the {name} gateway refusing the key",
        )


async def test_a_top_up_paid_through_one_gateway_unblocks_the_other_within_a_second(overdraft_pair) -> None:
    first, second = overdraft_pair
    user = await first.signup()  # no free grant: empty
    chat = SMALL.body
    assert await status_of(second, "POST", "/v1/chat/completions", user["api_key"], chat) == 403

    async with first.http.post(
        first.gateway + "/billing/topup", json={"amount_usd": "10.00"}, headers=bearer(user["api_key"])
    ) as response:
        topup = await response.json()
        assert response.status == 200, topup
    # The second gateway remembers the wallet as empty right up to the payment.
    assert await status_of(second, "POST", "/v1/chat/completions", user["api_key"], chat) == 403
    async with first.http.post(topup["checkout_url"], allow_redirects=False) as response:
        # The Stripe double has delivered checkout.session.completed through the first gateway.
        assert response.status == 303, await response.text()
    paid_at = time.monotonic()
    assert await first.db.balance(user["wallet_id"]) == 10 * 10**9

    async def served() -> bool:
        status = await status_of(second, "POST", "/v1/chat/completions", user["api_key"], chat)
        assert status in (200, 403), status
        return status == 200

    await wait_until_within(
        served, since=paid_at, bound_s=PROPAGATION_BOUND_S, what="the other gateway serving the wallet"
    )


async def test_strict_mode_never_goes_below_zero_across_both_gateways(strict_pair) -> None:
    storm = await storm_through_both(strict_pair)
    assert storm.final >= 0, f"overdrawn by {-storm.final} nano-USD in strict mode; {storm.served_by()}"
    assert all(e.balance_after_nano >= 0 for e in storm.usage), [e.balance_after_nano for e in storm.usage]
    await assert_charged_once(strict_pair[0].db, storm)
