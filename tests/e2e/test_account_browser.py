"""The account page in a real browser (Debian's Chromium through Playwright), through the whole
gateway: a person signs in with their key, sees the signup grant, makes billed requests with the
openai SDK, finds them on the spend page with the ledger's exact amounts, creates a key, uses it,
revokes it, and signs out — after which the old session cookie is refused.

Each page is also checked by axe-core (vendored, tests/vendor/axe-core) for serious and critical
accessibility violations, and at 360 px wide for sideways scrolling. Screenshots of each page go
to test-artifacts/account/.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Page, expect
from support import browser
from support.waiting import wait_until

from billing import money

pytestmark = pytest.mark.integration

AXE = (Path(__file__).resolve().parents[1] / "vendor" / "axe-core" / "axe.min.js").read_text(encoding="utf-8")
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
NARROW = {"width": 360, "height": 740}
WAIT_S = 20.0


@pytest.fixture(scope="module")
async def stack(launch_stack) -> AsyncIterator[Any]:
    async with launch_stack(
        BILLINGPROXY_KEY_CACHE_TTL_MS="100", BILLINGPROXY_AUTO_RECHARGE_INTERVAL_MS="100"
    ) as running:
        yield running


async def serious_violations(page: Page) -> list[str]:
    """axe-core's serious and critical findings on the page as it is now. Evaluated through the
    DevTools protocol, which the page's CSP (script-src 'self') does not govern."""
    await page.evaluate(AXE)
    found = await page.evaluate(
        "async () => (await axe.run(document)).violations"
        ".filter(v => v.impact === 'serious' || v.impact === 'critical')"
        ".map(v => v.id + ': ' + v.nodes.map(n => n.target.join(' ')).join(', '))"
    )
    return list(found)


async def look(page: Page, name: str, shots: Path) -> None:
    """The checks every page gets: accessible, usable at 360 px, and a screenshot."""
    assert await serious_violations(page) == [], name
    await page.set_viewport_size(NARROW)
    overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    await page.screenshot(path=str(shots / f"{name}-360.png"), full_page=True)
    assert overflow <= 0, f"{name} scrolls sideways at 360 px by {overflow} px"
    await page.set_viewport_size({"width": 1100, "height": 800})
    await page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


