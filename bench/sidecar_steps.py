"""Where the sidecar's CPU goes, step by step, without Envoy in the way.

Two kinds of measurement, both sequential (one call at a time, so nothing is batched or queued):

1. **The real sidecar process**, driven over gRPC from here like Envoy drives it; its CPU time
   (``/proc/<pid>/stat``) per call:
   - ``check_get_cached_key``: a Check for ``GET /v1/models`` with a cached key: gRPC + protobuf
     plumbing and the key cache, no database;
   - ``check_post_cached_key``: a Check for the benchmark's chat request, key cached: adds the
     body's JSON and the hold (one SQL statement);
   - ``check_post_new_key``: the same with a key not yet cached: adds the key look-up;
   - ``access_log_settle``: one access-log entry on an open ALS stream, settled (the hold posted,
     the usage entry written): what every billed request costs after it ends.
2. **The same database work in this process**, timed with this thread's CPU clock: the sidecar's
   own code (``billing.holds`` on an asyncpg connection, as the sidecar runs it) against the
   way it was done before, to show what the change saved:
   ``place_asyncpg`` (``holds.place``) vs ``place_sqlalchemy`` (the same statement, the same SQL
   text, executed through SQLAlchemy on an AUTOCOMMIT connection); ``settle_asyncpg_one_statement``
   (``holds.settle``: one statement) vs ``settle_sqlalchemy`` (the previous settlement, kept here
   as a reference: lock the hold, ``ledger.post_entry``, mark the hold — 7 round trips through
   SQLAlchemy) vs ``settle_asyncpg_seven_round_trips`` (those statements with plain asyncpg).

All on a wallet of its own, so the benchmark's books (``bench.runner.Bench.check_books``) are
untouched; the references keep the invariants (balance = Σ entries, reserved = Σ pending holds).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import grpc
import sqlalchemy as sa
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import struct_pb2, wrappers_pb2

from billing import holds, ledger, pricing, tables, wallets
from authz_sidecar import access_log as access_log_mod

from bench import procstat, workload

CALLS = 400
GRANT_NANO = 1_000 * 10**9

# The seven round trips the settlement made before it was one statement (BEGIN, lock the hold,
# lock the wallet, insert the entry, move the balance, mark the hold, COMMIT), with plain asyncpg.
_SETTLE_STEPS = (
    "SELECT wallet_id, amount_nano, model, key_id, state FROM holds WHERE request_id = $1 FOR UPDATE",
    "SELECT balance_nano FROM wallets WHERE id = $1 FOR NO KEY UPDATE",
    """INSERT INTO ledger_entries (wallet_id, idempotency_key, kind, amount_nano, balance_after_nano, details)
       VALUES ($1, $2, 'usage', $3, $4, $5::jsonb) ON CONFLICT (idempotency_key) DO NOTHING RETURNING id""",
    """UPDATE wallets SET balance_nano = balance_nano + $2, reserved_nano = reserved_nano - $3,
       updated_at = now() WHERE id = $1""",
    "UPDATE holds SET state = 'posted', posted_nano = $2, resolved_at = now() WHERE request_id = $1",
)


async def _settle_seven_round_trips_sqlalchemy(conn, *, request_id: str, cost_nano: int, details: dict) -> None:
    """Reference only: how ``billing.holds.settle`` posted a hold before it was one statement."""
    h = tables.holds
    hold = (await conn.execute(sa.select(h).where(h.c.request_id == request_id).with_for_update())).first()
    assert hold is not None and hold.state == "pending"
    await ledger.post_entry(
        conn, wallet_id=hold.wallet_id, kind="usage", amount_nano=-cost_nano,
        idempotency_key=f"usage:{request_id}",
        details={"model": hold.model, "key_id": hold.key_id, "request_id": request_id, **details},
        release_reserved_nano=hold.amount_nano,
    )
    await conn.execute(sa.update(h).where(h.c.request_id == request_id)
                       .values(state="posted", posted_nano=cost_nano, resolved_at=sa.func.now()))


def _check_request(method: str, authorization: str, request_id: str, body: bytes) -> external_auth_pb2.CheckRequest:
    headers = {
        ":authority": "127.0.0.1", ":method": method, ":path": workload.PATH if method == "POST" else "/v1/models",
        ":scheme": "http", "authorization": authorization, "content-type": "application/json",
        "x-request-id": request_id, "user-agent": "bench",
    }
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method=method, headers=headers, path=headers[":path"], host="127.0.0.1", scheme="http",
        protocol="HTTP/1.1", size=len(body), raw_body=body,
    )
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )


def _log_entry(request_id: str, wallet_id: str, key_id: str) -> accesslog_pb2.HTTPAccessLogEntry:
    authz = struct_pb2.Struct()
    authz.update({"wallet_id": wallet_id, "key_id": key_id, "hold_id": request_id, "model": workload.MODEL})
    usage = struct_pb2.Struct()
    usage.update({"usage_seen": True, "prompt_tokens": workload.PROMPT_TOKENS,
                  "completion_tokens": workload.COMPLETION_TOKENS, "cached_tokens": 0})
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.common_properties.metadata.filter_metadata[access_log_mod.METADATA_NAMESPACE].CopyFrom(authz)
    entry.common_properties.metadata.filter_metadata[access_log_mod.USAGE_NAMESPACE].CopyFrom(usage)
    entry.request.request_id = request_id
    entry.response.response_code.CopyFrom(wrappers_pb2.UInt32Value(value=200))
    return entry


class Steps:
    def __init__(self, *, engine, database_url: str, grpc_port: int, sidecar_pid: int | None,
                 prices: pricing.PriceBook, calls: int = CALLS) -> None:
        self.engine = engine
        self.database_url = database_url
        self.grpc_port = grpc_port
        self.sidecar_pid = sidecar_pid
        self.prices = prices
        self.calls = calls
        self.results: dict[str, Any] = {"calls_per_step": calls}

    async def _setup(self) -> None:
        async with self.engine.begin() as conn:
            wallet = await wallets.create_wallet(
                conn, source="admin", grant_nano=GRANT_NANO, external_id=f"bench-steps-{uuid.uuid4().hex}"
            )
            self.wallet_id = wallet.id
            self.keys = [await wallets.issue_key(conn, wallet_id=wallet.id, source="admin")
                         for _ in range(self.calls + 1)]
        price = self.prices.price(workload.MODEL)
        self.cost = self.prices.cost_nano(price, pricing.Usage(
            prompt_tokens=workload.PROMPT_TOKENS, completion_tokens=workload.COMPLETION_TOKENS))

    async def _sidecar_cpu_per_call(self, name: str, calls: Callable[[], Awaitable[None]]) -> None:
        before, started = procstat.cpu_seconds(self.sidecar_pid), time.perf_counter()
        await calls()
        wall = time.perf_counter() - started
        cpu = procstat.cpu_seconds(self.sidecar_pid) - before
        self.results[name] = {"sidecar_cpu_us": round(cpu / self.calls * 1e6, 1),
                              "wall_us": round(wall / self.calls * 1e6, 1)}

    async def _local_cpu_per_call(self, name: str, call: Callable[[int], Awaitable[None]]) -> None:
        before, started = time.thread_time(), time.perf_counter()
        for n in range(self.calls):
            await call(n)
        wall, cpu = time.perf_counter() - started, time.thread_time() - before
        self.results[name] = {"bench_cpu_us": round(cpu / self.calls * 1e6, 1),
                              "wall_us": round(wall / self.calls * 1e6, 1)}

    async def _pending(self) -> int:
        async with self.engine.connect() as conn:
            return (await conn.execute(sa.text(
                "SELECT count(*) FROM holds WHERE wallet_id = :w AND state = 'pending'"), {"w": self.wallet_id})).scalar_one()

    async def run(self) -> dict[str, Any]:
        await self._setup()
        hot_key = f"Bearer {self.keys[0].plaintext}"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.grpc_port}") as channel:
            check = external_auth_pb2_grpc.AuthorizationStub(channel).Check
            await check(_check_request("GET", hot_key, "warm", b""))  # connect, cache the key

            async def gets() -> None:
                for n in range(self.calls):
                    await check(_check_request("GET", hot_key, f"get-{n}", b""))

            posted: list[str] = []

            async def posts_cached() -> None:
                for _ in range(self.calls):
                    request_id = f"steps-{uuid.uuid4()}"
                    response = await check(_check_request("POST", hot_key, request_id, workload.BODY))
                    if response.status.code == 0:
                        posted.append(request_id)
                    # One key throughout: cached, and kept fresh by the sidecar's refresher.

            async def posts_new_key() -> None:
                for n in range(self.calls):
                    request_id = f"steps-{uuid.uuid4()}"
                    response = await check(_check_request(
                        "POST", f"Bearer {self.keys[n + 1].plaintext}", request_id, workload.BODY))
                    if response.status.code == 0:
                        posted.append(request_id)

            await self._sidecar_cpu_per_call("check_get_cached_key", gets)
            await self._sidecar_cpu_per_call("check_post_cached_key", posts_cached)
            await self._sidecar_cpu_per_call("check_post_new_key", posts_new_key)
            self.results["holds_placed"] = len(posted)

            # Settle the first `calls` of them through a real ALS stream, one entry per message.
            to_settle = posted[: self.calls]
            queue: asyncio.Queue = asyncio.Queue()

            async def messages():
                identifier = als_pb2.StreamAccessLogsMessage.Identifier(log_name="billingproxy")
                first = True
                while (item := await queue.get()) is not None:
                    message = als_pb2.StreamAccessLogsMessage(
                        http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(log_entry=[item]))
                    if first:
                        message.identifier.CopyFrom(identifier)
                        first = False
                    yield message

            stream = als_pb2_grpc.AccessLogServiceStub(channel).StreamAccessLogs(messages())
            key_id = self.keys[0].key_id

            async def settle_all() -> None:
                for request_id in to_settle:
                    await queue.put(_log_entry(request_id, self.wallet_id, key_id))
                    await asyncio.sleep(0.002)  # one entry at a time, as requests finish
                deadline = time.perf_counter() + 30
                while await self._pending() > (len(posted) - len(to_settle)) and time.perf_counter() < deadline:
                    await asyncio.sleep(0.01)

            await self._sidecar_cpu_per_call("access_log_settle", settle_all)
            await queue.put(None)
            await stream
        # The sleeps between entries are not the sidecar's; report only CPU for this step.
        self.results["access_log_settle"].pop("wall_us")
        await self._in_process(posted[self.calls:])
        return self.results

    async def _in_process(self, pending: list[str]) -> None:
        """Place and settle through the sidecar's code (asyncpg) and the ways it was done before."""
        autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        amount = 50_000
        sa_ids = [f"steps-sa-{uuid.uuid4()}" for _ in range(self.calls)]
        pg_ids = [f"steps-pg-{uuid.uuid4()}" for _ in range(self.calls)]
        pg7_ids = [f"steps-pg7-{uuid.uuid4()}" for _ in range(self.calls)]
        key_id = self.keys[0].key_id

        async def place_sqlalchemy(n: int) -> None:
            async with autocommit.connect() as conn:
                placed = (await conn.exec_driver_sql(holds.PLACE_SQL, (
                    sa_ids[n], self.wallet_id, key_id, workload.MODEL, amount, 600.0, False))).first()
                assert placed is not None

        connection = await asyncpg.connect(self.database_url)
        try:
            async def place_asyncpg(n: int) -> None:
                for request_id in (pg_ids[n], pg7_ids[n]):
                    admitted = await holds.place(
                        connection, request_id=request_id, wallet_id=self.wallet_id, key_id=key_id,
                        model=workload.MODEL, amount_nano=amount, ttl_s=600, strict=False)
                    assert admitted is holds.Admission.ADMITTED

            steps = [await connection.prepare(sql) for sql in _SETTLE_STEPS]

            details = {"status": 200, "usage_source": "response", "prompt_tokens": workload.PROMPT_TOKENS,
                       "completion_tokens": workload.COMPLETION_TOKENS, "cached_tokens": 0}

            async def settle_sqlalchemy(n: int) -> None:
                async with self.engine.begin() as conn:
                    await _settle_seven_round_trips_sqlalchemy(
                        conn, request_id=sa_ids[n], cost_nano=self.cost, details=details)

            async def settle_asyncpg(n: int) -> None:
                outcome = await holds.settle(connection, request_id=pg_ids[n], cost_nano=self.cost, details=details)
                assert outcome is holds.Settlement.POSTED

            async def settle_asyncpg_seven(n: int) -> None:
                request_id = pg7_ids[n]
                async with connection.transaction():
                    hold = await steps[0].fetchrow(request_id)
                    balance = await steps[1].fetchval(hold["wallet_id"])
                    await steps[2].fetchrow(hold["wallet_id"], f"usage:{request_id}", -self.cost,
                                            balance - self.cost, json.dumps(
                        {"model": workload.MODEL, "key_id": key_id, "request_id": request_id, **details}))
                    await steps[3].fetch(hold["wallet_id"], -self.cost, hold["amount_nano"])
                    await steps[4].fetch(request_id, self.cost)

            await self._local_cpu_per_call("place_sqlalchemy", place_sqlalchemy)
            # Two holds per call (one for each asyncpg settle variant): halve the figures.
            await self._local_cpu_per_call("place_asyncpg", place_asyncpg)
            self.results["place_asyncpg"] = {k: round(v / 2, 1) for k, v in self.results["place_asyncpg"].items()}
            await self._local_cpu_per_call("settle_sqlalchemy", settle_sqlalchemy)
            await self._local_cpu_per_call("settle_asyncpg_seven_round_trips", settle_asyncpg_seven)
            await self._local_cpu_per_call("settle_asyncpg_one_statement", settle_asyncpg)
        finally:
            await connection.close()
        # Leave nothing pending: void the holds the Check steps placed beyond those settled.
        async with self.engine.begin() as conn:
            for request_id in pending:
                await holds.settle(conn, request_id=request_id, cost_nano=None)
