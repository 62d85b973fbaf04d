"""The endpoint table: every path the gateway forwards, how its worst case is read, where its
answer carries usage.

Why one table: the backend credential is shared by every tenant, so a path the gateway cannot
meter must never reach it. For each admitted endpoint this module says how the Check reads the
request's worst case (the output field that endpoint reads, × every multiplier), in which format
the answer reports usage (:class:`billing.usage.Format`, which the Lua filter and the access log
follow), and which price dimensions that answer can carry. Adding an endpoint is one row; a path
without a row answers ``404 endpoint_not_supported`` (docs/decisions/0001-billing-integrity.md).

Request features whose cost the gateway does not price are refused here, before any hold:
service tiers other than the default, web search, hosted (server-side) tools, background work,
and references to objects stored at the provider (their tokens are not in the body, and they may
belong to another tenant of the shared account).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from billing.usage import Format

# The admitted endpoints, by name (``BILLINGPROXY_ENDPOINTS`` picks among them).
ENDPOINT_NAMES = ("chat_completions", "completions", "embeddings", "responses", "messages", "models")

# OpenAI caps n at 128; a larger value is refused rather than multiplied into a hold.
CHOICES_MAX = 128
_DEFAULT_SERVICE_TIERS = frozenset({"auto", "default", "standard_only"})
# Content part types whose tokens are in the body itself (one token per byte bounds them).
_TEXT_PARTS = frozenset(
    {
        "text",
        "input_text",
        "output_text",
        "refusal",
        "summary_text",
        "reasoning_text",
        "tool_use",
        "tool_result",
        "thinking",
        "redacted_thinking",
        "function_call",
        "function_call_output",
        "function",
        "custom",
        "ephemeral",
    }
)
# Anthropic tools executed by the client (billed as ordinary tokens); every other typed tool runs
# at the provider and may carry fees (web search, code execution, web fetch).
_CLIENT_TOOL_PREFIXES = ("bash_", "text_editor_", "computer_")
# Prompt tokens a provider adds, beyond the body, when a request has tools: its own tool-use
# system prompt (Anthropic documents 313-346 tokens; OpenAI formats function definitions), and
# for each tool it defines itself (Anthropic's computer, bash, text editor: 245-735 tokens each,
# plus a 466-499-token computer-use prompt). Rounded up: the hold must not be below the cost.
TOOLS_PROMPT_TOKENS = 1_000
PROVIDER_TOOL_PROMPT_TOKENS = 1_500


# The top-level fields each endpoint accepts: its provider's documented request fields. Anything
# else is refused, because a proxy behind the gateway may act on fields of its own (LiteLLM's
# `fallbacks`, `api_base`, `mock_response` choose what is served and where: a client could be
# served o1-pro priced as gpt-4o-mini), and a field the gateway does not know may change what a
# request costs. Fields whose cost the readers below refuse are listed too, so the refusal names
# the real reason.
_CHAT_FIELDS = frozenset(
    {
        "model",
        "messages",
        "audio",
        "frequency_penalty",
        "function_call",
        "functions",
        "logit_bias",
        "logprobs",
        "max_completion_tokens",
        "max_tokens",
        "metadata",
        "modalities",
        "n",
        "parallel_tool_calls",
        "prediction",
        "presence_penalty",
        "prompt_cache_key",
        "prompt_cache_retention",
        "reasoning_effort",
        "response_format",
        "safety_identifier",
        "seed",
        "service_tier",
        "stop",
        "store",
        "stream",
        "stream_options",
        "temperature",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "user",
        "verbosity",
        "web_search_options",
    }
)
_COMPLETIONS_FIELDS = frozenset(
    {
        "model",
        "prompt",
        "best_of",
        "echo",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "max_tokens",
        "n",
        "presence_penalty",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "suffix",
        "temperature",
        "top_p",
        "user",
    }
)
_EMBEDDINGS_FIELDS = frozenset({"model", "input", "dimensions", "encoding_format", "user"})
_RESPONSES_FIELDS = frozenset(
    {
        "model",
        "input",
        "background",
        "conversation",
        "include",
        "instructions",
        "max_output_tokens",
        "max_tool_calls",
        "metadata",
        "parallel_tool_calls",
        "previous_response_id",
        "prompt",
        "prompt_cache_key",
        "prompt_cache_retention",
        "reasoning",
        "safety_identifier",
        "service_tier",
        "store",
        "stream",
        "stream_options",
        "temperature",
        "text",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "truncation",
        "user",
    }
)
_MESSAGES_FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "container",
        "context_management",
        "mcp_servers",
        "metadata",
        "service_tier",
        "stop_sequences",
        "stream",
        "system",
        "temperature",
        "thinking",
        "tool_choice",
        "tools",
        "top_k",
        "top_p",
    }
)
# Keys that name an object stored at the provider (a file, a cached context): its tokens are not
# in the body, and on a shared account it may be another tenant's.
_STORED_OBJECT_KEYS = ("file_id", "cached_content")


def _known_fields(request: Mapping[str, Any], fields: frozenset[str]) -> None:
    unknown = sorted(set(request) - fields)
    if unknown:
        raise RequestRefused(
            "parameter_not_supported",
            f"{unknown[0]} is not a parameter this gateway forwards for this endpoint.",
            unknown[0],
        )


class RequestRefused(ValueError):
    """The request cannot be metered as sent; ``code`` and ``param`` become the client's 400."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


