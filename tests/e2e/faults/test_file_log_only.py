"""The gRPC access log removed entirely (``BILLINGPROXY_ACCESS_LOG_GRPC=false``: Envoy never
opens the stream), under load: Envoy's JSON access-log file alone settles every request, each
exactly once and at exactly its price — streams and non-streams, chat and Anthropic messages."""

from __future__ import annotations

from support import load

ANSWERS = 60


async def test_the_file_log_alone_settles_every_request_exactly_under_load(launch_stack) -> None:
    async with launch_stack(BILLINGPROXY_ACCESS_LOG_GRPC="false") as running:
        stack = running.stack
        async with load.running(stack) as run:
            await run.until_answered(ANSWERS)

        verdict = await load.assert_exact_totals(stack, run)

        assert verdict.outcomes["complete"] == len(run.seen)
        assert verdict.charged == verdict.admitted == len(run.seen)
        # Every one of them from the file: the sidecar received no gRPC entry at all.
        assert await running.metric("billingproxy_access_log_file_recovered_total") == verdict.charged
