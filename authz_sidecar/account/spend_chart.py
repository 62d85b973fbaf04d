"""The spend charts as SVG drawn on the server: one bar per UTC day, stacked by model (or by key).

Why SVG from the server: no chart library to vendor and allow in the CSP, nothing to run in the
browser, and labels are exact decimal strings from :mod:`billing.money`. The page shows the same
numbers in a table beside the chart, so the chart is decoration for screen readers
(``aria-hidden`` is not used: the SVG has a title and a description instead).
"""

from __future__ import annotations

import dataclasses
import datetime as dt

from markupsafe import Markup, escape

from billing import money, spend

WIDTH = 720
HEIGHT = 240
MARGIN_LEFT = 64
MARGIN_BOTTOM = 28
MARGIN_TOP = 12
# Colour-blind-safe qualitative palette (Okabe–Ito); series beyond it share the last colour.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#999999")
OTHER = "others"


@dataclasses.dataclass(frozen=True)
class Chart:
    svg: Markup
    legend: list[tuple[str, str]]  # (series label, colour)
    days: list[dt.date]
    # nano-USD per day and series label, for the table beside the chart
    table: dict[dt.date, dict[str, int]]


def _series(rows: list[spend.DaySpend], by: str) -> list[str]:
    """Series (models or keys) by total spend, the ones past the palette folded into OTHER."""
    ranked = list(spend.totals(rows, by))
    if len(ranked) <= len(PALETTE):
        return ranked
    return [*ranked[: len(PALETTE) - 1], OTHER]


def _nice_ceiling(nano: int) -> int:
    """A round axis maximum at or above ``nano``: 1, 2 or 5 × a power of ten (in nano-USD)."""
    if nano <= 0:
        return money.NANO_PER_USD // 100  # one cent: an empty chart still has an axis
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= nano:
                return step * factor
        step *= 10


def render(
    rows: list[spend.DaySpend],
    *,
    today: dt.date,
    by: str = "model",
    labels: dict[str, str] | None = None,
    days: int = spend.DAYS,
) -> Chart:
    """The chart of ``rows`` stacked by ``by`` (``"model"`` or ``"key_id"``); ``labels`` names a
    series for people (a key's prefix for its id)."""
    first = spend.window_start(today, days)
    day_list = [first + dt.timedelta(days=i) for i in range(days)]
    names = labels or {}
    series = [names.get(name, name) for name in _series(rows, by)]
    shown = set(series)
    table: dict[dt.date, dict[str, int]] = {day: {} for day in day_list}
    for row in rows:
        if row.day not in table:
            continue
        name = names.get(getattr(row, by), getattr(row, by))
        name = name if name in shown else OTHER
        table[row.day][name] = table[row.day].get(name, 0) + row.nano
    top = _nice_ceiling(max((sum(v.values()) for v in table.values()), default=0))
    plot_w = WIDTH - MARGIN_LEFT - 8
    plot_h = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
    slot = plot_w / days
    bar_w = max(1.0, slot * 0.7)
    colour = {name: PALETTE[min(i, len(PALETTE) - 1)] for i, name in enumerate(series)}

    what = "model" if by == "model" else "key"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-labelledby="spend-{what}-title spend-{what}-desc" class="spend-chart" id="spend-by-{what}">',
        f'<title id="spend-{what}-title">Spend per day by {what}, last {days} days (UTC)</title>',
        f'<desc id="spend-{what}-desc">Bars stacked by {what}; the highest mark is '
        f"{escape(money.format_usd(top))} USD. The tables below have every figure.</desc>",
    ]
    base_y = MARGIN_TOP + plot_h
    for fraction in (0, 0.5, 1):
        y = base_y - plot_h * fraction
        label = money.format_usd(int(top * fraction))
        parts.append(
            f'<line x1="{MARGIN_LEFT}" y1="{y:.1f}" x2="{WIDTH - 8}" y2="{y:.1f}" class="grid"/>'
            f'<text x="{MARGIN_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">${escape(label)}</text>'
        )
    for i, day in enumerate(day_list):
        x = MARGIN_LEFT + i * slot + (slot - bar_w) / 2
        y = float(base_y)
        for name in series:
            nano = table[day].get(name, 0)
            if nano <= 0:
                continue
            h = plot_h * nano / top
            y -= h
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                f'fill="{colour[name]}"><title>{escape(day.isoformat())} {escape(name)}: '
                f"${escape(money.format_usd(nano))}</title></rect>"
            )
        if (days - 1 - i) % 7 == 0:  # weekly labels, ending on today
            parts.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{HEIGHT - 8}" text-anchor="middle">'
                f"{escape(day.strftime('%b %d'))}</text>"
            )
    parts.append("</svg>")
    legend = [(name, colour[name]) for name in series]
    return Chart(Markup("".join(parts)), legend, day_list, table)
