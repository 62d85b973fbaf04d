"""No fault: the load and the exact-totals assertion the fault tests rest on, shown to hold when
nothing breaks — every request complete and charged its exact price, once."""

from __future__ import annotations

from support import load

ANSWERS = 60


async def test_without_a_fault_every_request_is_complete_and_charged_its_exact_price_once(
    launch_stack,
) -> None:
    async with launch_stack() as running:
        stack = running.stack
        async with load.running(stack) as run:
            await run.until_answered(ANSWERS)

        verdict = await load.assert_exact_totals(stack, run)

        assert verdict.outcomes["complete"] == len(run.seen) >= ANSWERS
        assert verdict.charged == verdict.served == verdict.admitted == len(run.seen)
        assert verdict.charged_estimate == 0
        assert {seen.shape.name for seen in run.seen} == {shape.name for shape in load.books.SHAPES}
