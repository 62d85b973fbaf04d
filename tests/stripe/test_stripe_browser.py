"""Phase 4 in a real browser: headless Chromium follows the 403's top-up link to the account
page, signs in with the key, asks for $10, lands on the local Stripe double's TEST MODE checkout
page, clicks "Pay (test)", comes back to the account page, which shows the payment credited
without a reload; the wallet's next request is served. Chromium missing is a failure, not a skip
(the `chromium_path` fixture installs it where it can)."""

from __future__ import annotations

import aiohttp
from playwright.async_api import expect
from support import browser

from billing import money
from stripe_testkit import TEN_USD_NANO, Gateway


async def test_a_person_tops_up_in_chromium_and_is_served_again(default_stack, chromium_path: str) -> None:
    stack, db = default_stack
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        gateway = Gateway(stack.gateway_url, http)
        user = await gateway.signup()
        refusal = await gateway.exhaust(user["api_key"])
        top_up_url = refusal["error"]["top_up_url"]
        before = await db.balance(user["wallet_id"])

        async with browser.chromium(chromium_path) as chromium:
            page = await chromium.new_page()
            page.set_default_timeout(browser.TIMEOUT_MS)
            await page.goto(top_up_url)
            await page.fill("#api_key", user["api_key"])
            await page.click("button[type=submit]")
            await page.wait_for_url(f"{stack.gateway_url}/account/top-up")
            await page.fill("#amount_usd", "10.00")
            await page.screenshot(path=str(browser.artifacts_dir("account") / "top-up.png"), full_page=True)
            await page.click("#continue")

            await page.wait_for_url(f"{stack.stripe_double_url}/c/pay/**")
            text = await page.inner_text("body")
            assert "TEST MODE" in text and "$10.00" in text and "Pay (test)" in text
            assert await db.balance(user["wallet_id"]) == before

            await page.click("#pay")
            await page.wait_for_url(f"{stack.gateway_url}/account?session_id=**")
            await expect(page.locator("#topup")).to_have_attribute("data-state", "credited")
            await expect(page.locator("#balance")).to_have_text(money.format_usd(before + TEN_USD_NANO))
            await page.screenshot(
                path=str(browser.artifacts_dir("account") / "topped-up.png"), full_page=True
            )

        assert await db.balance(user["wallet_id"]) == before + TEN_USD_NANO
        status, body = await gateway.chat(user["api_key"])
        assert status == 200, body
