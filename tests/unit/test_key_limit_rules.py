"""billing.key_limits without a database: the calendar windows (UTC; weeks from Monday), when each
resets, a row read back as the Check would roll it over, and the limit's validation."""

from __future__ import annotations

import datetime as dt

import pytest

from billing import key_limits

W = key_limits.Window
UTC = dt.UTC


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


@pytest.mark.parametrize(
    ("window", "moment", "start", "reset"),
    [
        (
            W.DAILY,
            "2026-12-02T23:59:59.999999+00:00",
            "2026-12-02T00:00:00+00:00",
            "2026-12-03T00:00:00+00:00",
        ),
        (W.DAILY, "2026-12-03T00:00:00+00:00", "2026-12-03T00:00:00+00:00", "2026-12-04T00:00:00+00:00"),
        # 01:00 in Paris is still the previous UTC day.
        (W.DAILY, "2026-12-03T00:30:00+01:00", "2026-12-02T00:00:00+00:00", "2026-12-03T00:00:00+00:00"),
        (W.WEEKLY, "2026-12-06T23:59:59+00:00", "2026-11-30T00:00:00+00:00", "2026-12-07T00:00:00+00:00"),
        (W.WEEKLY, "2026-12-07T00:00:00+00:00", "2026-12-07T00:00:00+00:00", "2026-12-14T00:00:00+00:00"),
        (W.MONTHLY, "2026-12-31T23:59:59+00:00", "2026-12-01T00:00:00+00:00", "2027-01-01T00:00:00+00:00"),
        (W.MONTHLY, "2027-01-01T00:00:00+00:00", "2027-01-01T00:00:00+00:00", "2027-02-01T00:00:00+00:00"),
        (W.MONTHLY, "2028-02-29T12:00:00+00:00", "2028-02-01T00:00:00+00:00", "2028-03-01T00:00:00+00:00"),
    ],
)
def test_each_window_starts_and_resets_at_its_utc_calendar_boundary(
    window: key_limits.Window, moment: str, start: str, reset: str
) -> None:
    assert key_limits.calendar_start(window, at(moment)) == at(start)
    assert key_limits.resets_at(window, at(start)) == at(reset)
    # A count that began after the calendar start (the limit set mid-window) resets at the same time.
    assert key_limits.resets_at(window, at(moment)) == at(reset)


def test_a_total_window_never_resets() -> None:
    assert key_limits.calendar_start(W.TOTAL, at("2026-12-02T10:00:00+00:00")) == key_limits.TOTAL_START
    assert key_limits.resets_at(W.TOTAL, key_limits.TOTAL_START) is None


def row(
    window_start: dt.datetime | None, spent: int = 700, reserved: int = 200, window: str = "daily"
) -> dict:
    return {
        "id": "key_x",
        "wallet_id": "wal_x",
        "limit_nano": 1_000,
        "limit_window": window,
        "window_start": window_start,
        "spent_nano": spent,
        "reserved_nano": reserved,
    }


def test_a_row_read_after_its_window_ended_is_rolled_over_as_the_check_would() -> None:
    now = at("2026-12-03T08:00:00+00:00")
    current = key_limits.rolled(row(at("2026-12-03T00:00:00+00:00")), now)
    assert current is not None and (current.spent_nano, current.headroom_nano) == (700, 100)
    assert current.admits(100) and not current.admits(101)
    stale = key_limits.rolled(row(at("2026-12-02T00:00:00+00:00")), now)
    assert stale is not None
    assert (stale.spent_nano, stale.reserved_nano, stale.window_start) == (
        0,
        200,
        at("2026-12-03T00:00:00+00:00"),
    )
    assert key_limits.rolled({**row(None), "limit_nano": None, "limit_window": None}, now) is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"usd": "-1", "window": "daily"}, "usd"),
        ({"usd": 1.5, "window": "daily"}, "usd"),
        ({"usd": True, "window": "daily"}, "usd"),
        ({"usd": "1e3", "window": "daily"}, "usd"),
        ({"usd": "99999999999", "window": "daily"}, "usd"),
        ({"usd": "1", "window": "yearly"}, "window"),
        ({"usd": "1", "window": None}, "window"),
        ({"usd": "1"}, "window"),
        ({"usd": "1", "window": "daily", "key_id": "key_other"}, "key_id"),
    ],
)
def test_a_bad_limit_names_its_field(body: dict, param: str) -> None:
    with pytest.raises(key_limits.InvalidLimit) as refused:
        key_limits.parse(body)
    assert refused.value.param == param


def test_a_good_limit_is_exact_nano_usd() -> None:
    assert key_limits.parse({"usd": "5.00", "window": "monthly"}) == (5_000_000_000, W.MONTHLY)
    assert key_limits.parse({"usd": "0.000000001", "window": "total"}) == (1, W.TOTAL)
