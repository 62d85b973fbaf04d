"""The account page's fixed choices: cookie name and flags by the public URL's scheme, the CSP,
the ways back after sign-in, and CSV cells that cannot run as formulas."""

from __future__ import annotations

from typing import Any

import pytest

from authz_sidecar.account import pages
from billing.settings import Settings


def account_pages(**settings: Any) -> pages.AccountPages:
    unused: Any = None  # nothing here touches the database, the keys or Stripe
    return pages.AccountPages(Settings(**settings), unused, unused, unused, unused, unused, unused)


def test_https_gets_a_secure_host_only_cookie_and_http_a_plain_one() -> None:
    secure = account_pages(public_url="https://gateway.example.com")
    assert (secure.cookie_name, secure.secure, secure.origin) == (
        "__Host-bp_session",
        True,
        "https://gateway.example.com",
    )
    plain = account_pages(public_url="http://127.0.0.1:8080")
    assert (plain.cookie_name, plain.secure, plain.origin) == ("bp_session", False, "http://127.0.0.1:8080")


def test_the_csp_allows_no_inline_code_and_forms_only_to_checkout() -> None:
    with_stripe = account_pages(stripe_secret_key="sk_test_x", stripe_webhook_secret="whsec_x")
    assert "form-action 'self' https://checkout.stripe.com;" in with_stripe.csp
    assert "unsafe" not in with_stripe.csp and "default-src 'none'" in with_stripe.csp
    without = account_pages()
    assert "form-action 'self';" in without.csp


@pytest.mark.parametrize(
    ("asked", "goes"),
    [
        ("/account/top-up", "/account/top-up"),
        ("/account/keys", "/account/keys"),
        ("//evil.example", None),
        ("https://evil.example/account", None),
        ("/account/../billing/keys", None),
        ("/billing/topup", None),
        (None, None),
    ],
)
def test_sign_in_goes_back_only_to_the_pages_own_paths(asked: str | None, goes: str | None) -> None:
    assert pages._local_page(asked) == goes


@pytest.mark.parametrize("cell", ["=HYPERLINK(1)", "+1", "-1", "@SUM(A1)", "\tx", "\rx"])
def test_csv_cells_never_start_a_formula(cell: str) -> None:
    assert pages._csv_safe(cell).startswith("'")
    assert pages._csv_safe("gpt-4o-mini") == "gpt-4o-mini"
