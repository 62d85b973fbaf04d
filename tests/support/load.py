"""Concurrent load on a running stack, and the exact-totals assertion every fault test ends with.

Why: a fault proves nothing unless requests are in flight when it lands, and the proof of
"exactly once" has to come from the clients' own record, not from the sidecar under test.
:class:`Load` runs ``clients`` clients at once, each sending one request after another (chat
completions and Anthropic messages, streamed and not, on a few wallets in turn) and recording
what it saw (``bench.books.Seen``). :func:`assert_exact_totals` waits until every hold of the
run's wallets is resolved, then holds that record against the ledger and the demo backend's own
list of what it served (``bench.books.compare``: the rules are in its module docstring) and runs
the ledger audit.

The clients never wait for the gateway to come back: a request that fails is recorded and the
next one is sent after a short pause (a real client's back-off; it keeps a refused connection
from spinning). A test waits on conditions: :meth:`Load.until_answered`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import aiohttp

from bench import books
from billing import database, money, pricing
from billingproxy.devstack.local_stack import Stack

from . import waiting

CLIENTS = 8
WALLETS = 3
# A client whose request failed without an answer (no connection) pauses this long before its
# next one: pacing, not waiting for anything.
BACK_OFF_S = 0.05
# Requests are short (books.SHAPES: well under a second); a client gives up on one after this.
REQUEST_TIMEOUT_S = 30


@dataclasses.dataclass(frozen=True)
class Wallet:
    wallet_id: str
    api_key: str
    balance_before_nano: int


async def signed_up_wallets(gateway: str, count: int = WALLETS) -> list[Wallet]:
    """``count`` self-service wallets, signed up through the gateway as any client would."""
    wallets = []
    async with aiohttp.ClientSession() as session:
        for n in range(count):
            email = f"load-{n}-{uuid.uuid4().hex[:12]}@example.com"
            async with session.post(gateway + "/user/signup", json={"email": email}) as response:
                body = await response.json()
                assert response.status == 201, body
            wallets.append(Wallet(body["wallet_id"], body["api_key"], money.parse_usd(body["balance_usd"])))
    return wallets


class Load:
    """``clients`` clients sending requests of ``shapes`` in turn on ``wallets`` in turn, from
    ``start()`` until ``stop()``; ``seen`` is every request sent, as its client saw it."""

    def __init__(
        self,
        gateway: str,
        wallets: Sequence[Wallet],
        *,
        clients: int = CLIENTS,
        shapes: Sequence[books.Shape] = books.SHAPES,
    ) -> None:
        self.gateway = gateway
        self.wallets = list(wallets)
        self.seen: list[books.Seen] = []
        self._clients = clients
        self._turns = itertools.cycle(itertools.product(shapes, self.wallets))
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._clients),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
        )
        self._tasks = [
            asyncio.create_task(self._client(), name=f"load-client-{n}") for n in range(self._clients)
        ]

    async def stop(self) -> list[books.Seen]:
        """Let each client finish the request it is sending, then stop; the record is complete."""
        self._stopping.set()
        await asyncio.gather(*self._tasks)
        if self._session is not None:
            await self._session.close()
        return self.seen

    async def _client(self) -> None:
        assert self._session is not None
        while not self._stopping.is_set():
            shape, wallet = next(self._turns)
            seen = await books.send(self._session, self.gateway, shape, wallet.api_key, wallet.wallet_id)
            self.seen.append(seen)
            if seen.status is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), BACK_OFF_S)

    def count(self, accept: Callable[[books.Seen], bool] = lambda seen: True) -> int:
        return sum(1 for seen in self.seen if accept(seen))

    async def until_answered(
        self, more: int, *, accept: Callable[[books.Seen], bool] | None = None, timeout: float = 20.0
    ) -> None:
        """Until ``more`` requests (those ``accept`` takes; default: served complete) have been
        answered from now on."""
        taken = accept or (lambda seen: seen.outcome is books.Outcome.COMPLETE)
        target = self.count(taken) + more

        async def enough() -> bool:
            return self.count(taken) >= target

        await waiting.wait_until(enough, timeout, f"{more} more answers under load")

    def first(self, accept: Callable[[books.Seen], bool]) -> books.Seen | None:
        return next((seen for seen in self.seen if accept(seen)), None)


@contextlib.asynccontextmanager
async def running(stack: Stack, wallets: Sequence[Wallet], **options: Any) -> AsyncIterator[Load]:
    """``async with running(stack, wallets) as load``: a :class:`Load` on ``stack``'s gateway,
    stopped when the block ends (also when it raises)."""
    load = Load(stack.gateway_url, wallets, **options)
    load.start()
    try:
        yield load
    finally:
        await load.stop()


async def backend_arrivals_now(stack: Stack) -> int:
    """How many requests the demo backend has seen so far: a run's arrivals start after them."""
    async with aiohttp.ClientSession() as session:
        return len(await books.backend_arrivals(session, stack.backend_url))


async def assert_exact_totals(
    stack: Stack,
    load: Load,
    *,
    arrivals_since: int,
    resolve_timeout: float = 20.0,
) -> books.Verdict:
    """Every hold of the load's wallets resolved, then the books exactly as ``load`` saw them
    (``bench.books.compare``) and a clean audit. Returns the books for a test's own checks.

    ``arrivals_since``: :func:`backend_arrivals_now` before the load began.
    """
    wallet_ids = [w.wallet_id for w in load.wallets]
    engine = database.create_engine(stack.database_url, pool_size=1)
    try:

        async def resolved() -> bool:
            return await books.unresolved_holds(engine, wallet_ids) == 0

        await waiting.wait_until(resolved, resolve_timeout, "every hold of the run posted or voided")
        view = await books.read_ledger(engine, wallet_ids)
    finally:
        await engine.dispose()
    async with aiohttp.ClientSession() as session:
        arrivals = await books.backend_arrivals(session, stack.backend_url, since=arrivals_since)
    settings = stack.settings
    tariff = books.Tariff(pricing.load(settings.price_overrides_path, settings.markup_percent))
    verdict = books.compare(
        load.seen, view, tariff, {w.wallet_id: w.balance_before_nano for w in load.wallets}, arrivals
    )
    assert verdict.exact, books.render(verdict)
    assert verdict.outcomes["complete"] > 0, books.render(verdict)
    return verdict
