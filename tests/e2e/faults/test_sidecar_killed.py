"""The sidecar SIGKILLed under load, and restarted by the Stack's supervisor (as the kubelet
restarts it in a pod).

What must hold: every request served is charged exactly once — those whose gRPC access-log
entries Envoy could not deliver while the sidecar was away are settled from the file log once it
is back — and while it is away every request is refused (503 ``billing_unavailable``, ext_authz
fails closed), none served unbilled: the demo backend's own record shows none of them reached it
(``bench.books.compare`` holds every refused request against it).
"""

from __future__ import annotations

import time

from support import load

# Answers under load before the kill, and after the restart.
ANSWERS = 30


async def test_a_killed_sidecar_refuses_while_away_and_every_served_request_is_charged_once(
    launch_stack,
) -> None:
    async with launch_stack() as running:
        stack = running.stack
        readiness = load.Readiness(running.admin)
        async with load.running(stack) as run:
            await run.until_answered(ANSWERS)
            await run.next_complete()
            readiness.start()
            killed_at = time.time()
            await stack.kill_sidecar()
            await stack.wait_sidecar_restarted()
            back_at = await readiness.until(200, after=killed_at)
            await run.until_answered(ANSWERS)
        await readiness.stop()

        await load.assert_exact_totals(stack, run)

        # Away: from the kill to the last look at /readyz that found nothing listening.
        away_until = max(readiness.seen(None, after=killed_at))
        assert away_until < back_at
        while_away = load.within(run, killed_at, away_until)
        assert while_away, "no request was sent while the sidecar was away"
        assert {(seen.status, seen.error_code) for seen in while_away} == {(503, "billing_unavailable")}
        assert stack.sidecar_restarts == 1
        # The requests that ended while it was away were settled from Envoy's file log.
        assert await running.metric("billingproxy_access_log_file_recovered_total") > 0
