"""The account page through the real gateway (Envoy, the sidecar, PostgreSQL), as a browser and as
an attacker drive it over HTTP (docs/decisions/0037-account-page.md).

What a person relies on: a key signs in to a session that never holds the key; the pages show the
wallet's own figures exactly; a form from another origin, or without the session's CSRF token,
changes nothing; signing out or revoking the key ends the session for every copy of its cookie;
one wallet's session cannot touch another wallet's keys.
"""

from __future__ import annotations

import csv
import io
import re
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from support.waiting import wait_until

from billing import money

pytestmark = pytest.mark.integration

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
SIGN_IN_RATE = 40


@pytest.fixture(scope="module")
async def stack(launch_stack) -> AsyncIterator[Any]:
    async with launch_stack(
        BILLINGPROXY_KEY_CACHE_TTL_MS="100",
        BILLINGPROXY_SIGNUP_RATE_PER_MINUTE=str(SIGN_IN_RATE),
        BILLINGPROXY_ALERT_ALLOW_PRIVATE="true",  # a receiver on this machine (nothing listens)
    ) as running:
        yield running


class Browser:
    """A client with its own cookie jar that sends what a browser on the gateway's page sends."""

    def __init__(self, stack: Any, *, origin: str | None = None) -> None:
        self.stack = stack
        self.origin = origin or _origin(stack.settings.public_url)
        self.jar = aiohttp.CookieJar(unsafe=True)  # the gateway is an IP address in the tests
        self.http = aiohttp.ClientSession(cookie_jar=self.jar)

    async def __aenter__(self) -> Browser:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.http.close()

    async def get(self, path: str) -> tuple[int, str, Any]:
        async with self.http.get(self.stack.gateway + path, allow_redirects=True) as response:
            return response.status, await response.text(), response.headers

    async def post(
        self, path: str, data: dict[str, str], *, headers: dict[str, str] | None = None, follow: bool = False
    ) -> tuple[int, str, Any]:
        sent = {"origin": self.origin, **(headers or {})}
        async with self.http.post(
            self.stack.gateway + path, data=data, headers=sent, allow_redirects=follow
        ) as response:
            return response.status, await response.text(), response.headers

    async def sign_in(self, key: str) -> None:
        status, _, headers = await self.post("/account/sign-in", {"api_key": key})
        assert status == 303 and headers["location"] == "/account", status

    def session_cookie(self) -> str:
        [cookie] = [c for c in self.jar if c.key == "bp_session"]
        return cookie.value

    async def csrf(self, path: str = "/account") -> str:
        _, html, _ = await self.get(path)
        match = re.search(r'name="csrf_token" value="([^"]+)"', html)
        assert match, html
        return match.group(1)


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


async def sessions_of(stack: Any, wallet_id: str) -> int:
    return int(
        await stack.db.scalar("SELECT count(*) FROM account_sessions WHERE wallet_id = :w", w=wallet_id)
    )


async def test_signing_in_shows_the_wallet_and_the_cookie_is_locked_down(stack) -> None:
    user = await stack.signup()
    async with Browser(stack) as browser:
        status, html, headers = await browser.get("/account")
        assert status == 200 and 'action="/account/sign-in"' in html
        csp = headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert headers["x-frame-options"] == "DENY" and headers["cache-control"] == "no-store"

        async with browser.http.post(
            stack.gateway + "/account/sign-in",
            data={"api_key": user["api_key"]},
            headers={"origin": browser.origin},
            allow_redirects=False,
        ) as response:
            assert response.status == 303
            set_cookie = response.headers["set-cookie"]
        assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie and "Path=/" in set_cookie
        assert user["api_key"] not in set_cookie

        status, html, _ = await browser.get("/account")
        assert status == 200
        assert f'<span id="balance">{money.format_usd(money.parse_usd(user["balance_usd"]))}</span>' in html
        assert user["wallet_id"] in html and user["api_key"] not in html
        # Only the token's hash is stored.
        token = browser.session_cookie()
        stored = await stack.db.scalar(
            "SELECT count(*) FROM account_sessions WHERE token_hash = sha256(:t)", t=token.encode()
        )
        assert stored == 1


