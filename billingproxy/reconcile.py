"""``billingproxy reconcile LOG``: settle requests from Envoy's JSON access log, by hand.

Why, when the sidecar already follows the access-log file by itself
(authz_sidecar/access_log_file.py): for the exceptional case — a log kept elsewhere (a file
copied off a pod that is gone, lines collected by a log shipper), or a rotated file the sidecar
had not finished when it was replaced. This command reads the lines and settles each request
exactly as the sidecar would — the same facts
(``access_log.finished_request_from_json``), the same prices, the same statement, in batches —
idempotent on the request id: requests already settled are counted and left alone, so a whole
day's log can be fed in, and fed in again. Lines that are not access-log JSON (Envoy's own log
lines share the file) are skipped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from authz_sidecar.access_log import Settler
from authz_sidecar.access_log_file import read_lines
from billing import database, pricing

BATCH = 500


async def reconcile(database_url: str, prices: pricing.PriceBook, lines: Iterable[str]) -> str:
    """Settle what ``lines`` name; a table of what happened to them."""
    requests, skipped = read_lines(lines)
    outcomes: Counter[str] = Counter()
    pool = await database.create_pool(database_url, size=1)
    try:
        settler = Settler(pool, prices)
        for start in range(0, len(requests), BATCH):
            outcomes.update(o.value for o in await settler.settle(requests[start : start + BATCH]))
    finally:
        await pool.close()
    rows = [(name, count) for name, count in sorted(outcomes.items())]
    rows += [(f"skipped: {why}", count) for why, count in sorted(skipped.items())]
    width = max([len("OUTCOME")] + [len(name) for name, _ in rows])
    lines_out = [f"{'OUTCOME':<{width}}  REQUESTS"] + [f"{name:<{width}}  {count}" for name, count in rows]
    return "\n".join(lines_out)
