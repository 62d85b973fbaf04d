"""Wallet resources against the real operator (kopf), kmock's Kubernetes API and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from support import crd_schema

import operator_harness as h
from billing import api_keys, settings, tables, wallets
from billing_operator import errors, settings as operator_settings, wallet_reconciler

WALLETS = "wallets"


async def test_wallet_is_created_once_with_its_grant(operator, kube, engine: AsyncEngine) -> None:
    created = await kube.create(
        "Wallet",
        "team-a",
        {"ownerEmail": "Alice@Example.com", "initialGrant": "2.50", "stripeCustomerId": "cus_A1"},
    )
    uid = created["metadata"]["uid"]
    wallet = await kube.wait_for(WALLETS, "team-a", h.is_ready)

    (row,) = await h.wallet_rows(engine, uid)
    assert (row.source, row.email, row.balance_nano, row.suspended, row.stripe_customer_id) == (
        "kubernetes",
        "alice@example.com",
        2_500_000_000,
        False,
        "cus_A1",
    )
    (grant,) = await h.ledger_rows(engine, row.id)
    assert (grant.kind, grant.amount_nano, grant.idempotency_key) == (
        "grant",
        2_500_000_000,
        f"grant:kubernetes:{uid}",
    )

    status = wallet["status"]
    assert (
        status["walletId"] == row.id and status["balance"] == "2.500000" and status["reserved"] == "0.000000"
    )
    assert status["state"] == "Active" and status["observedGeneration"] == 1
    assert "billingproxy.io/finalizer" in wallet["metadata"]["finalizers"]
    crd_schema.assert_valid(wallet)
    event = await kube.wait_event("team-a", "WalletCreated")
    assert row.id in event["message"] and event["type"] == "Normal"
    await h.books_balance(engine)


async def test_default_grant_is_fifty_cents(operator, kube, engine: AsyncEngine) -> None:
    created = await kube.create("Wallet", "team-b", {"ownerEmail": "bob@example.com"})
    await kube.wait_for(WALLETS, "team-b", h.is_ready)
    (row,) = await h.wallet_rows(engine, created["metadata"]["uid"])
    assert row.balance_nano == 500_000_000


async def test_spec_changes_are_applied_and_the_grant_never_repeats(
    operator, kube, engine: AsyncEngine
) -> None:
    uid = (await kube.create("Wallet", "team-a", {"ownerEmail": "alice@example.com"}))["metadata"]["uid"]
    await kube.wait_for(WALLETS, "team-a", h.is_ready)

    await kube.patch_spec(WALLETS, "team-a", {"suspended": True, "ownerEmail": "carol@example.com"})
    wallet = await kube.wait_for(
        WALLETS, "team-a", lambda o: h.is_ready(o) and o["status"]["state"] == "Suspended"
    )
    assert wallet["status"]["observedGeneration"] == 2
    (row,) = await h.wallet_rows(engine, uid)
    assert row.suspended and row.email == "carol@example.com"
    assert "suspended" in (await kube.wait_event("team-a", "WalletSuspended"))["message"]

    await kube.patch_spec(WALLETS, "team-a", {"suspended": False})
    await kube.wait_for(WALLETS, "team-a", lambda o: h.is_ready(o) and o["status"]["state"] == "Active")
    await kube.wait_event("team-a", "WalletResumed")

    # The CRD forbids this (CEL); kmock does not evaluate CEL, like an old CRD would not.
    await kube.patch_spec(WALLETS, "team-a", {"initialGrant": "99.00"})
    await kube.wait_for(WALLETS, "team-a", lambda o: h.is_ready(o) and o["status"]["observedGeneration"] == 4)
    (row,) = await h.wallet_rows(engine, uid)
    assert row.balance_nano == 500_000_000
    assert [e.kind for e in await h.ledger_rows(engine, row.id)] == ["grant"]


async def test_invalid_spec_fails_permanently_with_a_condition_until_fixed(
    operator, kube, engine: AsyncEngine
) -> None:
    # A spec the CRD would refuse at `kubectl apply`; kmock takes it, as an older CRD might.
    uid = (await kube.create("Wallet", "bad", {"ownerEmail": "not-an-email"}))["metadata"]["uid"]
    wallet = await kube.wait_for(WALLETS, "bad", h.reason_is("InvalidSpec"))
    assert "spec.ownerEmail" in h.condition(wallet)["message"]
    assert await h.wallet_rows(engine, uid) == []

    await kube.patch_spec(WALLETS, "bad", {"ownerEmail": "fixed@example.com"})
    await kube.wait_for(WALLETS, "bad", h.is_ready)
    assert len(await h.wallet_rows(engine, uid)) == 1


async def test_wallets_of_other_owners_are_never_touched(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        admin = await wallets.create_wallet(conn, source="admin", grant_nano=7, external_id="uid-taken")
    spec = wallet_reconciler.WalletSpec.parse({"ownerEmail": "mallory@example.com", "suspended": True})
    with pytest.raises(errors.NotOwned):
        await wallet_reconciler.ensure(engine, uid="uid-taken", spec=spec, apply_switch=True)
    assert await wallet_reconciler.release(engine, uid="uid-taken") is None
    async with engine.connect() as conn:
        after = await wallets.get_wallet(conn, admin.id)
    assert after == admin


async def test_duplicate_runs_create_one_wallet_and_one_grant(engine: AsyncEngine) -> None:
    spec = wallet_reconciler.WalletSpec.parse({"ownerEmail": "dup@example.com", "initialGrant": "1"})
    outcomes = await asyncio.gather(
        *(wallet_reconciler.ensure(engine, uid="uid-dup", spec=spec, apply_switch=False) for _ in range(6))
    )
    assert len({o.wallet.id for o in outcomes}) == 1
    assert [o.created for o in outcomes].count(True) == 1
    (row,) = await h.wallet_rows(engine, "uid-dup")
    assert row.balance_nano == 1_000_000_000 and len(await h.ledger_rows(engine, row.id)) == 1


async def test_deleting_a_wallet_suspends_it_and_its_keys_and_keeps_the_ledger(
    operator, kube, engine: AsyncEngine
) -> None:
    uid = (await kube.create("Wallet", "team-a", {"ownerEmail": "alice@example.com"}))["metadata"]["uid"]
    wallet_id = (await kube.wait_for(WALLETS, "team-a", h.is_ready))["status"]["walletId"]
    await kube.create("ApiKey", "ci", {"walletRef": {"name": "team-a"}, "secretName": "ci-key"})
    await kube.wait_for("apikeys", "ci", h.is_ready)
    async with engine.begin() as conn:  # a key issued by hand for the same wallet
        await api_keys.issue_key(conn, wallet_id=wallet_id, source="admin")

    await kube.delete(WALLETS, "team-a")
    await kube.wait_gone(WALLETS, "team-a")

    (row,) = await h.wallet_rows(engine, uid)
    assert row.suspended
    keys = await h.key_rows(engine, wallet_id=wallet_id)
    assert len(keys) == 2 and all(k.suspended and k.revoked_at is None for k in keys)
    assert [e.kind for e in await h.ledger_rows(engine, wallet_id)] == ["grant"]
    assert "2 key(s)" in (await kube.wait_event("team-a", "WalletReleased"))["message"]
    # The ApiKey stays and says so: its key is suspended (the status timer reads PostgreSQL).
    await kube.wait_for("apikeys", "ci", lambda o: o["status"]["state"] == "Suspended")


async def test_a_restart_midway_grants_once(
    direct_settings, kubeconfig, kube, emulator, engine: AsyncEngine
) -> None:
    """The create handler's work is committed, but kopf never records it (its patches fail);
    a new operator runs the create handler again: still one wallet, one grant, one Event."""

    def results_patch(request) -> bool:
        return (
            request.resource == "billingproxy.io/v1alpha1/wallets"
            and request.method == "PATCH"
            and "finalizers" not in str(request.data)
        )

    heal = emulator.fail(results_patch)
    first = h.OperatorThread(direct_settings)
    await first.start()
    uid = (await kube.create("Wallet", "team-a", {"ownerEmail": "alice@example.com"}))["metadata"]["uid"]
    await h.eventually(lambda: h.wallet_rows(engine, uid), what="the wallet row")
    await first.stop()
    assert h.condition(await kube.get(WALLETS, "team-a")) is None  # the status never got written

    heal()
    async with h.running(direct_settings):
        wallet = await kube.wait_for(WALLETS, "team-a", h.is_ready)
    (row,) = await h.wallet_rows(engine, uid)
    assert row.balance_nano == 500_000_000 and len(await h.ledger_rows(engine, row.id)) == 1
    assert wallet["status"]["walletId"] == row.id
    assert len(await kube.events_for("team-a", "WalletCreated")) == 1
    create_patches = [
        r for r in emulator if r.method == "PATCH" and "last-handled-configuration" in str(r.data)
    ]
    assert create_patches, "the second operator ran the create handler (not just resume)"


async def test_database_outage_is_a_temporary_error_with_a_condition(
    proxied_settings, db_proxy, kubeconfig, kube, engine: AsyncEngine
) -> None:
    async with h.running(proxied_settings):
        db_proxy.close()
        uid = (await kube.create("Wallet", "team-a", {"ownerEmail": "alice@example.com"}))["metadata"]["uid"]
        wallet = await kube.wait_for(WALLETS, "team-a", h.reason_is("DatabaseUnavailable"))
        assert "PostgreSQL is unreachable" in h.condition(wallet)["message"]
        await db_proxy.open()
        await kube.wait_for(WALLETS, "team-a", h.is_ready)
    (row,) = await h.wallet_rows(engine, uid)
    assert len(await h.ledger_rows(engine, row.id)) == 1


async def test_wallet_rows_are_only_ever_kubernetes_rows(engine: AsyncEngine) -> None:
    """What the operator writes carries source='kubernetes' (the DB refuses unknown sources)."""
    spec = wallet_reconciler.WalletSpec.parse({"ownerEmail": "x@example.com"})
    await wallet_reconciler.ensure(engine, uid="uid-x", spec=spec, apply_switch=True)
    async with engine.connect() as conn:
        sources = set((await conn.execute(sa.select(tables.wallets.c.source))).scalars())
    assert sources == {"kubernetes"}


async def test_overdraft_limit_defaults_then_follows_its_field_only(
    operator, direct_settings, kube, engine: AsyncEngine
) -> None:
    """spec.overdraftLimitUsd is applied on create and when it changes; unset, the operator's
    default (BILLINGPROXY_OVERDRAFT_LIMIT_USD); a limit set by an admin outlives other changes."""
    uid = (await kube.create("Wallet", "team-a", {"ownerEmail": "alice@example.com"}))["metadata"]["uid"]
    wallet = await kube.wait_for(WALLETS, "team-a", h.is_ready)
    (row,) = await h.wallet_rows(engine, uid)
    assert row.overdraft_limit_nano == direct_settings.overdraft_limit_nano == 1_000_000_000
    assert wallet["status"]["overdraftLimit"] == "1.000000"
    crd_schema.assert_valid(wallet)

    await kube.patch_spec(WALLETS, "team-a", {"overdraftLimitUsd": "2.50"})
    await kube.wait_for(
        WALLETS, "team-a", lambda o: h.is_ready(o) and o["status"].get("overdraftLimit") == "2.500000"
    )
    (row,) = await h.wallet_rows(engine, uid)
    assert row.overdraft_limit_nano == 2_500_000_000

    # An admin lowers it by hand (`billingproxy wallet set-overdraft`); an unrelated change keeps it.
    async with engine.begin() as conn:
        await wallets.set_overdraft_limit(conn, row.id, 0)
    await kube.patch_spec(WALLETS, "team-a", {"ownerEmail": "carol@example.com"})
    await kube.wait_for(WALLETS, "team-a", lambda o: h.is_ready(o) and o["status"]["observedGeneration"] == 3)
    (row,) = await h.wallet_rows(engine, uid)
    assert (row.email, row.overdraft_limit_nano) == ("carol@example.com", 0)

    # Removing the field is a change too: back to the default.
    await kube.patch_spec(WALLETS, "team-a", {"overdraftLimitUsd": None})
    await kube.wait_for(WALLETS, "team-a", lambda o: h.is_ready(o) and o["status"]["observedGeneration"] == 4)
    (row,) = await h.wallet_rows(engine, uid)
    assert row.overdraft_limit_nano == 1_000_000_000


async def test_a_wallet_declared_without_overdraft_gets_none(operator, kube, engine: AsyncEngine) -> None:
    uid = (
        await kube.create(
            "Wallet", "strict-team", {"ownerEmail": "bob@example.com", "overdraftLimitUsd": "0"}
        )
    )["metadata"]["uid"]
    wallet = await kube.wait_for(WALLETS, "strict-team", h.is_ready)
    (row,) = await h.wallet_rows(engine, uid)
    assert row.overdraft_limit_nano == 0 and wallet["status"]["overdraftLimit"] == "0.000000"


def test_the_default_overdraft_limit_is_the_core_setting() -> None:
    cfg = operator_settings.from_env(
        {"DATABASE_URL": "postgresql://u:p@db/b", "BILLINGPROXY_OVERDRAFT_LIMIT_USD": "0.25"}
    )
    assert cfg.overdraft_limit_nano == 250_000_000
    assert (
        operator_settings.OperatorSettings(database_url="x").overdraft_limit_nano
        == settings.Settings().overdraft_limit_nano
    )


@pytest.mark.parametrize(
    "balance, limit, suspended, disputed, state",
    [
        (1, 0, False, False, "Active"),
        (0, 0, False, False, "Empty"),
        (-5, 0, False, False, "Empty"),
        (-5, 6, False, False, "Active"),
        (-6, 6, False, False, "Empty"),
        (0, 1, False, False, "Active"),
        (1, 0, True, False, "Suspended"),
        (1, 0, False, True, "Disputed"),
        (0, 0, True, True, "Suspended"),
        (0, 0, False, True, "Disputed"),
    ],
)
def test_the_status_state_is_the_wallet_state_as_the_crd_spells_it(
    balance: int, limit: int, suspended: bool, disputed: bool, state: str
) -> None:
    wallet = wallets.Wallet(
        id="wal_x",
        email=None,
        source="kubernetes",
        external_id="u",
        balance_nano=balance,
        reserved_nano=0,
        suspended=suspended,
        disputed=disputed,
        created_at=dt.datetime.now(dt.UTC),
        overdraft_limit_nano=limit,
    )
    assert wallet_reconciler.state_of(wallet) == state
    assert wallet.state.value == state.lower()


def test_every_wallet_state_is_one_the_crd_allows() -> None:
    allowed = crd_schema.version("Wallet")["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"][
        "state"
    ]["enum"]
    assert sorted(map(wallet_reconciler.crd_state, wallets.WalletState)) == sorted(allowed)
