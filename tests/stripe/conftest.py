"""Fixtures for the Stripe top-up tests: the local Stripe test double (the real SDK is pointed at
it, events are signed with the real scheme), a migrated database, the sidecar's public HTTP app
in-process, a whole gateway (`Stack`) through Envoy, and headless Chromium.

After every test, the ledger audit (``billing.audit``) must find nothing in each live database:
its books balance and agree with what Stripe told us.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import stripe
from aiohttp import web

from authz_sidecar import http_api
from authz_sidecar.key_lookup import KeyLookup
from billing import settings as settings_mod, topups
from billingproxy.devstack.local_stack import Stack, free_ports_env
from billingproxy.devstack.stripe_double import StripeDouble
from stripe_testkit import SECRET_KEY, WEBHOOK_SECRET, Db, session_params, stripe_settings

_LIVE: list[Db] = []


@contextlib.asynccontextmanager
async def _tracked(url: str) -> AsyncIterator[Db]:
    db = Db(url)
    _LIVE.append(db)
    try:
        yield db
    finally:
        _LIVE.remove(db)
        await db.engine.dispose()


@pytest.fixture
async def db(new_database) -> AsyncIterator[Db]:
    """A fresh database migrated by the real Alembic migrations (0003 included)."""
    async with new_database("stripe", migrate=True) as url, _tracked(url) as live:
        yield live
        # Here, not in the autouse fixture below: that one is torn down after this one.
        assert await live.problems() == []


@pytest.fixture(autouse=True)
async def books_agree_with_stripe() -> AsyncIterator[None]:
    """After each test, every longer-lived database (a module's stack) must balance too."""
    yield
    for live in list(_LIVE):
        assert await live.problems() == []


@pytest.fixture
async def double() -> AsyncIterator[StripeDouble]:
    """The test double, in this process; tests set ``webhook_url`` when they want deliveries."""
    fake = StripeDouble(
        secret_key=SECRET_KEY, webhook_secret=WEBHOOK_SECRET, webhook_url="http://127.0.0.1:9/unset"
    )
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def client(double: StripeDouble) -> AsyncIterator[stripe.StripeClient]:
    """The real SDK's client, pointed at the double (no retries: each call is one request)."""
    async with aiohttp.ClientSession() as session:
        yield stripe.StripeClient(
            SECRET_KEY,
            base_addresses={"api": double.url},
            max_network_retries=0,
            http_client=stripe.AIOHTTPClient(session=session, timeout=aiohttp.ClientTimeout(total=10)),
        )


class Sidecar:
    """The sidecar's public HTTP app (signup, balance, top-up, webhook) served in this process."""

    def __init__(self, url: str, http: aiohttp.ClientSession, settings: settings_mod.Settings) -> None:
        self.url = url
        self.http = http
        self.settings = settings

    async def post_event(self, payload: str, signature: str | None) -> tuple[int, dict[str, Any]]:
        headers = {"content-type": "application/json"}
        if signature is not None:
            headers["stripe-signature"] = signature
        async with self.http.post(
            self.url + "/stripe/webhook", data=payload.encode(), headers=headers
        ) as response:
            return response.status, await response.json()

    async def topup(self, api_key: str | None, body: Any, **headers: str) -> tuple[int, dict[str, Any]]:
        if api_key is not None:
            headers["authorization"] = f"Bearer {api_key}"
        async with self.http.post(self.url + "/billing/topup", json=body, headers=headers) as response:
            return response.status, await response.json()


@pytest.fixture
def start_sidecar(
    db: Db,
) -> Callable[[settings_mod.Settings], contextlib.AbstractAsyncContextManager[Sidecar]]:
    @contextlib.asynccontextmanager
    async def start(settings: settings_mod.Settings) -> AsyncIterator[Sidecar]:
        app = http_api.make_app(settings, db.engine, KeyLookup(db.engine, settings.key_cache_ttl_ms))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
                yield Sidecar(f"http://127.0.0.1:{runner.addresses[0][1]}", http, settings)
        finally:
            await runner.cleanup()

    return start


@pytest.fixture
async def sidecar(start_sidecar, double: StripeDouble) -> AsyncIterator[Sidecar]:
    """The sidecar configured with the double's keys; the double delivers webhooks to it."""
    async with start_sidecar(stripe_settings(double.url)) as running:
        double.webhook_url = running.url + "/stripe/webhook"
        yield running


# --- a whole gateway through Envoy ---------------------------------------------------------------


def stack_env(database_url: str, data_dir: Path, **settings: str) -> dict[str, str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BILLINGPROXY_", "STRIPE_")) and k != "DATABASE_URL"
    }
    return {
        **clean,
        "DATABASE_URL": database_url,
        "BILLINGPROXY_DATA_DIR": str(data_dir),
        **free_ports_env(),
        "BILLINGPROXY_SIGNUP_RATE_PER_MINUTE": "1000",
        # A millionth of a dollar: less than any request's worst case, so the first is refused.
        "BILLINGPROXY_FREE_GRANT_USD": "0.000001",
        **settings,
    }


@contextlib.asynccontextmanager
async def _launch_stack(new_database, data_dir: Path, **settings: str) -> AsyncIterator[tuple[Stack, Db]]:
    async with new_database("stripe", migrate=False) as url:
        stack = Stack(stack_env(url, data_dir, **settings), say=lambda _m: None, durable=False)
        try:
            await stack.start()
            async with _tracked(url) as live:
                yield stack, live
        finally:
            await stack.stop()


@pytest.fixture(scope="session")
async def default_stack(
    new_database, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Stack, Db]]:
    """`billingproxy up` with no Stripe keys: the Stack starts its own test double (a child)."""
    async with _launch_stack(new_database, tmp_path_factory.mktemp("default_stack")) as running:
        yield running


@pytest.fixture(scope="session")
async def keyed_stack(
    new_database, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Stack, Db, StripeDouble]]:
    """The gateway with Stripe keys configured (so no double of its own), its SDK pointed at a
    double in this process, whose objects and events the tests can then drive directly."""
    fake = StripeDouble(
        secret_key=SECRET_KEY, webhook_secret=WEBHOOK_SECRET, webhook_url="http://127.0.0.1:9/unset"
    )
    await fake.start()
    try:
        keys = {
            "STRIPE_SECRET_KEY": SECRET_KEY,
            "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "STRIPE_API_BASE": fake.url,
        }
        async with _launch_stack(new_database, tmp_path_factory.mktemp("keyed_stack"), **keys) as (
            stack,
            live,
        ):
            fake.webhook_url = stack.gateway_url + "/stripe/webhook"
            yield stack, live, fake
    finally:
        await fake.stop()


@pytest.fixture
def new_session(double: StripeDouble, db: Db) -> Callable[..., Awaitable[str]]:
    """``await new_session(wallet_id, cents=1000)``: an open Checkout Session in the double,
    recorded as the gateway's ``POST /billing/topup`` records it (only such sessions are
    credited). ``recorded=False``: a session someone else created on the same Stripe account."""

    async def create(
        wallet_ref: str | None, cents: int = 1000, *, recorded: bool = True, **extra: Any
    ) -> str:
        session = double.create_session(session_params(wallet_ref, cents, **extra))
        if recorded:
            assert wallet_ref is not None, "the gateway records every session it creates for a wallet"
            async with db.engine.begin() as conn:
                await topups.record_checkout_session(
                    conn,
                    session_id=session["id"],
                    wallet_id=wallet_ref,
                    amount_nano=cents * 10**7,
                    expires_at=None,
                )
        return session["id"]

    return create
