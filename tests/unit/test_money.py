"""billing.money: USD strings ⇄ integer nano-USD, exactly, and the one rounding of a cost."""

from __future__ import annotations

import decimal
import random
from decimal import Decimal

import pytest

from billing import money

NANO_MAX = 2**63 - 1  # PostgreSQL BIGINT's largest value


@pytest.mark.parametrize(
    ("text", "nano", "canonical"),
    [
        ("0", 0, "0.000000"),
        ("10", 10_000_000_000, "10.000000"),
        ("0.50", 500_000_000, "0.500000"),
        ("0.5", 500_000_000, "0.500000"),
        ("0.499850", 499_850_000, "0.499850"),
        ("0.000000150", 150, "0.00000015"),
        ("0.000000001", 1, "0.000000001"),
        ("0.149850001", 149_850_001, "0.149850001"),
        ("12.3456789", 12_345_678_900, "12.3456789"),
        ("0000000001.5", 1_500_000_000, "1.500000"),
        ("9223372036.854775807", NANO_MAX, "9223372036.854775807"),
    ],
)
def test_parse_and_format_known_values(text: str, nano: int, canonical: str) -> None:
    assert money.parse_usd(text) == nano
    assert money.format_usd(nano) == canonical
    assert money.parse_usd(canonical) == nano


@pytest.mark.parametrize(
    ("text", "nano", "canonical"),
    [
        ("-1.5", -1_500_000_000, "-1.500000"),
        ("-0.000000001", -1, "-0.000000001"),
        ("-0", 0, "0.000000"),
        ("-9223372036.854775807", -NANO_MAX, "-9223372036.854775807"),
    ],
)
def test_negative_amounts_when_allowed(text: str, nano: int, canonical: str) -> None:
    assert money.parse_usd(text, allow_negative=True) == nano
    assert money.format_usd(nano) == canonical


def test_round_trip_over_many_values() -> None:
    rng = random.Random(20261125)
    values = [0, 1, -1, 999_999_999, 1_000_000_000, 1_000_000_001, NANO_MAX, -NANO_MAX]
    values += [rng.randint(-NANO_MAX, NANO_MAX) for _ in range(2000)]
    values += [rng.randint(-(10**12), 10**12) for _ in range(2000)]
    for nano in values:
        text = money.format_usd(nano)
        assert money.parse_usd(text, allow_negative=True) == nano, text
        # At least six decimals, and no trailing zero beyond the sixth.
        frac = text.split(".")[1]
        assert len(frac) >= 6
        assert len(frac) == 6 or not frac.endswith("0")
        # Independently: the string is the exact decimal value of nano / 1e9.
        assert Decimal(text) == Decimal(nano).scaleb(-9)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1e3",
        "1E3",
        "1.5e-7",
        "NaN",
        "nan",
        "Infinity",
        "inf",
        " 1",
        "1 ",
        "1\n",
        "1.0000000001",  # ten decimals: a tenth of a nano would be lost
        "0.0000000005",
        ".5",
        "1.",
        "+1",
        "1,00",
        "1_000",
        "0x10",
        "$1",
        "1.2.3",
        "--1",
        "１０",  # full-width digits: int() accepts them, a money parser must not
        "٣",  # ARABIC-INDIC DIGIT THREE
        "9223372036.854775808",  # one nano over BIGINT
        "9999999999.999999999",
        "10000000000",  # eleven whole digits
    ],
)
def test_rejects_malformed_or_out_of_range(text: str) -> None:
    with pytest.raises(money.MoneyError):
        money.parse_usd(text)
    with pytest.raises(money.MoneyError):
        money.parse_usd(text, allow_negative=True)


@pytest.mark.parametrize("text", ["-1", "-0.000000001", "-10.00"])
def test_rejects_negative_unless_allowed(text: str) -> None:
    with pytest.raises(money.MoneyError, match="negative"):
        money.parse_usd(text)


def test_rejects_too_large_negative() -> None:
    with pytest.raises(money.MoneyError, match="too large"):
        money.parse_usd("-9223372036.854775808", allow_negative=True)


@pytest.mark.parametrize("value", [1, 1.0, 0.5, Decimal("1"), None, b"1", ["1"], True])
def test_rejects_non_strings(value: object) -> None:
    with pytest.raises(money.MoneyError):
        money.parse_usd(value)  # not a str, on purpose


def test_money_error_is_a_value_error() -> None:
    assert issubclass(money.MoneyError, ValueError)


