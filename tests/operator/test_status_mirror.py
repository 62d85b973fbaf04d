"""The status timers: balances and states mirrored from PostgreSQL, and the Events they imply."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from support import crd_schema

import operator_harness as h
from billing import ledger, tables

WALLETS = "wallets"


async def _post(engine: AsyncEngine, wallet_id: str, kind: str, amount_nano: int, key: str) -> ledger.Entry:
    async with engine.begin() as conn:
        return await ledger.post_entry(
            conn, wallet_id=wallet_id, kind=kind, amount_nano=amount_nano, idempotency_key=key
        )


async def test_top_ups_low_balance_and_empty_wallets_show_in_status_and_events(
    operator, kube, engine: AsyncEngine
) -> None:
    # Empty is balance + overdraft limit <= 0: here below -$0.05.
    await kube.create(
        "Wallet",
        "team-a",
        {
            "ownerEmail": "alice@example.com",
            "initialGrant": "1.00",
            "lowBalanceThreshold": "0.50",
            "overdraftLimitUsd": "0.05",
        },
    )
    wallet_id = (await kube.wait_for(WALLETS, "team-a", h.is_ready))["status"]["walletId"]

    topup = await _post(engine, wallet_id, "topup", 10_000_000_000, "stripe:pi_test_1")
    wallet = await kube.wait_for(WALLETS, "team-a", lambda o: o["status"].get("balance") == "11.000000")
    event = await kube.wait_event("team-a", "TopUp")
    assert "$10.000000" in event["message"] and "$11.000000" in event["message"]
    await kube.wait_for(
        WALLETS, "team-a", lambda o: (o["status"].get("lastTopUp") or {}).get("entryId") == topup.id
    )
    wallet = await kube.get(WALLETS, "team-a")
    assert wallet["status"]["lastTopUp"]["amount"] == "10.000000"
    crd_schema.assert_valid(wallet)

    await _post(engine, wallet_id, "adjustment", -10_800_000_000, "test:spend-1")
    await kube.wait_for(WALLETS, "team-a", lambda o: o["status"].get("balance") == "0.200000")
    low = await kube.wait_event("team-a", "LowBalance")
    assert low["type"] == "Warning" and "$0.200000" in low["message"]

    await _post(engine, wallet_id, "adjustment", -300_000_000, "test:spend-2")
    await kube.wait_for(WALLETS, "team-a", lambda o: o["status"].get("state") == "Empty")
    empty = await kube.wait_event("team-a", "WalletEmpty")
    assert empty["type"] == "Warning" and "$-0.100000" in empty["message"]

    # Each fact is announced once, however many ticks pass.
    await kube.wait_for(WALLETS, "team-a", lambda o: o["status"]["balance"] == "-0.100000")
    await _post(engine, wallet_id, "credit", 1_000_000_000, "credit:ticket-7")
    await kube.wait_for(WALLETS, "team-a", lambda o: o["status"].get("state") == "Active")
    await kube.wait_for(WALLETS, "team-a", lambda o: o["status"]["lastTopUp"]["amount"] == "1.000000")
    assert len(await kube.events_for("team-a", "TopUp")) == 2
    assert len(await kube.events_for("team-a", "WalletEmpty")) == 1
    assert len(await kube.events_for("team-a", "LowBalance")) == 1


async def test_reserved_funds_are_mirrored(operator, kube, engine: AsyncEngine) -> None:
    await kube.create("Wallet", "team-a", {"ownerEmail": "alice@example.com"})
    wallet_id = (await kube.wait_for(WALLETS, "team-a", h.is_ready))["status"]["walletId"]
    async with engine.begin() as conn:  # what a Check's hold does to the row
        await conn.execute(
            sa.update(tables.wallets)
            .where(tables.wallets.c.id == wallet_id)
            .values(reserved_nano=123_000_000)
        )
    await kube.wait_for(WALLETS, "team-a", lambda o: o["status"].get("reserved") == "0.123000")


async def test_a_database_outage_flips_synced_not_ready(proxied_settings, db_proxy, kubeconfig, kube) -> None:
    async with h.running(proxied_settings):
        await kube.create("Wallet", "team-a", {"ownerEmail": "alice@example.com"})
        await kube.wait_for(
            WALLETS, "team-a", lambda o: h.is_ready(o) and h.reason_is("Mirrored", "True", "Synced")(o)
        )
        db_proxy.close()
        wallet = await kube.wait_for(WALLETS, "team-a", h.reason_is("DatabaseUnavailable", "False", "Synced"))
        assert h.condition(wallet)["status"] == "True"  # Ready is about the spec, and still true
        await db_proxy.open()
        await kube.wait_for(WALLETS, "team-a", h.reason_is("Mirrored", "True", "Synced"))


async def test_an_expiring_key_turns_expired(operator, kube) -> None:
    await kube.create("Wallet", "team-a", {"ownerEmail": "alice@example.com"})
    await kube.wait_for(WALLETS, "team-a", h.is_ready)
    soon = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)).isoformat()
    await kube.create(
        "ApiKey", "temp", {"walletRef": {"name": "team-a"}, "secretName": "temp-key", "expiresAt": soon}
    )
    await kube.wait_for("apikeys", "temp", lambda o: h.is_ready(o) and o["status"]["state"] == "Active")
    await kube.wait_for("apikeys", "temp", lambda o: o["status"]["state"] == "Expired", timeout_s=6)