@dataclasses.dataclass(frozen=True)
class WorstCase:
    """What bounds a request's cost, read from its body before it reaches the backend."""

    output_per_choice: int  # output tokens one choice may produce (the field the endpoint reads)
    choices: int  # how many outputs the request produces (n × prompts × best_of)
    prompt_in_body: bool  # False: it references content not in the body (image URLs, files)
    dimensions: frozenset[str]  # the Usage dimensions its answer can carry
    stream_usage: bool = False  # an OpenAI stream that must be asked for usage (Lua filter)
    prompt_overhead: int = 0  # prompt tokens the provider adds that are not in the body (tools)
    # The field the request must set to be admitted: the model's output limit is unknown and the
    # request set none, so nothing bounds its answer (output_per_choice is then 0).
    output_unbounded: str | None = None

    @property
    def output_tokens(self) -> int:
        return self.output_per_choice * self.choices


# A request reader: (the JSON body, the model's output limit, None when the price map knows none)
# → its worst case, or RequestRefused.
Reader = Callable[[Mapping[str, Any], int | None], WorstCase]


@dataclasses.dataclass(frozen=True)
class Endpoint:
    name: str
    method: str
    path: str  # exact, or a prefix when it ends with "/"
    usage_format: Format | None  # None: free, nothing to hold or settle
    read: Reader | None = None

    def matches(self, method: str, path: str) -> bool:
        if method != self.method:
            return False
        return path.startswith(self.path) if self.path.endswith("/") else path == self.path


# --- reading a request's worst case --------------------------------------------------------------


def whole_number(
    request: Mapping[str, Any], field: str, *, low: int = 1, high: int | None = None
) -> int | None:
    """A whole-number field, None when absent or null; anything else (a bool, a float, a string,
    out of range) is refused, never taken as some default."""
    value = request.get(field)
    if value is None:
        return None
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < low
        or (high is not None and value > high)
    ):
        bound = f"from {low}" + (f" to {high}" if high is not None else "")
        raise RequestRefused(
            "invalid_parameter", f"{field} must be a whole number {bound}, not {value!r}.", field
        )
    return value


def _output_budget(
    request: Mapping[str, Any], fields: tuple[str, ...], limit: int | None
) -> tuple[int, str | None]:
    """The largest of the output fields this endpoint reads (a backend may honour either when
    both are sent), capped by the model's limit; the limit itself when none is set.

    A model whose limit the price map does not know has nothing to cap by, and no guess will do: a
    hold below what the backend may produce is the most its answer is ever charged (a settlement
    never exceeds its hold). So the request's own bound is the hold, and without one the budget is 0
    and the field to set is returned too: the Check refuses such a request, after the refusals
    that say more (docs/decisions/0020-no-guessed-output-limit.md).

    Returns (the budget, the field the request must set or None)."""
    asked = [value for field in fields if (value := whole_number(request, field)) is not None]
    if limit is not None:
        return (min(max(asked), limit) if asked else limit), None
    return (max(asked), None) if asked else (0, fields[0])


def _service_tier(request: Mapping[str, Any]) -> None:
    tier = request.get("service_tier")
    if tier is not None and not isinstance(tier, str):
        raise RequestRefused(
            "invalid_parameter", f"service_tier must be a string, not {tier!r}.", "service_tier"
        )
    if tier is not None and tier not in _DEFAULT_SERVICE_TIERS:
        raise RequestRefused(
            "model_not_priced",
            f'service_tier {tier!r} has prices this gateway does not bill; omit it or use "auto".',
            "service_tier",
        )


