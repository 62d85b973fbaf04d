"""A local LLM backend with exact, documented token counts, in every format the gateway admits.

Why: `billingproxy up` needs a backend when none is configured, and tests must assert exact
costs, so the "model" here is arithmetic. It answers in the providers' documented wire formats,
so everything between client and backend runs for real:

- ``POST /v1/chat/completions`` (OpenAI): JSON, or SSE ``chat.completion.chunk``s with the final
  usage chunk (``choices: []``) only when the request sets ``stream_options.include_usage`` (and
  a 400 for stream_options without streaming, as OpenAI does); ``n`` choices; cached prompt
  tokens; audio tokens when asked for audio.
- ``POST /v1/completions`` (OpenAI's legacy completions): JSON or SSE, the same usage rules.
- ``POST /v1/embeddings`` (OpenAI): JSON.
- ``POST /v1/responses`` (OpenAI's Responses API): JSON, or SSE events response.created,
  response.in_progress, response.output_item.added, response.content_part.added,
  response.output_text.delta…, response.output_text.done, response.content_part.done,
  response.output_item.done, response.completed. The response object echoes the request's
  ``instructions``, ``tools``, ``metadata``, ``tool_choice``, ``text``, ``user`` … as given, as
  OpenAI does.
- ``POST /v1/messages`` (Anthropic): JSON, or SSE events message_start, content_block_start, ping,
  content_block_delta…, content_block_stop, message_delta, message_stop; cache reads and writes
  (5-minute and 1-hour) when asked.

Token counts (what tests can rely on):
- A text's tokens are its words (whitespace-separated). A message's text is its string content,
  or the ``text`` of its content parts.
- chat prompt_tokens = words across all messages + PER_MESSAGE_TOKENS (3) per message, plus
  AUDIO_PART_TOKENS (10) per ``input_audio`` content part (counted as prompt audio tokens).
- legacy completions prompt_tokens = words of ``prompt`` (a string or a list of strings).
- responses input_tokens = chat prompt_tokens of ``instructions`` (when a string, as a system
  message) and ``input`` (a string is one user message).
- messages input = chat prompt_tokens of ``system`` (a string or text blocks, as one message) and
  ``messages``; of it, cache reads and writes as asked (below), the rest ``input_tokens``.
- embeddings prompt_tokens = words across all inputs.
- completion tokens per choice = min(the request's output limit — ``max_completion_tokens``,
  ``max_tokens`` or ``max_output_tokens`` — or DEFAULT_MAX_TOKENS (16), REPLY_WORDS_MAX (256));
  chat and legacy completions multiply by ``n``. finish_reason / stop_reason is "length" /
  "max_tokens" when the request set a limit below REPLY_WORDS_MAX, else "stop" / "end_turn".
  With ``"modalities": ["text", "audio"]`` a chat reply also carries AUDIO_TOKENS_PER_WORD (2)
  audio tokens per completion token (completion_tokens counts both).
- The reply is that many words "token" — or, with ``x-demo-reply: echo``, the client's last
  message (or prompt, or input) verbatim, whatever its length: the counts stay the arithmetic above.

Test controls (request headers):
- x-demo-status: 400/401/429/500/… answers that error in the provider's error shape.
- x-demo-delay-ms: wait before answering (at most DELAY_MS_MAX).
- x-demo-chunk-bytes: send the answer in pieces of this many bytes.
- x-demo-chunk-delay-ms: pause between pieces / SSE events (at most CHUNK_DELAY_MS_MAX).
- x-demo-cached-tokens: that many prompt tokens were read from the cache (Anthropic: cache reads).
- x-demo-cache-write-tokens, x-demo-cache-write-1h-tokens: Anthropic cache writes (5 min, 1 h).
- x-demo-reasoning-tokens: that many extra completion tokens spent reasoning (chat, responses).
- x-demo-reply: ``echo`` (the reply repeats the client's text) or ``words`` (the default).
- x-demo-usage: a JSON object sent as the answer's final usage instead of the computed one
  (Anthropic streams: message_delta's usage; message_start's is the computed one).
- x-demo-cut-before: the answer stops just before the first occurrence of this text (in the bytes
  on the wire); x-demo-cut-at: … after this many bytes. x-demo-cut-mode: ``close`` (the body ends
  there, cleanly: a backend that stopped early; the default), ``reset`` (the connection is aborted)
  or ``stall`` (the connection stays open, sending nothing more, until the client leaves or
  STALL_S_MAX passes).
`GET /_demo/last_request` shows the last /v1 request (method, path, headers, body) and, once a
stalled answer has stopped, ``stalled_after_bytes``. `GET /_demo/requests` lists the
``x-request-id`` of every metered (POST) /v1 request that reached the backend, in order of
arrival (at most REQUEST_IDS_MAX; ``dropped`` counts the rest): the backend's own record of what
it served, which the fault tests and ``python -m bench --chaos`` hold against the ledger. With
`api_key` set, /v1 requires it as Bearer.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import logging
import os
import ssl
import struct
import time
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

logger = logging.getLogger(__name__)

PER_MESSAGE_TOKENS = 3
DEFAULT_MAX_TOKENS = 16
REPLY_WORDS_MAX = 256
REPLY_WORD = "token"
AUDIO_PART_TOKENS = 10
AUDIO_TOKENS_PER_WORD = 2
DELAY_MS_MAX = 10_000
CHUNK_DELAY_MS_MAX = 1_000
STALL_S_MAX = 30
REQUEST_IDS_MAX = 1_000_000
EMBEDDING_DIMENSIONS = 8
MODELS = ("demo-model", "gpt-4o-mini", "gemini/gemini-2.5-flash", "claude-sonnet-4-5")
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}

_ERRORS = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}
_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    529: "overloaded_error",
}

_LAST_REQUEST: web.AppKey[dict[str, Any]] = web.AppKey("last_request", dict)
_API_KEY = web.AppKey("api_key", str)
_IDS: web.AppKey[itertools.count[int]] = web.AppKey("ids", itertools.count)


class Arrivals:
    """The x-request-ids of the metered requests that reached the backend, bounded."""

    def __init__(self) -> None:
        self.request_ids: list[str] = []
        self.dropped = 0

    def add(self, request: web.Request) -> None:
        request_id = request.headers.get("x-request-id")
        if request.method != "POST" or request_id is None:
            return
        if len(self.request_ids) < REQUEST_IDS_MAX:
            self.request_ids.append(request_id)
        else:
            self.dropped += 1


_ARRIVALS = web.AppKey("arrivals", Arrivals)


class DemoError(Exception):
    """An answer in the provider's error shape (OpenAI's, or Anthropic's on /v1/messages)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    def response(self, path: str = "") -> web.Response:
        if path == "/v1/messages":
            error_type = _ANTHROPIC_ERRORS.get(self.status, "api_error")
            return web.json_response(
                {"type": "error", "error": {"type": error_type, "message": str(self)}}, status=self.status
            )
        error_type, code = _ERRORS.get(self.status, ("server_error", "server_error"))
        body = {"error": {"message": str(self), "type": error_type, "param": None, "code": code}}
        return web.json_response(body, status=self.status)


