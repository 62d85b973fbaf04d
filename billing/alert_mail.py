"""Alert events as mail: the SMTP URL, the message, and the one blocking send
(docs/decisions/0036-alert-mail-and-events.md).

Why the stdlib and not a template engine: an alert mail is a few lines of plain text, and the
``email`` package with its ``SMTP`` policy is what refuses a header value carrying a line break,
so a wallet's address (typed by whoever signed up, or declared in a Wallet resource) cannot add
a header or a recipient. The envelope's recipient is given to SMTP apart from the headers, and
is the one checked address, never a header re-read.

Sharp edges: the password in the URL must never reach a log or an error message — errors here
name the host and the port, never the URL; and :func:`send` blocks (smtplib), so the caller runs
it in a thread.
"""

from __future__ import annotations

import dataclasses
import email.headerregistry
import email.message
import email.policy
import email.utils
import smtplib
import ssl
import urllib.parse

from billing import money

SCHEMES = ("smtp", "smtps")
DEFAULT_PORTS = {"smtp": 587, "smtps": 465}
TIMEOUT_S = 10.0
ADDRESS_CHARS_MAX = 254
SUBJECT_PREFIX = "[BillingProxy]"
# What a mail says, by event type; an unknown type (added later) still gets a mail that says so.
_SUBJECTS = {
    "wallet.balance_low": "Your balance is low",
    "auto_recharge.succeeded": "Your balance was recharged",
    "auto_recharge.failed": "An automatic recharge failed",
    "auto_recharge.paused": "Automatic recharge is paused",
    "key.limit_reached": "An API key reached its spend limit",
}


class InvalidSmtpUrl(ValueError):
    """BILLINGPROXY_SMTP_URL is not one the gateway can send with; the message never repeats it."""


class InvalidAddress(ValueError):
    """An address no mail can be sent to (line breaks, several addresses, not ASCII, too long)."""


@dataclasses.dataclass(frozen=True)
class SmtpServer:
    """Where and how alert mail is sent. ``smtps``: TLS from the first byte; ``smtp``: STARTTLS
    when the server offers it, and required when there is a password to send."""

    scheme: str
    host: str
    port: int
    username: str = ""
    password: str = dataclasses.field(default="", repr=False)

    @property
    def where(self) -> str:
        """For logs and errors: no user name, no password."""
        return f"{self.scheme}://{self.host}:{self.port}"


