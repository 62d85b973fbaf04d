"""ApiKey resources against the real operator (kopf), kmock's Kubernetes API and PostgreSQL."""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from support import crd_schema

import operator_harness as h
from billing import api_keys, holds, key_format, key_limits

APIKEYS = "apikeys"
NOW = dt.datetime.now(dt.UTC)


async def _wallet(kube, name: str = "team-a") -> str:
    await kube.create("Wallet", name, {"ownerEmail": "alice@example.com"})
    return (await kube.wait_for("wallets", name, h.is_ready))["status"]["walletId"]


async def _secret(kube, name: str) -> dict | None:
    return await kube.get("secrets", name)


async def _record(engine: AsyncEngine, plaintext: str) -> api_keys.KeyRecord | None:
    async with engine.connect() as conn:
        return await api_keys.find_key(conn, key_format.hash_key(plaintext))


async def test_apikey_puts_the_key_in_a_secret_and_only_its_hash_in_postgres(
    operator, kube, emulator, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wallet_id = await _wallet(kube)
    expires = (NOW + dt.timedelta(days=30)).replace(microsecond=0)
    created = await kube.create(
        "ApiKey",
        "ci",
        {
            "walletRef": {"name": "team-a"},
            "secretName": "ci-key",
            "allowedModels": ["gpt-4o-mini", "gemini/gemini-2.5-flash"],
            "expiresAt": expires.isoformat().replace("+00:00", "Z"),
        },
    )
    uid = created["metadata"]["uid"]
    apikey = await kube.wait_for(APIKEYS, "ci", h.is_ready)

    secret = await _secret(kube, "ci-key")
    assert secret["type"] == "Opaque" and set(secret["data"]) == {"api-key", "key-id"}
    plaintext, key_id = h.secret_value(secret, "api-key"), h.secret_value(secret, "key-id")
    assert key_format.is_well_formed(plaintext)
    assert secret["metadata"]["labels"] == {
        "app.kubernetes.io/managed-by": "billingproxy-operator",
        "billingproxy.io/apikey": "ci",
        "billingproxy.io/wallet": "team-a",
    }
    (owner,) = secret["metadata"]["ownerReferences"]
    assert owner == {
        "apiVersion": "billingproxy.io/v1alpha1",
        "kind": "ApiKey",
        "name": "ci",
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }

    (row,) = await h.key_rows(engine, external_id=uid)
    assert (row.id, bytes(row.key_hash), row.source, row.wallet_id) == (
        key_id,
        key_format.hash_key(plaintext),
        "kubernetes",
        wallet_id,
    )
    assert row.allowed_models == ["gemini/gemini-2.5-flash", "gpt-4o-mini"] and row.expires_at == expires
    assert (await _record(engine, plaintext)).refusal(NOW) is None

    status = apikey["status"]
    assert (status["keyId"], status["keyPrefix"], status["walletId"], status["state"]) == (
        key_id,
        plaintext[:17],
        wallet_id,
        "Active",
    )
    crd_schema.assert_valid(apikey)
    event = await kube.wait_event("ci", "KeyIssued")
    assert key_id in event["message"] and "ci-key" in event["message"]

    # The plaintext is in the Secret and nowhere else: not in any other object (any version of
    # it), not in an Event, not in a log line, not in a database column.
    forms = (plaintext, base64.b64encode(plaintext.encode()).decode(), plaintext[17:])
    for (resource, _namespace, name), obj in emulator.objects.items():
        if resource == "v1/secrets":
            continue
        text = json.dumps([dict(v) if v is not None else None for v in obj.history], default=str)
        assert not any(f in text for f in forms), f"the key leaked into {resource} {name}"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert any(r.name.startswith("kopf.objects") for r in caplog.records)  # the operator's log was seen
    assert not any(f in logged for f in forms)
    assert not any(f in str(tuple(row)) for f in forms)


async def test_apikey_waits_for_its_wallet(operator, kube) -> None:
    await kube.create("ApiKey", "early", {"walletRef": {"name": "later"}, "secretName": "early-key"})
    apikey = await kube.wait_for(APIKEYS, "early", h.reason_is("WalletNotFound"))
    assert "later" in h.condition(apikey)["message"] and await _secret(kube, "early-key") is None
    await _wallet(kube, "later")
    await kube.wait_for(APIKEYS, "early", h.is_ready)
    assert await _secret(kube, "early-key") is not None


async def test_rotation_replaces_the_key_and_revokes_the_old_one_after_the_grace_period(
    operator, kube, engine: AsyncEngine
) -> None:
    await _wallet(kube)
    uid = (
        await kube.create(
            "ApiKey",
            "ci",
            {"walletRef": {"name": "team-a"}, "secretName": "ci-key", "rotationGracePeriodSeconds": 2},
        )
    )["metadata"]["uid"]
    await kube.wait_for(APIKEYS, "ci", h.is_ready)
    old = h.secret_value(await _secret(kube, "ci-key"), "api-key")

    await kube.patch_spec(APIKEYS, "ci", {"rotationGeneration": 1})
    apikey = await kube.wait_for(
        APIKEYS, "ci", lambda o: h.is_ready(o) and o["status"]["rotationGeneration"] == 1
    )
    secret = await _secret(kube, "ci-key")
    new = h.secret_value(secret, "api-key")
    assert new != old and secret["metadata"]["annotations"]["billingproxy.io/rotation-generation"] == "1"
    old_record, new_record = await _record(engine, old), await _record(engine, new)
    assert apikey["status"]["keyId"] == new_record.id == h.secret_value(secret, "key-id")
    assert apikey["status"]["previousKeyId"] == old_record.id
    crd_schema.assert_valid(apikey)
    # Inside the grace period both keys work; the old one has its end written down.
    now = dt.datetime.now(dt.UTC)
    assert old_record.refusal(now) is None and new_record.refusal(now) is None
    assert now < old_record.revoke_after <= now + dt.timedelta(seconds=3)
    assert old_record.id in (await kube.wait_event("ci", "KeyRotated"))["message"]

    async def old_key_refused() -> bool:
        record = await _record(engine, old)
        return record.refusal(dt.datetime.now(dt.UTC)) == "revoked"

    await h.eventually(old_key_refused, timeout_s=5, what="the old key's revocation")
    assert (await _record(engine, new)).refusal(dt.datetime.now(dt.UTC)) is None
    await kube.wait_for(APIKEYS, "ci", lambda o: "previousKeyId" not in o["status"])
    assert len(await h.key_rows(engine, external_id=uid)) == 2


async def test_suspend_and_resume_a_key(operator, kube, engine: AsyncEngine) -> None:
    await _wallet(kube)
    await kube.create("ApiKey", "ci", {"walletRef": {"name": "team-a"}, "secretName": "ci-key"})
    await kube.wait_for(APIKEYS, "ci", h.is_ready)
    plaintext = h.secret_value(await _secret(kube, "ci-key"), "api-key")
    await kube.patch_spec(APIKEYS, "ci", {"suspended": True})
    await kube.wait_for(APIKEYS, "ci", lambda o: h.is_ready(o) and o["status"]["state"] == "Suspended")
    assert (await _record(engine, plaintext)).refusal(NOW) == "suspended"
    await kube.patch_spec(APIKEYS, "ci", {"suspended": False})
    await kube.wait_for(APIKEYS, "ci", lambda o: h.is_ready(o) and o["status"]["state"] == "Active")
    assert (await _record(engine, plaintext)).refusal(NOW) is None


async def test_deleting_an_apikey_revokes_every_key_then_deletes_the_secret(
    operator, kube, engine: AsyncEngine
) -> None:
    await _wallet(kube)
    uid = (await kube.create("ApiKey", "ci", {"walletRef": {"name": "team-a"}, "secretName": "ci-key"}))[
        "metadata"
    ]["uid"]
    await kube.wait_for(APIKEYS, "ci", h.is_ready)
    await kube.patch_spec(APIKEYS, "ci", {"rotationGeneration": 1})  # one key in its grace period
    await kube.wait_for(APIKEYS, "ci", lambda o: h.is_ready(o) and o["status"].get("previousKeyId"))

    await kube.delete(APIKEYS, "ci")
    await kube.wait_gone(APIKEYS, "ci")
    rows = await h.key_rows(engine, external_id=uid)
    assert len(rows) == 2 and all(r.revoked_at is not None for r in rows)
    assert await _secret(kube, "ci-key") is None
    message = (await kube.wait_event("ci", "KeyRevoked"))["message"]
    assert all(r.id in message for r in rows)


async def test_deletion_waits_for_the_database_the_key_is_revoked_before_the_object_goes(
    proxied_settings, db_proxy, kubeconfig, kube, engine: AsyncEngine
) -> None:
    async with h.running(proxied_settings):
        await _wallet(kube)
        await kube.create("ApiKey", "ci", {"walletRef": {"name": "team-a"}, "secretName": "ci-key"})
        await kube.wait_for(APIKEYS, "ci", h.is_ready)
        plaintext = h.secret_value(await _secret(kube, "ci-key"), "api-key")
        db_proxy.close()
        await kube.delete(APIKEYS, "ci")
        blocked = await kube.wait_for(APIKEYS, "ci", h.reason_is("DatabaseUnavailable"))
        assert (
            blocked["metadata"]["deletionTimestamp"]
            and "billingproxy.io/finalizer" in blocked["metadata"]["finalizers"]
        )
        assert (await _record(engine, plaintext)).refusal(NOW) is None and await _secret(kube, "ci-key")
        await db_proxy.open()
        await kube.wait_gone(APIKEYS, "ci")
    assert (await _record(engine, plaintext)).refusal(dt.datetime.now(dt.UTC)) == "revoked"
    assert await _secret(kube, "ci-key") is None


async def test_a_secret_that_is_not_ours_is_left_alone(operator, kube) -> None:
    await _wallet(kube)
    theirs = await kube.create_secret("taken", {"password": "hunter2"})
    await kube.create("ApiKey", "ci", {"walletRef": {"name": "team-a"}, "secretName": "taken"})
    apikey = await kube.wait_for(APIKEYS, "ci", h.reason_is("SecretConflict"))
    assert "not managed by the operator" in h.condition(apikey)["message"]
    assert (await _secret(kube, "taken"))["data"] == theirs["data"]

    await kube._call("DELETE", "/api/v1/namespaces/default/secrets/taken")
    await kube.wait_for(APIKEYS, "ci", h.is_ready)
    assert set((await _secret(kube, "taken"))["data"]) == {"api-key", "key-id"}


async def test_a_restart_midway_records_the_key_that_is_in_the_secret(
    proxied_settings, db_proxy, kubeconfig, kube, emulator, engine: AsyncEngine
) -> None:
    """The Secret is written, then PostgreSQL goes away before the key is recorded; the next
    operator records that very key: no key lost, none issued twice."""
    first = h.OperatorThread(proxied_settings)
    await first.start()
    await _wallet(kube)

    def cut_database_after_secret(request) -> None:
        if request.resource == "v1/secrets" and request.method == "POST":
            db_proxy.close()

    emulator.observe(cut_database_after_secret)
    uid = (await kube.create("ApiKey", "ci", {"walletRef": {"name": "team-a"}, "secretName": "ci-key"}))[
        "metadata"
    ]["uid"]
    await kube.wait_for(APIKEYS, "ci", h.reason_is("DatabaseUnavailable"))
    in_secret = await _secret(kube, "ci-key")
    assert in_secret is not None and await h.key_rows(engine, external_id=uid) == []
    await first.stop()

    await db_proxy.open()
    async with h.running(proxied_settings):
        apikey = await kube.wait_for(APIKEYS, "ci", h.is_ready)
    (row,) = await h.key_rows(engine, external_id=uid)
    assert row.id == h.secret_value(in_secret, "key-id") == apikey["status"]["keyId"]
    assert bytes(row.key_hash) == key_format.hash_key(h.secret_value(in_secret, "api-key"))
    assert (await _secret(kube, "ci-key"))["data"] == in_secret["data"]
    assert len(await kube.events_for("ci", "KeyIssued")) == 1


async def test_restart_reissues_nothing_and_replaces_a_lost_secret(
    direct_settings, kubeconfig, kube, engine: AsyncEngine
) -> None:
    async with h.running(direct_settings):
        await _wallet(kube)
        uid = (await kube.create("ApiKey", "ci", {"walletRef": {"name": "team-a"}, "secretName": "ci-key"}))[
            "metadata"
        ]["uid"]
        await kube.wait_for(APIKEYS, "ci", h.is_ready)
    before = await _secret(kube, "ci-key")
    async with h.running(direct_settings):  # resume handlers run again: a duplicate run
        await kube.wait_for(APIKEYS, "ci", h.is_ready)
    assert (await _secret(kube, "ci-key"))["data"] == before["data"]
    assert len(await h.key_rows(engine, external_id=uid)) == 1

    await kube._call("DELETE", "/api/v1/namespaces/default/secrets/ci-key")
    async with h.running(direct_settings):
        await kube.wait_for(APIKEYS, "ci", lambda o: h.is_ready(o) and o["status"].get("previousKeyId"))
    lost, replacement = await h.key_rows(engine, external_id=uid)
    assert h.secret_value(await _secret(kube, "ci-key"), "key-id") == replacement.id
    assert lost.revoke_after is not None and lost.revoked_at is None  # its users get the grace period


async def test_spend_limit_is_applied_mirrored_announced_and_removed(
    operator, kube, engine: AsyncEngine
) -> None:
    """spec.spendLimit reaches the key's row; status shows the window's spend and its reset; the
    limit reached is announced once as a KeyLimitReached Event; removing it clears the row."""
    wallet_id = await _wallet(kube)
    created = await kube.create(
        "ApiKey",
        "capped",
        {
            "walletRef": {"name": "team-a"},
            "secretName": "capped-key",
            "spendLimit": {"usd": "0.000001", "window": "daily"},
        },
    )
    apikey = await kube.wait_for(APIKEYS, "capped", lambda o: h.is_ready(o) and "spentUsd" in o["status"])
    crd_schema.assert_valid(apikey)
    (row,) = await h.key_rows(engine, external_id=created["metadata"]["uid"])
    assert (row.limit_nano, row.limit_window) == (1_000, "daily")
    tomorrow = key_limits.calendar_start(key_limits.Window.DAILY, dt.datetime.now(dt.UTC)) + dt.timedelta(
        days=1
    )
    assert apikey["status"]["spentUsd"] == "0.000000"
    assert apikey["status"]["resetsAt"] == tomorrow.isoformat().replace("+00:00", "Z")

    async with engine.begin() as conn:
        assert (
            await holds.place(
                conn,
                request_id="r1",
                wallet_id=wallet_id,
                key_id=row.id,
                model="m",
                amount_nano=1_000,
                ttl_s=60,
                strict=True,
            )
            is None
        )
        refused = await holds.place(
            conn,
            request_id="r2",
            wallet_id=wallet_id,
            key_id=row.id,
            model="m",
            amount_nano=1,
            ttl_s=60,
            strict=True,
        )
        assert refused is not None and refused.reason is holds.RefusalReason.KEY_LIMIT_REACHED
        assert (
            await holds.settle(conn, request_id="r1", resolution=holds.Resolution.post(1_000))
            is holds.Settlement.POSTED
        )
    await kube.wait_for(APIKEYS, "capped", lambda o: o["status"].get("spentUsd") == "0.000001")
    event = await kube.wait_event("capped", "KeyLimitReached")
    assert row.id in event["message"] and "daily limit of $0.000001" in event["message"]

    await kube.patch_spec(APIKEYS, "capped", {"spendLimit": None})
    await kube.wait_for(APIKEYS, "capped", lambda o: h.is_ready(o) and "spentUsd" not in o["status"])
    (row,) = await h.key_rows(engine, external_id=created["metadata"]["uid"])
    assert (row.limit_nano, row.limit_window) == (None, None)
    assert len(await kube.events_for("capped", "KeyLimitReached")) == 1