async def test_a_wrong_key_says_so_the_same_way_whatever_is_wrong(stack) -> None:
    revoked_owner = await stack.signup()
    other = await stack.signup()
    async with Browser(stack) as browser:
        await browser.sign_in(revoked_owner["api_key"])
        csrf = await browser.csrf("/account/keys")
        status, _, _ = await browser.post("/account/keys", {"csrf_token": csrf})
        assert status == 201
        await browser.post(
            f"/account/keys/{revoked_owner['key_id']}/revoke", {"csrf_token": csrf, "confirm": "yes"}
        )
    answers = []
    async with Browser(stack) as browser:
        for key in ("nonsense", other["api_key"][:-2] + "xx", revoked_owner["api_key"], ""):
            status, html, _ = await browser.post("/account/sign-in", {"api_key": key})
            message = re.search(r'id="sign-in-error">([^<]+)<', html)
            answers.append((status, message.group(1) if message else html[:200]))
    assert answers == [(401, "That key is not valid.")] * 4


async def test_a_form_from_another_origin_or_without_the_token_changes_nothing(stack) -> None:
    user = await stack.signup()
    async with Browser(stack, origin="https://evil.example") as attacker_page:
        status, _, _ = await attacker_page.post("/account/sign-in", {"api_key": user["api_key"]})
        assert status == 403  # login CSRF: the attacker's page cannot sign the victim in
    assert await sessions_of(stack, user["wallet_id"]) == 0

    async with Browser(stack) as browser:
        await browser.sign_in(user["api_key"])
        keys_before = await stack.db.scalar(
            "SELECT count(*) FROM api_keys WHERE wallet_id = :w", w=user["wallet_id"]
        )
        csrf = await browser.csrf()
        for data, headers in [
            ({}, {}),  # no token
            ({"csrf_token": "x" * len(csrf)}, {}),  # a wrong one
            ({"csrf_token": csrf}, {"origin": "https://evil.example"}),  # the right one, wrong origin
            ({"csrf_token": csrf}, {"origin": "null"}),
        ]:
            status, _, _ = await browser.post("/account/keys", data, headers=headers)
            assert status == 403, (data, headers)
            status, _, _ = await browser.post("/account/sign-out", data, headers=headers)
            assert status == 403, (data, headers)
        keys_after = await stack.db.scalar(
            "SELECT count(*) FROM api_keys WHERE wallet_id = :w", w=user["wallet_id"]
        )
        assert keys_after == keys_before
        assert await sessions_of(stack, user["wallet_id"]) == 1
        status, html, _ = await browser.get("/account")
        assert 'action="/account/sign-out"' in html, "still signed in"


async def test_sign_in_makes_a_new_session_and_sign_out_ends_every_copy(stack) -> None:
    user = await stack.signup()
    async with Browser(stack) as browser:
        planted = "planted-by-an-attacker"
        browser.jar.update_cookies({"bp_session": planted}, response_url=aiohttp.client.URL(stack.gateway))
        await browser.sign_in(user["api_key"])
        first = browser.session_cookie()
        assert first != planted
        await browser.sign_in(user["api_key"])
        assert browser.session_cookie() != first, "a new token at every sign-in"

        copy = browser.session_cookie()
        csrf = await browser.csrf()
        status, _, headers = await browser.post("/account/sign-out", {"csrf_token": csrf})
        assert status == 303
    async with Browser(stack) as thief:
        thief.jar.update_cookies({"bp_session": copy}, response_url=aiohttp.client.URL(stack.gateway))
        status, html, _ = await thief.get("/account")
        assert status == 200 and 'action="/account/sign-in"' in html, "the copied cookie is refused"
        async with thief.http.get(stack.gateway + "/account/balance.json") as response:
            assert response.status == 401


