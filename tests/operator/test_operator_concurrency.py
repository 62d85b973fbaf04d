"""The status timers run beside the handlers, and a tick can be in flight at any moment: when the
object is deleted, when the operator stops, while a handler writes the same status.

Each test puts a tick exactly there instead of hoping a race goes one way: PostgreSQL holds the
tick's query (a table lock the test takes), or the Kubernetes emulator holds its write
(``Emulator.hold``).
"""

from __future__ import annotations

import asyncio
import gc
import json
import warnings

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

import operator_harness as h
from billing import api_keys, ledger

WALLETS = "wallets"


def _status_write(plural: str, marker: str):
    """Matches a status PATCH of ``plural`` whose body mentions ``marker``."""

    def match(request) -> bool:
        return (
            request.resource == f"billingproxy.io/v1alpha1/{plural}"
            and request.method == "PATCH"
            and request.subresource == "status"
            and marker in json.dumps(request.data, default=str)
        )

    return match


def _synced(obj: dict) -> bool:
    return h.is_ready(obj) and h.reason_is("Mirrored", "True", "Synced")(obj)


async def _tick_waiting_for(engine: AsyncEngine, table: str) -> bool:
    """Whether another session (the operator's status tick) waits for a lock on ``table``."""
    async with engine.connect() as conn:
        waiting = await conn.scalar(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND wait_event_type = 'Lock' AND query LIKE :table"
            ),
            {"table": f"%{table}%"},
        )
    return bool(waiting)


async def test_a_wallet_deleted_while_its_status_tick_waits_for_the_database_goes_at_once(
    operator, kube, engine: AsyncEngine
) -> None:
    """kopf removes the finalizer only once the object's timers have exited; a tick it cannot
    stop at once used to cost kopf's 60 s polling interval (more than any test waits)."""
    await kube.create("Wallet", "team-a", {"ownerEmail": "alice@example.com"})
    await kube.wait_for(WALLETS, "team-a", _synced)
    async with engine.connect() as locker:
        # The tick reads the wallet row, then its top-ups: it waits here. Deleting touches no
        # ledger entry, so only the tick is held.
        await locker.execute(sa.text("LOCK TABLE ledger_entries IN ACCESS EXCLUSIVE MODE"))
        await h.eventually(
            lambda: _tick_waiting_for(engine, "ledger_entries"), what="a status tick in flight"
        )
        await kube.delete(WALLETS, "team-a")
        await kube.wait_gone(WALLETS, "team-a")
        await locker.rollback()
    assert len(await kube.events_for("team-a", "WalletReleased")) == 1


async def test_stopping_the_operator_while_a_status_tick_waits_for_the_database_leaves_nothing_open(
    direct_settings, kubeconfig, kube, engine: AsyncEngine
) -> None:
    """kopf gives a timer a few event-loop cycles to exit, then leaves it running. The tick then
    finished after the cleanup had disposed of the pool: its connection went back to the
    discarded pool, was never closed, and surfaced as an asyncpg ResourceWarning in whichever
    later test happened to collect it (likewise kopf's API session, if the tick wrote a status)."""
    operator = h.OperatorThread(direct_settings)
    await operator.start()
    try:
        await kube.create("Wallet", "team-a", {"ownerEmail": "alice@example.com"})
        await kube.wait_for(WALLETS, "team-a", _synced)
        async with engine.connect() as locker:
            await locker.execute(sa.text("LOCK TABLE ledger_entries IN ACCESS EXCLUSIVE MODE"))
            await h.eventually(
                lambda: _tick_waiting_for(engine, "ledger_entries"), what="a status tick in flight"
            )
            stopping = asyncio.ensure_future(operator.stop())

            async def cleaned_up() -> bool:
                return operator.logged("Activity 'cleanup'") or stopping.done()

            await h.eventually(cleaned_up, what="the operator's cleanup")
            await locker.rollback()  # a tick still running goes on now, after the cleanup
            await stopping
    finally:
        await operator.stop()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaks == [], "the stopped operator left resources open"


async def test_a_status_tick_never_takes_back_the_ready_condition_a_handler_wrote(
    proxied_settings, db_proxy, kubeconfig, kube, emulator
) -> None:
    """Conditions are one list: a tick that rewrote the whole list from what it had seen before
    the handler's write put the old Ready back, and nothing ever wrote it again."""
    async with h.running(proxied_settings):
        db_proxy.close()
        await kube.create("Wallet", "team-a", {"ownerEmail": "alice@example.com"})
        await kube.wait_for(
            WALLETS,
            "team-a",
            lambda o: (
                h.reason_is("DatabaseUnavailable")(o)
                and h.reason_is("DatabaseUnavailable", "False", "Synced")(o)
            ),
        )
        async with (
            emulator.hold(_status_write(WALLETS, "Reconciled")) as handler_write,
            emulator.hold(_status_write(WALLETS, "Mirrored")) as tick_write,
        ):
            await db_proxy.open()
            # Both have decided what to write; the handler's write lands first, the tick's second.
            await handler_write.arrived()
            await tick_write.arrived()
            handler_write.release()
            await handler_write.served()
            tick_write.release()
            await tick_write.served()
        await kube.wait_for(WALLETS, "team-a", _synced)


async def test_a_deletion_handler_run_again_by_kopf_announces_the_release_once(
    operator, kube, emulator, engine: AsyncEngine
) -> None:
    """While a timer is still exiting, kopf keeps the finalizer, forgets that the deletion
    handler succeeded and runs it again on the next event (kopf issue #882). The second run has
    nothing left to suspend; it must not post a second, wrong WalletReleased."""
    await kube.create("Wallet", "team-a", {"ownerEmail": "alice@example.com"})
    wallet_id = (await kube.wait_for(WALLETS, "team-a", _synced))["status"]["walletId"]
    async with engine.begin() as conn:
        await api_keys.issue_key(conn, wallet_id=wallet_id, source="admin")
    async with emulator.hold(_status_write(WALLETS, "lastTopUp")) as tick_write:
        async with engine.begin() as conn:  # a top-up: the next tick writes the status, and is held there
            await ledger.post_entry(
                conn,
                wallet_id=wallet_id,
                kind="credit",
                amount_nano=1_000_000,
                idempotency_key="credit:test-1",
            )
        await tick_write.arrived()
        await kube.delete(WALLETS, "team-a")
        await kube.wait_event("team-a", "WalletReleased")
    await kube.wait_gone(WALLETS, "team-a")
    (released,) = await kube.events_for("team-a", "WalletReleased")
    assert "1 key(s)" in released["message"]
