"""A key made by an ApiKey works through the real gateway (Envoy → sidecar → demo backend), and
is refused within a second of the operator revoking it when the ApiKey is deleted."""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from support.waiting import wait_until_within

import operator_harness as h
from billing import api_keys, key_format
from billingproxy.devstack.local_stack import Stack

REVOCATION_BUDGET_S = 1.0


@pytest.fixture
async def gateway(database_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BILLINGPROXY_", "STRIPE_")) and k != "DATABASE_URL"
    }
    names = ("GATEWAY", "API", "GRPC", "ADMIN", "ENVOY_ADMIN")
    env.update(
        {
            "DATABASE_URL": database_url,
            "BILLINGPROXY_DATA_DIR": str(tmp_path / "stack"),
            **{
                f"BILLINGPROXY_{name}_PORT": str(port)
                for name, port in zip(names, h.server_ports(len(names)), strict=True)
            },
        }
    )
    stack = Stack(env, say=lambda _message: None, durable=False)
    await stack.start()
    try:
        yield stack
    finally:
        await stack.stop()


async def _chat(http: aiohttp.ClientSession, url: str, key: str) -> int:
    body = {"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "Hello"}]}
    async with http.post(
        f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        await response.read()
        return response.status


async def test_a_key_from_an_apikey_works_through_envoy_until_the_apikey_is_deleted(
    gateway: Stack, operator, kube, engine: AsyncEngine
) -> None:
    await kube.create("Wallet", "team-a", {"ownerEmail": "alice@example.com", "initialGrant": "1.00"})
    await kube.wait_for("wallets", "team-a", h.is_ready)
    await kube.create("ApiKey", "ci", {"walletRef": {"name": "team-a"}, "secretName": "ci-key"})
    await kube.wait_for("apikeys", "ci", h.is_ready)
    key = h.secret_value(await kube.get("secrets", "ci-key"), "api-key")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        assert await _chat(http, gateway.gateway_url, key) == 200
        await kube.wait_for(
            "wallets",
            "team-a",
            lambda o: o["status"]["balance"] != "1.000000",
            what="the request's cost in the Wallet's status",
        )

        await kube.delete("apikeys", "ci")

        async def revoked_since() -> float | None:
            """When the test saw the operator's revocation committed (time.monotonic), else None."""
            async with engine.connect() as conn:
                record = await api_keys.find_key(conn, key_format.hash_key(key))
            seen = time.monotonic()
            assert record is not None
            return seen if record.refusal(dt.datetime.now(dt.UTC)) == "revoked" else None

        # The operator revokes the key at its own pace; from that commit on, the gateway's promise.
        revoked_at = await h.eventually(revoked_since, what="the deleted ApiKey's key revoked in PostgreSQL")

        async def refused() -> bool:
            return await _chat(http, gateway.gateway_url, key) == 401

        await wait_until_within(
            refused,
            since=revoked_at,
            bound_s=REVOCATION_BUDGET_S,
            what="the deleted ApiKey's key being refused",
        )
    await kube.wait_gone("apikeys", "ci")
