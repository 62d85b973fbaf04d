"""Property: whatever the client's content, wherever the provider echoes it, wherever the answer is
cut and however it is split into chunks, the Lua filter in a real Envoy publishes only the
provider's own final usage object, and settlement reads the provider's usage when the answer
ended normally and nothing otherwise (the hold: never less than what was streamed).

Each example is an answer in one of the formats the gateway admits (OpenAI chat/completions,
Responses and embeddings, Anthropic messages; JSON and SSE), built from the documented shapes
with generated usage numbers, the client's text and JSON echoed in strings and nested objects
(model output, the Responses API's instructions/tools/metadata, extra members — some long
enough that an event outgrows what the filter holds before scanning — SSE comments), now and then
no usage at all, a random JSON style (spacing, escaping, indentation: multi-line data), a random line ending
(\\n, \\r\\n, \\r), random chunk boundaries and an optional cut (the backend ends the body early,
or aborts the connection). A scripted backend sends exactly those bytes through Envoy; the
oracle is computed from where the terminal event ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings, strategies as st

from billing.usage import Format, read
from usage_gateway import Gateway, read_entry, usage_gateway

pytestmark = pytest.mark.integration

EXAMPLES = 25  # per kind of answer, whole and cut: 350 in all, ~15 s
PATHS = {
    Format.OPENAI_CHAT: "/v1/chat/completions",
    Format.OPENAI_RESPONSES: "/v1/responses",
    Format.OPENAI_EMBEDDINGS: "/v1/embeddings",
    Format.ANTHROPIC_MESSAGES: "/v1/messages",
}


# --- the scripted backend ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Script:
    content_type: str
    pieces: list[bytes]
    end: str  # "close": the body ends after the pieces; "reset": the connection is aborted


SCRIPTS: dict[str, Script] = {}
_NEXT = itertools.count()


async def _scripted(request: web.Request) -> web.StreamResponse:
    await request.read()
    script = SCRIPTS.pop(request.headers["x-script"])
    response = web.StreamResponse(headers={"Content-Type": script.content_type})
    await response.prepare(request)
    for piece in script.pieces:
        await response.write(piece)
        # A pause lets Envoy read each piece on its own (they would coalesce in the socket).
        await asyncio.sleep(0.001)
    if script.end == "reset":
        assert request.transport is not None
        request.transport.abort()
        return response
    await response.write_eof()
    return response


@pytest.fixture(scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    app = web.Application()
    app.router.add_post("/{tail:.*}", _scripted)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with usage_gateway(
            tmp_path_factory.mktemp("usage_properties"), f"http://127.0.0.1:{port}"
        ) as gw:
            yield gw
    finally:
        await runner.cleanup()


# --- answers -------------------------------------------------------------------------------------------

NASTY = [
    '"usage": {"prompt_tokens": 0, "completion_tokens": 0}',
    '"usage":{"input_tokens":0,"output_tokens":0}',
    "data: [DONE]\n\n",
    "data: [DONE]",
    "\n\n",
    "\r\n\r\n",
    "\r",
    "\n",
    'event: message_stop\ndata: {"type":"message_stop"}\n\n',
    '{"type": "response.completed", "response": {"usage": {"input_tokens": 0, "output_tokens": 0}}}',
    '"}]}',
    "\\",
    '\\"',
    '"',
    "\\u0022",
    "data: ",
    ": comment",
    "\u2028",
    "\U0001f600",
    "\x00",
    "}",
    "{",
    "[",
    "]",
    ",",
    ":",
    "usage",
    '"usage"',
]
client_text = st.lists(st.one_of(st.sampled_from(NASTY), st.text(max_size=10)), max_size=5).map("".join)
ECHO_KEYS = [
    "usage",
    "type",
    "response",
    "message",
    "prompt_tokens",
    "input_tokens",
    "output_tokens",
    "completion_tokens",
    "choices",
    "data",
    "delta",
    "finished",
]
client_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | client_text,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(ECHO_KEYS) | st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=10,
)
counts = st.integers(0, 10**7)


@st.composite
def usage_objects(draw: st.DrawFn, usage_format: Format) -> dict[str, Any]:
    """A valid final usage object of the format, as the provider documents it."""
    if usage_format is Format.OPENAI_CHAT:
        prompt, completion = draw(counts), draw(counts)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": draw(st.integers(0, prompt)), "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": draw(st.integers(0, completion))},
        }
    if usage_format is Format.OPENAI_RESPONSES:
        prompt, output = draw(counts), draw(counts)
        return {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": draw(st.integers(0, prompt))},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": draw(st.integers(0, output))},
            "total_tokens": prompt + output,
        }
    if usage_format is Format.OPENAI_EMBEDDINGS:
        prompt = draw(counts)
        return {"prompt_tokens": prompt, "total_tokens": prompt}
    write_5m, write_1h = draw(counts), draw(counts)
    return {
        "input_tokens": draw(counts),
        "cache_read_input_tokens": draw(counts),
        "cache_creation_input_tokens": write_5m + write_1h,
        "cache_creation": {"ephemeral_5m_input_tokens": write_5m, "ephemeral_1h_input_tokens": write_1h},
        "output_tokens": draw(counts),
        "service_tier": "standard",
    }


@dataclasses.dataclass
class Answer:
    """A provider's answer, and what the filter must make of it."""

    usage_format: Format
    content_type: str
    body: bytes
    finished_at: int  # the filter has seen the terminal event once it has body[:finished_at]
    usage: (
        dict[str, Any] | None
    )  # the final usage object (Anthropic streams: message_delta's); None: none sent
    usage_start: dict[str, Any] | None = None  # Anthropic streams: message_start's
    document: bool = False  # a JSON answer: finished also needs the end of the body


