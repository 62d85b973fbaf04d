"""End-to-end fixtures: the real gateway (`billingproxy.devstack.local_stack.Stack`: migrations, demo
backend, sidecar subprocess, Envoy) on a fresh database of the session's PostgreSQL, with free
ports everywhere, one stack per test module.

The fixtures hand out objects rather than importable helpers (conftest modules are not meant to
be imported): ``launch_stack`` / ``launch_database`` start things, ``wait_until`` polls, and
:class:`Database` reads balances, ledgers, holds and row counts straight from PostgreSQL.

After every test, each live database must have no pending hold left (every admitted request
ends in exactly one settlement) and the ledger audit (``billing.audit``) must find nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine
from support import waiting
from support.alert_receiver import receiver_fixture  # noqa: F401 (the alert tests' webhook receiver)

from billing import audit, database, tables
from billingproxy.devstack.local_stack import RestartPolicy, Stack, free_ports_env

SETTLE_TIMEOUT_S = 15.0
BACKEND_API_KEY = "sk-backend-credential-e2e"
DEFAULT_RESTART_POLICY = RestartPolicy()


@pytest.fixture(scope="session")
def wait_until() -> Callable[..., Awaitable[Any]]:
    return waiting.wait_until


def _clean_env() -> dict[str, str]:
    """This process's environment without any BillingProxy setting (they come from the test)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("BILLINGPROXY_") and k != "DATABASE_URL"}


