"""The sidecar process: one event loop serving Envoy's Check (ext_authz over HTTP on its own
port, and over gRPC), gRPC (the access log, health), the public HTTP API and the admin port,
plus a follower of Envoy's JSON access-log file (what the gRPC log lost), a sweeper that
expires holds nobody settled and, after a grace period, charges those no log ever reported
(billing/expiry.py), the alert worker (low-balance webhooks, alert_delivery.py) and, with Stripe
configured, the recharge worker (auto-recharge's off-session charges, recharge_worker.py).

Two ways into PostgreSQL (billing/database.py): an asyncpg pool for the hot path (the Check's key
look-up and hold, the access log's settlements, the key cache's refresher, the sweeper) and a
SQLAlchemy engine for the HTTP API.

``Sidecar`` is what tests and ``billingproxy up`` start in-process or as a child;
``serve()`` is the thin entry point behind ``billingproxy sidecar`` (on uvloop).

Every listener here binds to ``INTERNAL_HOST`` (loopback: in Kubernetes the pod's own network
namespace), whatever ``bind_host`` says — that is Envoy's public listener only. Envoy is the one
client of all four; clients reach the HTTP API through Envoy's routes, and a probe or scraper of
the admin port runs in the pod (docs/architecture.md, "Listeners").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import asyncpg
import grpc
import uvloop
from aiohttp import web
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from authz_sidecar import (
    access_log,
    access_log_file,
    admin_port,
    alert_delivery,
    check,
    check_grpc,
    envoy_config,
    http_api,
    metrics,
    recharge_worker,
)
from authz_sidecar.check_http import CheckServer
from authz_sidecar.key_lookup import KeyLookup
from billing import account_sessions, database, errors, expiry, holds, key_limits, pricing
from billing.settings import INTERNAL_HOST, Settings, SettingsError

logger = logging.getLogger(__name__)

# How long stopping waits for the last rounds of the access-log file (the database may be down).
LAST_FILE_ROUND_S = 5.0


class ListenError(errors.UserFacingError, OSError):
    """A listener of the sidecar cannot bind its port (another process has it, or it is not ours
    to take); the message names the listener and the address."""

    def __init__(self, address: str, reason: str | None, *, listener: str = "") -> None:
        what = f" for {listener}" if listener else ""
        super().__init__(
            f"cannot listen{what} on {address}: {reason or 'the port is taken'}; "
            "stop the other process or choose another port (docs/configuration.md)"
        )


class Sidecar:
    def __init__(self, settings: Settings, prices: pricing.PriceBook) -> None:
        self.settings = settings
        self.prices = prices
        self.engine = database.create_engine(settings.database_url, pool_size=5)
        self.pool: asyncpg.Pool | None = None
        self._key_lookup: KeyLookup | None = None
        self._grpc: grpc.aio.Server | None = None
        self._runners: list[web.AppRunner] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._alerts: asyncio.Task[None] | None = None
        self._recharges: asyncio.Task[None] | None = None
        self._access_log: access_log.AccessLogService | None = None
        self._file_log: access_log_file.Follower | None = None
        self._file_follower: asyncio.Task[None] | None = None
        self._decider: check.Decider | None = None
        self._check: CheckServer | None = None
        self.health = health.aio.HealthServicer()

    async def start(self) -> None:
        s = self.settings
        if not s.access_log_secret:
            raise SettingsError(
                "BILLINGPROXY_ACCESS_LOG_SECRET must be set to serve: Envoy sends it with every access-log "
                "stream, and without it anyone who reaches the gRPC port could report usage "
                "(`billingproxy up` makes one; see docs/configuration.md)"
            )
        host = INTERNAL_HOST
        self.pool = pool = await database.create_pool(s.database_url, size=s.hot_path_pool_size)
        self._key_lookup = key_lookup = KeyLookup(pool, s.key_cache_ttl_ms)
        key_lookup.start()
        self._decider = decider = check.Decider(s, self.prices, pool, key_lookup)
        settler = access_log.Settler(pool, self.prices)
        self._access_log = access_log.AccessLogService(settler, secret=s.access_log_secret)
        self._access_log.start()
        self._file_log = access_log_file.Follower(
            settler,
            pool,
            s.access_log_path,
            rotate_bytes=s.access_log_rotate_bytes,
            admin_socket=s.envoy_admin_socket,
        )

        self._check = CheckServer(decider, body_bytes_max=s.request_body_bytes_max)
        try:
            await self._check.start(host, s.check_port)
        except OSError as exc:
            raise ListenError(f"{host}:{s.check_port}", exc.strerror, listener="the Check") from None

        self._grpc = grpc.aio.server()
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
            check_grpc.AuthorizationService(decider),
            self._grpc,
        )
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(self._access_log, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        address = f"{host}:{s.grpc_port}"
        if self._grpc.add_insecure_port(address) == 0:
            raise ListenError(address, None, listener="gRPC")
        await self._grpc.start()

        for app, port in (
            (http_api.make_app(s, self.engine, key_lookup), s.api_port),
            (
                admin_port.make_app(
                    self.engine, {"hot_path": self._pool_answers, "check": self._check_serves}
                ),
                s.admin_port,
            ),
        ):
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            try:
                await web.TCPSite(runner, host, port).start()
            except OSError as exc:
                await runner.cleanup()
                raise ListenError(f"{host}:{port}", exc.strerror) from None
            self._runners.append(runner)

        self._sweeper = asyncio.create_task(self._sweep_expired_holds(pool), name="hold-sweeper")
        self._file_follower = asyncio.create_task(self._file_log.run(), name="access-log-file")
        self._alerts = asyncio.create_task(alert_delivery.AlertWorker(s, pool).run(), name="alerts")
        if s.stripe_configured:
            self._recharges = asyncio.create_task(
                recharge_worker.RechargeWorker(s, pool).run(), name="auto-recharge"
            )
        await self._set_serving(True)
        logger.info(
            "sidecar ready: Check %s:%d, gRPC %s:%d, HTTP %s:%d, admin %s:%d",
            host,
            s.check_port,
            host,
            s.grpc_port,
            host,
            s.api_port,
            host,
            s.admin_port,
        )

    async def _pool_answers(self) -> None:
        """Readiness: the hot path's pool hands out a connection that answers. Asked twice: a
        connection the database closed (a restart) fails once and is then replaced by the pool."""
        assert self.pool is not None
        for attempt in range(2):
            try:
                async with database.acquire(self.pool) as conn:
                    await conn.fetchval("SELECT 1")
                return
            except (asyncpg.InterfaceError, asyncpg.PostgresConnectionError, OSError):
                if attempt == 1:
                    raise

    async def _check_serves(self) -> None:
        """Readiness: the Check server accepts connections."""
        if self._check is None or not self._check.serving:
            raise ConnectionRefusedError("the Check server is not serving")

    async def _set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in (
            "",
            "envoy.service.auth.v3.Authorization",
            "envoy.service.accesslog.v3.AccessLogService",
        ):
            await self.health.set(service, status)

    async def _sweep_expired_holds(self, pool: asyncpg.Pool) -> None:
        while True:
            try:
                async with database.acquire(pool) as conn:
                    swept = await expiry.sweep(conn, report_grace_s=self.settings.hold_report_grace_s)
                    metrics.unreported_holds_charged.inc(swept.charged)
                    if swept.charged:
                        logger.warning(
                            "charged %d holds their estimate: no access log reported them within %d s "
                            "of their expiry",
                            swept.charged,
                            self.settings.hold_report_grace_s,
                        )
                    metrics.holds_pending.set(await holds.outstanding(conn))
                    # Ended account-page sessions go on the same beat (an index range, usually empty).
                    await account_sessions.prune(conn)
                    await self._queue_limit_alerts(conn)
            except Exception as exc:  # noqa: BLE001 (the sweep outlives a failed round; the next retries)
                logger.warning("hold sweep failed: %s", exc)
            await asyncio.sleep(holds.EXPIRY_SWEEP_S)

    async def _queue_limit_alerts(self, conn: database.Connection) -> None:
        """Queue the ``key.limit_reached`` alert of each key the Check refused for its limit since
        the last round: here, not in the Check, so a refusal never waits for (or fails on) it.
        A refusal stays remembered until its alert is queued (once per window, billing.key_limits)."""
        if self._decider is None:
            return
        refusals, alerted = self._decider.limit_refusals, self._decider.limit_alerted
        for occurrence, limit in list(refusals.items()):
            await key_limits.queue_alert(conn, limit)
            del refusals[occurrence]
            if len(alerted) >= check.LIMIT_REFUSALS_MAX:
                alerted.clear()  # queueing again is harmless (one event per window); memory is not
            alerted.add(occurrence)

    @staticmethod
    async def _last_file_rounds(file_log: access_log_file.Follower) -> None:
        """Settle the access-log file to its end before stopping: in a pod its volume goes with
        the pod. Envoy writes the file every ``FILE_FLUSH_INTERVAL_MS``, so rounds go on until
        two of those have passed and a round finds nothing new."""
        loop = asyncio.get_running_loop()
        flushed_by = loop.time() + 2 * envoy_config.FILE_FLUSH_INTERVAL_MS / 1000
        while await file_log.follow_once() or loop.time() < flushed_by:
            await asyncio.sleep(access_log_file.FOLLOW_INTERVAL_S / 10)

    async def stop(self) -> None:
        """Stop taking work, settle what was received, then close everything."""
        if self._grpc is not None:
            await self._set_serving(False)
        if self._check is not None:
            await self._check.stop()
        if self._grpc is not None:
            await self._grpc.stop(grace=2)
        if self._decider is not None:
            await self._decider.close()
        if self._access_log is not None:
            await self._access_log.drain()
        if self._file_follower is not None:
            self._file_follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._file_follower
        if self._file_log is not None:
            try:
                await asyncio.wait_for(self._last_file_rounds(self._file_log), LAST_FILE_ROUND_S)
            except Exception as exc:  # noqa: BLE001 (the next sidecar resumes from the saved offset)
                logger.warning("last rounds of the access-log file failed: %r", exc)
            self._file_log.close()
        for task in (self._sweeper, self._alerts, self._recharges):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for runner in self._runners:
            await runner.cleanup()
        if self._key_lookup is not None:
            await self._key_lookup.close()
        if self.pool is not None:
            await self.pool.close()
        await self.engine.dispose()


async def run(settings: Settings, prices: pricing.PriceBook) -> None:
    """Serve until SIGINT/SIGTERM."""
    sidecar = Sidecar(settings, prices)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await sidecar.start()
    metrics.freeze_startup_heap()
    metrics.watch_gc_pauses()
    try:
        await stop.wait()
    finally:
        await sidecar.stop()


def serve(settings: Settings, prices: pricing.PriceBook) -> None:
    """``billingproxy sidecar``: run on uvloop until SIGINT/SIGTERM.

    uvloop (libuv) halves the event loop's own cost per socket event against asyncio's default
    loop; the Check server is almost nothing but socket events (docs/benchmarks.md). grpc.aio,
    aiohttp and asyncpg all run on it.
    """
    uvloop.run(run(settings, prices))