# --- token arithmetic --------------------------------------------------------------------------


def _words(text: object) -> int:
    return len(text.split()) if isinstance(text, str) else 0


def message_text_words(message: dict[str, Any]) -> int:
    content = message.get("content")
    if isinstance(content, list):
        return sum(_words(part.get("text")) for part in content if isinstance(part, dict))
    return _words(content)


def _audio_parts(message: dict[str, Any]) -> int:
    content = message.get("content")
    if not isinstance(content, list):
        return 0
    return sum(1 for part in content if isinstance(part, dict) and part.get("type") == "input_audio")


def prompt_tokens(messages: Sequence[dict[str, Any]]) -> int:
    return sum(
        message_text_words(m) + PER_MESSAGE_TOKENS + AUDIO_PART_TOKENS * _audio_parts(m) for m in messages
    )


def output_limit(request: dict[str, Any], *fields: str) -> tuple[int, bool]:
    """(completion tokens per choice, whether the request's limit cut the reply short)."""
    limit = next((request[f] for f in fields if request.get(f) is not None), None)
    if limit is None:
        return min(DEFAULT_MAX_TOKENS, REPLY_WORDS_MAX), False
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise DemoError(400, f"{fields[0]} must be a positive integer.")
    return min(limit, REPLY_WORDS_MAX), limit < REPLY_WORDS_MAX