async def test_revoking_the_key_ends_its_sessions(stack) -> None:
    user = await stack.signup()
    async with Browser(stack) as victim, Browser(stack) as other_tab:
        await victim.sign_in(user["api_key"])
        csrf = await victim.csrf("/account/keys")
        status, html, _ = await victim.post("/account/keys", {"csrf_token": csrf})
        assert status == 201
        new_key = re.search(r'id="new-key" readonly value="([^"]+)"', html)
        assert new_key
        await other_tab.sign_in(new_key.group(1))
        # The first session revokes the key the second signed in with.
        new_key_id = await stack.db.scalar(
            "SELECT id FROM api_keys WHERE wallet_id = :w AND id <> :k", w=user["wallet_id"], k=user["key_id"]
        )
        status, html, _ = await victim.post(f"/account/keys/{new_key_id}/revoke", {"csrf_token": csrf})
        assert status == 200 and 'id="confirm-revoke"' in html, "asks first"
        status, _, _ = await victim.post(
            f"/account/keys/{new_key_id}/revoke", {"csrf_token": csrf, "confirm": "yes"}
        )
        assert status == 303
        status, html, _ = await other_tab.get("/account")
        assert 'action="/account/sign-in"' in html


async def test_one_wallets_session_cannot_touch_another_wallets_keys(stack) -> None:
    victim = await stack.signup()
    attacker = await stack.signup()
    async with Browser(stack) as browser:
        await browser.sign_in(attacker["api_key"])
        csrf = await browser.csrf("/account/keys")
        for confirm in ("", "yes"):
            status, html, _ = await browser.post(
                f"/account/keys/{victim['key_id']}/revoke", {"csrf_token": csrf, "confirm": confirm}
            )
            assert status == 404, html[:300]
        status, html, _ = await browser.get("/account/keys")
        assert victim["key_id"] not in html
        status, html, _ = await browser.get("/account/spend")
        assert victim["wallet_id"] not in html
    revoked = await stack.db.scalar("SELECT revoked_at FROM api_keys WHERE id = :k", k=victim["key_id"])
    assert revoked is None


async def test_spend_and_the_csv_show_the_ledgers_exact_amounts(stack) -> None:
    user = await stack.signup()
    with stack.openai(user["api_key"]) as client:
        for _ in range(3):
            client.chat.completions.create(**CHAT)
    await stack.db.settled(user["wallet_id"])
    usage = await stack.db.rows(
        "SELECT id, amount_nano, details->>'request_id' AS request_id FROM ledger_entries "
        "WHERE wallet_id = :w AND kind = 'usage' ORDER BY id",
        w=user["wallet_id"],
    )
    assert len(usage) == 3
    total = -sum(row.amount_nano for row in usage)
    async with Browser(stack) as browser:
        await browser.sign_in(user["api_key"])
        status, html, _ = await browser.get("/account/spend")
        assert status == 200
        assert f'<td>gpt-4o-mini</td><td class="num">{money.format_usd(total)}</td>' in html
        for row in usage:
            assert row.request_id in html and money.format_usd(row.amount_nano) in html
        assert "<svg" in html and "<rect" in html

        async with browser.http.get(stack.gateway + "/account/entries.csv") as response:
            assert response.status == 200 and response.headers["content-type"].startswith("text/csv")
            rows = list(csv.DictReader(io.StringIO(await response.text())))
    assert [r["kind"] for r in rows].count("usage") == 3 and [r["kind"] for r in rows].count("grant") == 1
    assert sorted(
        money.parse_usd(r["amount_usd"], allow_negative=True) for r in rows if r["kind"] == "usage"
    ) == sorted(row.amount_nano for row in usage)


