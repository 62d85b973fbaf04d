"""Issue 13: a stream that never reaches its terminal event is charged its hold — the request's
worst-case estimate — never $0 and never "what was seen so far"; a stream near Envoy's route
timeout ends, and is settled, while its hold is still pending. The policy and the alternatives it
beat: docs/decisions/0031-aborted-streams-pay-the-hold.md.

Every amount asserted here is computed in this file, not through ``billing.pricing`` or the Check:
from litellm's per-token prices (written out below) and the rules docs/pricing.md states ("Holds":
one prompt token per byte of the body, at the highest input-side price the endpoint's answer can
carry; the endpoint's output field at the highest output-side price; rounded up once to a
nano-USD), and from the demo backend's documented token arithmetic for the exact charges. The
ledger must agree with that number *and* with the hold the Check recorded, so a Check and a
settlement that drifted together from the documented rule still fail.

How each request ends is steered through the demo backend (billingproxy/devstack/demo_backend.py):
``x-demo-chunk-delay-ms`` paces an answer so the backend is still producing when the client,
having read a few events, closes the connection; ``x-demo-delay-ms`` keeps the backend silent so
the client can leave before the first byte; ``x-demo-cut-at`` with ``x-demo-cut-mode: reset``
makes the backend abort mid-answer; ``x-demo-cut-before`` with ``x-demo-cut-mode: stall`` stops
it at an exact place (after the final usage, before the terminal event) for the client to leave
there. Nothing waits on the clock: each step waits on what the backend or the database shows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

pytestmark = pytest.mark.integration

OUTPUT_TOKENS = 64  # below the demo's REPLY_WORDS_MAX (256): the reply is exactly this long
EVENTS_READ = 5  # a few events, past the first text delta of every format
PACE_MS = "50"  # 64 tokens at 50 ms: the backend is still producing for seconds after EVENTS_READ
SILENT_MS = "5000"  # how long the backend waits before its first byte, for the client to leave first

# The route-timeout stack: the timeout just below the hold's TTL, the closest Settings allow
# (BILLINGPROXY_HOLD_TTL_S is at least 10 s, and UPSTREAM_TIMEOUT_S plus CHECK_TIMEOUT_MS must
# be below it).
HOLD_TTL_S = 10
ROUTE_TIMEOUT_S = HOLD_TTL_S - 1
CHECK_TIMEOUT_MS = 900
# One SSE event a second (the demo's longest pause): a chat stream of N tokens is N + 4 events
# (role, N deltas, finish, usage, [DONE]), each followed by one pause.
TIMED_PACE_MS = 1000
NEAR_TOKENS = 3  # 7 events: ends ~7 s after it starts, 2 s before the route timeout
OVERRUN_TOKENS = 16  # 20 events: would need 20 s
SILENT_PAST_TIMEOUT_MS = 10_000  # the demo's longest delay, past the route timeout

# litellm's per-token prices (model_prices_and_context_window_backup.json), markup 0. The hold's
# rates are the highest price of each side among the dimensions the endpoint's answer can carry
# (billing/endpoints.py): chat and Responses also carry cached input (cheaper) and reasoning
# output (no price of its own in the map: billed as output); Anthropic's input side includes
# 1-hour cache writes ($6 per million for claude-sonnet-4-5, above its plain input).
#        model: (input, output, hold input rate, hold output rate)
PRICES = {
    "gpt-4o-mini": (Decimal("1.5e-07"), Decimal("6e-07"), Decimal("1.5e-07"), Decimal("6e-07")),
    "gpt-3.5-turbo-instruct": (Decimal("1.5e-06"), Decimal("2e-06"), Decimal("1.5e-06"), Decimal("2e-06")),
    "claude-sonnet-4-5": (Decimal("3e-06"), Decimal("1.5e-05"), Decimal("6e-06"), Decimal("1.5e-05")),
}
NANO_PER_USD = 10**9


@dataclasses.dataclass(frozen=True)
class Stream:
    """One streaming endpoint the gateway admits, and what the demo backend counts for it."""

    name: str
    path: str
    model: str
    output_field: str
    prompt_overhead: int  # the demo counts a prompt's words, plus 3 per chat message
    # Where the final usage object has gone by and only the terminal event is left (None: the
    # usage travels in the terminal event itself, so there is no such place).
    before_terminal: str | None
    terminal: bytes

    def payload(self, words: list[str], output_tokens: int = OUTPUT_TOKENS) -> bytes:
        """The request body, byte for byte as sent: the hold counts its bytes."""
        text = " ".join(words)
        body: dict[str, Any] = {"model": self.model, self.output_field: output_tokens, "stream": True}
        if self.path == "/v1/completions":
            body["prompt"] = text
        elif self.path == "/v1/responses":
            body["input"] = text
        else:
            body["messages"] = [{"role": "user", "content": text}]
        return json.dumps(body).encode()

    def hold_nano(self, payload: bytes, output_tokens: int = OUTPUT_TOKENS) -> int:
        """docs/pricing.md, "Holds": every body byte a prompt token at the highest input-side
        price, the output field at the highest output-side price, rounded up once."""
        _, _, input_rate, output_rate = PRICES[self.model]
        return math.ceil((len(payload) * input_rate + output_tokens * output_rate) * NANO_PER_USD)

    def cost_nano(self, words: list[str], output_tokens: int = OUTPUT_TOKENS) -> int:
        """The demo backend's usage for this prompt, priced: what reading to the end costs."""
        input_price, output_price, _, _ = PRICES[self.model]
        prompt = len(words) + self.prompt_overhead
        return math.ceil((prompt * input_price + output_tokens * output_price) * NANO_PER_USD)


