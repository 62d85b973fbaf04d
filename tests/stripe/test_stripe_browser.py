"""Phase 4 in a real browser: headless Chromium follows the 403's top-up link, fills the form,
lands on the local Stripe double's TEST MODE checkout page, clicks "Pay (test)", comes back to
the gateway's success page, and the wallet's next request is served. Chromium missing is a
failure, not a skip (the `chromium_path` fixture installs it where it can)."""

from __future__ import annotations

import aiohttp
import pytest

from chromium_cdp import Chromium
from stripe_testkit import TEN_USD_NANO, Gateway


async def test_a_person_tops_up_in_chromium_and_is_served_again(
    default_stack, chromium_path: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    stack, db = default_stack
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        gateway = Gateway(stack.gateway_url, http)
        user = await gateway.signup()
        refusal = await gateway.exhaust(user["api_key"])
        top_up_url = refusal["error"]["top_up_url"]
        before = await db.balance(user["wallet_id"])

        async with Chromium(chromium_path, tmp_path_factory.mktemp("chromium")) as browser:
            page = await browser.new_page()
            await page.goto(top_up_url)
            await page.wait_for(
                "document.readyState === 'complete' && !!document.querySelector('#continue')",
                15,
                "the top-up page",
            )
            await page.type_into("input[name=api_key]", user["api_key"])
            await page.type_into("input[name=amount_usd]", "10.00")
            await page.click("#continue")

            checkout = f"{stack.stripe_double_url}/c/pay/"
            await page.wait_for(
                f"location.href.startsWith({checkout!r}) && document.readyState === 'complete' && "
                "!!document.querySelector('#pay')",
                15,
                "the checkout page",
            )
            text = await page.text()
            assert "TEST MODE" in text and "$10.00" in text and "Pay (test)" in text
            assert await db.balance(user["wallet_id"]) == before

            await page.click("#pay")
            success = f"{stack.gateway_url}/billing/topup/success"
            state = await page.wait_for(
                f"location.href.startsWith({success!r}) && document.querySelector('#status')?.dataset.state",
                15,
                "the success page",
            )
            assert state == "credited", await page.text()

        assert await db.balance(user["wallet_id"]) == before + TEN_USD_NANO
        status, body = await gateway.chat(user["api_key"])
        assert status == 200, body
