"""Helpers shared by the Stripe tests (imported by name; conftest.py holds the fixtures)."""

from __future__ import annotations

import uuid
from typing import Any

import aiohttp
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from support.waiting import wait_until

from billing import audit, database, ledger, payments, settings as settings_mod, tables, wallets

SECRET_KEY = "sk_test_stripe_suite_0123456789"
WEBHOOK_SECRET = "whsec_stripe_suite_0123456789abcdef"
TEN_USD_NANO = 10 * 10**9


def declared(cls: type) -> set[str]:
    """The attribute names the SDK declares for a Stripe object."""
    return {
        name
        for klass in cls.__mro__
        for name in getattr(klass, "__annotations__", {})
        if not name.startswith("_")
    }


class Db:
    """A migrated test database, read directly."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: AsyncEngine = database.create_engine(url, pool_size=10)

    async def new_wallet(self, grant_nano: int = 0) -> tuple[str, str]:
        """A self-service wallet and its key: (wallet_id, api_key)."""
        async with self.engine.begin() as conn:
            created = await wallets.signup(
                conn, email=f"u-{uuid.uuid4().hex[:10]}@example.com", grant_nano=grant_nano
            )
        return created.wallet.id, created.key.plaintext

    async def wallet(self, wallet_id: str) -> wallets.Wallet:
        async with self.engine.connect() as conn:
            wallet = await wallets.get_wallet(conn, wallet_id)
        assert wallet is not None
        return wallet

    async def balance(self, wallet_id: str) -> int:
        return (await self.wallet(wallet_id)).balance_nano

    async def entries(self, wallet_id: str) -> list[ledger.Entry]:
        async with self.engine.connect() as conn:
            return list(reversed(await ledger.entries(conn, wallet_id, limit=1000)))

    async def events(self) -> list[sa.Row]:
        async with self.engine.connect() as conn:
            return list(
                (
                    await conn.execute(
                        sa.select(tables.stripe_events).order_by(tables.stripe_events.c.received_at)
                    )
                ).all()
            )

    async def count(self, table: sa.Table) -> int:
        async with self.engine.connect() as conn:
            return (await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar_one()

    async def row_counts(self) -> dict[str, int]:
        every = (
            tables.wallets,
            tables.ledger_entries,
            tables.stripe_events,
            tables.stripe_payments,
            tables.stripe_disputes,
            tables.stripe_checkout_sessions,
        )
        return {t.name: await self.count(t) for t in every}

    async def process(self, event: dict[str, Any]) -> payments.Result:
        async with self.engine.begin() as conn:
            return await payments.process_event(conn, event)

    async def problems(self) -> list[Any]:
        return (await audit.run(self.engine)).findings


def session_params(wallet_ref: str | None, cents: int = 1000, **extra: Any) -> dict[str, Any]:
    """What the gateway's SDK call sends, decoded as the double decodes it (all strings)."""
    params: dict[str, Any] = {
        "mode": "payment",
        "success_url": "http://gateway.test/billing/topup/success?session_id={CHECKOUT_SESSION_ID}",
        "cancel_url": "http://gateway.test/billing/topup/cancelled",
        "line_items": [
            {
                "quantity": "1",
                "price_data": {
                    "currency": "usd",
                    "unit_amount": str(cents),
                    "product_data": {"name": "credit"},
                },
            }
        ],
        "metadata": {"wallet_id": wallet_ref} if wallet_ref else {},
        **extra,
    }
    if wallet_ref:
        params["client_reference_id"] = wallet_ref
    return params


def stripe_settings(double_url: str | None, **changes: Any) -> settings_mod.Settings:
    base = settings_mod.Settings(public_url="http://gateway.test:8080")
    if double_url is not None:
        base = base.replace(
            stripe_secret_key=SECRET_KEY, stripe_webhook_secret=WEBHOOK_SECRET, stripe_api_base=double_url
        )
    return base.replace(**changes)


class Gateway:
    """The public API through Envoy, as a client sees it."""

    def __init__(self, url: str, http: aiohttp.ClientSession) -> None:
        self.url = url
        self.http = http

    async def signup(self) -> dict[str, Any]:
        async with self.http.post(
            self.url + "/user/signup", json={"email": f"u-{uuid.uuid4().hex[:10]}@example.com"}
        ) as r:
            body = await r.json()
            assert r.status == 201, body
            return body

    async def chat(self, api_key: str) -> tuple[int, dict[str, Any]]:
        request = {
            "model": "gpt-4o-mini",
            "max_tokens": 8,
            "messages": [{"role": "user", "content": "Hello"}],
        }
        async with self.http.post(
            self.url + "/v1/chat/completions", json=request, headers={"authorization": f"Bearer {api_key}"}
        ) as r:
            return r.status, await r.json()

    async def balance(self, api_key: str) -> dict[str, Any]:
        async with self.http.get(
            self.url + "/billing/balance", headers={"authorization": f"Bearer {api_key}"}
        ) as r:
            assert r.status == 200
            return await r.json()

    async def topup(self, api_key: str, amount_usd: str = "10.00") -> dict[str, Any]:
        async with self.http.post(
            self.url + "/billing/topup",
            json={"amount_usd": amount_usd},
            headers={"authorization": f"Bearer {api_key}"},
        ) as r:
            body = await r.json()
            assert r.status == 200, body
            return body

    async def exhaust(self, api_key: str) -> dict[str, Any]:
        """Spend the (tiny) grant until the 403: what is left no longer covers a request's worst
        case (self-service wallets have no overdraft, so with the stacks' grant, at once)."""

        async def refused() -> dict[str, Any] | None:
            status, body = await self.chat(api_key)
            assert status in (200, 403, 429), (status, body)  # 429 while one is still being settled
            return body if status == 403 else None

        return await wait_until(refused, 15, "the 403 of an empty wallet")