def parse_smtp_url(url: str) -> SmtpServer:
    """``smtp://[user:pass@]host[:port]`` or ``smtps://…``; InvalidSmtpUrl saying what is wrong."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise InvalidSmtpUrl("is not a well-formed URL (a port out of range?)") from None
    if parts.scheme not in SCHEMES:
        raise InvalidSmtpUrl("must start with smtp:// (STARTTLS) or smtps:// (TLS)")
    if not parts.hostname:
        raise InvalidSmtpUrl("must name a host, as in smtp://user:password@mail.example.com:587")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise InvalidSmtpUrl("must have no path, query or fragment")
    if bool(parts.username) != bool(parts.password):
        raise InvalidSmtpUrl("must give both a user name and a password, or neither")
    return SmtpServer(
        scheme=parts.scheme,
        host=parts.hostname,
        port=port or DEFAULT_PORTS[parts.scheme],
        username=urllib.parse.unquote(parts.username or ""),
        password=urllib.parse.unquote(parts.password or ""),
    )


def check_sender(value: str) -> str:
    """The envelope sender of a From value (``alerts@example.com`` or ``BillingProxy
    <alerts@example.com>``); InvalidAddress if it is not one address on one line."""
    if any(c in value for c in "\r\n") or not value.isascii():
        raise InvalidAddress("a From address must be one line of ASCII")
    header = email.policy.SMTP.header_factory("from", value)
    if header.defects or len(header.addresses) != 1:
        raise InvalidAddress("a From must be exactly one address")
    return check_address(header.addresses[0].addr_spec)


def check_address(address: str) -> str:
    """``address`` if it is one plain ASCII mailbox a header and an envelope can carry as it is."""
    if not isinstance(address, str) or not address or len(address) > ADDRESS_CHARS_MAX:
        raise InvalidAddress("no address, or longer than 254 characters")
    if not address.isascii() or any(ord(c) < 0x21 or ord(c) == 0x7F for c in address):
        raise InvalidAddress("an address with a space, a control character or a non-ASCII one")
    name, addr_spec = email.utils.parseaddr(address)
    if name or addr_spec != address or addr_spec.count("@") != 1 or any(c in address for c in ',;<>()"'):
        raise InvalidAddress("not exactly one plain address")
    return address


@dataclasses.dataclass(frozen=True)
class AlertMail:
    """What one alert mail says; built from an event's row, so every attempt sends the same."""

    event_id: str
    type: str
    wallet_id: str
    balance_nano: int
    threshold_nano: int | None
    data: dict[str, str]

    def subject(self) -> str:
        return f"{SUBJECT_PREFIX} {_SUBJECTS.get(self.type, 'Billing alert: ' + self.type)}"

    def body(self, public_url: str) -> str:
        balance = f"${money.format_usd(self.balance_nano)}"
        lines = [f"Wallet {self.wallet_id}: {_SUBJECTS.get(self.type, self.type).lower()}."]
        if self.type == "wallet.balance_low" and self.threshold_nano is not None:
            lines.append(
                f"The balance is {balance}, at or below your alert threshold of "
                f"${money.format_usd(self.threshold_nano)}."
            )
        else:
            lines.append(f"The balance is {balance}.")
        # The other types' facts (amounts, a key's id, a reason), as their producer wrote them.
        lines.extend(f"{name.replace('_', ' ')}: {value}" for name, value in sorted(self.data.items()))
        if self.type != "key.limit_reached":
            lines += [
                "",
                f"Requests are refused once the balance runs out. Top up: {public_url}/billing/topup",
            ]
        lines += [
            "",
            "You receive this because this address owns the wallet. Alerts come once per threshold",
            f"crossed. Event id: {self.event_id}.",
        ]
        return "\n".join(lines) + "\n"

    def message(self, *, sender: str, recipient: str, public_url: str) -> email.message.EmailMessage:
        """The mail, headers set through the ``SMTP`` policy (a value with CR or LF is refused)."""
        msg = email.message.EmailMessage(policy=email.policy.SMTP)
        msg["From"] = sender
        msg["To"] = check_address(recipient)
        msg["Subject"] = self.subject()
        msg["Message-ID"] = f"<{self.event_id}@billingproxy>"
        msg["Date"] = email.utils.formatdate(usegmt=True)
        msg["Auto-Submitted"] = "auto-generated"
        msg.set_content(self.body(public_url))
        return msg


def send(server: SmtpServer, msg: email.message.EmailMessage, *, sender: str, recipient: str) -> None:
    """Send ``msg`` to ``recipient`` alone (the envelope, not the headers, says where it goes).
    Blocking. smtplib's errors pass through: the caller records them as a failed attempt."""
    context = ssl.create_default_context()
    smtp: smtplib.SMTP
    if server.scheme == "smtps":
        smtp = smtplib.SMTP_SSL(server.host, server.port, timeout=TIMEOUT_S, context=context)
    else:
        smtp = smtplib.SMTP(server.host, server.port, timeout=TIMEOUT_S)
    with smtp:
        smtp.ehlo()
        if server.scheme == "smtp":
            if smtp.has_extn("starttls"):
                smtp.starttls(context=context)
                smtp.ehlo()
            elif server.password:
                raise smtplib.SMTPNotSupportedError(
                    f"{server.where} offers no STARTTLS: the password is not sent in clear"
                )
        if server.username:
            smtp.login(server.username, server.password)
        smtp.send_message(msg, from_addr=sender, to_addrs=[check_address(recipient)])
