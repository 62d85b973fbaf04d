"""The alert worker: each round, record the thresholds crossed since the last (billing.alerts.sweep),
post the due events to their webhooks, signed, and mail them when SMTP is configured
(docs/alerts.md).

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

Mail is a channel of its own (docs/decisions/0036-alert-mail-and-events.md): its attempts are
counted apart from the webhook's, so one failing resends nothing on the other. The SMTP server is
the operator's, not the user's, so no address rules apply to it; smtplib blocks, so each mail is
sent in a thread.
"""

from __future__ import annotations

import asyncio
import email.errors
import logging
import smtplib
import socket
import time

import aiohttp
import asyncpg
from aiohttp.abc import AbstractResolver, ResolveResult

from authz_sidecar import metrics
from billing import alert_mail, alerts, database
from billing.settings import Settings

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
DELIVERY_TIMEOUT_S = 10.0
CONNECTIONS_MAX = 20
USER_AGENT = "BillingProxy-Alerts/1"
# The window of billingproxy_alert_events_recent.
RECENT_S = 3600


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


async def send_mail(
    settings: Settings, server: alert_mail.SmtpServer, mail: alerts.MailDelivery
) -> tuple[str, str | None, bool]:
    """Mail one event; its outcome, why not if it failed, and whether no later attempt can do better
    (an address the message cannot carry)."""
    content = alert_mail.AlertMail(
        event_id=mail.event_id,
        type=mail.type,
        wallet_id=mail.wallet_id,
        balance_nano=mail.balance_nano,
        threshold_nano=mail.threshold_nano,
        data=mail.data,
    )
    try:
        msg = content.message(
            sender=settings.smtp_from, recipient=mail.recipient, public_url=settings.public_url
        )
    except (alert_mail.InvalidAddress, ValueError, email.errors.HeaderDefect) as exc:
        return "failed", f"the wallet's address cannot be mailed: {exc}", True
    sender = alert_mail.check_sender(settings.smtp_from)
    try:
        await asyncio.to_thread(alert_mail.send, server, msg, sender=sender, recipient=mail.recipient)
    except smtplib.SMTPRecipientsRefused as exc:
        codes = ", ".join(str(code) for code, _ in exc.recipients.values())
        return "failed", f"{server.where} refused the recipient ({codes})", False
    except smtplib.SMTPResponseException as exc:
        answer = (
            exc.smtp_error.decode(errors="replace")
            if isinstance(exc.smtp_error, bytes)
            else str(exc.smtp_error)
        )
        # Servers echo the address in their answers; logs and last_error name the wallet instead.
        answer = answer.replace(mail.recipient, "<the wallet's address>")[:120]
        return "failed", f"{server.where} answered {exc.smtp_code}: {answer}", False
    except (smtplib.SMTPException, OSError) as exc:  # a TimeoutError and an ssl.SSLError are OSErrors
        return (
            "failed",
            f"{server.where}: {type(exc).__name__}: {exc}".replace(mail.recipient, "<the wallet's address>"),
            False,
        )
    return "delivered", None, False


class AlertWorker:
    """The sidecar's alert task (started and stopped like the hold sweeper)."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool) -> None:
        self._settings = settings
        self._pool = pool
        self._smtp = settings.smtp_server

    async def run(self) -> None:
        async with client_session(self._settings) as session:
            while True:
                try:
                    await self.round(session)
                except Exception as exc:  # noqa: BLE001 (the worker outlives a failed round; the next retries)
                    logger.warning("alert round failed: %s", exc)
                await asyncio.sleep(self._settings.alert_interval_ms / 1000)

    async def round(self, session: aiohttp.ClientSession) -> None:
        mail_on = self._smtp is not None
        async with database.acquire(self._pool) as conn:
            await alerts.enrol(conn, mail=mail_on)
            made = await alerts.sweep(conn)
            metrics.alert_events.labels(alerts.EventType.BALANCE_LOW).inc(made)
            claimed = await alerts.claim_due(conn)
            mails: list[alerts.MailDelivery] = []
            if mail_on:
                await alerts.take_for_mail(conn)
                mails = await alerts.claim_mail(conn)
        posted, mailed = await asyncio.gather(
            asyncio.gather(*(self._timed(session, d) for d in claimed)),
            asyncio.gather(*(self._mail(m) for m in mails)),
        )
        async with database.acquire(self._pool) as conn:
            for delivery, (outcome, error) in zip(claimed, posted, strict=True):
                await self._record(
                    conn,
                    alerts.WEBHOOK,
                    delivery.event_id,
                    delivery.wallet_id,
                    delivery.attempt,
                    outcome,
                    error,
                )
            for mail, (outcome, error, final) in zip(mails, mailed, strict=True):
                await self._record(
                    conn,
                    alerts.Channel.MAIL,
                    mail.event_id,
                    mail.wallet_id,
                    mail.attempt,
                    outcome,
                    error,
                    final,
                )
            for channel, count in (await alerts.pending_by_channel(conn)).items():
                metrics.alert_events_pending.labels(channel).set(count)
            recent = await alerts.made_since(conn, RECENT_S)
            for event_type in alerts.EventType:
                metrics.alert_events_recent.labels(str(event_type)).set(recent.get(event_type, 0))

    async def _record(
        self,
        conn: database.Connection,
        channel: str,
        event_id: str,
        wallet_id: str,
        attempt: int,
        outcome: str,
        error: str | None,
        final: bool = False,
    ) -> None:
        s = self._settings
        gave_up = await alerts.record_attempt(
            conn,
            event_id,
            channel,
            error,
            retry_base_ms=s.alert_retry_base_ms,
            retry_for_s=s.alert_retry_for_s,
            final=final,
        )
        if error is not None:
            # The wallet, never the URL's path or the address: logs are read by more people.
            logger.info(
                "alert %s by %s to wallet %s's owner, attempt %d: %s%s",
                event_id,
                channel,
                wallet_id,
                attempt,
                error,
                "; given up" if gave_up else "",
            )
        if gave_up:
            metrics.alert_deliveries.labels(channel, "gave_up").inc()
        metrics.alert_deliveries.labels(channel, outcome).inc()

    async def _mail(self, mail: alerts.MailDelivery) -> tuple[str, str | None, bool]:
        assert self._smtp is not None
        started = time.perf_counter()
        try:
            return await send_mail(self._settings, self._smtp, mail)
        finally:
            metrics.alert_delivery_duration_seconds.observe(time.perf_counter() - started)

    async def _timed(
        self, session: aiohttp.ClientSession, delivery: alerts.Delivery
    ) -> tuple[str, str | None]:
        started = time.perf_counter()
        try:
            return await deliver(session, delivery, allow_private=self._settings.alert_allow_private)
        finally:
            metrics.alert_delivery_duration_seconds.observe(time.perf_counter() - started)
