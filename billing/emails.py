"""Email addresses as mailboxes: which addresses reach the same inbox, so one inbox gets one free grant.

Why: the free grant is given once per person, and an address is the only proof of a person the
signup asks for. But one inbox answers to many addresses: ``bob+1@example.com`` (sub-addressing,
RFC 5233, offered by Gmail, Outlook, iCloud, Fastmail, Proton and most mail servers) and, at
Gmail, ``b.o.b@gmail.com`` and ``bob@googlemail.com``. :func:`mailbox` maps every such address
to one canonical form; the signup keys the free grant on it (``billing/wallets.py``).

The policy (``BILLINGPROXY_SIGNUP_EMAIL_POLICY``):

- ``mailbox`` (the default): lower case; everything from the first ``+`` of the local part is a
  tag and dropped (unless nothing would be left); at providers that ignore dots (:data:`PROVIDERS`)
  the dots go too and the provider's alias domains become its main domain.
- ``exact``: lower case only.

Deliberately not folded: ``-`` (a separator some servers use, but also part of many real names),
dots at providers that keep them, and subdomain addressing (``x@bob.fastmail.com``). The cost of
folding too much is a second person refused a free wallet; of folding too little, a free wallet
per variant.
"""

from __future__ import annotations

import dataclasses

POLICIES = ("mailbox", "exact")
TAG_SEPARATOR = "+"


@dataclasses.dataclass(frozen=True)
class Provider:
    """A mail provider whose inboxes ignore dots in the local part."""

    domain: str
    aliases: tuple[str, ...] = ()


# Gmail: "Dots don't matter in Gmail addresses"; googlemail.com is the same service.
PROVIDERS = (Provider("gmail.com", aliases=("googlemail.com",)),)
_DOTLESS = {name: p.domain for p in PROVIDERS for name in (p.domain, *p.aliases)}


def mailbox(address: str, policy: str = "mailbox") -> str:
    """The canonical mailbox of an address that is already valid (``wallets.normalize_email``)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown email policy {policy!r}; expected one of {POLICIES}")
    local, at, domain = address.strip().lower().rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"{address!r} is not an email address")
    if policy == "exact":
        return f"{local}@{domain}"
    base = local.split(TAG_SEPARATOR, 1)[0]
    local = base or local
    if domain in _DOTLESS:
        domain = _DOTLESS[domain]
        local = local.replace(".", "") or local
    return f"{local}@{domain}"
