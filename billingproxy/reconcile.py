"""``billingproxy reconcile LOG``: settle requests from Envoy's JSON access log.

Why: Envoy's gRPC access log is best effort. While the sidecar is away (a restart, a deploy)
Envoy drops the entries it cannot send, and those requests' holds expire uncharged. Envoy also
writes every request to its JSON access log on stdout (``envoy_config._stdout_access_log``,
the Check's metadata and the Lua filter's usage included). This command reads those lines and
settles each request exactly as the sidecar would — the same facts
(``access_log.finished_request_from_json``), the same prices, the same statement, in batches —
idempotent on the request id: requests already settled are counted and left alone, so a whole
day's log can be fed in, and fed in again. Lines that are not access-log JSON (Envoy's own log
lines share the file) are skipped.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable

from authz_sidecar.access_log import FinishedRequest, Settler, finished_request_from_json
from billing import database, pricing

BATCH = 500


def read_log(lines: Iterable[str]) -> tuple[list[FinishedRequest], Counter[str]]:
    """The settleable requests in ``lines`` (the last line wins for a request id) and what was skipped."""
    found: dict[str, FinishedRequest] = {}
    skipped: Counter[str] = Counter()
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if not line.startswith("{"):
            skipped["not an access-log line"] += 1
            continue
        try:
            record = json.loads(line)
        except ValueError:
            skipped["not an access-log line"] += 1
            continue
        done = finished_request_from_json(record) if isinstance(record, dict) else None
        if done is None:
            skipped["nothing to settle (no hold)"] += 1
            continue
        found[done.request_id] = done
    return list(found.values()), skipped


async def reconcile(database_url: str, prices: pricing.PriceBook, lines: Iterable[str]) -> str:
    """Settle what ``lines`` name; a table of what happened to them."""
    requests, skipped = read_log(lines)
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