class Database:
    """One test database, read directly (never through the code under test's own queries)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: AsyncEngine = database.create_engine(url, pool_size=2)

    async def scalar(self, sql: str, **params: Any) -> Any:
        async with self.engine.connect() as conn:
            return (await conn.execute(sa.text(sql), params)).scalar_one()

    async def rows(self, sql: str, **params: Any) -> list[sa.Row]:
        async with self.engine.connect() as conn:
            return list((await conn.execute(sa.text(sql), params)).all())

    async def wallet(self, wallet_id: str) -> sa.Row:
        """``balance_nano``, ``reserved_nano``, ``suspended`` of one wallet."""
        rows = await self.rows(
            "SELECT balance_nano, reserved_nano, suspended FROM wallets WHERE id = :id", id=wallet_id
        )
        assert len(rows) == 1, f"no wallet {wallet_id}"
        return rows[0]

    async def balance(self, wallet_id: str) -> int:
        return (await self.wallet(wallet_id)).balance_nano

    async def ledger(self, wallet_id: str) -> list[sa.Row]:
        """The wallet's entries, oldest first."""
        return await self.rows(
            "SELECT id, idempotency_key, kind, amount_nano, balance_after_nano, details "
            "FROM ledger_entries WHERE wallet_id = :id ORDER BY id",
            id=wallet_id,
        )

    async def holds(self, wallet_id: str) -> list[sa.Row]:
        return await self.rows(
            "SELECT request_id, amount_nano, state, posted_nano FROM holds WHERE wallet_id = :id "
            "ORDER BY created_at",
            id=wallet_id,
        )

    async def hold(self, request_id: str) -> sa.Row | None:
        rows = await self.rows(
            "SELECT request_id, wallet_id, amount_nano, state, posted_nano FROM holds WHERE request_id = :id",
            id=request_id,
        )
        return rows[0] if rows else None

    async def pending_holds(self, wallet_id: str | None = None) -> int:
        if wallet_id is None:
            return await self.scalar("SELECT count(*) FROM holds WHERE state = 'pending'")
        return await self.scalar(
            "SELECT count(*) FROM holds WHERE state = 'pending' AND wallet_id = :id", id=wallet_id
        )

    async def key_spend(self, key_id: str) -> int:
        """What a key's requests were charged: the sum of its usage entries, in nano-USD."""
        return await self.scalar(
            "SELECT coalesce(-sum(amount_nano), 0)::bigint FROM ledger_entries"
            " WHERE kind = 'usage' AND details->>'key_id' = :key_id",
            key_id=key_id,
        )

    async def row_counts(self) -> dict[str, int]:
        async with self.engine.connect() as conn:
            return {
                t.name: (await conn.execute(sa.select(sa.func.count()).select_from(t))).scalar_one()
                for t in (tables.wallets, tables.api_keys, tables.ledger_entries, tables.holds)
            }

    async def settled(self, wallet_id: str | None = None, timeout: float = SETTLE_TIMEOUT_S) -> None:
        """Wait until no hold (of this wallet, or at all) is pending."""

        async def none_pending() -> bool:
            return await self.pending_holds(wallet_id) == 0

        await waiting.wait_until(
            none_pending, timeout, f"settlement of every hold of {wallet_id or 'any wallet'}"
        )

    async def invariants(self) -> list[audit.Finding]:
        """What the whole ledger audit finds, in its read-only snapshot (``billingproxy audit``)."""
        return (await audit.run(self.engine)).findings

    def cli(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """``python -m billingproxy ARGS`` as a real subprocess against this database."""
        full_env = {**_clean_env(), "DATABASE_URL": self.url, **env}
        return subprocess.run(
            [sys.executable, "-m", "billingproxy", *args],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    async def acli(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(self.cli, *args, **env)


class RunningStack:
    """A started :class:`Stack` plus what the tests need to drive and inspect it. Its fault
    controls (``stack.kill_sidecar()``, ``stack.restart_envoy(hard=…)``, ``stack.stop_postgres()``
    …) are the Stack's own; ``said`` holds every line the Stack said, in order."""

    def __init__(self, stack: Stack, db: Database, http: aiohttp.ClientSession, said: list[str]) -> None:
        self.stack = stack
        self.said = said
        self.settings = stack.settings
        self.db = db
        self.http = http
        self.gateway = stack.gateway_url
        self.backend = stack.backend_url
        self.grpc_target = f"127.0.0.1:{stack.settings.grpc_port}"
        self.admin = f"http://127.0.0.1:{stack.settings.admin_port}"

    def openai(self, api_key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gateway + "/v1", api_key=api_key, max_retries=0, timeout=30)

    async def signup(self, email: str | None = None) -> dict[str, Any]:
        """A new self-service wallet through the public API (counts against the signup limit)."""
        email = email or f"user-{uuid.uuid4().hex[:12]}@example.com"
        async with self.http.post(self.gateway + "/user/signup", json={"email": email}) as response:
            body = await response.json()
            assert response.status == 201, body
        return {**body, "email": email}

    async def readyz(self) -> int:
        """The status of the sidecar's /readyz (0 when nothing answers: the sidecar is down)."""
        try:
            async with self.http.get(self.admin + "/readyz") as response:
                return response.status
        except aiohttp.ClientConnectionError:
            return 0

    async def backend_last_request(self) -> dict[str, Any]:
        async with self.http.get(self.backend + "/_demo/last_request") as response:
            assert response.status == 200
            return await response.json()

    async def metric(self, name: str, **labels: str) -> float:
        """The sum of the sidecar's Prometheus samples ``name`` with these labels (0 if none yet)."""
        async with self.http.get(self.admin + "/metrics") as response:
            text = await response.text()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )


_LIVE: list[Database] = []


@contextlib.asynccontextmanager
async def _database(new_database, *, migrate: bool) -> AsyncIterator[Database]:
    async with new_database("e2e", migrate=migrate) as url:
        db = Database(url)
        try:
            yield db
        finally:
            await db.engine.dispose()


@pytest.fixture(scope="session")
def launch_database(new_database) -> Callable[[], contextlib.AbstractAsyncContextManager[Database]]:
    """``async with launch_database() as db``: a fresh migrated database (no stack)."""

    @contextlib.asynccontextmanager
    async def launch() -> AsyncIterator[Database]:
        async with _database(new_database, migrate=True) as db:
            _LIVE.append(db)
            try:
                yield db
            finally:
                _LIVE.remove(db)

    return launch


@contextlib.asynccontextmanager
async def _running(
    data_dir: Path,
    db: Database | None,
    settings: dict[str, str],
    restart_policy: RestartPolicy = DEFAULT_RESTART_POLICY,
) -> AsyncIterator[RunningStack]:
    """A Stack on free ports over ``db`` (None: its own embedded PostgreSQL, deleted afterwards);
    the tests' defaults, then ``settings``."""
    env = {
        **_clean_env(),
        "BILLINGPROXY_DATA_DIR": str(data_dir),
        **free_ports_env(),
        "BILLINGPROXY_BACKEND_API_KEY": BACKEND_API_KEY,
        "BILLINGPROXY_SIGNUP_RATE_PER_MINUTE": "1000",
        **settings,
    }
    if db is not None:
        env["DATABASE_URL"] = db.url
    said: list[str] = []
    stack = Stack(env, say=said.append, durable=False, restart_policy=restart_policy)
    try:
        await stack.start()
        async with contextlib.AsyncExitStack() as cleanup:
            if db is None:
                db = Database(stack.database_url)
                cleanup.push_async_callback(db.engine.dispose)
            http = await cleanup.enter_async_context(
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
            )
            yield RunningStack(stack, db, http, said)
    finally:
        own_postgres = stack.embedded_postgres
        await stack.stop()
        if own_postgres is not None:
            # destroy, not just stop: as root the cluster may live outside pytest's tmp dir.
            await asyncio.to_thread(own_postgres.destroy)


@pytest.fixture(scope="session")
def launch_stack(
    new_database, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., contextlib.AbstractAsyncContextManager[RunningStack]]:
    """``async with launch_stack(BILLINGPROXY_X="…") as stack``: the whole gateway on free ports.

    Defaults: a fresh database (the Stack migrates it), the demo backend, a backend credential
    (``BACKEND_API_KEY``), and a signup limit high enough for the tests' own signups.
    ``own_postgres=True``: the Stack runs its own embedded PostgreSQL instead of a database on
    the session's server, as ``billingproxy up`` does, so ``stack.stop_postgres()`` and
    ``start_postgres()`` work (a few seconds more to start). ``restart_policy``: the sidecar
    supervisor's waits.
    """

    @contextlib.asynccontextmanager
    async def launch(
        *,
        own_postgres: bool = False,
        restart_policy: RestartPolicy = DEFAULT_RESTART_POLICY,
        **settings: str,
    ) -> AsyncIterator[RunningStack]:
        async with contextlib.AsyncExitStack() as scope:
            db = (
                None
                if own_postgres
                else await scope.enter_async_context(_database(new_database, migrate=False))
            )
            running = await scope.enter_async_context(
                _running(tmp_path_factory.mktemp("stack"), db, settings, restart_policy)
            )
            _LIVE.append(running.db)
            try:
                yield running
            finally:
                _LIVE.remove(running.db)

    return launch


@pytest.fixture(scope="session")
def launch_replica(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., contextlib.AbstractAsyncContextManager[RunningStack]]:
    """``async with launch_replica(stack, BILLINGPROXY_X="…") as replica``: a second gateway (its
    own sidecar and Envoy, its own ports and access-log secret) on ``stack``'s database, demo
    backend and Stripe test double, as a second pod of the chart's Deployment is. Its settings
    are the tests' defaults plus ``settings``: give it the ones ``stack`` was launched with."""

    @contextlib.asynccontextmanager
    async def launch(stack: RunningStack, **settings: str) -> AsyncIterator[RunningStack]:
        shared = {name: stack.stack.env[name] for name in _STRIPE_SETTINGS if name in stack.stack.env}
        shared["BILLINGPROXY_BACKEND_URL"] = stack.backend
        shared["BILLINGPROXY_UPSTREAM_HEADERS"] = stack.stack.env["BILLINGPROXY_UPSTREAM_HEADERS"]
        async with _running(tmp_path_factory.mktemp("replica"), stack.db, {**shared, **settings}) as replica:
            yield replica

    return launch


_STRIPE_SETTINGS = ("STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET", "STRIPE_API_BASE")


@pytest.fixture(autouse=True)
async def books_balance() -> AsyncIterator[None]:
    """After each test: nothing left pending, and the ledger audit finds nothing."""
    yield
    for db in list(_LIVE):
        await db.settled()
        assert await db.invariants() == []