def completion_tokens(request: dict[str, Any]) -> int:
    return output_limit(request, "max_completion_tokens", "max_tokens")[0]


def _choices(request: dict[str, Any]) -> int:
    n = request.get("n", 1)
    if n is None:
        return 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
        raise DemoError(400, "n must be an integer from 1 to 128.")
    return n


class Controls:
    """The x-demo-* request headers that shape an answer."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.chunk_bytes = _header_int(request, "x-demo-chunk-bytes", 0, 1 << 20)
        self.chunk_delay_s = _header_int(request, "x-demo-chunk-delay-ms", 0, CHUNK_DELAY_MS_MAX) / 1000
        self.cached = _header_int(request, "x-demo-cached-tokens", 0, 1 << 31)
        self.cache_write_5m = _header_int(request, "x-demo-cache-write-tokens", 0, 1 << 31)
        self.cache_write_1h = _header_int(request, "x-demo-cache-write-1h-tokens", 0, 1 << 31)
        self.reasoning = _header_int(request, "x-demo-reasoning-tokens", 0, 1 << 31)
        self.echo = request.headers.get("x-demo-reply", "words") == "echo"
        self.cut_before = request.headers.get("x-demo-cut-before")
        self.cut_at = _header_int(request, "x-demo-cut-at", -1, 1 << 40)
        self.cut_mode = request.headers.get("x-demo-cut-mode", "close")
        if self.cut_mode not in ("close", "reset", "stall"):
            raise DemoError(400, "x-demo-cut-mode must be close, reset or stall")
        raw_usage = request.headers.get("x-demo-usage")
        self.usage_given = raw_usage is not None
        self.usage: Any = None
        if raw_usage is not None:
            try:
                self.usage = json.loads(raw_usage)
            except ValueError:
                raise DemoError(400, "x-demo-usage must be JSON") from None

    def reply(self, words: int, echo_text: str) -> str:
        if self.echo:
            return echo_text
        return " ".join([REPLY_WORD] * words)

    def final_usage(self, computed: dict[str, Any]) -> Any:
        return self.usage if self.usage_given else computed


def _next_id(request: web.Request) -> int:
    ids = request.app[_IDS]
    return next(ids)


def _header_int(request: web.Request, name: str, default: int, maximum: int) -> int:
    raw = request.headers.get(name)
    if raw is None:
        return default
    try:
        return max(0, min(int(raw), maximum))
    except ValueError:
        raise DemoError(400, f"{name} must be a whole number") from None


# --- sending -----------------------------------------------------------------------------------


def sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event: ``event:`` (when named) and one ``data:`` line of JSON."""
    head = f"event: {event}\n" if event else ""
    payload = data if isinstance(data, str) else json.dumps(data)
    return f"{head}data: {payload}\n\n".encode()


async def send(
    request: web.Request, controls: Controls, pieces: list[bytes], content_type: str
) -> web.StreamResponse:
    """Send an answer made of ``pieces`` (SSE events, or one JSON document) as the controls say:
    split into x-demo-chunk-bytes pieces, paced, and cut where asked."""
    body = b"".join(pieces)
    cut = len(body)
    if controls.cut_before is not None:
        at = body.find(controls.cut_before.encode())
        cut = at if at >= 0 else cut
    if controls.cut_at >= 0:
        cut = min(cut, controls.cut_at)
    plain = cut == len(body) and not controls.chunk_bytes and not controls.chunk_delay_s
    if plain and content_type == "application/json":
        return web.Response(body=body, content_type="application/json")

    headers = SSE_HEADERS if content_type == "text/event-stream" else {"Content-Type": content_type}
    response = web.StreamResponse(headers=headers)
    if content_type != "text/event-stream":
        response.enable_chunked_encoding()
    await response.prepare(request)
    if controls.chunk_bytes:
        pieces = [body[i : i + controls.chunk_bytes] for i in range(0, len(body), controls.chunk_bytes)]
    sent = 0
    for whole in pieces:
        piece = whole[: max(0, cut - sent)]
        if piece:
            await response.write(piece)
            sent += len(piece)
            if controls.chunk_delay_s or controls.chunk_bytes:
                # Without a pause the pieces coalesce in the socket and Envoy sees one chunk.
                await asyncio.sleep(controls.chunk_delay_s or 0.002)
        if sent >= cut:
            break
    if sent < len(body):
        return await _stop(request, response, controls.cut_mode, sent)
    await response.write_eof()
    return response


