"""Where the sidecar's CPU goes, step by step, without Envoy in the way.

Two kinds of measurement, both sequential (one call at a time, so nothing is batched or queued):

1. **The real sidecar process**, driven from here as Envoy drives it; its CPU time
   (``/proc/<pid>/stat``) per call. The Check is ext_authz over HTTP (``authz_sidecar/check_http.py``):
   each call is the HTTP/1.1 request Envoy's ``http_service`` sends — the client's method,
   ``/check`` + the client's path, the headers Envoy passes (host, content-length, authorization,
   x-request-id, content-type, and the ``x-envoy-*`` ones it adds itself) and the buffered body —
   on one keep-alive connection; a 200 admits. The access log is Envoy's gRPC stream (ALS):
   - ``check_get_cached_key``: a Check for ``GET /v1/models`` with a cached key: HTTP parsing
     and answering plus the key cache, no database;
   - ``check_post_cached_key``: a Check for the benchmark's chat request, key cached: adds the
     body's JSON and the hold (one SQL statement);
   - ``check_post_new_key``: the same with a key not yet cached: adds the key look-up;
   - ``access_log_settle``: one access-log entry on an open ALS stream, settled (the hold posted,
     the usage entry written): what every billed request costs after it ends.

   ``wall_us`` is one round trip seen from here, so it includes this process's aiohttp client
   (``client_cpu_us``, far more than Envoy's client costs) and PostgreSQL.
2. **The same database work in this process**, timed with this thread's CPU clock: the sidecar's
   own code (``billing.holds`` on an asyncpg connection, as the sidecar runs it) against the
   way it was done before, to show what the change saved:
   ``place_asyncpg`` (``holds.place``) vs ``place_sqlalchemy`` (the same statement, the same SQL
   text, executed through SQLAlchemy on an AUTOCOMMIT connection); ``settle_asyncpg_one_statement``
   (``holds.settle``: one statement) vs ``settle_sqlalchemy`` (the previous settlement, kept here
   as a reference: lock the hold, ``ledger.post_entry``, mark the hold — 7 round trips through
   SQLAlchemy) vs ``settle_asyncpg_seven_round_trips`` (those statements with plain asyncpg).
   And the group commit the sidecar uses under load (``authz_sidecar/group_commit.py``):
   ``place_many`` / ``settle_many`` (``hold_batches.place_many`` / ``settle_many``: a batch of
   ``GROUP_COMMIT_BATCH`` as one transaction), per request, against ``place_asyncpg`` /
   ``settle_asyncpg_one_statement`` (the same statements one by one, as at low load), each sent
   both ways (``hold_batches.SET_BATCH_MIN``): as the set-based statement (what the sidecar sends for
   such a batch) and pipelined (each request's own statement), with PostgreSQL's CPU too — the
   CPU of the database backend serving this connection (``pg_cpu_us``).

All on a wallet of its own, so the benchmark's books (``bench.runner.Bench.check_books``) are
untouched; the references keep the invariants (balance = Σ entries, reserved = Σ pending holds).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import grpc
import sqlalchemy as sa
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf import struct_pb2, wrappers_pb2
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from authz_sidecar import contract, envoy_config
from bench import procstat, workload
from billing import api_keys, hold_batches, holds, ledger, pricing, settings, tables, wallets

CALLS = 400
GRANT_NANO = 1_000 * 10**9
# Requests per transaction in the group-commit step (the sidecar's batches grow with the load,
# up to authz_sidecar.check.HOLD_BATCH_MAX / access_log.SETTLE_BATCH_MAX).
GROUP_COMMIT_BATCH = 16
GROUP_COMMIT_ROUNDS = 100
BATCH_WAYS = ("set_based", "pipelined")
# The client's Host, which Envoy passes on to the Check.
GATEWAY_AUTHORITY = "127.0.0.1:8080"

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


async def _settle_seven_round_trips_sqlalchemy(
    conn: AsyncConnection, *, request_id: str, cost_nano: int, details: dict[str, Any]
) -> None:
    """Reference only: how ``billing.holds.settle`` posted a hold before it was one statement."""
    h = tables.holds
    hold = (await conn.execute(sa.select(h).where(h.c.request_id == request_id).with_for_update())).first()
    assert hold is not None and hold.state == "pending"
    await ledger.post_entry(
        conn,
        wallet_id=hold.wallet_id,
        kind="usage",
        amount_nano=-cost_nano,
        idempotency_key=f"usage:{request_id}",
        details={"model": hold.model, "key_id": hold.key_id, "request_id": request_id, **details},
        release_reserved_nano=hold.amount_nano,
    )
    await conn.execute(
        sa.update(h)
        .where(h.c.request_id == request_id)
        .values(state="posted", posted_nano=cost_nano, resolved_at=sa.func.now())
    )


def check_headers(method: str, authorization: str, request_id: str) -> dict[str, str]:
    """The headers Envoy's ext_authz ``http_service`` sends to the Check for a client request
    (as captured from Envoy with this repository's ``_ext_authz_filter``); content-length is
    added by the client for a body."""
    headers = {"host": GATEWAY_AUTHORITY, "authorization": authorization, "x-request-id": request_id}
    if method == "POST":
        headers.update({"content-type": "application/json", "x-envoy-auth-partial-body": "false"})
    else:
        headers["content-length"] = "0"
    headers.update(
        {
            "x-envoy-internal": "true",
            "x-envoy-expected-rq-timeout-ms": str(settings.Settings().check_timeout_ms),
        }
    )
    return headers


def _log_entry(request_id: str, wallet_id: str, key_id: str) -> accesslog_pb2.HTTPAccessLogEntry:
    # As ext_authz files a 200 Check answer's x-billingproxy-* headers (dynamic_metadata_from_headers).
    facts = {
        "wallet_id": wallet_id,
        "key_id": key_id,
        "hold_id": request_id,
        "model": workload.MODEL,
        "format": "openai_chat",
    }
    authz = struct_pb2.Struct()
    authz.update(
        {contract.metadata_header(field): contract.metadata_value(value) for field, value in facts.items()}
    )
    usage = struct_pb2.Struct()
    usage.update(
        {
            "usage": json.dumps(
                {"prompt_tokens": workload.PROMPT_TOKENS, "completion_tokens": workload.COMPLETION_TOKENS}
            ),
            "finished": True,
        }
    )
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.common_properties.metadata.filter_metadata[contract.AUTHZ_NAMESPACE].CopyFrom(authz)
    entry.common_properties.metadata.filter_metadata[contract.USAGE_NAMESPACE].CopyFrom(usage)
    entry.request.request_id = request_id
    entry.response.response_code.CopyFrom(wrappers_pb2.UInt32Value(value=200))
    return entry


class Steps:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        database_url: str,
        grpc_port: int,
        check_port: int,
        sidecar_pid: int | None,
        prices: pricing.PriceBook,
        access_log_secret: str,
        calls: int = CALLS,
    ) -> None:
        self.engine = engine
        self.database_url = database_url
        self.grpc_port = grpc_port  # the access log (ALS)
        self.access_log_secret = access_log_secret  # what Envoy sends; the sidecar reads nothing without it
        self.check_port = check_port  # the Check (HTTP)
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
            self.keys = [
                await api_keys.issue_key(conn, wallet_id=wallet.id, source="admin")
                for _ in range(self.calls + 1)
            ]
        self.cost = workload.cost_nano(self.prices)

    async def _sidecar_cpu_per_call(self, name: str, calls: Callable[[], Awaitable[None]]) -> None:
        before, started, client = (
            procstat.cpu_seconds(self.sidecar_pid),
            time.perf_counter(),
            time.thread_time(),
        )
        await calls()
        wall, client = time.perf_counter() - started, time.thread_time() - client
        cpu = procstat.cpu_seconds(self.sidecar_pid) - before
        self.results[name] = {
            "sidecar_cpu_us": round(cpu / self.calls * 1e6, 1),
            "wall_us": round(wall / self.calls * 1e6, 1),
            "client_cpu_us": round(client / self.calls * 1e6, 1),
        }

    async def _local_cpu_per_request(
        self,
        name: str,
        call: Callable[[int], Awaitable[None]],
        *,
        rounds: int | None = None,
        per_round: int = 1,
        pg_pid: int | None = None,
    ) -> None:
        """``call(n)`` for n in range(rounds), each doing ``per_round`` requests; per request.
        ``pg_pid``: the PostgreSQL backend the calls use, whose CPU is counted too."""
        rounds = self.calls if rounds is None else rounds
        pg_before = procstat.cpu_seconds(pg_pid) if pg_pid else None
        before, started = time.thread_time(), time.perf_counter()
        for n in range(rounds):
            await call(n)
        wall, cpu = time.perf_counter() - started, time.thread_time() - before
        requests = rounds * per_round
        self.results[name] = {
            "bench_cpu_us": round(cpu / requests * 1e6, 1),
            "wall_us": round(wall / requests * 1e6, 1),
        }
        if pg_before is not None:
            self.results[name]["pg_cpu_us"] = round(
                (procstat.cpu_seconds(pg_pid) - pg_before) / requests * 1e6, 1
            )

    async def _pending(self) -> int:
        async with self.engine.connect() as conn:
            pending: int = (
                await conn.execute(
                    sa.text("SELECT count(*) FROM holds WHERE wallet_id = :w AND state = 'pending'"),
                    {"w": self.wallet_id},
                )
            ).scalar_one()
        return pending

    async def run(self) -> dict[str, Any]:
        await self._setup()
        hot_key = f"Bearer {self.keys[0].plaintext}"
        base_url = f"http://127.0.0.1:{self.check_port}{contract.CHECK_PATH_PREFIX}"
        hold_header = contract.metadata_header("hold_id")
        # Like Envoy's connection pool to the Check cluster: HTTP/1.1, one keep-alive connection
        # (the calls are sequential), and only the headers Envoy sends.
        connector = aiohttp.TCPConnector(limit=1, keepalive_timeout=60)
        async with aiohttp.ClientSession(
            connector=connector,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        ) as session:

            async def check(method: str, authorization: str, request_id: str) -> bool:
                """One Check; True if admitted (200)."""
                path = workload.PATH if method == "POST" else "/v1/models"
                async with session.request(
                    method,
                    base_url + path,
                    headers=check_headers(method, authorization, request_id),
                    data=workload.BODY if method == "POST" else None,
                ) as response:
                    await response.read()
                    admitted = response.status == 200
                    if admitted and method == "POST":
                        assert response.headers.get(hold_header) == contract.metadata_value(request_id), (
                            response.headers
                        )
                    return admitted

            assert await check("GET", hot_key, "warm"), (
                "the sidecar did not admit the warm-up Check"
            )  # connect, cache the key

            async def gets() -> None:
                for n in range(self.calls):
                    assert await check("GET", hot_key, f"get-{n}")

            posted: list[str] = []

            async def posts_cached() -> None:
                for _ in range(self.calls):
                    request_id = f"steps-{uuid.uuid4()}"
                    if await check("POST", hot_key, request_id):
                        posted.append(request_id)
                    # One key throughout: cached, and kept fresh by the sidecar's refresher.

            async def posts_new_key() -> None:
                for n in range(self.calls):
                    request_id = f"steps-{uuid.uuid4()}"
                    if await check("POST", f"Bearer {self.keys[n + 1].plaintext}", request_id):
                        posted.append(request_id)

            await self._sidecar_cpu_per_call("check_get_cached_key", gets)
            await self._sidecar_cpu_per_call("check_post_cached_key", posts_cached)
            await self._sidecar_cpu_per_call("check_post_new_key", posts_new_key)
            self.results["holds_placed"] = len(posted)

        # Settle the first `calls` of them through a real ALS stream, one entry per message.
        to_settle = posted[: self.calls]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.grpc_port}") as channel:
            queue: asyncio.Queue[accesslog_pb2.HTTPAccessLogEntry | None] = asyncio.Queue()

            async def messages() -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
                identifier = als_pb2.StreamAccessLogsMessage.Identifier(log_name=envoy_config.ACCESS_LOG_NAME)
                first = True
                while (item := await queue.get()) is not None:
                    message = als_pb2.StreamAccessLogsMessage(
                        http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(log_entry=[item])
                    )
                    if first:
                        message.identifier.CopyFrom(identifier)
                        first = False
                    yield message

            stream = als_pb2_grpc.AccessLogServiceStub(channel).StreamAccessLogs(
                messages(), metadata=((contract.ACCESS_LOG_SECRET_HEADER, self.access_log_secret),)
            )
            key_id = self.keys[0].key_id

            async def settle_all() -> None:
                for request_id in to_settle:
                    await queue.put(_log_entry(request_id, self.wallet_id, key_id))
                    await asyncio.sleep(0.002)  # one entry at a time, as requests finish
                deadline = time.perf_counter() + 30
                while (
                    await self._pending() > (len(posted) - len(to_settle)) and time.perf_counter() < deadline
                ):
                    await asyncio.sleep(0.01)

            await self._sidecar_cpu_per_call("access_log_settle", settle_all)
            await queue.put(None)
            await stream
        # The sleeps between entries are not the sidecar's, nor this process's: report only its CPU.
        self.results["access_log_settle"].pop("wall_us")
        self.results["access_log_settle"].pop("client_cpu_us")
        await self._in_process(posted[self.calls :])
        return self.results

    async def _in_process(self, pending: list[str]) -> None:
        """Place and settle through the sidecar's code (asyncpg) and the ways it was done before."""
        autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        amount = 50_000
        sa_ids = [f"steps-sa-{uuid.uuid4()}" for _ in range(self.calls)]
        pg_ids = [f"steps-pg-{uuid.uuid4()}" for _ in range(self.calls)]
        pg7_ids = [f"steps-pg7-{uuid.uuid4()}" for _ in range(self.calls)]
        key_id = self.keys[0].key_id
        details = {
            "status": 200,
            "usage_source": "response",
            "prompt_tokens": workload.PROMPT_TOKENS,
            "completion_tokens": workload.COMPLETION_TOKENS,
            "cached_tokens": 0,
        }
        # The group commit: batches of GROUP_COMMIT_BATCH, built beforehand (the sidecar builds
        # them as Checks and log entries arrive).
        # GROUP_COMMIT_ROUNDS batches, so that PostgreSQL's CPU (counted in 10 ms clock ticks)
        # is read to a few µs per request; once for each way of sending a batch.
        rounds = GROUP_COMMIT_ROUNDS
        batches = {
            way: [[f"steps-gc-{uuid.uuid4()}" for _ in range(GROUP_COMMIT_BATCH)] for _ in range(rounds)]
            for way in BATCH_WAYS
        }
        place_batches = {
            way: [
                [
                    hold_batches.HoldRequest(request_id, self.wallet_id, key_id, workload.MODEL, amount)
                    for request_id in batch
                ]
                for batch in batches[way]
            ]
            for way in BATCH_WAYS
        }
        settle_batches = {
            way: [
                [
                    hold_batches.SettleRequest(
                        request_id, holds.Resolution.post(self.cost), details, wallet_id=self.wallet_id
                    )
                    for request_id in batch
                ]
                for batch in batches[way]
            ]
            for way in BATCH_WAYS
        }

        async def place_sqlalchemy(n: int) -> None:
            async with autocommit.connect() as conn:
                placed = (
                    await conn.exec_driver_sql(
                        holds.PLACE_SQL,
                        (sa_ids[n], self.wallet_id, key_id, workload.MODEL, amount, 600.0, False),
                    )
                ).first()
                assert placed is not None

        connection = await asyncpg.connect(self.database_url)
        try:

            async def place_asyncpg(n: int) -> None:
                for request_id in (pg_ids[n], pg7_ids[n]):
                    refusal = await holds.place(
                        connection,
                        request_id=request_id,
                        wallet_id=self.wallet_id,
                        key_id=key_id,
                        model=workload.MODEL,
                        amount_nano=amount,
                        ttl_s=600,
                        strict=False,
                    )
                    assert refusal is None

            steps = [await connection.prepare(sql) for sql in _SETTLE_STEPS]

            async def settle_sqlalchemy(n: int) -> None:
                async with self.engine.begin() as conn:
                    await _settle_seven_round_trips_sqlalchemy(
                        conn, request_id=sa_ids[n], cost_nano=self.cost, details=details
                    )

            async def settle_asyncpg(n: int) -> None:
                outcome = await holds.settle(
                    connection,
                    request_id=pg_ids[n],
                    resolution=holds.Resolution.post(self.cost),
                    details=details,
                )
                assert outcome is holds.Settlement.POSTED

            async def settle_asyncpg_seven(n: int) -> None:
                request_id = pg7_ids[n]
                async with connection.transaction():
                    hold = await steps[0].fetchrow(request_id)
                    assert hold is not None
                    balance = await steps[1].fetchval(hold["wallet_id"])
                    await steps[2].fetchrow(
                        hold["wallet_id"],
                        f"usage:{request_id}",
                        -self.cost,
                        balance - self.cost,
                        json.dumps(
                            {"model": workload.MODEL, "key_id": key_id, "request_id": request_id, **details}
                        ),
                    )
                    await steps[3].fetch(hold["wallet_id"], -self.cost, hold["amount_nano"])
                    await steps[4].fetch(request_id, self.cost)

            def place_many(way: str) -> Callable[[int], Awaitable[None]]:
                async def call(n: int) -> None:
                    refusals = await hold_batches.place_many(
                        connection, place_batches[way][n], ttl_s=600, strict=False
                    )
                    assert refusals == [None] * GROUP_COMMIT_BATCH, refusals

                return call

            def settle_many(way: str) -> Callable[[int], Awaitable[None]]:
                async def call(n: int) -> None:
                    outcomes = await hold_batches.settle_many(connection, settle_batches[way][n])
                    assert outcomes == [holds.Settlement.POSTED] * GROUP_COMMIT_BATCH, outcomes

                return call

            await self._local_cpu_per_request("place_sqlalchemy", place_sqlalchemy)
            # Two holds per call (one for each asyncpg settle variant).
            await self._local_cpu_per_request("place_asyncpg", place_asyncpg, per_round=2)
            await self._local_cpu_per_request("settle_sqlalchemy", settle_sqlalchemy)
            await self._local_cpu_per_request("settle_asyncpg_seven_round_trips", settle_asyncpg_seven)
            await self._local_cpu_per_request("settle_asyncpg_one_statement", settle_asyncpg)
            self.results["group_commit_batch"] = GROUP_COMMIT_BATCH
            pg_pid = await connection.fetchval("SELECT pg_backend_pid()")
            set_batch_min = hold_batches.SET_BATCH_MIN
            try:
                for way in BATCH_WAYS:
                    # The threshold decides how place_many / settle_many send a batch of this size.
                    hold_batches.SET_BATCH_MIN = (
                        set_batch_min if way == "set_based" else GROUP_COMMIT_BATCH + 1
                    )
                    suffix = "" if way == "set_based" else "_pipelined"
                    await self._local_cpu_per_request(
                        f"place_many{suffix}",
                        place_many(way),
                        rounds=rounds,
                        per_round=GROUP_COMMIT_BATCH,
                        pg_pid=pg_pid,
                    )
                    await self._local_cpu_per_request(
                        f"settle_many{suffix}",
                        settle_many(way),
                        rounds=rounds,
                        per_round=GROUP_COMMIT_BATCH,
                        pg_pid=pg_pid,
                    )
            finally:
                hold_batches.SET_BATCH_MIN = set_batch_min
        finally:
            await connection.close()
        # Leave nothing pending: void the holds the Check steps placed beyond those settled.
        async with self.engine.begin() as conn:
            for request_id in pending:
                await holds.settle(conn, request_id=request_id, resolution=holds.Resolution.VOID)