@pytest.mark.parametrize("value", [1.0, Decimal("1"), "1", True, None])
def test_format_refuses_anything_but_int(value: object) -> None:
    with pytest.raises(TypeError):
        money.format_usd(value)  # not a str, on purpose


@pytest.mark.parametrize(
    ("nano", "text"),
    [
        (0, "0.00"),
        (10_000_000_000, "10.00"),
        (500_000_000, "0.50"),
        (10_000_000, "0.01"),
        (99_999_999_900_000_000, "99999999.90"),
        (-1_500_000_000, "-1.50"),
        (-10_000_000, "-0.01"),
        # Finer than a cent: the digits stay, never rounded (as format_usd never rounds).
        (1_500_000, "0.0015"),
        (5_000_000, "0.005"),
        (1, "0.000000001"),
        (-149_850_001, "-0.149850001"),
        (NANO_MAX, "9223372036.854775807"),
    ],
)
def test_format_usd_cents_known_values(nano: int, text: str) -> None:
    assert money.format_usd_cents(nano) == text
    assert money.parse_usd(text, allow_negative=True) == nano


def test_format_usd_cents_is_format_usd_in_fewer_decimals() -> None:
    rng = random.Random(20261202)
    values = [rng.randint(-(10**12), 10**12) for _ in range(2000)]
    values += [rng.randint(-(10**9), 10**9) * money.NANO_PER_CENT for _ in range(2000)]
    for nano in values:
        text = money.format_usd_cents(nano)
        assert Decimal(text) == Decimal(money.format_usd(nano)), nano
        frac = text.split(".")[1]
        assert len(frac) == 2 or (len(frac) > 2 and not frac.endswith("0")), text


def test_nano_per_cent_is_a_hundredth_of_a_dollar() -> None:
    assert money.NANO_PER_CENT * 100 == money.NANO_PER_USD == money.parse_usd("1")
    assert money.parse_usd("0.01") == money.NANO_PER_CENT


@pytest.mark.parametrize("value", [1.0, Decimal("1"), "1", True, None])
def test_format_usd_cents_refuses_anything_but_int(value: object) -> None:
    with pytest.raises(TypeError):
        money.format_usd_cents(value)  # not an int, on purpose


@pytest.mark.parametrize(
    ("usd", "nano"),
    [
        ("0", 0),
        ("0.000000150", 150),  # exact: unchanged
        ("0.00000015", 150),
        ("1.5E-7", 150),
        ("2.000000000000", 2_000_000_000),
        ("0.0000001501", 151),  # 150.1 nano → 151
        ("0.0000001500000000000001", 151),
        ("1E-18", 1),  # a billionth of a nano is still a nano
        ("0.0000000014", 2),  # 1.4 nano → 2, not 1 (up, not to nearest)
        ("0.0000000019", 2),
        ("12.3456789001", 12_345_678_901),
    ],
)
def test_nano_from_usd_ceil_rounds_up_to_whole_nano(usd: str, nano: int) -> None:
    assert money.nano_from_usd_ceil(Decimal(usd)) == nano


def test_nano_from_usd_ceil_is_exact_beyond_the_default_precision() -> None:
    # 1 USD + 1e-31 USD: 32 significant digits once in nano-USD. A multiplication in Decimal's
    # default 28-digit context rounds the tail away first and then the ceiling sees a whole
    # number — two roundings, one of them down.
    assert money.nano_from_usd_ceil(Decimal("1.0000000000000000000000000000001")) == 1_000_000_001
    assert money.nano_from_usd_ceil(Decimal("123456789.1234567890000000000000000001")) == (
        123_456_789_123_456_790
    )


def test_nano_from_usd_ceil_ignores_the_callers_decimal_context() -> None:
    with decimal.localcontext() as ctx:
        ctx.prec = 3
        ctx.rounding = decimal.ROUND_FLOOR
        assert money.nano_from_usd_ceil(Decimal("0.0000001501")) == 151
        assert money.nano_from_usd_ceil(Decimal("7.000000001")) == 7_000_000_001


@pytest.mark.parametrize("usd", ["NaN", "sNaN", "Infinity", "-Infinity"])
def test_nano_from_usd_ceil_refuses_non_finite(usd: str) -> None:
    with pytest.raises(money.MoneyError):
        money.nano_from_usd_ceil(Decimal(usd))


def test_nano_from_usd_ceil_returns_int() -> None:
    assert type(money.nano_from_usd_ceil(Decimal("0.1"))) is int