async def _stop(
    request: web.Request, response: web.StreamResponse, mode: str, sent: int
) -> web.StreamResponse:
    """End an answer cut short: cleanly, by aborting the connection, or by going silent."""
    transport = request.transport
    if mode == "reset":
        if transport is not None:
            transport.abort()
        return response
    if mode == "stall":
        request.app[_LAST_REQUEST]["stalled_after_bytes"] = sent
        deadline = time.monotonic() + STALL_S_MAX
        while transport is not None and not transport.is_closing() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if transport is not None:
            transport.abort()
        return response
    await response.write_eof()
    return response


# --- handlers ----------------------------------------------------------------------------------


async def _body(request: web.Request) -> Any:
    # request.read() caches, so the middleware and the handler share one read of the body.
    raw = await request.read()
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode("utf-8", errors="replace")


@web.middleware
async def _demo_controls(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/v1/"):
        return await handler(request)
    body = await _body(request)
    request.app[_ARRIVALS].add(request)
    request.app[_LAST_REQUEST].clear()
    request.app[_LAST_REQUEST].update(
        method=request.method,
        path=request.path_qs,
        headers={k.lower(): v for k, v in request.headers.items()},
        body=body,
    )
    try:
        delay_ms = _header_int(request, "x-demo-delay-ms", 0, DELAY_MS_MAX)
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)
        expected = request.app[_API_KEY]
        if expected and request.headers.get("Authorization") != f"Bearer {expected}":
            raise DemoError(401, "Incorrect API key provided.")
        status = _header_int(request, "x-demo-status", 0, 599)
        if status >= 400:
            raise DemoError(status, f"Demo error {status} as requested by x-demo-status.")
        if request.method == "POST" and not isinstance(body, dict):
            raise DemoError(400, "The request body must be a JSON object.")
        return await handler(request)
    except DemoError as error:
        return error.response(request.path)


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _chat_usage(
    prompt: int, completion: int, controls: Controls, *, input_audio: int = 0, output_audio: int = 0
) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {
            "cached_tokens": min(controls.cached, prompt - input_audio),
            "audio_tokens": input_audio,
        },
        "completion_tokens_details": {
            "reasoning_tokens": controls.reasoning,
            "audio_tokens": output_audio,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body: dict[str, Any] = await _body(request)
    controls = Controls(request)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise DemoError(400, "'messages' must be a non-empty array of objects.")
    if body.get("stream_options") is not None and body.get("stream") is not True:
        # OpenAI's answer too: a gateway must never add stream_options to an unstreamed request.
        raise DemoError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.")
    prompt = prompt_tokens(messages)
    input_audio = AUDIO_PART_TOKENS * sum(_audio_parts(m) for m in messages)
    per_choice, limited = output_limit(body, "max_completion_tokens", "max_tokens")
    n = _choices(body)
    audio = isinstance(body.get("modalities"), list) and "audio" in body["modalities"]
    output_audio = AUDIO_TOKENS_PER_WORD * per_choice * n if audio else 0
    usage = controls.final_usage(
        _chat_usage(
            prompt,
            per_choice * n + output_audio + controls.reasoning,
            controls,
            input_audio=input_audio,
            output_audio=output_audio,
        )
    )
    finish_reason = "length" if limited else "stop"
    text = controls.reply(per_choice, _last_user_text(messages))
    head: dict[str, Any] = {
        "id": f"chatcmpl-demo{_next_id(request)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(body.get("model") or MODELS[0]),
    }
    if "metadata" in body:
        head["metadata"] = body["metadata"]  # echoed as given, before the usage

    if body.get("stream") is True:
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and options.get("include_usage") is True

        def chunk(choices: list[dict[str, Any]], chunk_usage: Any = None) -> bytes:
            data = {
                **head,
                "object": "chat.completion.chunk",
                "system_fingerprint": "fp_demo",
                "choices": choices,
            }
            if include_usage:  # OpenAI sends "usage": null on every chunk but the last
                data["usage"] = chunk_usage
            return sse(data)

        pieces = [
            chunk(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": "", "refusal": None},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for i in range(n)
                ]
            )
        ]
        for i in range(n):
            for delta in _deltas(text, controls.echo):
                pieces.append(
                    chunk(
                        [{"index": i, "delta": {"content": delta}, "logprobs": None, "finish_reason": None}]
                    )
                )
            pieces.append(
                chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": finish_reason}])
            )
        if include_usage:
            pieces.append(chunk([], usage))
        pieces.append(b"data: [DONE]\n\n")
        return await send(request, controls, pieces, "text/event-stream")

    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
    if audio:
        message["audio"] = {"id": "audio_demo", "expires_at": 0, "data": "", "transcript": text}
    answer = {
        **head,
        "choices": [
            {"index": i, "message": message, "logprobs": None, "finish_reason": finish_reason}
            for i in range(n)
        ],
        "usage": usage,
        "service_tier": "default",
        "system_fingerprint": "fp_demo",
    }
    return await send(request, controls, [json.dumps(answer).encode()], "application/json")