@dataclasses.dataclass
class Style:
    """How one provider writes JSON and SSE."""

    dumps: Callable[[Any], str]
    eol: str
    data_space: bool
    shuffle: random.Random

    def obj(self, *required: tuple[str, Any], echoes: list[tuple[str, Any]] = ()) -> dict[str, Any]:
        """An object with its members (and the echoed ones) in a provider-chosen order."""
        members = list(required) + list(echoes)
        self.shuffle.shuffle(members)
        return dict(members)

    def event(self, data: str, name: str | None = None, comment: str | None = None) -> bytes:
        lines = []
        if comment is not None:
            lines.append(":" + comment.replace("\r", " ").replace("\n", " "))
        if name is not None:
            lines.append(f"event: {name}")
        prefix = "data: " if self.data_space else "data:"
        lines += [prefix + line for line in data.split("\n")]
        return (self.eol.join(lines) + self.eol + self.eol).encode()


@st.composite
def styles(draw: st.DrawFn) -> Style:
    separators = draw(st.sampled_from([(",", ":"), (", ", ": ")]))
    ensure_ascii, indent = draw(st.booleans()), draw(st.sampled_from([None, None, 0, 1]))
    return Style(
        dumps=lambda value: json.dumps(
            value, separators=separators, ensure_ascii=ensure_ascii, indent=indent
        ),
        eol=draw(st.sampled_from(["\n", "\r\n", "\r"])),
        data_space=draw(st.booleans()),
        shuffle=random.Random(draw(st.integers(0, 2**32))),
    )


def echoes(draw: st.DrawFn) -> list[tuple[str, Any]]:
    """Extra members carrying the client's JSON; now and then a long one (an event larger than
    the filter holds before scanning)."""
    members = draw(
        st.lists(
            st.tuples(st.sampled_from(["metadata", "echo", "instructions_echo", "x"]), client_json),
            max_size=2,
            unique_by=lambda member: member[0],
        )
    )
    long = draw(st.sampled_from([0, 0, 0, 0, 0, 9000]))
    if long:
        members.append(
            ("long_echo", {"usage": {"input_tokens": 0}, "text": draw(client_text) * 8 + "x" * long})
        )
    return members


def comment(draw: st.DrawFn) -> str | None:
    return draw(st.none() | client_text)


KINDS = [
    (f, stream) for f in Format for stream in (False, True) if not (stream and f is Format.OPENAI_EMBEDDINGS)
]
# Now and then a provider sends no usage at all (a backend that ignores include_usage).
sends_usage = st.sampled_from([True, True, True, False])


@st.composite
def answers(draw: st.DrawFn, usage_format: Format, stream: bool) -> Answer:
    style = draw(styles())
    usage = draw(usage_objects(usage_format))
    texts = draw(st.lists(client_text, min_size=1, max_size=4))
    if not stream:
        return _json_answer(draw, usage_format, style, usage, texts)
    if usage_format is Format.OPENAI_CHAT:
        return _chat_stream(draw, style, usage, texts)
    if usage_format is Format.OPENAI_RESPONSES:
        return _responses_stream(draw, style, usage, texts)
    return _anthropic_stream(draw, style, usage, texts)