async def test_a_person_watches_spends_and_manages_keys_in_the_browser(stack, chromium_path: str) -> None:
    shots = browser.artifacts_dir("account")
    user = await stack.signup()
    async with browser.chromium(chromium_path) as chromium:
        context = await chromium.new_context()
        page = await context.new_page()
        page.set_default_timeout(browser.TIMEOUT_MS)
        script_errors: list[str] = []
        page.on("pageerror", lambda error: script_errors.append(str(error)))
        # A CSP violation or a script error; the 401 of the wrong key's sign-in is expected.
        page.on("console", lambda m: "Security Policy" in m.text and script_errors.append(m.text))

        await page.goto(stack.gateway + "/account")
        await look(page, "sign-in", shots)
        await page.fill("#api_key", "sk-not-a-key")
        await page.click("button[type=submit]")
        assert await page.inner_text("#sign-in-error") == "That key is not valid."
        await page.fill("#api_key", user["api_key"])
        await page.click("button[type=submit]")
        await page.wait_for_selector("#balance")
        assert await page.inner_text("#balance") == money.format_usd(money.parse_usd(user["balance_usd"]))
        assert await page.inner_text("#state") == "active"
        await look(page, "overview", shots)

        with stack.openai(user["api_key"]) as client:
            for _ in range(2):
                client.chat.completions.create(**CHAT)
        await stack.db.settled(user["wallet_id"])
        balance = money.format_usd(await stack.db.balance(user["wallet_id"]))
        # The overview follows the wallet by itself (its script asks every 2 s): no reload.
        await expect(page.locator("#balance")).to_have_text(balance, timeout=browser.TIMEOUT_MS)

        await page.click("nav >> text=Spend")
        usage = await stack.db.rows(
            "SELECT amount_nano, details->>'request_id' AS request_id FROM ledger_entries "
            "WHERE wallet_id = :w AND kind = 'usage'",
            w=user["wallet_id"],
        )
        entries = await page.inner_text("#entries-table")
        for row in usage:
            assert row.request_id in entries and money.format_usd(row.amount_nano) in entries
        assert await page.locator("#spend-by-model rect").count() == 1  # one day, one model
        assert await page.locator("#spend-by-key rect").count() == 1  # one day, one key
        await look(page, "spend", shots)

        await page.click("nav >> text=Keys")
        await page.click("#create-key")
        new_key = await page.input_value("#new-key")
        assert new_key.startswith("sk-") and new_key != user["api_key"]
        await look(page, "keys-created", shots)
        with stack.openai(new_key) as client:
            client.chat.completions.create(**CHAT)
        await page.goto(stack.gateway + "/account/keys")
        assert new_key not in await page.content(), "shown once"
        new_key_id = await stack.db.scalar(
            "SELECT id FROM api_keys WHERE wallet_id = :w AND id <> :k", w=user["wallet_id"], k=user["key_id"]
        )
        await page.select_option("#limit-key", new_key_id)
        await page.fill("#limit-usd", "5.00")
        await page.select_option("#limit-window", "weekly")
        await page.click("#set-limit")
        await expect(page.locator(f"#keys-table tr[data-key-id={new_key_id}] td.limit")).to_contain_text(
            "5.000000 weekly"
        )
        await look(page, "keys-limited", shots)
        await page.locator(f"#keys-table tr[data-key-id={new_key_id}]").get_by_role("button").click()
        await look(page, "key-revoke", shots)
        await page.click("#confirm-revoke")
        await page.wait_for_url("**/account/keys")
        with stack.openai(new_key) as client:
            refused = None
            for _ in range(50):  # the key cache answers for at most 100 ms more
                try:
                    client.chat.completions.create(**CHAT)
                except Exception as exc:  # noqa: BLE001 — any refusal ends the wait; checked below
                    refused = exc
                    break
            assert refused is not None and getattr(refused, "status_code", None) == 401, refused

        await page.click("nav >> text=Top up")
        await page.wait_for_selector("#amount_usd")
        await look(page, "top-up", shots)

        # Auto-recharge with Stripe's test card: the setup Checkout saves it, back on the page
        # the card shows; the next request takes the balance below the threshold → one recharge.
        await page.click("nav >> text=Auto-recharge")
        await page.fill("#threshold_usd", "1.00")
        await page.fill("#amount_usd", "10.00")
        await page.fill("#monthly_cap_usd", "20.00")
        await look(page, "auto-recharge-form", shots)
        await page.click("#save-recharge")
        await page.wait_for_url(f"{stack.stack.stripe_double_url}/c/pay/**")
        await page.fill("#card", "4242424242424242")
        await page.click("#pay")
        await page.wait_for_url(f"{stack.gateway}/account/auto-recharge?session_id=**")

        async def shown(locator: str, text: str) -> bool:
            await page.reload()
            return text in await page.inner_text(locator)

        # The webhook saves the card; the page shows it once it has.
        await wait_until(lambda: shown("#card", "4242"), WAIT_S, "the saved card on the page")
        assert await page.inner_text("#card") == "visa ·· 4242"
        assert await page.inner_text("#recharge-status") == "on"
        # Already below the threshold when the card was saved: the recharge starts without waiting
        # for another request; requests keep being served meanwhile.
        with stack.openai(user["api_key"]) as client:
            client.chat.completions.create(**CHAT)
        await wait_until(lambda: shown("#recharges-table", "succeeded"), WAIT_S, "the recharge, succeeded")
        topups = [e.amount_nano for e in await stack.db.ledger(user["wallet_id"]) if e.kind == "topup"]
        assert topups == [money.parse_usd("10.00")], "exactly one recharge, credited once"
        await look(page, "auto-recharge", shots)

        await page.click("nav >> text=Alerts")
        await page.wait_for_selector("#save-alerts")
        await look(page, "alerts", shots)

        [cookie] = [c for c in await context.cookies() if c["name"] == "bp_session"]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        await page.click("text=Sign out")
        await page.wait_for_selector("#api_key")
        assert script_errors == []

        # The cookie as it was before signing out, in a new browser context: refused.
        thief = await chromium.new_context()
        await thief.add_cookies([cookie])
        stolen = await thief.new_page()
        await stolen.goto(stack.gateway + "/account")
        assert await stolen.locator("#api_key").count() == 1