async def test_top_up_checks_its_form_and_shows_only_the_wallets_own_payment(stack) -> None:
    owner = await stack.signup()
    other = await stack.signup()
    async with Browser(stack) as browser:
        await browser.sign_in(owner["api_key"])
        csrf = await browser.csrf("/account/top-up")
        status, _, _ = await browser.post("/account/top-up", {"amount_usd": "10.00"})
        assert status == 403, "no CSRF token"
        for amount in ("0.10", "1e3", "-10", "ten", "10.001", ""):
            status, html, _ = await browser.post(
                "/account/top-up", {"csrf_token": csrf, "amount_usd": amount}
            )
            assert status == 400 and 'id="top-up-error"' in html, amount
        assert (
            await stack.db.scalar(
                "SELECT count(*) FROM stripe_checkout_sessions WHERE wallet_id = :w", w=owner["wallet_id"]
            )
            == 0
        )
        status, _, headers = await browser.post(
            "/account/top-up", {"csrf_token": csrf, "amount_usd": "10.00"}
        )
        assert status == 303 and "/c/pay/cs_test_" in headers["location"]
        own = await stack.db.scalar(
            "SELECT id FROM stripe_checkout_sessions WHERE wallet_id = :w", w=owner["wallet_id"]
        )
        _, html, _ = await browser.get(f"/account?session_id={own}")
        assert 'id="topup" data-state="pending"' in html
    async with Browser(stack) as browser:
        await browser.sign_in(other["api_key"])
        _, html, _ = await browser.get(f"/account?session_id={own}")
        assert 'id="topup"' not in html, "another wallet's payment is not shown"
        async with browser.http.get(stack.gateway + f"/account/balance.json?session_id={own}") as response:
            assert (await response.json())["topup_credited"] is None


async def test_sign_in_goes_back_only_to_the_account_pages_own_paths(stack) -> None:
    user = await stack.signup()
    for target, lands in [
        ("/account/top-up", "/account/top-up"),
        ("//evil.example/", "/account"),
        ("https://evil.example/", "/account"),
        ("/billing/keys", "/account"),
    ]:
        async with Browser(stack) as browser:
            status, _, headers = await browser.post(
                "/account/sign-in", {"api_key": user["api_key"], "next": target}
            )
            assert status == 303 and headers["location"] == lands, target


async def test_alerts_are_registered_tested_and_removed_and_bad_input_changes_nothing(stack) -> None:
    user = await stack.signup()
    endpoints = "SELECT count(*) FROM alert_endpoints WHERE wallet_id = :w AND url IS NOT NULL"
    async with Browser(stack) as browser:
        await browser.sign_in(user["api_key"])
        csrf = await browser.csrf("/account/alerts")
        status, _, _ = await browser.post("/account/alerts", {"url": "http://127.0.0.1:9/hook"})
        assert status == 403, "no CSRF token"
        for url, thresholds in [
            ("ftp://127.0.0.1/hook", ""),
            ("not a url", ""),
            ("http://127.0.0.1:9/hook", "5, ten"),
            ("http://127.0.0.1:9/hook", "-1"),
            ("http://127.0.0.1:9/hook", "1e3"),
        ]:
            status, html, _ = await browser.post(
                "/account/alerts", {"csrf_token": csrf, "url": url, "thresholds": thresholds}
            )
            assert status == 400 and 'id="alerts-error"' in html, (url, thresholds)
        assert await stack.db.scalar(endpoints, w=user["wallet_id"]) == 0

        status, html, _ = await browser.post(
            "/account/alerts", {"csrf_token": csrf, "url": "http://127.0.0.1:9/hook", "thresholds": "0.25, 0"}
        )
        assert status == 200 and 'id="signing-secret" readonly value="whsec_' in html
        status, html, _ = await browser.get("/account/alerts")
        assert "whsec_" not in html.replace("secret ending", ""), "the secret is shown once"
        assert '<span id="alert-thresholds">0.000000 USD, 0.250000 USD</span>' in html
        status, html, _ = await browser.post("/account/alerts/test", {"csrf_token": csrf})
        assert status == 202 and "<td>alert.test</td>" in html
        status, _, _ = await browser.post("/account/alerts/remove", {"csrf_token": csrf})
        assert status == 303
        assert await stack.db.scalar(endpoints, w=user["wallet_id"]) == 0