CHAT = Stream(
    name="chat",
    path="/v1/chat/completions",
    model="gpt-4o-mini",
    output_field="max_tokens",
    prompt_overhead=3,
    before_terminal="data: [DONE]",
    terminal=b"data: [DONE]",
)
STREAMS = [
    CHAT,
    Stream(
        name="completions",
        path="/v1/completions",
        model="gpt-3.5-turbo-instruct",
        output_field="max_tokens",
        prompt_overhead=0,
        before_terminal="data: [DONE]",
        terminal=b"data: [DONE]",
    ),
    Stream(
        name="responses",
        path="/v1/responses",
        model="gpt-4o-mini",
        output_field="max_output_tokens",
        prompt_overhead=3,
        before_terminal=None,
        terminal=b'"type": "response.completed"',
    ),
    Stream(
        name="messages",
        path="/v1/messages",
        model="claude-sonnet-4-5",
        output_field="max_tokens",
        prompt_overhead=3,
        before_terminal="event: message_stop",
        terminal=b'"type": "message_stop"',
    ),
]


def prompt_words() -> list[str]:
    """A prompt of fixed length whose last word finds this request among the backend's."""
    return ["please", "count", "these", "words", uuid.uuid4().hex]


def headers(user: dict[str, Any], **controls: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {user['api_key']}",
        "Content-Type": "application/json",
        **{f"x-demo-{name.replace('_', '-')}": value for name, value in controls.items()},
    }


@dataclasses.dataclass(frozen=True)
class Charge:
    """A settled request as PostgreSQL has it: its hold and the one ledger entry it made."""

    hold_nano: int
    charged_nano: int
    details: dict[str, Any]
    settled_before_expiry: bool  # resolved while its hold was still within its TTL