def _deltas(text: str, echo: bool) -> list[str]:
    """A reply as streamed: word by word, or an echo in one piece."""
    if echo or not text:
        return [text]
    words = text.split(" ")
    return [words[0]] + [" " + w for w in words[1:]]


async def completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions``, OpenAI's legacy completions: ``text_completion`` objects."""
    body: dict[str, Any] = await _body(request)
    controls = Controls(request)
    prompts = body.get("prompt")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise DemoError(400, "'prompt' must be a string or a non-empty array of strings.")
    if body.get("stream_options") is not None and body.get("stream") is not True:
        raise DemoError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.")
    prompt = sum(_words(p) for p in prompts)
    per_choice, limited = output_limit(body, "max_tokens")
    n = _choices(body) * len(prompts)
    usage = controls.final_usage(
        {
            "prompt_tokens": prompt,
            "completion_tokens": per_choice * n,
            "total_tokens": prompt + per_choice * n,
        }
    )
    finish_reason = "length" if limited else "stop"
    text = controls.reply(per_choice, prompts[-1])
    head = {
        "id": f"cmpl-demo{_next_id(request)}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": str(body.get("model") or MODELS[0]),
    }
    if body.get("stream") is True:
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and options.get("include_usage") is True

        def chunk(choices: list[dict[str, Any]], chunk_usage: Any = None) -> bytes:
            data = {**head, "choices": choices}
            if include_usage:
                data["usage"] = chunk_usage
            return sse(data)

        pieces = []
        for i in range(n):
            for delta in _deltas(text, controls.echo):
                pieces.append(chunk([{"text": delta, "index": i, "logprobs": None, "finish_reason": None}]))
            pieces.append(chunk([{"text": "", "index": i, "logprobs": None, "finish_reason": finish_reason}]))
        if include_usage:
            pieces.append(chunk([], usage))
        pieces.append(b"data: [DONE]\n\n")
        return await send(request, controls, pieces, "text/event-stream")
    answer = {
        **head,
        "choices": [
            {"text": text, "index": i, "logprobs": None, "finish_reason": finish_reason} for i in range(n)
        ],
        "usage": usage,
        "system_fingerprint": "fp_demo",
    }
    return await send(request, controls, [json.dumps(answer).encode()], "application/json")


def response_input_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The Responses API's ``instructions`` and ``input`` as chat messages, to count them alike."""
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str):
        messages.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        raise DemoError(400, "'input' must be a string or a non-empty array of input items.")
    return messages + items


