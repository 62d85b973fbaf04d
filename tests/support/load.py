"""Concurrent load on a running stack, and the exact-totals assertion every fault test ends with.

Why: a fault proves nothing unless requests are in flight when it lands, and the proof of
"exactly once" has to come from the clients' own record, not from the sidecar under test.
:class:`Load` runs ``clients`` clients at once, each sending one request after another (chat
completions and Anthropic messages, streamed and not, on a few wallets in turn) and recording
what it saw (``bench.books.Seen``). :func:`assert_exact_totals` waits until every hold of the
run's wallets is resolved, then holds that record against the ledger and the demo backend's own
list of what it served (``bench.books.compare``: the rules are in its module docstring) and runs
``billingproxy audit``.

The clients never wait for the gateway to come back: a request that fails is recorded and the
next one is sent after a short pause (a real client's back-off; it keeps a refused connection
from spinning). A test waits on conditions (:meth:`Load.until_answered`,
:meth:`Readiness.until`) and picks the requests of a moment by their times (:func:`within`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import subprocess
import sys
import time
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
# A client whose request was refused or got no answer at all pauses this long before its next
# one, as a real client backs off: pacing, not waiting for anything.
BACK_OFF_S = 0.05
# Requests are short (books.SHAPES: well under a second); a client gives up on one after this.
REQUEST_TIMEOUT_S = 30
AUDIT_GIVE_UP_S = 60


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
        arrivals_before: int = 0,
    ) -> None:
        self.gateway = gateway
        self.wallets = list(wallets)
        # How many requests the demo backend had seen before this load: its own come after.
        self.arrivals_before = arrivals_before
        self.seen: list[books.Seen] = []
        self._clients = clients
        self._turns = itertools.cycle(itertools.product(shapes, self.wallets))
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._completion: asyncio.Future[books.Seen] | None = None

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
            waiting_for_one = self._completion is not None and not self._completion.done()
            if seen.outcome is books.Outcome.COMPLETE and waiting_for_one:
                assert self._completion is not None
                self._completion.set_result(seen)
            if seen.outcome in (books.Outcome.LOST, books.Outcome.REFUSED):
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

    async def next_complete(self, timeout: float = 20.0) -> books.Seen:
        """The next request a client sees complete, returned the moment its client has read its
        end: a fault injected then lands while the gateway is still reporting that request (its
        access-log entries are buffered for a few milliseconds)."""
        self._completion = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(self._completion, timeout)
        finally:
            self._completion = None


@contextlib.asynccontextmanager
async def running(
    stack: Stack, wallets: Sequence[Wallet] | None = None, **options: Any
) -> AsyncIterator[Load]:
    """``async with running(stack) as load``: a :class:`Load` on ``stack``'s gateway, on
    ``wallets`` (default: :data:`WALLETS` new signups), stopped when the block ends (also when it
    raises). It notes how many requests the demo backend had seen before, so its books hold only
    the run's own arrivals."""
    if wallets is None:
        wallets = await signed_up_wallets(stack.gateway_url)
    async with aiohttp.ClientSession() as session:
        arrivals_before = len(await books.backend_arrivals(session, stack.backend_url))
    load = Load(stack.gateway_url, wallets, arrivals_before=arrivals_before, **options)
    load.start()
    try:
        yield load
    finally:
        await load.stop()


async def assert_exact_totals(
    stack: Stack,
    load: Load,
    *,
    resolve_timeout: float = 20.0,
    envoy_killed_at: Sequence[float] = (),
    envoy_stopped_at: Sequence[float] = (),
) -> books.Verdict:
    """Every hold of the load's wallets resolved, then the books exactly as ``load`` saw them
    (``bench.books.compare``, which runs ``billing.audit`` in the same snapshot), then
    ``billingproxy audit`` as an operator runs it, which must exit 0. Returns the books for a
    test's own checks. ``envoy_killed_at``: when the test SIGKILLed Envoy (``time.time()``);
    ``envoy_stopped_at``: when it stopped Envoy gracefully (``bench.books.compare``)."""
    wallet_ids = [w.wallet_id for w in load.wallets]
    engine = database.create_engine(stack.database_url, pool_size=1)
    try:

        async def resolved() -> bool:
            return await books.unresolved_holds(engine, wallet_ids) == 0

        await waiting.wait_until(resolved, resolve_timeout, "every hold of the run posted or voided")
        view = await books.read_ledger(engine, wallet_ids, report_grace_s=stack.settings.hold_report_grace_s)
    finally:
        await engine.dispose()
    async with aiohttp.ClientSession() as session:
        arrivals = await books.backend_arrivals(session, stack.backend_url, since=load.arrivals_before)
    settings = stack.settings
    tariff = books.Tariff(pricing.load(settings.price_overrides_path, settings.markup_percent))
    verdict = books.compare(
        load.seen,
        view,
        tariff,
        {w.wallet_id: w.balance_before_nano for w in load.wallets},
        arrivals,
        envoy_killed_at,
        envoy_stopped_at,
    )
    assert verdict.exact, books.render(verdict)
    assert verdict.outcomes["complete"] > 0, books.render(verdict)
    audited = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "billingproxy", "audit"],
        env=stack.env,  # its database and its settings (the report grace the audit checks)
        capture_output=True,
        text=True,
        timeout=AUDIT_GIVE_UP_S,
        check=False,
    )
    assert audited.returncode == 0, audited.stdout + audited.stderr
    return verdict


class Readiness:
    """The sidecar's ``/readyz``, sampled in the background from ``start()`` to ``stop()``: when
    each look began (``time.time()``, the clients' clock) and the status it got, None when nothing
    listened. What a fault test reads the sidecar's down time and its readiness turns from."""

    INTERVAL_S = 0.02

    def __init__(self, admin_url: str) -> None:
        self._url = admin_url + "/readyz"
        self.samples: list[tuple[float, int | None]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._sample(), name="readiness-probe")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _sample(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while True:
                began = time.time()
                status: int | None
                try:
                    async with session.get(self._url) as response:
                        status = response.status
                except (aiohttp.ClientError, OSError, TimeoutError):
                    status = None
                self.samples.append((began, status))
                await asyncio.sleep(self.INTERVAL_S)

    def seen(self, status: int | None, after: float = 0.0) -> list[float]:
        """When the looks that got ``status`` began, from ``after`` on."""
        return [began for began, got in self.samples if got == status and began >= after]

    async def until(self, status: int | None, after: float, timeout: float = 20.0) -> float:
        """Until a look begun after ``after`` got ``status``; when it began."""

        async def seen() -> float | None:
            looks = self.seen(status, after)
            return looks[0] if looks else None

        began: float = await waiting.wait_until(seen, timeout, f"/readyz answering {status} after the fault")
        return began


def within(run: Load, start: float, end: float) -> list[books.Seen]:
    """The requests whose whole exchange lay between ``start`` and ``end`` (``time.time()``)."""
    return [seen for seen in run.seen if seen.started_at >= start and seen.ended_at <= end]
