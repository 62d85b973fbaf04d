"""The spend chart's SVG: bars stacked by model per UTC day, labels exact and escaped."""

from __future__ import annotations

import datetime as dt

from authz_sidecar.account import spend_chart
from billing import money, spend

TODAY = dt.date(2026, 12, 2)
USD = money.NANO_PER_USD


def row(days_ago: int, model: str, nano: int, key: str = "key_a") -> spend.DaySpend:
    return spend.DaySpend(TODAY - dt.timedelta(days=days_ago), model, key, nano)


def test_every_day_of_the_window_is_a_slot_and_the_table_has_the_exact_sums() -> None:
    chart = spend_chart.render(
        [row(0, "gpt-4o", 150), row(0, "gpt-4o", 50, "key_b"), row(29, "o1", USD), row(30, "o1", 7)],
        today=TODAY,
    )
    assert (
        chart.days[0] == TODAY - dt.timedelta(days=29) and chart.days[-1] == TODAY and len(chart.days) == 30
    )
    assert chart.table[TODAY] == {"gpt-4o": 200}
    assert chart.table[TODAY - dt.timedelta(days=29)] == {"o1": USD}
    assert sum(sum(day.values()) for day in chart.table.values()) == USD + 200, "the 31st day is left out"
    assert [model for model, _ in chart.legend] == ["o1", "gpt-4o"], "largest first"
    assert chart.svg.count("<rect") == 2


def test_the_axis_top_is_a_round_amount_at_or_above_the_highest_day() -> None:
    chart = spend_chart.render([row(1, "m", 3 * USD + 1)], today=TODAY)
    assert "$5.00" in chart.svg and "highest mark is 5.00" in chart.svg
    empty = spend_chart.render([], today=TODAY)
    assert "<rect" not in empty.svg and "$0.01" in empty.svg


def test_a_model_name_cannot_inject_markup() -> None:
    chart = spend_chart.render([row(0, '<script>alert(1)</script>"', USD)], today=TODAY)
    assert "<script>" not in chart.svg and "&lt;script&gt;" in chart.svg


def test_models_beyond_the_palette_share_one_series() -> None:
    rows = [row(0, f"model-{i}", (i + 1) * 1000) for i in range(12)]
    chart = spend_chart.render(rows, today=TODAY)
    assert len(chart.legend) == len(spend_chart.PALETTE)
    assert chart.legend[-1][0] == spend_chart.OTHER
    assert sum(chart.table[TODAY].values()) == sum(r.nano for r in rows), "nothing is dropped"


def test_by_key_the_series_are_the_keys_named_by_their_prefixes() -> None:
    rows = [row(0, "gpt-4o", 100, "key_a"), row(0, "o1", 50, "key_b"), row(1, "o1", 25, "key_a")]
    chart = spend_chart.render(rows, today=TODAY, by="key_id", labels={"key_a": "sk-litellm-AAA"})
    assert [name for name, _ in chart.legend] == ["sk-litellm-AAA", "key_b"]
    assert chart.table[TODAY] == {"sk-litellm-AAA": 100, "key_b": 50}
    assert 'id="spend-by-key"' in chart.svg