async def charge_of(stack, user: dict[str, Any], request_id: str) -> Charge:
    """Wait until the wallet has nothing pending, then read the request's hold and entry."""
    await stack.db.settled(user["wallet_id"])
    rows = await stack.db.rows(
        "SELECT h.amount_nano, h.state, h.resolved_at < h.expires_at AS in_time, "
        "       -e.amount_nano AS charged, e.details "
        "  FROM holds h JOIN ledger_entries e ON e.idempotency_key = 'usage:' || h.request_id "
        " WHERE h.request_id = :id AND e.wallet_id = :wallet",
        id=request_id,
        wallet=user["wallet_id"],
    )
    assert len(rows) == 1, f"request {request_id} has no settled hold with its one usage entry: {rows}"
    row = rows[0]
    assert row.state == "posted", row
    return Charge(row.amount_nano, row.charged, row.details, row.in_time)


def assert_charged_the_hold(charge: Charge, expected_hold_nano: int, status: int) -> None:
    assert charge.charged_nano == charge.hold_nano == expected_hold_nano > 0, charge
    assert charge.details["usage_source"] == "hold_estimate", charge
    assert charge.details["status"] == status, charge


async def read_until_cut(response: aiohttp.ClientResponse) -> bytes:
    """Everything the gateway sent before the answer broke off (or ended)."""
    seen = bytearray()
    try:
        async for piece in response.content.iter_any():
            seen += piece
    except aiohttp.ClientPayloadError:
        pass  # the chunked body stopped short: what a cut answer looks like to a client
    return bytes(seen)


@pytest.fixture(scope="module")
async def stack(launch_stack) -> AsyncIterator[Any]:
    async with launch_stack() as running:
        yield running


# --- the stream does not reach its end ---------------------------------------------------------


@pytest.mark.parametrize("stream", STREAMS, ids=lambda s: s.name)
async def test_a_client_that_leaves_mid_stream_pays_the_hold(stack, stream: Stream) -> None:
    user = await stack.signup()
    words = prompt_words()
    payload = stream.payload(words)
    async with stack.http.post(
        stack.gateway + stream.path, data=payload, headers=headers(user, chunk_delay_ms=PACE_MS)
    ) as response:
        assert response.status == 200, await response.text()
        request_id = response.headers["x-request-id"]
        seen = b"".join([await response.content.readuntil(b"\n\n") for _ in range(EVENTS_READ)])
        response.close()  # the client hangs up while the backend is still producing
    assert stream.terminal not in seen

    charge = await charge_of(stack, user, request_id)
    assert_charged_the_hold(charge, stream.hold_nano(payload), status=200)
    # Never less than the whole answer would have cost: leaving early saves nothing.
    assert charge.charged_nano > stream.cost_nano(words)


@pytest.mark.parametrize("stream", STREAMS, ids=lambda s: s.name)
async def test_a_stream_the_backend_aborts_pays_the_hold(stack, stream: Stream) -> None:
    """The provider did the work up to the cut (and bills for it), so the client pays, as if
    it had left there itself."""
    user = await stack.signup()
    payload = stream.payload(prompt_words())
    async with stack.http.post(
        stack.gateway + stream.path, data=payload, headers=headers(user, cut_at="2000", cut_mode="reset")
    ) as response:
        assert response.status == 200, await response.text()
        request_id = response.headers["x-request-id"]
        seen = await read_until_cut(response)
    assert 0 < len(seen) <= 2000 and stream.terminal not in seen

    assert_charged_the_hold(await charge_of(stack, user, request_id), stream.hold_nano(payload), status=200)


