"""The stack under faults, with real processes: a SIGKILLed sidecar comes back by itself (the Stack
supervises it as the kubelet would), requests are refused while it is away and never reach the
backend, and Envoy and PostgreSQL restarted by the fault controls are found again by the rest.

The window while the sidecar is down is made to last, not raced: a restart policy whose first
wait is ten minutes keeps it down until the test stops the stack, which must then end at once.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

import pytest
from support import processes

from billingproxy.devstack.local_stack import RestartPolicy

MODEL = "gpt-4o-mini"
RESTART_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0
# Longer than any test runs: the sidecar stays down until the test itself ends it.
NEVER_WITHIN_THE_TEST = RestartPolicy(first_delay_s=600.0, delay_max_s=600.0)
# Short waits that double visibly: 0.1, 0.2, 0.4, then the cap.
QUICK = RestartPolicy(first_delay_s=0.1, delay_max_s=0.4, reset_after_s=600.0)


async def _chat(stack, api_key: str, text: str) -> tuple[int, dict[str, Any]]:
    """One chat completion through the gateway: its status and JSON body."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 8}
    async with stack.http.post(
        stack.gateway + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {api_key}"}
    ) as response:
        return response.status, await response.json()


async def _served_and_charged(stack, user: dict[str, Any]) -> None:
    """A request is answered 200 and its cost comes off the wallet (the access log reached the
    sidecar and the ledger)."""
    before = await stack.db.balance(user["wallet_id"])
    status, body = await _chat(stack, user["api_key"], f"served {uuid.uuid4().hex}")
    assert status == 200, body
    await stack.db.settled(user["wallet_id"])
    assert await stack.db.balance(user["wallet_id"]) < before


async def _refused_before_the_backend(stack, user: dict[str, Any]) -> None:
    """A request is answered the documented 503 ``billing_unavailable`` and the backend never
    saw it (its last request is still an earlier one)."""
    marker = f"refused {uuid.uuid4().hex}"
    status, body = await _chat(stack, user["api_key"], marker)
    assert status == 503, body
    assert body["error"]["code"] == "billing_unavailable", body
    assert marker not in str((await stack.backend_last_request())["body"])


def _said(stack, text: str) -> list[str]:
    return [line for line in stack.said if text in line]


async def test_a_killed_sidecar_is_restarted_by_the_stack_and_serves_again(launch_stack) -> None:
    async with launch_stack() as stack:
        user = await stack.signup()
        await _served_and_charged(stack, user)

        killed = await stack.stack.kill_sidecar()
        await stack.stack.wait_sidecar_restarted(1, RESTART_TIMEOUT_S)

        assert _said(stack, "the sidecar exited with status -9; restarting in 0.5 s (restart 1)")
        assert stack.stack.process_ids()["sidecar"] != killed
        assert stack.stack.dead_child() is None
        assert await stack.readyz() == 200
        await _served_and_charged(stack, user)
        assert await stack.db.invariants() == []


async def test_while_the_sidecar_is_down_requests_are_refused_and_stop_ends_the_back_off(
    launch_stack, wait_until
) -> None:
    async with launch_stack(restart_policy=NEVER_WITHIN_THE_TEST) as stack:
        user = await stack.signup()
        await _served_and_charged(stack, user)

        await stack.stack.kill_sidecar()

        async def backing_off() -> list[str]:
            return _said(stack, "the sidecar exited with status -9; restarting in 600 s (restart 1)")

        await wait_until(backing_off, RESTART_TIMEOUT_S, "the supervisor's back-off line")
        assert await stack.readyz() == 0
        assert stack.stack.dead_child() is None  # `up` waits for the restart; it does not stop
        await _refused_before_the_backend(stack, user)
        await _refused_before_the_backend(stack, user)  # and again: nothing came back meanwhile

        others = stack.stack.process_ids()
        assert "sidecar" not in others
        supervisor = f"sidecar-supervisor:{stack.settings.admin_port}"
        assert [task for task in asyncio.all_tasks() if task.get_name() == supervisor]
        # Ten minutes before the restart: stop() must not wait for it.
        await asyncio.wait_for(stack.stack.stop(), STOP_TIMEOUT_S)

        assert processes.sidecars_under(os.getpid()) == set(), "a sidecar was started after stop()"
        assert not [task for task in asyncio.all_tasks() if task.get_name() == supervisor], (
            "the supervisor outlived stop(): it could still start a sidecar"
        )
        assert not _said(stack, "the sidecar is back")
        assert stack.stack.sidecar_restarts == 1
        assert not [pid for pid in others.values() if processes.alive(pid)]