async def responses(request: web.Request) -> web.StreamResponse:
    """``POST /v1/responses`` (OpenAI's Responses API): usage is ``input_tokens`` /
    ``output_tokens``, and a stream ends with ``response.completed`` carrying it."""
    body: dict[str, Any] = await _body(request)
    controls = Controls(request)
    messages = response_input_messages(body)
    prompt = prompt_tokens(messages)
    output, _ = output_limit(body, "max_output_tokens")
    number = _next_id(request)
    text = controls.reply(output, _last_user_text(messages))
    message_id = f"msg_demo{number}"
    usage = controls.final_usage(
        {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": min(controls.cached, prompt)},
            "output_tokens": output + controls.reasoning,
            "output_tokens_details": {"reasoning_tokens": controls.reasoning},
            "total_tokens": prompt + output + controls.reasoning,
        }
    )
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    item = {
        "id": message_id,
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [part],
    }
    # The response object, in OpenAI's member order: the request's own settings echoed as given.
    answer: dict[str, Any] = {
        "id": f"resp_demo{number}",
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": body.get("max_tool_calls"),
        "model": str(body.get("model") or MODELS[0]),
        "output": [item],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": body.get("reasoning"),
        "service_tier": "default",
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": body.get("text", {"format": {"type": "text"}}),
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools", []),
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation", "disabled"),
        "usage": usage,
        "user": body.get("user"),
        "metadata": body.get("metadata", {}),
    }
    if body.get("stream") is not True:
        return await send(request, controls, [json.dumps(answer).encode()], "application/json")

    sequence = itertools.count()

    def event(kind: str, **fields: Any) -> bytes:
        return sse({"type": kind, "sequence_number": next(sequence), **fields}, event=kind)

    in_progress = {**answer, "status": "in_progress", "output": [], "usage": None}
    pieces = [
        event("response.created", response=in_progress),
        event("response.in_progress", response=in_progress),
        event(
            "response.output_item.added",
            output_index=0,
            item={**item, "status": "in_progress", "content": []},
        ),
        event(
            "response.content_part.added",
            item_id=message_id,
            output_index=0,
            content_index=0,
            part={**part, "text": ""},
        ),
    ]
    for delta in _deltas(text, controls.echo):
        pieces.append(
            event(
                "response.output_text.delta",
                item_id=message_id,
                output_index=0,
                content_index=0,
                delta=delta,
                logprobs=[],
            )
        )
    pieces += [
        event(
            "response.output_text.done",
            item_id=message_id,
            output_index=0,
            content_index=0,
            text=text,
            logprobs=[],
        ),
        event("response.content_part.done", item_id=message_id, output_index=0, content_index=0, part=part),
        event("response.output_item.done", output_index=0, item=item),
        event("response.completed", response=answer),
    ]
    return await send(request, controls, pieces, "text/event-stream")


async def messages(request: web.Request) -> web.StreamResponse:
    """``POST /v1/messages`` (Anthropic's Messages API): ``input_tokens`` are the uncached ones;
    cache reads and writes are counted beside them; a stream's message_delta usage is cumulative."""
    body: dict[str, Any] = await _body(request)
    controls = Controls(request)
    turns = body.get("messages")
    if not isinstance(turns, list) or not turns or not all(isinstance(m, dict) for m in turns):
        raise DemoError(400, "messages: Field required (a non-empty array of objects).")
    if body.get("max_tokens") is None:
        raise DemoError(400, "max_tokens: Field required")
    system = body.get("system")
    prompt = prompt_tokens(turns)
    if isinstance(system, (str, list)):
        prompt += prompt_tokens([{"role": "system", "content": system}])
    output, limited = output_limit(body, "max_tokens")
    read = min(controls.cached, prompt)
    write_5m = min(controls.cache_write_5m, prompt - read)
    write_1h = min(controls.cache_write_1h, prompt - read - write_5m)
    computed = {
        "input_tokens": prompt - read - write_5m - write_1h,
        "cache_creation_input_tokens": write_5m + write_1h,
        "cache_read_input_tokens": read,
        "cache_creation": {"ephemeral_5m_input_tokens": write_5m, "ephemeral_1h_input_tokens": write_1h},
        "output_tokens": output,
        "service_tier": "standard",
    }
    usage = controls.final_usage(computed)
    text = controls.reply(output, _last_user_text(turns))
    stop_reason = "max_tokens" if limited else "end_turn"
    message: dict[str, Any] = {
        "id": f"msg_demo{_next_id(request)}",
        "type": "message",
        "role": "assistant",
        "model": str(body.get("model") or MODELS[-1]),
    }
    if body.get("stream") is not True:
        answer = {
            **message,
            "content": [{"type": "text", "text": text}],
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": usage,
        }
        return await send(request, controls, [json.dumps(answer).encode()], "application/json")

    start_usage = {k: v for k, v in computed.items() if k != "service_tier"} | {"output_tokens": 1}
    pieces = [
        sse(
            {
                "type": "message_start",
                "message": {
                    **message,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": start_usage,
                },
            },
            event="message_start",
        ),
        sse(
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            event="content_block_start",
        ),
        sse({"type": "ping"}, event="ping"),
    ]
    for delta in _deltas(text, controls.echo):
        pieces.append(
            sse(
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": delta}},
                event="content_block_delta",
            )
        )
    final = usage if controls.usage_given else {"output_tokens": output}
    pieces += [
        sse({"type": "content_block_stop", "index": 0}, event="content_block_stop"),
        sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": final,
            },
            event="message_delta",
        ),
        sse({"type": "message_stop"}, event="message_stop"),
    ]
    return await send(request, controls, pieces, "text/event-stream")