@pytest.mark.parametrize("stream", STREAMS, ids=lambda s: s.name)
async def test_a_client_that_leaves_before_the_first_byte_pays_the_hold(
    stack, wait_until, stream: Stream
) -> None:
    """The request reached the backend, which bills it whether or not anyone reads the answer;
    Envoy logs status 0 with an upstream host. A plain socket, so the hang-up is exactly a close."""
    user = await stack.signup()
    words = prompt_words()
    payload = stream.payload(words)
    gateway = urlsplit(stack.gateway)
    head = "".join(
        f"{name}: {value}\r\n"
        for name, value in {
            "Host": gateway.netloc,
            **headers(user, delay_ms=SILENT_MS),
            "Content-Length": str(len(payload)),
        }.items()
    )
    _, writer = await asyncio.open_connection(gateway.hostname, gateway.port)
    try:
        writer.write(f"POST {stream.path} HTTP/1.1\r\n{head}\r\n".encode() + payload)
        await writer.drain()

        async def backend_has_it() -> str | None:
            async with stack.http.get(stack.backend + "/_demo/last_request") as response:
                last = await response.json() if response.status == 200 else {}  # 404: no request yet
            return last["headers"]["x-request-id"] if words[-1] in json.dumps(last.get("body")) else None

        request_id = await wait_until(backend_has_it, 10.0, "the request to reach the demo backend")
    finally:
        writer.close()  # before the backend's first byte
        await writer.wait_closed()

    charge = await charge_of(stack, user, request_id)
    assert_charged_the_hold(charge, stream.hold_nano(payload), status=0)
    assert charge.details["unfinished"] == "client_left_before_the_answer"


@pytest.mark.parametrize(
    "stream", [s for s in STREAMS if s.before_terminal is not None], ids=lambda s: s.name
)
async def test_a_client_that_leaves_after_the_final_usage_but_before_the_end_pays_the_hold(
    stack, wait_until, stream: Stream
) -> None:
    """The usage object has arrived whole; the terminal event has not. Only the terminal event
    proves a usage object was the final one (OpenAI-compatible backends may send running usage on
    every chunk; Anthropic's message_delta usage is cumulative), so this is an unfinished answer:
    the hold. (A Responses stream carries its usage in its terminal event: no such place.)"""
    user = await stack.signup()
    payload = stream.payload(prompt_words())
    async with stack.http.post(
        stack.gateway + stream.path,
        data=payload,
        headers=headers(user, cut_before=stream.before_terminal or "", cut_mode="stall"),
    ) as response:
        assert response.status == 200, await response.text()
        request_id = response.headers["x-request-id"]

        async def stalled() -> int | None:
            return (await stack.backend_last_request()).get("stalled_after_bytes")

        seen = await response.content.readexactly(await wait_until(stalled, 10.0, "the backend's stall"))
        response.close()
    last_event = seen.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert b'"usage": {' in last_event, last_event  # the final usage reached the client …
    assert stream.terminal not in seen  # … the terminal event did not

    assert_charged_the_hold(await charge_of(stack, user, request_id), stream.hold_nano(payload), status=200)


@pytest.mark.parametrize("stream", STREAMS, ids=lambda s: s.name)
async def test_a_stream_read_to_the_end_pays_its_usage(stack, stream: Stream) -> None:
    user = await stack.signup()
    words = prompt_words()
    payload = stream.payload(words)
    async with stack.http.post(stack.gateway + stream.path, data=payload, headers=headers(user)) as response:
        assert response.status == 200, await response.text()
        request_id = response.headers["x-request-id"]
        assert stream.terminal in await response.read()

    charge = await charge_of(stack, user, request_id)
    assert charge.charged_nano == stream.cost_nano(words) > 0, charge
    assert charge.hold_nano == stream.hold_nano(payload) > charge.charged_nano
    assert charge.details["usage_source"] == "response"


# --- near Envoy's route timeout ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TimedRequest:
    """A request sent to the route-timeout stack: what the client saw and how long it took."""

    user: dict[str, Any]
    words: list[str]
    payload: bytes
    status: int
    request_id: str
    answer: bytes
    elapsed_s: float


@pytest.fixture(scope="module")
async def timed_stack(launch_stack) -> AsyncIterator[Any]:
    async with launch_stack(
        BILLINGPROXY_UPSTREAM_TIMEOUT_S=str(ROUTE_TIMEOUT_S),
        BILLINGPROXY_HOLD_TTL_S=str(HOLD_TTL_S),
        BILLINGPROXY_CHECK_TIMEOUT_MS=str(CHECK_TIMEOUT_MS),
    ) as running:
        yield running