async def test_auto_recharge_form_refuses_bad_input_and_leads_to_the_card_setup(stack) -> None:
    user = await stack.signup()
    settings = "SELECT count(*) FROM auto_recharges WHERE wallet_id = :w"
    async with Browser(stack) as browser:
        await browser.sign_in(user["api_key"])
        csrf = await browser.csrf("/account/auto-recharge")
        good = {"threshold_usd": "2.00", "amount_usd": "10.00", "monthly_cap_usd": "30.00"}
        status, _, _ = await browser.post("/account/auto-recharge", good)
        assert status == 403, "no CSRF token"
        for field, bad in [
            ("amount_usd", "0.50"),  # below the top-up minimum
            ("amount_usd", "10.005"),  # fractions of a cent
            ("amount_usd", "1e1"),
            ("threshold_usd", "-1"),
            ("threshold_usd", "999999999"),
            ("monthly_cap_usd", "5.00"),  # below one recharge
            ("amount_usd", ""),
        ]:
            status, html, _ = await browser.post(
                "/account/auto-recharge", {**good, field: bad, "csrf_token": csrf}
            )
            assert status == 400 and 'id="recharge-error"' in html, (field, bad)
        assert await stack.db.scalar(settings, w=user["wallet_id"]) == 0
        status, _, headers = await browser.post("/account/auto-recharge", {**good, "csrf_token": csrf})
        assert status == 303 and "/c/pay/cs_test_" in headers["location"], "to the card's setup page"
        assert await stack.db.scalar(settings, w=user["wallet_id"]) == 1
        status, _, _ = await browser.post("/account/auto-recharge/off", {"csrf_token": csrf})
        assert status == 303
        enabled = await stack.db.scalar(
            "SELECT enabled FROM auto_recharges WHERE wallet_id = :w", w=user["wallet_id"]
        )
        assert enabled is False


async def test_a_key_is_capped_from_the_page_and_another_wallets_key_cannot_be(stack) -> None:
    user = await stack.signup()
    other = await stack.signup()
    limit = "SELECT limit_nano, limit_window FROM api_keys WHERE id = :k"
    async with Browser(stack) as browser:
        await browser.sign_in(user["api_key"])
        csrf = await browser.csrf("/account/keys")
        good = {"key_id": user["key_id"], "usd": "0.00001", "window": "daily"}
        status, _, _ = await browser.post("/account/keys/limit", good)
        assert status == 403, "no CSRF token"
        for bad in [
            {"usd": "-1"},
            {"usd": "1e3"},
            {"usd": "ten"},
            {"window": "hourly"},
            {"usd": "0.1", "window": ""},
        ]:
            status, html, _ = await browser.post("/account/keys/limit", {**good, **bad, "csrf_token": csrf})
            assert status == 400 and 'id="keys-error"' in html, bad
        status, _, _ = await browser.post(
            "/account/keys/limit", {**good, "key_id": other["key_id"], "csrf_token": csrf}
        )
        assert status == 404
        assert tuple(await stack.db.rows(limit, k=other["key_id"]))[0] == (None, None)
        assert tuple(await stack.db.rows(limit, k=user["key_id"]))[0] == (None, None)

        status, html, _ = await browser.post("/account/keys/limit", {**good, "csrf_token": csrf})
        assert status == 200 and 'id="keys-notice"' in html
        assert tuple(await stack.db.rows(limit, k=user["key_id"]))[0] == (10_000, "daily")

        async def refused() -> bool:
            with stack.openai(user["api_key"]) as client:
                try:
                    client.chat.completions.create(**CHAT)
                except openai.PermissionDeniedError as exc:
                    return exc.body["code"] == "key_limit_reached"  # type: ignore[index]
            await stack.db.settled(user["wallet_id"])
            return False

        await wait_until(refused, 20, "the capped key refused with key_limit_reached")
        _, html, _ = await browser.get("/account/keys")
        assert "0.000010 daily:" in html

        status, _, _ = await browser.post("/account/keys/limit", {**good, "usd": "", "csrf_token": csrf})
        assert status == 200
        assert tuple(await stack.db.rows(limit, k=user["key_id"]))[0][0] is None


# Last in the module: it uses up the client's sign-in allowance.
async def test_sign_in_is_rate_limited_per_client(stack) -> None:
    async with Browser(stack) as browser:
        statuses = []
        for _ in range(SIGN_IN_RATE + 1):
            status, _, headers = await browser.post("/account/sign-in", {"api_key": "sk-nope"})
            statuses.append(status)
        assert statuses[-1] == 429 and "retry-after" in headers
        assert set(statuses[:-1]) <= {401, 429}