def _stream(request: Mapping[str, Any]) -> bool:
    stream = request.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise RequestRefused("invalid_parameter", f"stream must be true or false, not {stream!r}.", "stream")
    return stream


def _refuse_fields(request: Mapping[str, Any], fields: Mapping[str, str]) -> None:
    for field, why in fields.items():
        value = request.get(field)
        if value is not None and value is not False:
            raise RequestRefused(
                "parameter_not_supported", f"{field} is not supported by this gateway: {why}", field
            )


def _tools(request: Mapping[str, Any], allowed: Callable[[Any], bool]) -> int:
    """Refuse tools that run at the provider; return the prompt tokens the tools add beyond the
    body (:data:`TOOLS_PROMPT_TOKENS`, :data:`PROVIDER_TOOL_PROMPT_TOKENS`)."""
    tools = request.get("tools")
    if tools is None:
        return TOOLS_PROMPT_TOKENS if request.get("functions") is not None else 0
    if not isinstance(tools, list):
        raise RequestRefused("invalid_parameter", "tools must be a list.", "tools")
    overhead = TOOLS_PROMPT_TOKENS if tools else 0
    for tool in tools:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if not allowed(kind):
            raise RequestRefused(
                "model_not_priced",
                f"The tool type {kind!r} runs at the provider with fees this gateway does not bill; "
                "only function tools are supported.",
                "tools",
            )
        if isinstance(kind, str) and kind.startswith(_CLIENT_TOOL_PREFIXES):
            overhead += PROVIDER_TOOL_PROMPT_TOKENS
    return overhead


def _parts_in_body(value: Any, dimensions: set[str]) -> bool:
    """True when every content part anywhere in ``value`` (messages, items, tool results nested in
    them) has its tokens in the body; notes audio input in ``dimensions``. An image or a file
    costs tokens by its pixels or pages, not by its bytes (a blank 10k×10k PNG is a few KB), so
    any part that is not text makes the prompt bound the model's context window."""
    in_body = True
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        kind = node.get("type")
        stored = next((key for key in _STORED_OBJECT_KEYS if node.get(key) is not None), None)
        if stored is not None:
            raise RequestRefused(
                "parameter_not_supported",
                f"{stored} names an object stored at the provider; send its content in the request.",
                stored,
            )
        if kind == "item_reference":
            raise RequestRefused(
                "parameter_not_supported",
                "Item references read objects stored at the provider; send the items themselves.",
                "input",
            )
        if kind == "input_audio":
            dimensions.add("input_audio")
        elif isinstance(kind, str) and kind not in _TEXT_PARTS and kind != "message":
            in_body = False
        stack.extend(child for child in node.values() if isinstance(child, (list, dict)))
    return in_body


def _chat_completions(request: Mapping[str, Any], limit: int | None) -> WorstCase:
    _known_fields(request, _CHAT_FIELDS)
    _service_tier(request)
    _refuse_fields(
        request, {"web_search_options": "web search is billed per query, which this gateway does not price."}
    )
    overhead = _tools(request, lambda kind: kind in ("function", "custom"))
    dimensions = {"input_text", "input_cached", "output_text", "output_reasoning"}
    modalities = request.get("modalities")
    if request.get("audio") is not None or (isinstance(modalities, list) and "audio" in modalities):
        dimensions.add("output_audio")
    prompt_in_body = _parts_in_body(request.get("messages"), dimensions)
    output, unbounded = _output_budget(request, ("max_completion_tokens", "max_tokens"), limit)
    prediction = request.get("prediction")
    if prediction is not None:
        # Rejected predicted tokens are billed as output on top of the answer: at most its bytes.
        output += len(json.dumps(prediction).encode())
    return WorstCase(
        output_per_choice=output,
        choices=whole_number(request, "n", high=CHOICES_MAX) or 1,
        prompt_in_body=prompt_in_body,
        dimensions=frozenset(dimensions),
        stream_usage=_stream(request),
        prompt_overhead=overhead,
        output_unbounded=unbounded,
    )


def _completions(request: Mapping[str, Any], limit: int | None) -> WorstCase:
    _known_fields(request, _COMPLETIONS_FIELDS)
    prompt = request.get("prompt")
    # A list of strings (or of token lists) is one completion per prompt, each n times.
    prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
    n = whole_number(request, "n", high=CHOICES_MAX) or 1
    best_of = whole_number(request, "best_of", high=CHOICES_MAX) or 1
    output, unbounded = _output_budget(request, ("max_tokens",), limit)
    return WorstCase(
        output_per_choice=output,
        output_unbounded=unbounded,
        choices=max(prompts, 1) * max(n, best_of),
        prompt_in_body=True,
        dimensions=frozenset({"input_text", "input_cached", "output_text"}),
        stream_usage=_stream(request),
    )


