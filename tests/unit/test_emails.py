"""billing/emails.py: which addresses are one mailbox (one free grant), and the grant identity."""

from __future__ import annotations

import pytest

from billing import emails, settings as settings_mod, wallets


@pytest.mark.parametrize(
    ("address", "mailbox"),
    [
        ("alice@example.com", "alice@example.com"),
        ("Alice@Example.COM", "alice@example.com"),
        ("alice+billing@example.com", "alice@example.com"),
        ("alice+a+b@example.com", "alice@example.com"),
        ("a.lice@example.com", "a.lice@example.com"),  # dots count outside Gmail
        ("a-lice+x@example.com", "a-lice@example.com"),  # "-" is part of the name, never a tag
        ("a.l.i.c.e@gmail.com", "alice@gmail.com"),
        ("A.Lice+Spam@GMAIL.com", "alice@gmail.com"),
        ("alice@googlemail.com", "alice@gmail.com"),
        ("al.ice+1@googlemail.com", "alice@gmail.com"),
        ("alice@mail.gmail.com", "alice@mail.gmail.com"),  # another domain, not Gmail's
        ("+tag@example.com", "+tag@example.com"),  # nothing before the tag: the whole address
        ("...@gmail.com", "...@gmail.com"),  # nothing but dots: kept
        ("o'brien+x@example.ie", "o'brien@example.ie"),
    ],
)
def test_mailbox_folds_tags_case_and_gmails_dots(address: str, mailbox: str) -> None:
    assert emails.mailbox(address) == mailbox


@pytest.mark.parametrize(
    ("address", "exact"),
    [
        ("Alice+x@Example.com", "alice+x@example.com"),
        ("a.lice@GMAIL.com", "a.lice@gmail.com"),
        ("alice@googlemail.com", "alice@googlemail.com"),
    ],
)
def test_the_exact_policy_folds_only_case(address: str, exact: str) -> None:
    assert emails.mailbox(address, "exact") == exact


def test_an_unknown_policy_or_a_non_address_is_an_error() -> None:
    with pytest.raises(ValueError, match="policy"):
        emails.mailbox("a@example.com", "loose")
    for broken in ("", "example.com", "@example.com", "alice@"):
        with pytest.raises(ValueError):
            emails.mailbox(broken)


@pytest.mark.parametrize(
    "address",
    [
        "a.b+c@googlemail.com",
        "+x@gmail.com",
        "a+@example.org",
        ".+.@gmail.com",
        "x-y.z+1+2@example.org",
        "...@googlemail.com",
    ],
)
def test_a_mailbox_is_its_own_mailbox(address: str) -> None:
    """Folding twice changes nothing: the identity of a mailbox is stable."""
    once = emails.mailbox(address)
    assert emails.mailbox(once) == once


def test_the_grant_identity_is_the_mailboxs_hash_and_names_no_address() -> None:
    same = {
        wallets.signup_grant_identity(a)
        for a in ("bob@gmail.com", "b.o.b+x@googlemail.com", " BOB@gmail.com")
    }
    assert len(same) == 1
    [identity] = same
    assert identity.startswith("mailbox:") and "bob" not in identity and len(identity) == len("mailbox:") + 64
    assert wallets.signup_grant_identity("bob+x@gmail.com", "exact") != identity
    # A plain address is the same identity under either policy (switching keeps it).
    assert wallets.signup_grant_identity("bob@gmail.com", "exact") == identity
    with pytest.raises(wallets.EmailInvalid):
        wallets.signup_grant_identity("not an address")


def test_the_policy_setting() -> None:
    assert settings_mod.Settings().signup_email_policy == "mailbox"
    env = {"BILLINGPROXY_SIGNUP_EMAIL_POLICY": " Exact "}
    assert settings_mod.from_env(env).signup_email_policy == "exact"
    with pytest.raises(settings_mod.SettingsError, match="SIGNUP_EMAIL_POLICY must be one of mailbox, exact"):
        settings_mod.from_env({"BILLINGPROXY_SIGNUP_EMAIL_POLICY": "gmail"})
