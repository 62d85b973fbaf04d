"""billing.topups without a database: a requested amount is read exactly, within its bounds, in
whole cents, or refused saying what is wrong; nano-USD convert to Stripe's cents exactly."""

from __future__ import annotations

import pytest

from billing import money, topups

CENT = money.NANO_PER_CENT
TEN_USD_NANO = 10 * money.NANO_PER_USD


@pytest.mark.parametrize(
    ("value", "nano"),
    [
        ("10.00", TEN_USD_NANO),
        ("10", TEN_USD_NANO),
        (10, TEN_USD_NANO),
        ("5.00", 5 * 10**9),
        ("500", 500 * 10**9),
        (" 12.34 ", 1234 * CENT),
        ("10.000", TEN_USD_NANO),
    ],
)
def test_topup_amounts_in_bounds_are_read_exactly(value: object, nano: int) -> None:
    assert topups.parse_topup_amount(value, min_nano=5 * 10**9, max_nano=500 * 10**9) == nano


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("4.99", "from 5.00 to 500.00"),
        ("500.01", "from 5.00 to 500.00"),
        ("0", "from 5.00"),
        ("10.001", "fractions of a cent"),
        ("-10", "negative"),
        ("1e3", "not a USD amount"),
        ("abc", "not a USD amount"),
        (10.5, "decimal string"),
        (None, "decimal string"),
        (True, "decimal string"),
        ("", "not a USD amount"),
    ],
)
def test_bad_topup_amounts_say_what_is_wrong(value: object, message: str) -> None:
    with pytest.raises(topups.TopupAmountError, match=message):
        topups.parse_topup_amount(value, min_nano=5 * 10**9, max_nano=500 * 10**9)


@pytest.mark.parametrize(
    ("nano", "cents"), [(0, 0), (CENT, 1), (TEN_USD_NANO, 1000), (99_999_999 * CENT, 99_999_999)]
)
def test_whole_cents_convert_exactly(nano: int, cents: int) -> None:
    assert topups.cents_from_nano(nano) == cents


@pytest.mark.parametrize("nano", [1, CENT - 1, TEN_USD_NANO + 1, CENT + CENT // 2])
def test_fractions_of_a_cent_never_reach_stripe(nano: int) -> None:
    with pytest.raises(ValueError, match="not a whole number of cents"):
        topups.cents_from_nano(nano)