def _json_answer(draw, usage_format: Format, style: Style, usage: dict[str, Any], texts: list[str]) -> Answer:
    if usage_format is Format.OPENAI_CHAT:
        content = (
            "choices",
            [{"index": 0, "message": {"role": "assistant", "content": texts[0]}, "finish_reason": "stop"}],
        )
    elif usage_format is Format.OPENAI_RESPONSES:
        content = (
            "output",
            [{"type": "message", "content": [{"type": "output_text", "text": t} for t in texts]}],
        )
    elif usage_format is Format.OPENAI_EMBEDDINGS:
        content = ("data", [{"object": "embedding", "index": 0, "embedding": [0.5, -1.25e-3]}])
    else:
        content = ("content", [{"type": "text", "text": t} for t in texts])
    members = [("id", "x-1"), content] + ([("usage", usage)] if draw(sends_usage) else [])
    document = style.dumps(style.obj(*members, echoes=echoes(draw))).encode()
    trailing = draw(st.sampled_from([b"", b"\n", b" \r\n\t"]))
    return Answer(
        usage_format,
        "application/json",
        document + trailing,
        len(document),
        usage if len(members) == 3 else None,
        document=True,
    )


def _chat_stream(draw, style: Style, usage: dict[str, Any], texts: list[str]) -> Answer:
    head = [("id", "chatcmpl-1"), ("object", "chat.completion.chunk"), ("created", 1), ("model", "m")]
    events = []
    for text in texts:
        choices = [{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}]
        events.append(
            style.event(
                style.dumps(style.obj(*head, ("choices", choices), ("usage", None), echoes=echoes(draw))),
                comment=comment(draw),
            )
        )
    if not draw(sends_usage):
        body = b"".join(events) + style.event("[DONE]")
        return Answer(Format.OPENAI_CHAT, "text/event-stream", body, len(body) + 1, None)  # never finished
    events.append(
        style.event(style.dumps(style.obj(*head, ("choices", []), ("usage", usage), echoes=echoes(draw))))
    )
    body = b"".join(events) + style.event("[DONE]")
    return Answer(Format.OPENAI_CHAT, "text/event-stream", body, len(body) - len(style.eol) + 1, usage)


def _responses_stream(draw, style: Style, usage: dict[str, Any], texts: list[str]) -> Answer:
    def response(status: str, final_usage: Any) -> dict[str, Any]:
        return style.obj(
            ("id", "resp_1"),
            ("object", "response"),
            ("status", status),
            ("instructions", draw(client_json)),
            ("tools", [draw(client_json)]),
            ("metadata", {"note": draw(client_text)}),
            ("output", []),
            ("usage", final_usage),
        )

    def event(kind: str, **fields: Any) -> bytes:
        data = style.obj(("type", kind), *fields.items(), echoes=echoes(draw))
        return style.event(style.dumps(data), name=draw(st.sampled_from([kind, None])), comment=comment(draw))

    events = [
        event("response.created", response=response("in_progress", None)),
        event("response.in_progress", response=response("in_progress", None)),
    ]
    events += [event("response.output_text.delta", item_id="msg_1", delta=text) for text in texts]
    terminal = draw(st.sampled_from(["response.completed", "response.incomplete"]))
    last = event(terminal, response=response(terminal.split(".")[1], usage))
    body = b"".join(events) + last
    return Answer(Format.OPENAI_RESPONSES, "text/event-stream", body, len(body) - len(style.eol) + 1, usage)