@pytest.fixture(scope="module")
async def timed(timed_stack) -> AsyncIterator[dict[str, asyncio.Task[TimedRequest]]]:
    """The three slow requests, started together (each takes most of the route timeout, so one
    after the other would triple the wait); each test awaits its own."""

    async def send(output_tokens: int, **controls: str) -> TimedRequest:
        user = await timed_stack.signup()
        words = prompt_words()
        payload = CHAT.payload(words, output_tokens)
        started = time.monotonic()
        async with timed_stack.http.post(
            timed_stack.gateway + CHAT.path,
            data=payload,
            headers=headers(user, **controls),
            timeout=aiohttp.ClientTimeout(total=3 * ROUTE_TIMEOUT_S),
        ) as response:
            answer = await read_until_cut(response)
            return TimedRequest(
                user,
                words,
                payload,
                response.status,
                response.headers["x-request-id"],
                answer,
                time.monotonic() - started,
            )

    pace = str(TIMED_PACE_MS)
    tasks = {
        "near": asyncio.create_task(send(NEAR_TOKENS, chunk_delay_ms=pace)),
        "overrun": asyncio.create_task(send(OVERRUN_TOKENS, chunk_delay_ms=pace)),
        "silent": asyncio.create_task(send(NEAR_TOKENS, delay_ms=str(SILENT_PAST_TIMEOUT_MS))),
    }
    try:
        yield tasks
    finally:
        await asyncio.gather(*tasks.values(), return_exceptions=True)


async def test_a_stream_that_ends_just_before_the_route_timeout_pays_its_usage_while_its_hold_is_pending(
    timed_stack, timed
) -> None:
    request = await timed["near"]
    assert request.status == 200
    assert request.answer.endswith(b"data: [DONE]\n\n"), request.answer[-200:]
    # It did run close to the limit (a slow machine only makes it longer).
    assert request.elapsed_s >= ROUTE_TIMEOUT_S - 2

    charge = await charge_of(timed_stack, request.user, request.request_id)
    assert charge.charged_nano == CHAT.cost_nano(request.words, NEAR_TOKENS) > 0, charge
    assert charge.hold_nano == CHAT.hold_nano(request.payload, NEAR_TOKENS)
    assert charge.details["usage_source"] == "response"
    assert charge.settled_before_expiry, charge


async def test_a_stream_that_overruns_the_route_timeout_is_cut_and_pays_the_hold(timed_stack, timed) -> None:
    """Envoy ends it at the route timeout (status 200 was sent already; the body stops short),
    and the access log settles it while its hold, a second longer-lived, is still pending."""
    request = await timed["overrun"]
    assert request.status == 200
    assert b"data: [DONE]" not in request.answer and b"data: {" in request.answer
    assert request.elapsed_s >= ROUTE_TIMEOUT_S

    charge = await charge_of(timed_stack, request.user, request.request_id)
    assert_charged_the_hold(charge, CHAT.hold_nano(request.payload, OVERRUN_TOKENS), status=200)
    assert charge.settled_before_expiry, charge


async def test_a_backend_silent_past_the_route_timeout_is_answered_504_and_pays_the_hold(
    timed_stack, timed
) -> None:
    """The route's idle timeout equals its timeout, so a silent backend meets the route timeout
    (504, Envoy's UT flag), never a stream idle timeout (408, which would read as a client error
    and void the hold) — while the provider may well be generating the answer it will bill."""
    request = await timed["silent"]
    assert request.status == 504, request.answer
    assert json.loads(request.answer)["error"]["code"] == "response_timeout"
    assert request.elapsed_s >= ROUTE_TIMEOUT_S

    charge = await charge_of(timed_stack, request.user, request.request_id)
    assert_charged_the_hold(charge, CHAT.hold_nano(request.payload, NEAR_TOKENS), status=504)
    assert charge.details["unfinished"] == "upstream_timeout"
    assert charge.settled_before_expiry, charge
