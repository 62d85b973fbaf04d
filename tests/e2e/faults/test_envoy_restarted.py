"""Envoy restarted under load: gracefully (``billingproxy up``'s stop: buffered gRPC access-log
entries sent, then SIGTERM) and hard (SIGKILL, as a crash: whatever Envoy buffered is lost to the
gRPC log, and the requests in flight are cut).

What must hold: the holds of the requests in flight settle, nothing is charged twice, and what
the gRPC log did not deliver is recovered from the file log, or — for a request Envoy died in
the middle of, which no log reports — charged its hold's estimate once the hold has expired and
its grace has passed (billing/expiry.py; both shortened here so the test sees it happen).

The restart comes the moment a client has read an answer to its end, while Envoy may still hold
that request's reports in its buffers (gRPC: 10 ms; the file: 200 ms). Gracefully, every request
a client saw complete is charged its exact price. A SIGKILL takes those reports with Envoy: a
request that ended then is charged its hold instead, as docs/failures.md says ("Envoy killed"),
and only such a request (``bench.books.REPORTS_LOST_S``); every other is charged its price.
Either way, a request Envoy cut before it reached the backend may be charged its hold (no report
of it, or cut while Envoy was connecting): the books count it apart, never as a served request.

The graceful restart runs twice: with both logs, and with the gRPC log off
(``BILLINGPROXY_ACCESS_LOG_GRPC=false``), where only the file can settle across the restart: the
entries Envoy had buffered when it was stopped are written to the file as it exits, and every
charge of the run comes from the file.
"""

from __future__ import annotations

import time

import pytest
from support import load

ANSWERS = 30
# The shortest hold the settings allow, a route timeout below it, and no grace: a hold no log
# reports is charged its estimate within ~15 s (the expiry sweep runs every 5 s).
FAST_EXPIRY = {
    "BILLINGPROXY_HOLD_TTL_S": "10",
    "BILLINGPROXY_UPSTREAM_TIMEOUT_S": "5",
    "BILLINGPROXY_HOLD_REPORT_GRACE_S": "0",
}
RESOLVE_TIMEOUT_S = 30.0


@pytest.mark.parametrize(
    ("hard", "grpc_log"),
    [(False, True), (True, True), (False, False)],
    ids=["graceful", "hard", "graceful-file-log-only"],
)
async def test_an_envoy_restarted_under_load_leaves_every_request_charged_once(
    launch_stack, hard: bool, grpc_log: bool
) -> None:
    async with launch_stack(**FAST_EXPIRY, BILLINGPROXY_ACCESS_LOG_GRPC=str(grpc_log).lower()) as running:
        stack = running.stack
        async with load.running(stack) as run:
            await run.until_answered(ANSWERS)
            await run.next_complete()
            restarting_at = time.time()
            await stack.restart_envoy(hard=hard)
            await run.until_answered(ANSWERS)

        verdict = await load.assert_exact_totals(
            stack,
            run,
            resolve_timeout=RESOLVE_TIMEOUT_S,
            envoy_killed_at=[restarting_at] if hard else [],
            envoy_stopped_at=[] if hard else [restarting_at],
        )

        # The restart did cut requests in flight, and the gateway served again after it.
        assert verdict.outcomes["cut"] + verdict.outcomes["lost"] > 0, load.books.render(verdict)
        assert load.within(run, restarting_at, time.time())
        if not grpc_log:
            # Every charge came from the file, none from a hold's expiry nor the absent gRPC log.
            assert await running.metric("billingproxy_access_log_file_recovered_total") == verdict.charged
