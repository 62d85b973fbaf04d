"""The access-log file alone settles everything, through the real Envoy and sidecar.

The gRPC access log is switched off (``BILLINGPROXY_ACCESS_LOG_GRPC=false``): Envoy reports
nothing to the sidecar but the lines of its JSON access-log file, as when the gRPC path is lost
entirely. Every request is then charged exactly what the backend reported, from the file; with a
small rotation size the sidecar rotates the file under Envoy (rename, then Envoy's
``/reopen_logs``) several times while requests keep coming, and nothing is lost or charged twice.
"""

from __future__ import annotations

import asyncio

import pytest

from billing import pricing
from billing.usage import Usage

pytestmark = pytest.mark.integration

MODEL = "gpt-4o-mini"
ROTATE_BYTES = 4096  # a few requests' lines: several rotations in one test


async def test_the_file_alone_settles_every_request_exactly_across_rotations(
    launch_stack, wait_until
) -> None:
    async with launch_stack(
        BILLINGPROXY_ACCESS_LOG_GRPC="false", BILLINGPROXY_ACCESS_LOG_ROTATE_BYTES=str(ROTATE_BYTES)
    ) as stack:
        account = await stack.signup()
        wallet_id, key = account["wallet_id"], account["api_key"]
        prices = pricing.load(None, stack.stack.settings.markup_percent)
        price = prices.price(MODEL)
        assert price is not None
        client = stack.openai(key)
        log_dir = stack.stack.settings.access_log_path.parent
        assert log_dir.stat().st_mode & 0o077 == 0  # the lines name wallets, keys and models

        expected = 0
        request_ids: list[str] = []
        for batch in range(6):
            answers = await asyncio.gather(
                *(
                    asyncio.to_thread(
                        client.chat.completions.with_raw_response.create,
                        model=MODEL,
                        messages=[{"role": "user", "content": f"batch {batch} request {n} " * (n + 1)}],
                        max_tokens=20,
                    )
                    for n in range(5)
                )
            )
            for raw in answers:
                completion = raw.parse()
                assert completion.usage is not None
                request_ids.append(raw.headers["x-request-id"])
                expected += prices.cost_nano(
                    price,
                    Usage.tokens(
                        prompt_tokens=completion.usage.prompt_tokens,
                        completion_tokens=completion.usage.completion_tokens,
                    ),
                )
            # Settled from the file only (the gRPC log is off), before the next batch starts.
            await stack.db.settled(wallet_id)

        charged = {
            entry.idempotency_key: -entry.amount_nano
            for entry in await stack.db.ledger(wallet_id)
            if entry.kind == "usage"
        }
        assert sorted(charged) == sorted(f"usage:{request_id}" for request_id in request_ids)
        assert sum(charged.values()) == expected
        assert await stack.db.balance(wallet_id) == 500_000_000 - expected
        # The sidecar rotated under Envoy, and keeps the live file and one rotated file only.
        files = sorted(path.name for path in log_dir.iterdir())
        assert files in (["access.log", "access.log.1"], ["access.log.1"]), files
        rotations = await stack.db.scalar("SELECT count(*) FROM access_log_cursors")
        assert rotations >= 3
        assert await stack.metric("billingproxy_access_log_file_recovered_total") == len(request_ids)
