"""authz_sidecar.check: what the client is told for each way billing.holds can refuse a hold.

The real Decider, with a stand-in for the hold's statement (so no database): each test says what
``place`` answers, and checks the status and code the client gets. The statement itself is tested
against PostgreSQL in tests/integration/test_holds.py.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from authz_sidecar import api_errors, check
from billing import api_keys, hold_batches, holds, pricing
from billing.settings import Settings

MODEL = "gpt-4o-mini"
KEY = api_keys.KeyRecord(
    id="key_x",
    wallet_id="wal_x",
    key_hash=b"\0" * 32,
    display_prefix="sk-litellm-x",
    allowed_models=None,
    expires_at=None,
    revoked_at=None,
    suspended=False,
)


class Keys:
    async def authenticate(self, authorization: str | None) -> api_keys.KeyRecord:
        return KEY


class StandInDecider(check.Decider):
    def __init__(self, refusal: holds.Refusal | None) -> None:
        price = pricing.ModelPrice.tokens(
            MODEL, Decimal("0.00000015"), Decimal("0.0000006"), max_output_tokens=100, max_input_tokens=1000
        )
        super().__init__(Settings(), pricing.PriceBook({MODEL: price}), None, Keys())  # type: ignore[arg-type]
        self.refusal = refusal

    async def _place_holds(self, batch: list[hold_batches.HoldRequest]) -> list[holds.Refusal | None]:
        return [self.refusal for _ in batch]


async def answer(refusal: holds.Refusal | None) -> dict[str, str] | api_errors.ApiError:
    decider = StandInDecider(refusal)
    try:
        return await decider.decide(
            method="POST",
            path="/v1/chat/completions",
            headers={
                "authorization": "Bearer sk-litellm-x",
                "content-type": "application/json",
                "x-request-id": "req-1",
            },
            body=json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode(),
        )
    finally:
        await decider.close()


def refused(reason: holds.RefusalReason, **money: Any) -> holds.Refusal:
    return holds.Refusal(reason, amount_nano=1_000, **money)


CASES = [
    (
        refused(holds.RefusalReason.FUNDS_RESERVED, balance_nano=5_000, reserved_nano=5_000),
        429,
        "funds_reserved",
    ),
    (refused(holds.RefusalReason.WALLET_SUSPENDED), 403, "wallet_suspended"),
    (refused(holds.RefusalReason.PAYMENT_DISPUTED), 403, "payment_disputed"),
    (refused(holds.RefusalReason.WALLET_NOT_FOUND), 403, "wallet_not_found"),
    (refused(holds.RefusalReason.DUPLICATE_REQUEST), 409, "duplicate_request"),
    (
        refused(holds.RefusalReason.INSUFFICIENT_FUNDS, shortfall=holds.Shortfall.WALLET_EMPTY),
        403,
        "insufficient_funds",
    ),
]


@pytest.mark.parametrize(("refusal", "status", "code"), CASES, ids=[c[2] for c in CASES])
async def test_each_refusal_reason_is_answered_with_its_own_code(
    refusal: holds.Refusal, status: int, code: str
) -> None:
    error = await answer(refusal)
    assert isinstance(error, api_errors.ApiError)
    assert (error.status, error.code) == (status, code)
    assert refusal.reason.value == code


def test_every_refusal_reason_is_covered_above() -> None:
    assert {refusal.reason for refusal, _, _ in CASES} == set(holds.RefusalReason)


async def test_a_placed_hold_admits_with_its_facts() -> None:
    facts = await answer(None)
    assert isinstance(facts, dict)
    assert facts[check.metadata_header("hold_id")] == "req-1"
    assert facts[check.metadata_header("wallet_id")] == "wal_x"
