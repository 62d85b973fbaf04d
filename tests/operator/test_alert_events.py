"""Alert events of operator-managed wallets become Kubernetes Events on their Wallet, one per
event: every type but the webhook's test, LowBalance from the alert thresholds only for a Wallet
that declares no lowBalanceThreshold of its own, and nothing posted twice across a restart of the
operator. (Two replicas taking at once: tests/integration/test_alert_queue.py.)"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

import operator_harness as h
from billing import alerts, ledger
from billing_operator import events, settings as operator_settings

WALLETS = "wallets"
USD = 1_000_000_000
TYPES = {
    alerts.EventType.RECHARGE_SUCCEEDED: ("AutoRechargeSucceeded", "Normal"),
    alerts.EventType.RECHARGE_FAILED: ("AutoRechargeFailed", "Warning"),
    alerts.EventType.RECHARGE_PAUSED: ("AutoRechargePaused", "Warning"),
    alerts.EventType.KEY_LIMIT_REACHED: ("KeyLimitReached", "Warning"),
}


async def watched_wallet(kube, engine: AsyncEngine, name: str, spec: dict) -> str:
    await kube.create("Wallet", name, {"ownerEmail": f"{name}@example.com", **spec})
    wallet_id: str = (await kube.wait_for(WALLETS, name, h.is_ready))["status"]["walletId"]
    async with engine.begin() as conn:  # what every sidecar's alert worker does each round
        await alerts.enrol(conn, mail=False)
    return wallet_id


async def queue(engine: AsyncEngine, wallet_id: str, event_type: alerts.EventType, occurrence: str) -> str:
    async with engine.begin() as conn:
        event_id = await alerts.queue_event(
            conn, wallet_id, event_type, occurrence=occurrence, data={"amount_usd": "10.000000"}
        )
    assert event_id is not None
    return event_id


async def spend(engine: AsyncEngine, wallet_id: str, nano: int) -> int:
    """Spend ``nano`` and sweep, as the sidecar would; the events the sweep made."""
    async with engine.begin() as conn:
        await ledger.post_entry(
            conn, wallet_id=wallet_id, kind="adjustment", amount_nano=-nano, idempotency_key=f"test:{nano}"
        )
    async with engine.begin() as conn:
        return await alerts.sweep(conn)


def at_least(kube, name: str, reason: str, n: int):
    async def probe() -> bool | None:
        return True if len(await kube.events_for(name, reason)) >= n else None

    return probe


async def test_every_alert_type_is_posted_once_on_its_wallet(
    direct_settings: operator_settings.OperatorSettings, kubeconfig: Path, kube, engine: AsyncEngine
) -> None:
    async with h.running(direct_settings):
        wallet_id = await watched_wallet(kube, engine, "team-a", {"initialGrant": "2.00"})
        ids = {t: await queue(engine, wallet_id, t, f"{t}:1") for t in TYPES}
        for event_type, (reason, kind) in TYPES.items():
            posted = await kube.wait_event("team-a", reason)
            assert posted["type"] == kind and ids[event_type] in posted["message"]
            assert "amount_usd 10.000000" in posted["message"]
        await queue(engine, wallet_id, alerts.EventType.TEST, "test:1")  # not posted
        # No lowBalanceThreshold in the spec: the alert defaults' crossing ($1, never topped up) is it.
        assert await spend(engine, wallet_id, USD * 3 // 2) == 1
        low = await kube.wait_event("team-a", events.LOW_BALANCE)
        assert "at or below the alert threshold of $1.000000" in low["message"]

    async with h.running(direct_settings):  # a restart posts nothing again
        await queue(engine, wallet_id, alerts.EventType.KEY_LIMIT_REACHED, "key:2")
        await h.eventually(at_least(kube, "team-a", "KeyLimitReached", 2), what="the second KeyLimitReached")
        for reason, _ in TYPES.values():
            expected = 2 if reason == "KeyLimitReached" else 1
            assert len(await kube.events_for("team-a", reason)) == expected, reason
        assert len(await kube.events_for("team-a", events.LOW_BALANCE)) == 1
        assert not [e for e in await kube.events_for("team-a") if "alert.test" in e["message"]]


async def test_a_wallet_with_its_own_threshold_keeps_one_low_balance_source(
    operator, kube, engine: AsyncEngine
) -> None:
    wallet_id = await watched_wallet(
        kube, engine, "team-b", {"initialGrant": "2.00", "lowBalanceThreshold": "0.30"}
    )
    assert await spend(engine, wallet_id, USD * 7 // 4) == 1  # $0.25: the default $1 crossed too
    low = await kube.wait_event("team-b", events.LOW_BALANCE)
    assert "$0.300000" in low["message"], "the spec's threshold, not the alert defaults"
    await queue(engine, wallet_id, alerts.EventType.RECHARGE_PAUSED, "r:1")
    await kube.wait_event("team-b", "AutoRechargePaused")
    assert len(await kube.events_for("team-b", events.LOW_BALANCE)) == 1
