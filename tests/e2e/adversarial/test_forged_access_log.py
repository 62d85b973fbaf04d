"""Issue 10, finding 1: only Envoy reports usage.

Whoever reached the sidecar's gRPC port could send access-log entries, and every entry was
settled: a forged 500 voided a request that had been served, and a forged entry naming
``o1-pro`` and 10M + 10M tokens posted -$7,500 on another wallet's pending hold (settlement priced
the model the entry named). Now the access-log stream must carry the secret Envoy is configured
with (gRPC initial metadata), and an entry whose model or wallet disagrees with the hold the Check
recorded is refused, counted and leaves the hold as it was — through the gRPC access log and
through ``billingproxy reconcile`` alike.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from authz_sidecar.contract import ACCESS_LOG_SECRET_HEADER
from billing import holds, wallets

pytestmark = pytest.mark.integration

MODEL = "gpt-4o-mini"
HOLD_NANO = 500_000
SETTLED_WITHIN_S = 10.0


@pytest.fixture(scope="module")
async def stack(launch_stack) -> AsyncIterator[Any]:
    async with launch_stack() as running:
        yield running


def entry(
    request_id: str,
    *,
    wallet_id: str,
    key_id: str,
    model: str,
    status: int,
    prompt: int = 0,
    completion: int = 0,
) -> accesslog_pb2.HTTPAccessLogEntry:
    """An HTTP access-log entry shaped as Envoy sends it (ext_authz's metadata as the Check's
    answer headers, the Lua filter's usage as protobuf doubles)."""
    log = accesslog_pb2.HTTPAccessLogEntry()
    metadata = log.common_properties.metadata.filter_metadata
    metadata["envoy.filters.http.ext_authz"].update(
        {
            "x-billingproxy-wallet-id": wallet_id,
            "x-billingproxy-key-id": key_id,
            "x-billingproxy-hold-id": request_id,
            "x-billingproxy-model": model,
        }
    )
    metadata["billingproxy.usage"].update(
        {
            "prompt_tokens": float(prompt),
            "completion_tokens": float(completion),
            "cached_tokens": 0.0,
            "usage_seen": True,
        }
    )
    log.request.request_id = request_id
    log.request.path = "/v1/chat/completions"
    log.response.response_code.value = status
    return log


async def deliver(stack, *entries: accesslog_pb2.HTTPAccessLogEntry, secret: str | None) -> None:
    """One access-log stream carrying ``entries``, with ``secret`` in its initial metadata (as
    Envoy's ``grpc_service.initial_metadata`` sends it), or none."""
    message = als_pb2.StreamAccessLogsMessage(
        identifier=als_pb2.StreamAccessLogsMessage.Identifier(log_name="billingproxy"),
        http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(log_entry=list(entries)),
    )
    metadata = None if secret is None else ((ACCESS_LOG_SECRET_HEADER, secret),)
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        stub = als_pb2_grpc.AccessLogServiceStub(channel)
        await stub.StreamAccessLogs(iter([message]), metadata=metadata, timeout=10)


async def place_hold(db, user: dict[str, Any], request_id: str) -> None:
    """The hold a Check would have placed for ``user``'s request on gpt-4o-mini."""
    async with db.engine.begin() as conn:
        refusal = await holds.place(
            conn,
            request_id=request_id,
            wallet_id=user["wallet_id"],
            key_id=user["key_id"],
            model=MODEL,
            amount_nano=HOLD_NANO,
            ttl_s=600,
            strict=False,
        )
    assert refusal is None


async def money(stack, user: dict[str, Any], request_id: str) -> tuple[Any, ...]:
    """Everything a settlement could change: the wallet's balance and reservation, its ledger,
    and the hold's state."""
    wallet = await stack.db.wallet(user["wallet_id"])
    hold = await stack.db.hold(request_id)
    return (
        wallet.balance_nano,
        wallet.reserved_nano,
        len(await stack.db.ledger(user["wallet_id"])),
        hold.state,
        hold.posted_nano,
    )


async def void_genuinely(stack, wait_until, user: dict[str, Any], request_id: str) -> None:
    """Envoy's own entry for the request (with the secret, agreeing with the hold) still settles
    it: the refusals above left the hold usable. A failed request, so that the outcome does not
    depend on how usage is read."""
    secret = stack.settings.access_log_secret
    await deliver(
        stack,
        entry(request_id, wallet_id=user["wallet_id"], key_id=user["key_id"], model=MODEL, status=500),
        secret=secret,
    )

    async def voided() -> bool:
        return (await stack.db.hold(request_id)).state == "voided"

    await wait_until(voided, SETTLED_WITHIN_S, "the genuine entry to void the hold")
    assert (await stack.db.wallet(user["wallet_id"])).reserved_nano == 0


@pytest.mark.parametrize("secret", [None, "", "not-the-secret-" + "x" * 32], ids=["none", "empty", "wrong"])
async def test_a_stream_without_the_secret_is_refused_and_settles_nothing(stack, wait_until, secret) -> None:
    """The forged 500 that voided a served request: refused UNAUTHENTICATED, counted, nothing settled."""
    user = await stack.signup()
    request_id = f"forged-{uuid.uuid4()}"
    await place_hold(stack.db, user, request_id)
    before = await money(stack, user, request_id)
    refused = await stack.metric("billingproxy_access_log_refusals_total", reason="unauthenticated")

    forged = entry(request_id, wallet_id=user["wallet_id"], key_id=user["key_id"], model=MODEL, status=500)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await deliver(stack, forged, secret=secret)
    assert failure.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert stack.settings.access_log_secret not in (failure.value.details() or "")

    assert (
        await stack.metric("billingproxy_access_log_refusals_total", reason="unauthenticated") == refused + 1
    )
    assert await money(stack, user, request_id) == before
    assert before[3] == "pending"
    await void_genuinely(stack, wait_until, user, request_id)


@pytest.mark.parametrize("claim", ["model", "wallet"])
async def test_an_entry_that_disagrees_with_its_hold_is_refused_and_counted(stack, wait_until, claim) -> None:
    """With the secret (a compromised or buggy reporter): an entry naming o1-pro and 10M + 10M
    tokens for a gpt-4o-mini hold, or naming another wallet, is refused; the hold, the wallet
    and the ledger are exactly as before."""
    victim, other = await stack.signup(), await stack.signup()
    request_id = f"mismatch-{uuid.uuid4()}"
    await place_hold(stack.db, victim, request_id)
    before = await money(stack, victim, request_id)
    other_before = await stack.db.wallet(other["wallet_id"])
    refusals = await stack.metric("billingproxy_access_log_refusals_total", reason="hold_mismatch")
    outcomes = await stack.metric("billingproxy_settlements_total", outcome="refused_mismatch")

    wallet_id, model = victim["wallet_id"], MODEL
    if claim == "model":
        model = "o1-pro"
    else:
        wallet_id = other["wallet_id"]
    forged = entry(
        request_id,
        wallet_id=wallet_id,
        key_id=victim["key_id"],
        model=model,
        status=200,
        prompt=10_000_000,
        completion=10_000_000,
    )
    await deliver(stack, forged, secret=stack.settings.access_log_secret)

    async def counted() -> bool:
        return await stack.metric("billingproxy_access_log_refusals_total", reason="hold_mismatch") > refusals

    await wait_until(counted, SETTLED_WITHIN_S, "the disagreeing entry to be refused")
    assert (
        await stack.metric("billingproxy_access_log_refusals_total", reason="hold_mismatch") == refusals + 1
    )
    assert await stack.metric("billingproxy_settlements_total", outcome="refused_mismatch") == outcomes + 1
    assert await money(stack, victim, request_id) == before
    assert await stack.db.wallet(other["wallet_id"]) == other_before
    await void_genuinely(stack, wait_until, victim, request_id)


async def test_reconcile_refuses_a_line_that_disagrees_with_its_hold(launch_database, tmp_path) -> None:
    """``billingproxy reconcile`` reads Envoy's JSON log, which anyone who can write that file can
    forge: the same agreement check applies, and the table says what was refused."""
    async with launch_database() as db:
        async with db.engine.begin() as conn:
            owner = await wallets.signup(
                conn, email=f"reconcile-{uuid.uuid4().hex[:8]}@example.com", grant_nano=500_000_000
            )
        user = {"wallet_id": owner.wallet.id, "key_id": owner.key.key_id}
        for request_id in ("rec-agrees", "rec-other-model", "rec-other-wallet"):
            await place_hold(db, user, request_id)
        grant = await db.balance(user["wallet_id"])

        def line(request_id: str, *, model: str = MODEL, wallet_id: str = user["wallet_id"]) -> str:
            authz = {
                "x-billingproxy-hold-id": request_id,
                "x-billingproxy-wallet-id": wallet_id,
                "x-billingproxy-key-id": user["key_id"],
                "x-billingproxy-model": model,
            }
            usage = {
                "prompt_tokens": 10_000_000,
                "completion_tokens": 10_000_000,
                "cached_tokens": 0,
                "usage_seen": True,
            }
            return json.dumps({"request_id": request_id, "status": 200, "authz": authz, "usage": usage})

        log = tmp_path / "envoy.log"
        log.write_text(
            "\n".join(
                [
                    line("rec-other-model", model="o1-pro"),
                    line("rec-other-wallet", wallet_id="wal_somebody_else"),
                    json.dumps(
                        {
                            "request_id": "rec-agrees",
                            "status": 500,
                            "authz": {
                                "x-billingproxy-hold-id": "rec-agrees",
                                "x-billingproxy-wallet-id": user["wallet_id"],
                                "x-billingproxy-key-id": user["key_id"],
                                "x-billingproxy-model": MODEL,
                            },
                            "usage": None,
                        }
                    ),
                ]
            )
            + "\n"
        )

        result = await db.acli("reconcile", str(log))
        assert result.returncode == 0, result.stderr
        table = dict(row.rsplit(None, 1) for row in result.stdout.strip().splitlines()[1:])
        assert table == {"refused_mismatch": "2", "voided": "1"}, result.stdout
        states = {h.request_id: (h.state, h.posted_nano) for h in await db.holds(user["wallet_id"])}
        assert states == {
            "rec-agrees": ("voided", None),
            "rec-other-model": ("pending", None),
            "rec-other-wallet": ("pending", None),
        }
        assert await db.balance(user["wallet_id"]) == grant
        assert [e.kind for e in await db.ledger(user["wallet_id"])] == ["grant"]

        # The two refused holds are Envoy's to settle: their genuine reports (failures) void them.
        async with db.engine.begin() as conn:
            for request_id in ("rec-other-model", "rec-other-wallet"):
                voided = await holds.settle(
                    conn,
                    request_id=request_id,
                    resolution=holds.Resolution.VOID,
                    wallet_id=user["wallet_id"],
                    model=MODEL,
                )
                assert voided is holds.Settlement.VOIDED
        assert (await db.wallet(user["wallet_id"])).reserved_nano == 0


async def test_neither_the_sidecar_nor_envoys_config_goes_without_the_secret(launch_database) -> None:
    """Without BILLINGPROXY_ACCESS_LOG_SECRET the sidecar would have nothing to check streams
    against: it refuses to start, and the Envoy config it would pair with is not rendered."""
    async with launch_database() as db:
        for command in (("sidecar",), ("envoy-config", "--backend-url", "http://127.0.0.1:9")):
            result = await db.acli(*command)
            assert result.returncode == 2, (command, result.stdout, result.stderr)
            assert "Traceback" not in result.stderr
            assert "BILLINGPROXY_ACCESS_LOG_SECRET" in result.stderr, result.stderr
        short = await db.acli("sidecar", BILLINGPROXY_ACCESS_LOG_SECRET="short")
        assert short.returncode == 2 and "at least 32" in short.stderr, short.stderr
        assert "short" not in short.stderr.replace("BILLINGPROXY", "")  # the value is never echoed