async def test_each_crash_in_a_row_waits_twice_as_long_up_to_the_cap(launch_stack) -> None:
    async with launch_stack(restart_policy=QUICK) as stack:
        for restart in range(1, 5):
            await stack.stack.kill_sidecar()
            await stack.stack.wait_sidecar_restarted(restart, RESTART_TIMEOUT_S)

        assert _said(stack, "restarting in") == [
            f"the sidecar exited with status -9; restarting in {delay} s (restart {restart})"
            for restart, delay in ((1, "0.1"), (2, "0.2"), (3, "0.4"), (4, "0.4"))
        ]
        assert stack.stack.sidecar_restarts == 4
        user = await stack.signup()
        await _served_and_charged(stack, user)


@pytest.mark.parametrize("hard", [False, True], ids=["graceful", "sigkill"])
async def test_envoy_restarted_serves_again_on_the_same_port(launch_stack, hard: bool) -> None:
    async with launch_stack() as stack:
        user = await stack.signup()
        await _served_and_charged(stack, user)
        before = stack.stack.process_ids()["envoy"]

        await stack.stack.restart_envoy(hard=hard)

        assert stack.stack.process_ids()["envoy"] != before
        assert not processes.alive(before)
        assert stack.stack.dead_child() is None
        await _served_and_charged(stack, user)
        assert await stack.db.invariants() == []


async def test_postgres_stopped_fails_closed_and_the_sidecar_reconnects_when_it_returns(
    launch_stack, wait_until
) -> None:
    async with launch_stack(own_postgres=True) as stack:
        user = await stack.signup()
        await _served_and_charged(stack, user)
        url, port = stack.stack.database_url, stack.stack.embedded_postgres.port

        await stack.stack.stop_postgres()

        async def unready() -> bool:
            return await stack.readyz() == 503

        await wait_until(unready, RESTART_TIMEOUT_S, "/readyz to answer 503 without PostgreSQL")
        await _refused_before_the_backend(stack, user)
        assert stack.stack.dead_child() is None  # stopped on purpose: `up` would not stop for it

        await stack.stack.start_postgres()

        async def ready() -> bool:
            return await stack.readyz() == 200

        await wait_until(ready, RESTART_TIMEOUT_S, "/readyz to answer 200 with PostgreSQL back")
        assert (stack.stack.database_url, stack.stack.embedded_postgres.port) == (url, port)
        assert stack.stack.sidecar_restarts == 0  # it reconnected; nothing restarted it
        await _served_and_charged(stack, user)
        assert await stack.db.invariants() == []


async def test_a_sidecar_that_cannot_start_without_its_database_is_retried_until_it_can(
    launch_stack, wait_until
) -> None:
    async with launch_stack(own_postgres=True, restart_policy=QUICK) as stack:
        user = await stack.signup()
        await _served_and_charged(stack, user)
        await stack.stack.stop_postgres()
        await stack.stack.kill_sidecar()

        async def crash_looping() -> bool:  # restarted, and exited again on its own
            return any("(restart 3)" in line and "status -9" not in line for line in stack.said)

        await wait_until(crash_looping, RESTART_TIMEOUT_S, "the sidecar to fail to start twice more")
        assert not _said(stack, "the sidecar is back")

        await stack.stack.start_postgres()
        await stack.stack.wait_sidecar_restarted(stack.stack.sidecar_restarts, RESTART_TIMEOUT_S)

        assert await stack.readyz() == 200
        await _served_and_charged(stack, user)
        assert await stack.db.invariants() == []