async def embeddings(request: web.Request) -> web.StreamResponse:
    body: dict[str, Any] = await _body(request)
    controls = Controls(request)
    inputs = body.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise DemoError(400, "'input' must be a string or a non-empty array.")
    tokens = sum(_words(text) for text in inputs)
    data = []
    for index, text in enumerate(inputs):
        vector = [((len(str(text)) + index + d) % 7) / 7 for d in range(EMBEDDING_DIMENSIONS)]
        embedding: Any = vector
        if body.get("encoding_format") == "base64":
            packed = struct.pack(f"<{len(vector)}f", *vector)
            embedding = base64.b64encode(packed).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    answer = {
        "object": "list",
        "data": data,
        "model": str(body.get("model") or MODELS[0]),
        "usage": controls.final_usage({"prompt_tokens": tokens, "total_tokens": tokens}),
    }
    return await send(request, controls, [json.dumps(answer).encode()], "application/json")


async def models(request: web.Request) -> web.Response:
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "billingproxy-demo"} for m in MODELS]
    return web.json_response({"object": "list", "data": data})


async def last_request(request: web.Request) -> web.Response:
    last = request.app[_LAST_REQUEST]
    if not last:
        raise web.HTTPNotFound(text='{"error": "no request yet"}', content_type="application/json")
    return web.json_response(last)


async def request_ids(request: web.Request) -> web.Response:
    arrivals = request.app[_ARRIVALS]
    return web.json_response({"request_ids": arrivals.request_ids, "dropped": arrivals.dropped})


def make_app(*, api_key: str = "") -> web.Application:
    """The demo backend; with ``api_key``, /v1 answers 401 unless sent ``Bearer <api_key>``."""
    app = web.Application(middlewares=[_demo_controls], client_max_size=64 * 1024 * 1024)
    app[_LAST_REQUEST] = {}
    app[_API_KEY] = api_key
    app[_IDS] = itertools.count(1)
    app[_ARRIVALS] = Arrivals()
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/messages", messages)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/_demo/last_request", last_request)
    app.router.add_get("/_demo/requests", request_ids)
    return app


async def serve(
    host: str, port: int, *, api_key: str = "", ssl_context: ssl.SSLContext | None = None
) -> tuple[web.AppRunner, int]:
    """Start the demo backend; returns the runner (``await runner.cleanup()`` stops it) and the
    port it listens on (useful with ``port=0``). ``ssl_context`` serves https."""
    # Long header lines: a test may send a whole usage object in x-demo-usage.
    runner = web.AppRunner(
        make_app(api_key=api_key), access_log=None, max_line_size=65536, max_field_size=65536
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    bound_port = runner.addresses[0][1]
    logger.info("demo LLM backend on http://%s:%d", host, bound_port)
    return runner, bound_port


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="billingproxy-demo-backend", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4000)
    # From the environment, not argv, so the credential never shows in `ps`.
    parser.add_argument(
        "--api-key",
        default=os.environ.get("BILLINGPROXY_BACKEND_API_KEY", ""),
        help="credential the backend requires (Bearer); default: $BILLINGPROXY_BACKEND_API_KEY",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    web.run_app(make_app(api_key=args.api_key), host=args.host, port=args.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
