"""A local SMTP server that keeps every mail it receives: `billingproxy up`'s alert mail goes here
when BILLINGPROXY_SMTP_URL is not set, and the tests send to it to check what a mail says.

Why in the process that starts it (not a child like the Stripe double): `up` prints each mail's
recipient, subject and file as it arrives, on the terminal the person watches; and a test reads
:attr:`MailSink.received` directly. It listens on loopback only, offers no STARTTLS and asks no
password, and is never part of a production image (the ``devstack`` extra).

:attr:`MailSink.refusals` makes it answer the next messages with an SMTP error (a ``451`` "try
again later" by default), as a real server under load or greylisting does, so retries can be
tested against a real exchange.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.message
import email.policy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

# aiosmtpd logs every SMTP line at INFO on "mail.log"; `up` prints one line per mail instead.
logging.getLogger("mail.log").setLevel(logging.WARNING)

HOST = "127.0.0.1"
REFUSAL = "451 4.3.0 Try again later"


@dataclasses.dataclass(frozen=True)
class Received:
    """One mail as it arrived: the envelope's sender and recipients, and the parsed message."""

    mail_from: str
    rcpt_tos: list[str]
    message: email.message.EmailMessage
    raw: bytes
    path: Path | None

    @property
    def subject(self) -> str:
        return str(self.message["subject"])

    @property
    def body(self) -> str:
        part = self.message.get_body(("plain",))
        assert part is not None
        return str(part.get_content())


class _Handler:
    def __init__(self, sink: MailSink) -> None:
        self._sink = sink

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802 (aiosmtpd's name)
        return await self._sink._take(envelope)


class MailSink:
    """``async with MailSink(directory, say=print) as sink``: an SMTP server on ``sink.url``."""

    def __init__(self, directory: Path | None = None, *, say: Callable[[str], object] | None = None) -> None:
        self.directory = directory
        self.received: list[Received] = []
        # Answers for the next messages, in order (e.g. [REFUSAL] * 2); each is used once.
        self.refusals: list[str] = []
        self._say = say
        self._server: asyncio.base_events.Server | None = None
        self._arrived = asyncio.Condition()
        self.port = 0

    @property
    def url(self) -> str:
        return f"smtp://{HOST}:{self.port}"

    async def start(self, port: int = 0) -> None:
        loop = asyncio.get_running_loop()
        handler = _Handler(self)
        self._server = await loop.create_server(
            lambda: SMTP(handler, hostname="localhost", loop=loop), HOST, port
        )
        self.port = self._server.sockets[0].getsockname()[1]
        if self.directory is not None:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> MailSink:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def _take(self, envelope: Envelope) -> str:
        if self.refusals:
            return self.refusals.pop(0)
        raw = bytes(envelope.original_content or b"")
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, email.message.EmailMessage)
        path = None
        if self.directory is not None:
            path = self.directory / f"{len(self.received) + 1:05d}.eml"
            path.write_bytes(raw)
        received = Received(str(envelope.mail_from), list(envelope.rcpt_tos), message, raw, path)
        self.received.append(received)
        if self._say is not None:
            self._say(
                f"mail to {', '.join(received.rcpt_tos)}: {received.subject}" + (f" ({path})" if path else "")
            )
        async with self._arrived:
            self._arrived.notify_all()
        return "250 OK"

    async def wait_for(self, count: int, timeout_s: float) -> list[Received]:
        """Wait until ``count`` mails have arrived (TimeoutError after ``timeout_s``); all of them."""
        async with asyncio.timeout(timeout_s), self._arrived:
            await self._arrived.wait_for(lambda: len(self.received) >= count)
        return list(self.received)
