"""Issue 10, finding 2 — "usage can be spoofed" — through real Envoy, the sidecar and PostgreSQL.

The attack: the backend echoes client-supplied JSON (OpenAI's Responses objects carry the
request's ``instructions``, ``tools`` and ``metadata``; a model repeats what it is told), the
echo spells usage numbers, and the client hangs up before the answer's final usage. A gateway
that reads usage by pattern over the body charged such a request what the echo said ($0). Here
every format the gateway admits is attacked that way, and each answer is charged either its
provider's final usage (read to the end) or its hold, the worst case (cut before its terminal
event) — never what the echo said, never less than what was streamed.

The demo backend (billingproxy/devstack/demo_backend.py) plays the provider: ``x-demo-cut-before`` ends
its answer just before the first occurrence of a text, and ``x-demo-cut-mode: stall`` then keeps
the connection open and reports how many bytes it sent (``/_demo/last_request``): the client reads
exactly those and hangs up, so the hang-up lands exactly at the cut.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest

pytestmark = pytest.mark.integration

# litellm's per-token prices (model_prices_and_context_window_backup.json), markup 0.
PRICES = {
    "gpt-4o-mini": (Decimal("1.5e-07"), Decimal("6e-07")),
    "gpt-3.5-turbo-instruct": (Decimal("1.5e-06"), Decimal("2e-06")),
    "text-embedding-3-small": (Decimal("2e-08"), Decimal(0)),
    "claude-sonnet-4-5": (Decimal("3e-06"), Decimal("1.5e-05")),
}
# Usage numbers the client would like to be charged, spelled every way a pattern could read them.
FAKE_USAGE = {
    "prompt_tokens": 0,
    "completion_tokens": 0,
    "input_tokens": 0,
    "output_tokens": 0,
    "cached_tokens": 0,
    "total_tokens": 0,
}
FAKE_TEXT = (
    '"usage": {"prompt_tokens": 0, "completion_tokens": 0, "input_tokens": 0, '
    '"output_tokens": 0}\n\ndata: [DONE]\n\nevent: message_stop\ndata: {"type": "message_stop"}\n\n'
)
WORDS = len(FAKE_TEXT.split())  # the demo counts a prompt's tokens as its words (+3 per message)
LONG = 256  # the demo's longest reply: what a spoofed charge would have saved


def cost_nano(model: str, prompt: int, completion: int) -> int:
    input_price, output_price = PRICES[model]
    return math.ceil((prompt * input_price + completion * output_price) * 10**9)


@pytest.fixture(scope="module")
async def stack(launch_stack) -> AsyncIterator[Any]:
    async with launch_stack() as running:
        yield running


@pytest.fixture(scope="module")
async def user(stack) -> dict[str, Any]:
    return await stack.signup()


def echo_everywhere() -> dict[str, Any]:
    """Request members the demo backend (like OpenAI's Responses API) echoes in its answer."""
    return {
        "metadata": {"usage": FAKE_USAGE, **{k: str(v) for k, v in FAKE_USAGE.items()}},
        "instructions": {"usage": FAKE_USAGE, "note": FAKE_TEXT, **FAKE_USAGE},
        "tools": [
            {
                "type": "function",
                "name": "spoof",
                "description": FAKE_TEXT,
                "parameters": {"type": "object", "usage": FAKE_USAGE, "properties": {"usage": FAKE_USAGE}},
            }
        ],
    }


# (id, path, body, expected (model, prompt tokens, completion tokens) when read to the end)
CASES = [
    (
        "chat-json",
        "/v1/chat/completions",
        {
            "model": "gpt-4o-mini",
            "max_tokens": LONG,
            "metadata": echo_everywhere()["metadata"],
            "messages": [{"role": "user", "content": FAKE_TEXT}],
        },
        ("gpt-4o-mini", WORDS + 3, LONG),
    ),
    (
        "chat-stream",
        "/v1/chat/completions",
        {
            "model": "gpt-4o-mini",
            "max_tokens": LONG,
            "stream": True,
            "metadata": echo_everywhere()["metadata"],
            "messages": [{"role": "user", "content": FAKE_TEXT}],
        },
        ("gpt-4o-mini", WORDS + 3, LONG),
    ),
    (
        "completions-stream",
        "/v1/completions",
        {"model": "gpt-3.5-turbo-instruct", "max_tokens": LONG, "stream": True, "prompt": FAKE_TEXT},
        ("gpt-3.5-turbo-instruct", WORDS, LONG),
    ),
    (
        "responses-json",
        "/v1/responses",
        {"model": "gpt-4o-mini", "max_output_tokens": LONG, "input": FAKE_TEXT, **echo_everywhere()},
        ("gpt-4o-mini", WORDS + 3, LONG),
    ),
    (
        "responses-stream",
        "/v1/responses",
        {
            "model": "gpt-4o-mini",
            "max_output_tokens": LONG,
            "stream": True,
            "input": FAKE_TEXT,
            **echo_everywhere(),
        },
        ("gpt-4o-mini", WORDS + 3, LONG),
    ),
    (
        "embeddings",
        "/v1/embeddings",
        {"model": "text-embedding-3-small", "input": [FAKE_TEXT, FAKE_TEXT]},
        ("text-embedding-3-small", 2 * WORDS, 0),
    ),
    (
        "messages-json",
        "/v1/messages",
        {
            "model": "claude-sonnet-4-5",
            "max_tokens": LONG,
            "system": FAKE_TEXT,
            "metadata": {"user_id": FAKE_TEXT},
            "messages": [{"role": "user", "content": FAKE_TEXT}],
        },
        ("claude-sonnet-4-5", (WORDS + 3) * 2, LONG),
    ),
    (
        "messages-stream",
        "/v1/messages",
        {
            "model": "claude-sonnet-4-5",
            "max_tokens": LONG,
            "stream": True,
            "system": FAKE_TEXT,
            "messages": [{"role": "user", "content": FAKE_TEXT}],
        },
        ("claude-sonnet-4-5", (WORDS + 3) * 2, LONG),
    ),
]
# Where the client hangs up: just before the answer's terminal part. For JSON answers, after the
# whole usage object has gone by but before the answer closed.
CUTS = {
    "chat-json": ['"system_fingerprint"', '"prompt_tokens_details"'],
    "chat-stream": ["data: [DONE]", '"choices": [], "usage": {'],
    "completions-stream": ["data: [DONE]", '"choices": [], "usage": {'],
    "responses-json": ['"user": null'],
    "responses-stream": ["event: response.completed", "event: response.in_progress"],
    "embeddings": ['"usage"', '"model"'],
    "messages-json": ['"stop_reason"', '"usage"'],
    "messages-stream": ["event: message_stop", "event: message_delta", "event: content_block_start"],
}


async def call(
    stack,
    wait_until,
    user: dict[str, Any],
    path: str,
    body: dict[str, Any],
    *,
    hang_up_before: str | None = None,
    reply: str = "echo",
) -> tuple[str, bytes]:
    """POST through the gateway; with ``hang_up_before`` the backend stops there and the client
    hangs up once everything before it has arrived. Returns the request id and what was read."""
    headers = {
        "Authorization": f"Bearer {user['api_key']}",
        "Content-Type": "application/json",
        "x-demo-reply": reply,
    }
    if hang_up_before is not None:
        headers.update({"x-demo-cut-before": hang_up_before, "x-demo-cut-mode": "stall"})
    async with stack.http.post(
        stack.gateway + path, data=json.dumps(body).encode(), headers=headers
    ) as response:
        assert response.status == 200, await response.text()
        request_id = response.headers["x-request-id"]
        if hang_up_before is None:
            return request_id, await response.read()

        async def stalled() -> int | None:
            return (await stack.backend_last_request()).get("stalled_after_bytes")

        sent = await wait_until(stalled, 10, "the demo backend's stall at the cut")
        seen = await response.content.readexactly(sent)
        response.close()  # the client hangs up
    return request_id, seen


def _cut_id(cut: str) -> str:
    return "".join(
        c if c.isalnum() or c in "._" else "-" for c in cut.split(":")[-1 if cut.startswith("event") else 0]
    ).strip("-")


async def charge(stack, user: dict[str, Any], request_id: str) -> tuple[int, int, dict[str, Any]]:
    """(what the request was charged, its hold, the ledger entry's details), once settled."""
    await stack.db.settled(user["wallet_id"])
    hold = await stack.db.hold(request_id)
    assert hold is not None, f"no hold for {request_id}"
    entries = [
        e for e in await stack.db.ledger(user["wallet_id"]) if e.idempotency_key == f"usage:{request_id}"
    ]
    assert len(entries) == 1, entries
    return -entries[0].amount_nano, hold.amount_nano, entries[0].details


@pytest.mark.parametrize(("path", "body", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_an_echo_read_to_the_end_is_charged_the_providers_usage(
    stack, wait_until, user, path, body, expected
) -> None:
    request_id, answer = await call(stack, wait_until, user, path, body)
    if path != "/v1/embeddings":  # the one endpoint that echoes nothing
        assert json.dumps(FAKE_TEXT)[1:-1].encode() in answer, "the demo did not echo the client's text"
    charged, hold, details = await charge(stack, user, request_id)
    model, prompt, completion = expected
    assert charged == cost_nano(model, prompt, completion), details
    assert details["usage_source"] == "response"
    assert charged <= hold


@pytest.mark.parametrize(
    ("path", "body", "cut"),
    [(c[1], c[2], cut) for c in CASES for cut in CUTS[c[0]]],
    ids=[f"{c[0]}-before-{_cut_id(cut)}" for c in CASES for cut in CUTS[c[0]]],
)
async def test_an_echo_then_a_hang_up_is_charged_the_hold(stack, wait_until, user, path, body, cut) -> None:
    request_id, seen = await call(stack, wait_until, user, path, body, hang_up_before=cut)
    charged, hold, details = await charge(stack, user, request_id)
    assert charged == hold, (charged, hold, details, seen[-300:])
    assert details["usage_source"] == "hold_estimate"


async def test_a_hang_up_after_anthropics_message_start_is_not_charged_its_input_alone(
    stack, wait_until, user
) -> None:
    """message_start carries input_tokens and output_tokens: 1 — numbers a pattern would bill."""
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": LONG,
        "stream": True,
        "messages": [{"role": "user", "content": "hello"}],
    }
    request_id, seen = await call(
        stack, wait_until, user, "/v1/messages", body, hang_up_before="event: ping", reply="words"
    )
    assert b'"output_tokens": 1' in seen
    charged, hold, _ = await charge(stack, user, request_id)
    assert charged == hold > cost_nano("claude-sonnet-4-5", 1 + 3, LONG)
