"""The sidecar supervisor's waits (billingproxy/devstack/local_stack.py, RestartPolicy): the
e2e tests see them doubling on a real crash loop; the reset after a long run needs a sidecar that
ran for minutes, so it is checked here on the policy itself."""

from __future__ import annotations

from billingproxy.devstack.local_stack import RestartPolicy

POLICY = RestartPolicy(first_delay_s=0.5, delay_max_s=10.0, reset_after_s=30.0)


def test_the_first_restart_waits_the_first_delay() -> None:
    assert POLICY.delay_s(None, uptime_s=0.1) == 0.5


def test_crashes_in_a_row_double_the_wait_up_to_the_cap() -> None:
    delays, delay = [], None
    for _ in range(8):
        delay = POLICY.delay_s(delay, uptime_s=1.0)
        delays.append(delay)
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_a_sidecar_that_ran_long_enough_starts_again_from_the_first_delay() -> None:
    assert POLICY.delay_s(10.0, uptime_s=29.9) == 10.0
    assert POLICY.delay_s(10.0, uptime_s=30.0) == 0.5
