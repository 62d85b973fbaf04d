"""billing.recharges' rules without a database: what a setting may be, the idempotency key, and
the PaymentIntent a recharge asks Stripe for (built from its row alone, so a retry is the same)."""

from __future__ import annotations

import datetime as dt

import pytest

from authz_sidecar import recharge_worker
from billing import money, recharges

USD = money.NANO_PER_USD
BOUNDS = {"amount_min_nano": 5 * USD, "amount_max_nano": 500 * USD}


def parse(threshold: object, amount: object, cap: object = None) -> recharges.Setting:
    return recharges.parse_setting(threshold=threshold, amount=amount, monthly_cap=cap, **BOUNDS)


def test_good_settings() -> None:
    assert parse("2.00", "10.00") == recharges.Setting(2 * USD, 10 * USD, None)
    assert parse("0", "5", "5") == recharges.Setting(0, 5 * USD, 5 * USD)
    assert parse(" 0.0000001 ", 500, "1000000") == recharges.Setting(100, 500 * USD, 1_000_000 * USD)
    assert parse("500", "10").threshold_nano == 500 * USD


@pytest.mark.parametrize(
    ("threshold", "amount", "cap", "param"),
    [
        ("2", 10.0, None, "amount_usd"),
        ("2", "10.001", None, "amount_usd"),
        ("2", "4.99", None, "amount_usd"),
        ("2", "500.01", None, "amount_usd"),
        ("2", "-5", None, "amount_usd"),
        ("2", "NaN", None, "amount_usd"),
        ("2", "1e1", None, "amount_usd"),
        ("2", None, None, "amount_usd"),
        ("2", True, None, "amount_usd"),
        ("2", ["10"], None, "amount_usd"),
        (2.0, "10", None, "threshold_usd"),
        ("-0.01", "10", None, "threshold_usd"),
        ("500.000000001", "10", None, "threshold_usd"),
        ("0.0000000001", "10", None, "threshold_usd"),
        ("2", "10", "9.99", "monthly_cap_usd"),
        ("2", "10", "1000000.01", "monthly_cap_usd"),
        ("2", "10", "20.001", "monthly_cap_usd"),
        ("2", "10", 20.5, "monthly_cap_usd"),
        ("2", "10", False, "monthly_cap_usd"),
    ],
)
def test_bad_settings_name_the_field(threshold: object, amount: object, cap: object, param: str) -> None:
    with pytest.raises(recharges.InvalidSetting) as caught:
        parse(threshold, amount, cap)
    assert caught.value.param == param


def test_the_key_and_the_alert_occurrence_are_per_recharge() -> None:
    assert recharges.idempotency_key("wal_a", 7) == "recharge:wal_a:7"
    assert recharges.idempotency_key("wal_a", 7) != recharges.idempotency_key("wal_a", 8)
    assert recharges.occurrence("wal_a", 7) == "wal_a:7"


def test_the_payment_intent_is_made_of_the_row_only() -> None:
    now = dt.datetime(2026, 12, 2, tzinfo=dt.UTC)
    row = recharges.Recharge(
        wallet_id="wal_a",
        seq=3,
        amount_nano=10 * USD,
        customer="cus_a",
        payment_method="pm_a",
        state="creating",
        payment_intent=None,
        failure_code=None,
        failure_message=None,
        attempts=1,
        created_at=now,
        updated_at=now,
    )
    params = recharge_worker.payment_intent_params(row)
    assert params == {
        "amount": 1000,
        "currency": "usd",
        "customer": "cus_a",
        "payment_method": "pm_a",
        "off_session": True,
        "confirm": True,
        "description": "BillingProxy auto-recharge 3",
        "metadata": {"wallet_id": "wal_a", "recharge_seq": "3", "purpose": recharges.PURPOSE},
    }
    later = recharges.Recharge(**{**row.__dict__, "attempts": 5, "updated_at": now + dt.timedelta(hours=1)})
    assert recharge_worker.payment_intent_params(later) == params
