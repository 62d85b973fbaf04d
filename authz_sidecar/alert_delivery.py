"""The alert worker: each round, record the thresholds crossed since the last (billing.alerts.sweep)
and post the due events to their webhooks, signed (docs/alerts.md).

Every sidecar runs one; the database decides who does what (the sweep's row locks, the queue's
``FOR UPDATE SKIP LOCKED`` leases), so replicas share the work and never send one event twice at
once. Delivery is at least once: a sidecar stopped between a post and its record leaves the event
to be posted again when its lease ends.

Sharp edges, all about the URL being the user's while the post comes from inside the pod (SSRF;
docs/decisions/0033-low-balance-alerts.md): the URL is checked again at each delivery (a setting
may have changed); a name is resolved at each delivery by :class:`PublicOnlyResolver`, which
refuses it if any address is not public, and the connection goes to the addresses it checked (no
DNS cache, so no second resolution a rebinding name could answer differently); redirects are not
followed; proxies from the environment are not used; the receiver's body is never read.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import aiohttp
import asyncpg
from aiohttp.abc import AbstractResolver, ResolveResult

from authz_sidecar import metrics
from billing import alerts, database
from billing.settings import Settings

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
DELIVERY_TIMEOUT_S = 10.0
CONNECTIONS_MAX = 20
USER_AGENT = "BillingProxy-Alerts/1"


class AddressRefused(Exception):
    """The webhook's name resolved to an address the gateway does not post to."""


class PublicOnlyResolver(AbstractResolver):
    """aiohttp's resolver, refusing a name any of whose addresses is not public (unless the
    setting allows private ones). All or nothing: a name answering one public and one loopback
    address would otherwise reach loopback on a retry."""

    def __init__(self, *, allow_private: bool) -> None:
        self._inner = aiohttp.ThreadedResolver()
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if not results or not all(
            alerts.address_allowed(r["host"], allow_private=self._allow_private) for r in results
        ):
            raise AddressRefused(f"{host} resolves to an address the gateway does not post to")
        return results

    async def close(self) -> None:
        await self._inner.close()


async def check_name(host: str, *, allow_private: bool) -> None:
    """Resolve ``host`` as a delivery would: AddressRefused if an address is not allowed, OSError
    if the name does not resolve within ``CONNECT_TIMEOUT_S``."""
    resolver = PublicOnlyResolver(allow_private=allow_private)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):  # a TimeoutError is an OSError
            await resolver.resolve(host, 443, socket.AF_UNSPEC)
    finally:
        await resolver.close()


def client_session(settings: Settings) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        resolver=PublicOnlyResolver(allow_private=settings.alert_allow_private),
        use_dns_cache=False,
        force_close=True,
        limit=CONNECTIONS_MAX,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=DELIVERY_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
        trust_env=False,
        headers={"user-agent": USER_AGENT},
    )


async def deliver(
    session: aiohttp.ClientSession,
    delivery: alerts.Delivery,
    *,
    allow_private: bool,
    now: float | None = None,
) -> tuple[str, str | None]:
    """Post one event; its outcome (a label of ``alert_deliveries``) and, unless delivered, why not."""
    body = delivery.payload()
    timestamp = int(time.time() if now is None else now)
    headers = {
        "content-type": "application/json",
        alerts.SIGNATURE_HEADER: alerts.signature(body, delivery.signing_secret, timestamp),
        alerts.EVENT_ID_HEADER: delivery.event_id,
    }
    try:
        alerts.check_url(delivery.url, allow_private=allow_private)
        async with session.post(delivery.url, data=body, headers=headers, allow_redirects=False) as response:
            if 200 <= response.status < 300:
                return "delivered", None
            return "failed", f"the receiver answered HTTP {response.status}"
    except (alerts.InvalidUrl, AddressRefused) as exc:
        return "refused_address", str(exc)
    except TimeoutError:
        return "failed", f"no answer within {DELIVERY_TIMEOUT_S:g} s"
    except (aiohttp.ClientError, OSError) as exc:
        return "failed", f"{type(exc).__name__}: {exc}"


class AlertWorker:
    """The sidecar's alert task (started and stopped like the hold sweeper)."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool) -> None:
        self._settings = settings
        self._pool = pool

    async def run(self) -> None:
        async with client_session(self._settings) as session:
            while True:
                try:
                    await self.round(session)
                except Exception as exc:  # noqa: BLE001 (the worker outlives a failed round; the next retries)
                    logger.warning("alert round failed: %s", exc)
                await asyncio.sleep(self._settings.alert_interval_ms / 1000)

    async def round(self, session: aiohttp.ClientSession) -> None:
        s = self._settings
        async with database.acquire(self._pool) as conn:
            made = await alerts.sweep(conn)
            metrics.alert_events.labels(alerts.EventType.BALANCE_LOW).inc(made)
            claimed = await alerts.claim_due(conn)
        outcomes = await asyncio.gather(*(self._timed(session, d) for d in claimed))
        async with database.acquire(self._pool) as conn:
            for delivery, (outcome, error) in zip(claimed, outcomes, strict=True):
                if outcome == "delivered":
                    await alerts.record_delivered(conn, delivery.event_id)
                else:
                    assert error is not None
                    gave_up = await alerts.record_failed(
                        conn,
                        delivery.event_id,
                        error,
                        retry_base_ms=s.alert_retry_base_ms,
                        retry_for_s=s.alert_retry_for_s,
                    )
                    logger.info(
                        "alert %s to wallet %s's webhook, attempt %d: %s%s",
                        delivery.event_id,
                        delivery.wallet_id,
                        delivery.attempt,
                        error,
                        "; given up" if gave_up else "",
                    )
                    if gave_up:
                        metrics.alert_deliveries.labels("gave_up").inc()
                metrics.alert_deliveries.labels(outcome).inc()
            metrics.alert_events_pending.set(await alerts.pending(conn))

    async def _timed(
        self, session: aiohttp.ClientSession, delivery: alerts.Delivery
    ) -> tuple[str, str | None]:
        started = time.perf_counter()
        try:
            return await deliver(session, delivery, allow_private=self._settings.alert_allow_private)
        finally:
            metrics.alert_delivery_duration_seconds.observe(time.perf_counter() - started)
