"""Money as integer nano-USD (1e-9 USD), and its USD decimal-string form.

Why nano-USD: per-token prices go down to 1e-8 USD and below, so cents would round every request
to zero. Nine decimals keep a token's price exact while a signed 64-bit integer (PostgreSQL
BIGINT) still holds ±9.2 billion USD. Floats never appear: parsing goes through ``Decimal`` and
a cost is rounded up once, to a whole nano-USD, by :func:`nano_from_usd_ceil`.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from fractions import Fraction

NANO_PER_USD = 10**9
# Card payments (Stripe) count whole cents.
NANO_PER_CENT = NANO_PER_USD // 100
# BIGINT's range, so a value that parses always fits the database.
NANO_MAX = 2**63 - 1

# ASCII only: \d alone would also accept "１０" or "٣", which int() then reads as digits.
_USD_PATTERN = re.compile(r"(?P<sign>-?)(?P<whole>\d{1,10})(?:\.(?P<frac>\d{1,9}))?", re.ASCII)


class MoneyError(ValueError):
    """A USD amount that is malformed, too precise or out of range."""


def parse_usd(text: str, *, allow_negative: bool = False) -> int:
    """Parse a decimal USD string ("10", "0.50", "0.000000150") into nano-USD, exactly.

    Refuses what would lose or invent money: more than nine decimals, exponents, floats' text
    forms like "1e3", "NaN", spaces, and negatives unless ``allow_negative``.
    """
    if not isinstance(text, str):
        raise MoneyError(f'an amount in USD must be a decimal string such as "10.00", not {text!r}')
    match = _USD_PATTERN.fullmatch(text)
    if match is None:
        raise MoneyError(
            f'{text!r} is not a USD amount: use a decimal string such as "10.00" '
            "(at most 9 decimals, no exponent)"
        )
    if match["sign"] and not allow_negative:
        raise MoneyError(f"{text!r} is negative; the amount must be zero or more")
    frac = (match["frac"] or "").ljust(9, "0")
    nano = int(match["whole"]) * NANO_PER_USD + int(frac)
    if nano > NANO_MAX:
        raise MoneyError(f"{text!r} is too large")
    return -nano if match["sign"] else nano


def format_usd(nano: int) -> str:
    """Render nano-USD as a USD decimal string: six decimals, more only when needed to be exact.

    ``500_000_000`` → ``"0.500000"``; ``149_850_001`` → ``"0.149850001"``. Never loses a nano.
    """
    return _format(nano, decimals_min=6)


def format_usd_cents(nano: int) -> str:
    """Render nano-USD as dollars and cents: two decimals, more only when needed to be exact.

    ``10_000_000_000`` → ``"10.00"``, for what people read (a top-up's amount and bounds); an
    amount finer than a cent keeps its digits (``1_500_000`` → ``"0.0015"``): never rounded.
    """
    return _format(nano, decimals_min=2)


def _format(nano: int, *, decimals_min: int) -> str:
    if not isinstance(nano, int) or isinstance(nano, bool):
        raise TypeError(f"nano-USD must be an int, not {type(nano).__name__}")
    sign = "-" if nano < 0 else ""
    whole, frac = divmod(abs(nano), NANO_PER_USD)
    digits = f"{frac:09d}"
    trimmed = digits.rstrip("0").ljust(decimals_min, "0")
    return f"{sign}{whole}.{trimmed}"


def nano_from_usd_ceil(usd: Decimal) -> int:
    """An exact USD ``Decimal`` rounded up to a whole nano-USD: the one rounding of a request."""
    if not usd.is_finite():
        raise MoneyError(f"cost {usd} is not finite")
    # In Fraction, not Decimal: a Decimal product is rounded to the caller's context precision
    # (28 digits by default) before the ceiling, a second rounding that can go down.
    return math.ceil(Fraction(usd) * NANO_PER_USD)
