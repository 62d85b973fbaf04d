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

from billingproxy.devstack.local_stack import RestartPolicy

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


# The shortest hold the settings allow, and the route and Check timeouts below it as start-up
# demands; the grace far longer than the outage, as by default (900 s) it is.
HOLD_TTL_S = 10
PAST_THE_TTL = {
    "BILLINGPROXY_HOLD_TTL_S": str(HOLD_TTL_S),
    "BILLINGPROXY_UPSTREAM_TIMEOUT_S": "2",
    "BILLINGPROXY_CHECK_TIMEOUT_MS": "1000",
    "BILLINGPROXY_HOLD_REPORT_GRACE_S": "600",
}
# The supervisor waits this long before starting the sidecar again: away past every hold's TTL.
AWAY_PAST_THE_TTL = RestartPolicy(first_delay_s=HOLD_TTL_S + 2)
AWAY_TIMEOUT_S = HOLD_TTL_S + 2 + 30.0


async def test_a_sidecar_away_past_the_hold_ttl_charges_each_served_request_its_price_not_its_estimate(
    launch_stack,
) -> None:
    """The default path under load: the requests that finished as the sidecar died are reported
    only by the file, read once it is back — after their holds' TTL, within the grace — and the
    report wins over the estimate: each is charged its exact price, none its hold's estimate."""
    async with launch_stack(restart_policy=AWAY_PAST_THE_TTL, **PAST_THE_TTL) as running:
        stack = running.stack
        async with load.running(stack) as run:
            await run.until_answered(ANSWERS)
            await run.next_complete()
            killed_at = time.time()
            await stack.kill_sidecar()
            await stack.wait_sidecar_restarted(timeout_s=AWAY_TIMEOUT_S)
            await run.until_answered(ANSWERS)

        verdict = await load.assert_exact_totals(stack, run)

        # Every request served was seen complete, so each was charged its exact price above.
        assert verdict.outcomes["cut"] == verdict.outcomes["lost"] == 0, load.books.render(verdict)
        assert verdict.charged_estimate == 0, load.books.render(verdict)
        # And some of them were settled from the file after their hold's TTL had passed.
        late = await running.db.scalar(
            "SELECT count(*) FROM holds WHERE wallet_id = ANY(:ids) AND state = 'posted'"
            " AND created_at <= to_timestamp(:killed_at)"
            " AND resolved_at >= created_at + make_interval(secs => :ttl)",
            ids=[wallet.wallet_id for wallet in run.wallets],
            killed_at=killed_at,
            ttl=HOLD_TTL_S,
        )
        assert late > 0, "no request was settled after its hold's TTL"
        assert await running.metric("billingproxy_access_log_file_recovered_total") >= late