def _embeddings(request: Mapping[str, Any], limit: int | None) -> WorstCase:
    _known_fields(request, _EMBEDDINGS_FIELDS)
    return WorstCase(
        output_per_choice=0, choices=1, prompt_in_body=True, dimensions=frozenset({"input_text"})
    )


def _responses(request: Mapping[str, Any], limit: int | None) -> WorstCase:
    _known_fields(request, _RESPONSES_FIELDS)
    _service_tier(request)
    _refuse_fields(
        request,
        {
            "background": "background work goes on after the answer, where no usage can be read.",
            "previous_response_id": "it reads a response stored at the provider; send the whole input.",
            "conversation": "it reads a conversation stored at the provider; send the whole input.",
            "prompt": "it reads a prompt template stored at the provider; send the input itself.",
        },
    )
    overhead = _tools(request, lambda kind: kind in ("function", "custom"))
    dimensions = {"input_text", "input_cached", "output_text", "output_reasoning"}
    prompt_in_body = _parts_in_body(request.get("input"), dimensions)
    _stream(request)
    output, unbounded = _output_budget(request, ("max_output_tokens",), limit)
    return WorstCase(
        output_per_choice=output,
        output_unbounded=unbounded,
        choices=1,
        prompt_in_body=prompt_in_body,
        dimensions=frozenset(dimensions),
        prompt_overhead=overhead,
    )


def _messages(request: Mapping[str, Any], limit: int | None) -> WorstCase:
    _known_fields(request, _MESSAGES_FIELDS)
    _service_tier(request)
    _refuse_fields(
        request,
        {
            "mcp_servers": "MCP servers run at the provider.",
            "container": "containers run code at the provider.",
        },
    )
    overhead = _tools(
        request,
        lambda kind: (
            kind in (None, "custom") or (isinstance(kind, str) and kind.startswith(_CLIENT_TOOL_PREFIXES))
        ),
    )
    if whole_number(request, "max_tokens") is None:
        raise RequestRefused("invalid_parameter", "max_tokens is required.", "max_tokens")
    dimensions = {"input_text", "input_cached", "input_cache_write_5m", "input_cache_write_1h", "output_text"}
    prompt_in_body = _parts_in_body([request.get("messages"), request.get("system")], dimensions)
    dimensions.discard("input_audio")  # Anthropic takes no audio
    _stream(request)
    output, unbounded = _output_budget(request, ("max_tokens",), limit)
    return WorstCase(
        output_per_choice=output,
        output_unbounded=unbounded,
        choices=1,
        prompt_in_body=prompt_in_body,
        dimensions=frozenset(dimensions),
        prompt_overhead=overhead,
    )


TABLE: tuple[Endpoint, ...] = (
    Endpoint("chat_completions", "POST", "/v1/chat/completions", Format.OPENAI_CHAT, _chat_completions),
    Endpoint("completions", "POST", "/v1/completions", Format.OPENAI_CHAT, _completions),
    Endpoint("embeddings", "POST", "/v1/embeddings", Format.OPENAI_EMBEDDINGS, _embeddings),
    Endpoint("responses", "POST", "/v1/responses", Format.OPENAI_RESPONSES, _responses),
    Endpoint("messages", "POST", "/v1/messages", Format.ANTHROPIC_MESSAGES, _messages),
    Endpoint("models", "GET", "/v1/models", None),
    Endpoint("models", "GET", "/v1/models/", None),
)


class EndpointTable:
    """The admitted rows (``BILLINGPROXY_ENDPOINTS``), looked up by method and path."""

    def __init__(self, names: Iterable[str] = ENDPOINT_NAMES) -> None:
        chosen = set(names)
        unknown = chosen - set(ENDPOINT_NAMES)
        if unknown:
            raise ValueError(f"unknown endpoint(s) {sorted(unknown)}; known: {', '.join(ENDPOINT_NAMES)}")
        self._rows = tuple(row for row in TABLE if row.name in chosen)

    def find(self, method: str, path: str) -> Endpoint | None:
        path = path.split("?", 1)[0]
        return next((row for row in self._rows if row.matches(method, path)), None)
