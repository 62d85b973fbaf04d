"""PostgreSQL stopped under load and started again (the Stack's own embedded server, as in
``billingproxy up``).

What must hold: while the database is down the Check fails closed with the documented 503
(``billing_unavailable``) and never lets a request through unbilled; ``/readyz`` answers 503,
then 200 once the database is back; the sidecar reconnects by itself (the supervisor never
restarts it); the settlements of the requests that finished while it was down are applied when
it returns, and the books are exact.

The database stays down until the gRPC path has given up on a settlement
(``billingproxy_settlement_failures_total`` rose) — an outage its retries cannot absorb — so what
settles those requests once it is back can only be Envoy's access-log file
(``billingproxy_access_log_file_recovered_total``).
"""

from __future__ import annotations

import dataclasses
import time

from support import load

ANSWERS = 30
# Refusals to see while the database is down, before starting it again.
REFUSALS = 20
# A give-up, not a bound: the gRPC settlement's retries last about a second.
GIVE_UP_TIMEOUT_S = 30.0
# Streams of about a second (the default pacing: a third of that), so that streams admitted
# before the stop surely finish after it, whatever the machine's load.
SLOW_STREAM = {"x-demo-chunk-delay-ms": "50"}
SHAPES = [
    dataclasses.replace(shape, demo_headers=SLOW_STREAM) if shape.stream else shape
    for shape in load.books.SHAPES
]


def refused_unavailable(seen: load.books.Seen) -> bool:
    return seen.status == 503 and seen.error_code == "billing_unavailable"


async def test_a_stopped_database_fails_closed_and_the_sidecar_settles_everything_once_it_returns(
    launch_stack, wait_until
) -> None:
    async with launch_stack(own_postgres=True) as running:
        stack = running.stack
        readiness = load.Readiness(running.admin)
        readiness.start()
        async with load.running(stack, shapes=SHAPES) as run:
            await run.until_answered(ANSWERS)
            await run.next_complete()
            failures_before = await running.metric("billingproxy_settlement_failures_total")
            await stack.stop_postgres()
            stopped_at = time.time()
            await readiness.until(503, after=stopped_at)
            # A stream admitted before the stop finishes while the database is down: its
            # settlement has to wait for the database.
            await run.until_answered(1)
            await run.until_answered(REFUSALS, accept=refused_unavailable)

            async def grpc_gave_up() -> bool:
                return await running.metric("billingproxy_settlement_failures_total") > failures_before

            await wait_until(
                grpc_gave_up, GIVE_UP_TIMEOUT_S, "a gRPC settlement given up while the database is down"
            )
            starting_at = time.time()
            await stack.start_postgres()
            ready_again_at = await readiness.until(200, after=starting_at)
            await run.until_answered(ANSWERS)
        await readiness.stop()

        await load.assert_exact_totals(stack, run)

        while_down = load.within(run, stopped_at, starting_at)
        assert while_down
        assert all(refused_unavailable(seen) for seen in while_down), {
            (seen.status, seen.error_code) for seen in while_down
        }
        # Requests admitted before the stop that finished while the database was down: their
        # settlements waited for it, and the books above found each charged its exact price.
        finished_while_down = [
            seen
            for seen in run.seen
            if seen.outcome is load.books.Outcome.COMPLETE and stopped_at <= seen.ended_at <= starting_at
        ]
        assert finished_while_down, "no served request finished while the database was down"
        assert readiness.seen(200, after=ready_again_at)
        assert stack.sidecar_restarts == 0
        # What the gRPC log gave up on, the file settled once the database was back.
        assert await running.metric("billingproxy_access_log_file_recovered_total") > 0
