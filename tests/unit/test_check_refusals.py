"""authz_sidecar.check: what the client is told for each way billing.holds can refuse a hold.

The real Decider, with a stand-in for the hold's statement (so no database): each test says what
``place`` answers, and checks the status and code the client gets. The statement itself is tested
against PostgreSQL in tests/integration/test_holds.py.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from support.manual_time import ManualTime

from authz_sidecar import api_errors, check, contract
from billing import api_keys, hold_batches, holds, key_limits, pricing
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


# Priced, but the price map gives no output limit (some of litellm's entries, or an override).
UNLIMITED_MODEL = "no-known-limit"
OUTPUT_PRICE = Decimal("0.0000006")


class StandInDecider(check.Decider):
    def __init__(self, refusal: holds.Refusal | None, *, clock: Callable[[], float] = time.monotonic) -> None:
        price = pricing.ModelPrice.tokens(
            MODEL, Decimal("0.00000015"), OUTPUT_PRICE, max_output_tokens=100, max_input_tokens=1000
        )
        unlimited = pricing.ModelPrice.tokens(
            UNLIMITED_MODEL, Decimal("0.00000015"), OUTPUT_PRICE, max_input_tokens=1000
        )
        book = pricing.PriceBook({MODEL: price, UNLIMITED_MODEL: unlimited})
        super().__init__(Settings(), book, None, Keys(), clock=clock)  # type: ignore[arg-type]  # no database: holds stand in
        self.refusal = refusal
        self.placed: list[hold_batches.HoldRequest] = []

    async def _place_holds(self, batch: list[hold_batches.HoldRequest]) -> list[holds.Refusal | None]:
        self.placed += batch
        return [self.refusal for _ in batch]


async def answer(
    refusal: holds.Refusal | None,
    request: dict[str, Any] | None = None,
    decider: StandInDecider | None = None,
) -> dict[str, str] | api_errors.ApiError:
    decider = decider or StandInDecider(refusal)
    request = request or {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    try:
        return await decider.decide(
            method="POST",
            path="/v1/chat/completions",
            headers={
                "authorization": "Bearer sk-litellm-x",
                "content-type": "application/json",
                "x-request-id": "req-1",
            },
            body=json.dumps(request).encode(),
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
        refused(
            holds.RefusalReason.KEY_LIMIT_REACHED,
            key_limit=key_limits.KeyLimit(
                key_id="key_x",
                wallet_id="wal_x",
                limit_nano=5_000_000_000,
                window=key_limits.Window.MONTHLY,
                window_start=dt.datetime(2026, 12, 1, tzinfo=dt.UTC),
                spent_nano=4_999_999_500,
                reserved_nano=0,
            ),
        ),
        403,
        "key_limit_reached",
    ),
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


async def test_a_key_limit_refusal_says_which_limit_and_when_it_resets_and_offers_no_top_up() -> None:
    refusal = next(r for r, _, code in CASES if code == "key_limit_reached")
    decider = StandInDecider(refusal)
    error = await answer(refusal, decider=decider)
    assert isinstance(error, api_errors.ApiError)
    assert error.type == "permission_error" and "top_up_url" not in error.extra
    assert {k: error.extra[k] for k in ("limit_usd", "window", "resets_at")} == {
        "limit_usd": "5.000000",
        "window": "monthly",
        "resets_at": "2027-01-01T00:00:00Z",
    }
    assert error.message == (
        "This request may cost up to $0.00007095, more than the $0.0000005 left of this API key's "
        "monthly spend limit of $5.00 ($4.9999995 spent, $0.00 held for requests in flight); it "
        "resets at 2027-01-01T00:00:00Z."
    )
    assert error.extra["worst_case_usd"] == "0.00007095"
    used_up = dataclasses.replace(refusal.key_limit, spent_nano=refusal.key_limit.limit_nano)
    assert used_up.describe(70_950) == (
        "This API key's monthly spend limit of $5.00 is reached ($5.00 spent, $0.00 held for "
        "requests in flight); it resets at 2027-01-01T00:00:00Z."
    )
    # Remembered once per window for the sweep's alert, never queued by the Check itself; once the
    # sweep has queued it, later refusals in the window are not remembered again.
    assert list(decider.limit_refusals) == [("key_x", "2026-12-01T00:00:00Z")]
    decider.limit_alerted.add(decider.limit_refusals.popitem()[0])
    await answer(refusal, decider=decider)
    assert decider.limit_refusals == {}


def test_every_refusal_reason_is_covered_above() -> None:
    assert {refusal.reason for refusal, _, _ in CASES} == set(holds.RefusalReason)


async def test_a_placed_hold_admits_with_its_facts() -> None:
    facts = await answer(None)
    assert isinstance(facts, dict)
    assert facts[contract.metadata_header("hold_id")] == "req-1"
    assert facts[contract.metadata_header("wallet_id")] == "wal_x"


# --- a model whose output limit is unknown (docs/decisions/0020) -------------------------------


async def test_a_model_without_a_known_limit_is_held_for_all_the_request_asks() -> None:
    """The attack: ask such a model for far more than any guessed cap. The hold must cover it, or
    the settlement (never above its hold) would charge a long answer as a short one."""
    decider = StandInDecider(None)
    request = {
        "model": UNLIMITED_MODEL,
        "max_tokens": 100_000,
        "messages": [{"role": "user", "content": "hi"}],
    }
    assert isinstance(await answer(None, request, decider), dict)
    (hold,) = decider.placed
    assert hold.amount_nano >= 100_000 * OUTPUT_PRICE * 10**9


async def test_a_model_without_a_known_limit_needs_a_bound_on_its_output() -> None:
    decider = StandInDecider(None)
    request = {"model": UNLIMITED_MODEL, "messages": [{"role": "user", "content": "hi"}]}
    error = await answer(None, request, decider)
    assert isinstance(error, api_errors.ApiError)
    assert (error.status, error.code) == (400, "output_limit_required")
    assert decider.placed == []


# --- the empty-wallet memo ---------------------------------------------------------------------


class SlowStatementDecider(StandInDecider):
    """The hold's statement takes ``statement_s`` of the clock, as a loaded database would."""

    def __init__(self, refusal: holds.Refusal | None, clock: ManualTime) -> None:
        super().__init__(refusal, clock=clock)
        self.clock = clock
        self.statement_s = 0.0
        self.statement_began: list[float] = []

    async def _place_holds(self, batch: list[hold_batches.HoldRequest]) -> list[holds.Refusal | None]:
        self.statement_began.append(self.clock.now)
        self.clock.now += self.statement_s
        return await super()._place_holds(batch)