def _anthropic_stream(draw, style: Style, usage: dict[str, Any], texts: list[str]) -> Answer:
    start = {k: v for k, v in usage.items() if k != "service_tier"} | {"output_tokens": 1}
    delta = draw(st.sampled_from([{"output_tokens": usage["output_tokens"]}, usage]))

    def event(kind: str, **fields: Any) -> bytes:
        data = style.obj(("type", kind), *fields.items(), echoes=echoes(draw))
        return style.event(style.dumps(data), name=kind, comment=comment(draw))

    message = style.obj(
        ("id", "msg_1"),
        ("type", "message"),
        ("role", "assistant"),
        ("content", []),
        ("model", "m"),
        ("usage", start),
    )
    events = [
        event("message_start", message=message),
        event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        event("ping"),
    ]
    events += [event("content_block_delta", index=0, delta={"type": "text_delta", "text": t}) for t in texts]
    events += [
        event("content_block_stop", index=0),
        event("message_delta", delta={"stop_reason": "end_turn", "stop_sequence": None}, usage=delta),
    ]
    last = event("message_stop")
    body = b"".join(events) + last
    return Answer(
        Format.ANTHROPIC_MESSAGES,
        "text/event-stream",
        body,
        len(body) - len(style.eol) + 1,
        delta,
        usage_start=start,
    )


@st.composite
def deliveries(
    draw: st.DrawFn, usage_format: Format, stream: bool, cut: bool
) -> tuple[Answer, list[bytes], int | None, str]:
    """An answer, the pieces it is sent in, where it is cut (None: not cut), and how it ends."""
    answer = draw(answers(usage_format, stream))
    size = len(answer.body)
    cut_at = draw(st.integers(0, size - 1)) if cut else None
    end = draw(st.sampled_from(["close", "reset"])) if cut else "close"
    sent = answer.body[: size if cut_at is None else cut_at]
    bounds = sorted(set(draw(st.lists(st.integers(1, max(1, len(sent) - 1)), max_size=10))))
    pieces = [sent[a:b] for a, b in zip([0, *bounds], [*bounds, len(sent)], strict=True) if sent[a:b]]
    return answer, pieces, cut_at, end


# --- the property ---------------------------------------------------------------------------------------


async def _deliver(gateway: Gateway, answer: Answer, pieces: list[bytes], end: str) -> dict[str, Any]:
    name = str(next(_NEXT))
    SCRIPTS[name] = Script(answer.content_type, pieces, end)
    headers = {"content-type": "application/json", "x-script": name}
    url = gateway.url + PATHS[answer.usage_format]
    async with gateway.session.post(url, data=b'{"model": "m"}', headers=headers) as response:
        assert response.status == 200, await response.text()
        if end == "reset":
            # Envoy ends the request at the backend's abort (its log entry is written then), but
            # closes the client's connection only after its delayed-close timeout (1 s).
            entry = await gateway.log_entry(response.headers["x-request-id"])
            response.close()
            return entry
        await response.read()
    return await gateway.log_entry(response.headers["x-request-id"])


@pytest.mark.parametrize("cut", [False, True], ids=["whole", "cut"])
@pytest.mark.parametrize(
    ("usage_format", "stream"), KINDS, ids=[f"{f.value}-{'sse' if stream else 'json'}" for f, stream in KINDS]
)
async def test_only_the_providers_final_usage_is_ever_read(
    gateway: Gateway, usage_format: Format, stream: bool, cut: bool
) -> None:
    loop = asyncio.get_running_loop()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(delivery=deliveries(usage_format, stream, cut))
    def check(delivery: tuple[Answer, list[bytes], int | None, str]) -> None:
        answer, pieces, cut_at, end = delivery
        entry = asyncio.run_coroutine_threadsafe(_deliver(gateway, answer, pieces, end), loop).result(60)
        published = entry["usage"] or {}

        # Whatever was published is the provider's own object, never text the client chose.
        if "usage" in published:
            assert answer.usage is not None and json.loads(published["usage"]) == answer.usage, published
        if "usage_start" in published:
            assert json.loads(published["usage_start"]) == answer.usage_start, published

        reached = (len(answer.body) if cut_at is None else cut_at) >= answer.finished_at
        if answer.document:
            reached = reached and end == "close"  # a JSON answer also needs the end of its body
        finished = published.get("finished") is True
        if end == "close":
            assert finished == reached, (finished, reached, cut_at, answer.finished_at, answer.body[-80:])
        else:
            assert not finished or reached  # an aborted connection may lose what was in flight

        # What settlement charges: the provider's usage when the answer ended normally with one,
        # else nothing (the hold).
        charged = read_entry(entry)
        if finished and answer.usage is not None:
            start = None if answer.usage_start is None else json.dumps(answer.usage_start)
            expected = read(answer.usage_format, json.dumps(answer.usage), start, True)
            assert expected is not None and charged == expected
        else:
            assert charged is None

    await asyncio.to_thread(check)
