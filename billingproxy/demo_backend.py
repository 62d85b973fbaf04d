"""A local OpenAI-compatible LLM backend with exact, documented token counts.

Why: `billingproxy up` needs a backend when none is configured, and tests must assert exact
costs, so the "model" here is arithmetic. It speaks OpenAI's wire format (JSON and SSE
`chat.completion.chunk` streams, with the final usage chunk only when the request sets
`stream_options.include_usage`, and a 400 for stream_options without streaming, as OpenAI does),
so everything between client and backend runs for real.

Token counts (what tests can rely on):
- chat prompt_tokens = words (whitespace-separated) across all message texts
  + PER_MESSAGE_TOKENS (3) per message; a message's text is its string content or the
  `text` of its content parts.
- completion_tokens = min(max_completion_tokens or max_tokens or DEFAULT_MAX_TOKENS (16),
  REPLY_WORDS_MAX (256)); the reply is that many words "token", so finish_reason is "length"
  when the request set a limit below REPLY_WORDS_MAX, else "stop".
- embeddings prompt_tokens = words across all inputs.
- responses (`POST /v1/responses`, OpenAI's Responses API, JSON or SSE events ending in
  `response.completed`): input_tokens = chat prompt_tokens of `instructions` (as a system
  message) and `input` (a string is one user message); output_tokens = min(max_output_tokens or
  16, 256). Usage is named `input_tokens` / `output_tokens` there.
- cached_tokens = 0, or min(x-demo-cached-tokens, prompt_tokens).

Test controls (request headers):
- x-demo-status: 400/401/429/500/… answers that error in OpenAI's error shape.
- x-demo-delay-ms: wait before answering (at most DELAY_MS_MAX).
- x-demo-chunk-bytes: send a JSON answer in pieces of this many bytes (chunked encoding).
- x-demo-chunk-delay-ms: pause between pieces / SSE events (at most CHUNK_DELAY_MS_MAX).
- x-demo-cached-tokens: report that many cached prompt tokens.
`GET /_demo/last_request` shows the last /v1 request (method, path, headers, body), so tests can
check which credential reached the backend. With `api_key` set, /v1 requires it as Bearer.
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

logger = logging.getLogger(__name__)

PER_MESSAGE_TOKENS = 3
DEFAULT_MAX_TOKENS = 16
REPLY_WORDS_MAX = 256
REPLY_WORD = "token"
DELAY_MS_MAX = 10_000
CHUNK_DELAY_MS_MAX = 1_000
EMBEDDING_DIMENSIONS = 8
MODELS = ("demo-model", "gpt-4o-mini", "gemini/gemini-2.5-flash")

_ERRORS = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}

_LAST_REQUEST = web.AppKey("last_request", dict)
_API_KEY = web.AppKey("api_key", str)
_IDS = web.AppKey("ids", itertools.count)


class DemoError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    def response(self) -> web.Response:
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


def prompt_tokens(messages: Sequence[dict[str, Any]]) -> int:
    return sum(message_text_words(m) + PER_MESSAGE_TOKENS for m in messages)


def completion_tokens(request: dict[str, Any]) -> int:
    limit = request.get("max_completion_tokens") or request.get("max_tokens") or DEFAULT_MAX_TOKENS
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise DemoError(400, "max_tokens must be a positive integer.")
    return min(limit, REPLY_WORDS_MAX)


def _usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def _header_int(request: web.Request, name: str, default: int, maximum: int) -> int:
    raw = request.headers.get(name)
    if raw is None:
        return default
    try:
        return max(0, min(int(raw), maximum))
    except ValueError:
        raise DemoError(400, f"{name} must be a whole number") from None


# --- handlers ----------------------------------------------------------------------------------


async def _body(request: web.Request) -> Any:
    # request.read() caches, so the middleware and the handler share one read of the body.
    raw = await request.read()
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode("utf-8", errors="replace")


@web.middleware
async def _demo_controls(request: web.Request, handler: Any) -> web.StreamResponse:
    if not request.path.startswith("/v1/"):
        return await handler(request)
    body = await _body(request)
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
        return error.response()


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body: dict[str, Any] = await _body(request)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise DemoError(400, "'messages' must be a non-empty array of objects.")
    prompt = prompt_tokens(messages)
    completion = completion_tokens(body)
    cached = min(_header_int(request, "x-demo-cached-tokens", 0, 1 << 31), prompt)
    limited = bool(body.get("max_completion_tokens") or body.get("max_tokens"))
    finish_reason = "length" if limited and completion < REPLY_WORDS_MAX else "stop"
    model = str(body.get("model") or MODELS[0])
    completion_id = f"chatcmpl-demo{next(request.app[_IDS])}"
    created = int(time.time())
    chunk_delay_s = _header_int(request, "x-demo-chunk-delay-ms", 0, CHUNK_DELAY_MS_MAX) / 1000
    usage = _usage(prompt, completion, cached)

    if body.get("stream_options") is not None and body.get("stream") is not True:
        # OpenAI's answer too: a gateway must never add stream_options to an unstreamed request.
        raise DemoError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.")
    if body.get("stream") is True:
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        return await _stream_chat(
            request, completion_id, created, model, completion, finish_reason,
            usage if include_usage else None, chunk_delay_s,
        )

    answer = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant", "content": " ".join([REPLY_WORD] * completion), "refusal": None
                },
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage,
        "system_fingerprint": "fp_demo",
    }
    return await _send_json(request, answer, chunk_delay_s)


async def _send_json(request: web.Request, answer: dict[str, Any], chunk_delay_s: float) -> web.StreamResponse:
    piece = _header_int(request, "x-demo-chunk-bytes", 0, 1 << 20)
    if not piece:
        return web.json_response(answer)
    data = json.dumps(answer).encode()
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    for start in range(0, len(data), piece):
        await response.write(data[start : start + piece])
        # Without a pause the pieces coalesce in the socket and Envoy sees one chunk.
        await asyncio.sleep(chunk_delay_s or 0.002)
    await response.write_eof()
    return response


async def _stream_chat(
    request: web.Request,
    completion_id: str,
    created: int,
    model: str,
    completion: int,
    finish_reason: str,
    usage: dict[str, Any] | None,
    chunk_delay_s: float,
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)

    async def event(choices: list[dict[str, Any]], chunk_usage: dict[str, Any] | None) -> None:
        chunk: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_demo",
            "choices": choices,
        }
        # OpenAI sends "usage": null on every chunk but the last when usage was asked for.
        if usage is not None:
            chunk["usage"] = chunk_usage
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if chunk_delay_s:
            await asyncio.sleep(chunk_delay_s)

    def choice(delta: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

    await event(choice({"role": "assistant", "content": "", "refusal": None}), None)
    for n in range(completion):
        await event(choice({"content": REPLY_WORD if n == 0 else " " + REPLY_WORD}), None)
    await event(choice({}, finish_reason), None)
    if usage is not None:
        await event([], usage)
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


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
    ``output_tokens``, and a stream always ends with ``response.completed`` carrying it."""
    body: dict[str, Any] = await _body(request)
    prompt = prompt_tokens(response_input_messages(body))
    limit = body.get("max_output_tokens") or DEFAULT_MAX_TOKENS
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise DemoError(400, "max_output_tokens must be a positive integer.")
    output = min(limit, REPLY_WORDS_MAX)
    cached = min(_header_int(request, "x-demo-cached-tokens", 0, 1 << 31), prompt)
    number = next(request.app[_IDS])
    text = " ".join([REPLY_WORD] * output)
    message_id = f"msg_demo{number}"
    answer: dict[str, Any] = {
        "id": f"resp_demo{number}",
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": str(body.get("model") or MODELS[0]),
        "output": [{
            "type": "message", "id": message_id, "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }],
        "parallel_tool_calls": True,
        "temperature": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "text": {"format": {"type": "text"}},
        "truncation": "disabled",
        "metadata": {},
        "usage": {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + output,
        },
    }
    chunk_delay_s = _header_int(request, "x-demo-chunk-delay-ms", 0, CHUNK_DELAY_MS_MAX) / 1000
    if body.get("stream") is not True:
        return await _send_json(request, answer, chunk_delay_s)

    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    sequence = itertools.count()

    async def event(kind: str, **fields: Any) -> None:
        data = {"type": kind, "sequence_number": next(sequence), **fields}
        await response.write(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode())
        if chunk_delay_s:
            await asyncio.sleep(chunk_delay_s)

    in_progress = {**answer, "status": "in_progress", "output": [], "usage": None}
    await event("response.created", response=in_progress)
    await event("response.in_progress", response=in_progress)
    for n in range(output):
        await event("response.output_text.delta", item_id=message_id, output_index=0, content_index=0,
                    delta=REPLY_WORD if n == 0 else " " + REPLY_WORD)
    await event("response.output_text.done", item_id=message_id, output_index=0, content_index=0, text=text)
    await event("response.completed", response=answer)
    await response.write_eof()
    return response


async def embeddings(request: web.Request) -> web.Response:
    body: dict[str, Any] = await _body(request)
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
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "model": str(body.get("model") or MODELS[0]),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


async def models(request: web.Request) -> web.Response:
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "billingproxy-demo"} for m in MODELS]
    return web.json_response({"object": "list", "data": data})


async def last_request(request: web.Request) -> web.Response:
    last = request.app[_LAST_REQUEST]
    if not last:
        raise web.HTTPNotFound(text='{"error": "no request yet"}', content_type="application/json")
    return web.json_response(last)


def make_app(*, api_key: str = "") -> web.Application:
    """The demo backend; with ``api_key``, /v1 answers 401 unless sent ``Bearer <api_key>``."""
    app = web.Application(middlewares=[_demo_controls], client_max_size=64 * 1024 * 1024)
    app[_LAST_REQUEST] = {}
    app[_API_KEY] = api_key
    app[_IDS] = itertools.count(1)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/_demo/last_request", last_request)
    return app


async def serve(
    host: str, port: int, *, api_key: str = "", ssl_context: ssl.SSLContext | None = None
) -> tuple[web.AppRunner, int]:
    """Start the demo backend; returns the runner (``await runner.cleanup()`` stops it) and the
    port it listens on (useful with ``port=0``). ``ssl_context`` serves https."""
    runner = web.AppRunner(make_app(api_key=api_key), access_log=None)
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