EMPTY = refused(
    holds.RefusalReason.INSUFFICIENT_FUNDS, balance_nano=0, shortfall=holds.Shortfall.WALLET_EMPTY
)


async def test_a_wallet_refused_as_empty_is_served_one_ttl_after_its_statement_began() -> None:
    """The promise is a key change's: a top-up committed while the refusing statement ran is seen
    by every Check begun one key-cache period after that statement began, however long it took."""
    clock = ManualTime()
    ttl_s = Settings().key_cache_ttl_ms / 1000
    decider = SlowStatementDecider(EMPTY, clock)
    decider.statement_s = 3 * ttl_s
    error = await answer(EMPTY, decider=decider)
    assert isinstance(error, api_errors.ApiError)
    assert error.extra["reason"] == "wallet_empty"
    (began,) = decider.statement_began

    decider.refusal = None  # topped up while the statement ran
    decider.statement_s = 0.0
    clock.now = began + ttl_s / 2
    remembered = await answer(None, decider=decider)
    assert isinstance(remembered, api_errors.ApiError)
    assert remembered.code == "insufficient_funds"
    assert len(decider.placed) == 1, "within the period the memo refuses without a statement"

    clock.now = began + ttl_s
    assert isinstance(await answer(None, decider=decider), dict)
    assert len(decider.placed) == 2
