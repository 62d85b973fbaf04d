"""What one answer consumed, in disjoint priced dimensions, and how each provider format says it.

Why a type of its own: a provider reports usage in its own shape (OpenAI's ``prompt_tokens`` with
``*_details``, the Responses API's ``input_tokens``, Anthropic's cache reads and writes beside
``input_tokens``), and each shape hides dimensions that cost differently (cache writes cost more
than input, audio tokens 16× text). :class:`Usage` splits an answer's tokens so that every token
is in exactly one dimension, and :mod:`billing.pricing` prices each dimension on its own.

The usage formats name where an answer carries its final usage (docs/architecture.md, "Usage
metering in Envoy"; decision records 0001 and 0007):

- ``openai_chat``: chat completions and legacy completions. JSON: the top-level ``usage``.
  Stream: the chunk whose top-level ``usage`` is an object, then ``data: [DONE]``.
- ``openai_responses``: JSON: the top-level ``usage``. Stream: ``response.usage`` of the
  ``response.completed`` (or ``response.incomplete``) event.
- ``openai_embeddings``: JSON only: the top-level ``usage``.
- ``anthropic_messages``: JSON: the top-level ``usage``. Stream: ``message.usage`` of
  ``message_start`` merged with the ``usage`` of ``message_delta``, then ``message_stop``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping
from typing import Any

# No real answer comes near this many tokens; a count beyond it is a broken or hostile usage
# object, charged the hold rather than priced (and it keeps every cost inside a BIGINT).
TOKENS_MAX = 10**12


class Format(enum.Enum):
    """Where and in which shape an endpoint's answer carries its usage."""

    OPENAI_CHAT = "openai_chat"
    OPENAI_RESPONSES = "openai_responses"
    OPENAI_EMBEDDINGS = "openai_embeddings"
    ANTHROPIC_MESSAGES = "anthropic_messages"


@dataclasses.dataclass(frozen=True)
class Usage:
    """Token counts by priced dimension; each token of an answer is in exactly one of them."""

    input_text: int = 0  # prompt tokens read at the ordinary input price (uncached text, images)
    input_cached: int = 0  # prompt tokens read from the provider's cache
    input_cache_write_5m: int = 0  # prompt tokens written to a cache (Anthropic, 5-minute TTL)
    input_cache_write_1h: int = 0  # … with a 1-hour TTL
    input_audio: int = 0  # prompt tokens of audio
    output_text: int = 0  # completion tokens of text (not reasoning, not audio)
    output_reasoning: int = 0  # completion tokens spent reasoning (billed as output)
    output_audio: int = 0  # completion tokens of audio

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{field.name} must be a whole number >= 0, not {value!r}")

    @classmethod
    def tokens(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
        """The plain text case: prompt (of which ``cached_tokens`` from cache) and completion."""
        for name, value in (
            ("prompt_tokens", prompt_tokens),
            ("completion_tokens", completion_tokens),
            ("cached_tokens", cached_tokens),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a whole number >= 0, not {value!r}")
        if cached_tokens > prompt_tokens:
            raise ValueError("cached_tokens cannot exceed prompt_tokens")
        return cls(
            input_text=prompt_tokens - cached_tokens,
            input_cached=cached_tokens,
            output_text=completion_tokens,
        )

    @property
    def input_total(self) -> int:
        """Every prompt token, whatever its price (what a long-context price tier is chosen by)."""
        return (
            self.input_text
            + self.input_cached
            + self.input_cache_write_5m
            + self.input_cache_write_1h
            + self.input_audio
        )

    @property
    def output_total(self) -> int:
        return self.output_text + self.output_reasoning + self.output_audio

    def details(self) -> dict[str, int]:
        """The non-zero dimensions, for the ledger entry's details."""
        return {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if getattr(self, field.name)
        }


class UnreadableUsage(ValueError):
    """The answer's usage cannot be charged exactly; the message says why. Settlement then
    charges the hold (decision record 0001, point 4)."""


def read(
    usage_format: Format, usage_json: str | None, usage_start_json: str | None, finished: bool
) -> Usage | None:
    """The answer's exact usage, or None when it must be charged its hold.

    ``usage_json`` / ``usage_start_json`` / ``finished`` are what the Lua filter published in
    ``billingproxy.usage``: the raw JSON text of the final usage object, Anthropic's
    ``message_start`` usage, and whether the answer reached its terminal event. None when the
    answer did not finish or the object is not a valid usage object of ``usage_format``.
    """
    try:
        return parse(usage_format, usage_json, usage_start_json, finished)
    except UnreadableUsage:
        return None


def parse(
    usage_format: Format, usage_json: str | None, usage_start_json: str | None, finished: bool
) -> Usage:
    """:func:`read`, raising :class:`UnreadableUsage` with the reason instead of returning None."""
    if finished is not True:
        raise UnreadableUsage("the answer did not reach its terminal event")
    if usage_json is None:
        raise UnreadableUsage("the answer carried no usage object")
    usage = _json_object(usage_json, "usage")
    if usage_format is Format.ANTHROPIC_MESSAGES:
        if usage_start_json is not None:
            usage = _anthropic_stream_merge(_json_object(usage_start_json, "message_start usage"), usage)
        return _anthropic(usage)
    if usage_start_json is not None:
        raise UnreadableUsage(f"a message_start usage in a {usage_format.value} answer")
    if usage_format is Format.OPENAI_CHAT:
        return _openai_chat(usage)
    if usage_format is Format.OPENAI_RESPONSES:
        return _openai_responses(usage)
    if usage_format is Format.OPENAI_EMBEDDINGS:
        return _openai_embeddings(usage)
    raise UnreadableUsage(f"unknown usage format {usage_format!r}")


# --- per format --------------------------------------------------------------------------------


def _openai_chat(usage: Mapping[str, Any]) -> Usage:
    """Chat and legacy completions: ``prompt_tokens`` / ``completion_tokens`` are totals; the
    ``*_details`` split them (cached and audio prompt tokens; reasoning and audio completion
    tokens). Accepted and rejected prediction tokens are output text, billed as such.

    OpenAI counts reasoning inside ``completion_tokens``; Gemini's OpenAI-compatible endpoint
    counts its thinking outside it, and says so in ``total_tokens`` (prompt + completion +
    reasoning). Only that total tells the two apart, so reasoning is taken as extra exactly when
    the total says so; a usage object with neither sum is unreadable (charged the hold)."""
    prompt = _count(usage, "prompt_tokens", required=True)
    completion = _count(usage, "completion_tokens", required=True)
    prompt_details = _details(usage, "prompt_tokens_details")
    completion_details = _details(usage, "completion_tokens_details")
    cached = _count(prompt_details, "cached_tokens")
    input_audio = _count(prompt_details, "audio_tokens")
    reasoning = _count(completion_details, "reasoning_tokens")
    output_audio = _count(completion_details, "audio_tokens")
    total = _count(usage, "total_tokens") if usage.get("total_tokens") is not None else None
    reasoning_outside = reasoning > 0 and total == prompt + completion + reasoning
    if not reasoning_outside:
        _total(usage, prompt + completion)
    inside = output_audio if reasoning_outside else reasoning + output_audio
    return Usage(
        input_text=_rest(prompt, cached + input_audio, "prompt_tokens", "cached and audio tokens"),
        input_cached=cached,
        input_audio=input_audio,
        output_text=_rest(completion, inside, "completion_tokens", "reasoning and audio tokens"),
        output_reasoning=reasoning,
        output_audio=output_audio,
    )


def _openai_responses(usage: Mapping[str, Any]) -> Usage:
    """The Responses API: ``input_tokens`` (of which ``input_tokens_details.cached_tokens``) and
    ``output_tokens`` (of which ``output_tokens_details.reasoning_tokens``)."""
    prompt = _count(usage, "input_tokens", required=True)
    output = _count(usage, "output_tokens", required=True)
    _total(usage, prompt + output)
    cached = _count(_details(usage, "input_tokens_details"), "cached_tokens")
    reasoning = _count(_details(usage, "output_tokens_details"), "reasoning_tokens")
    return Usage(
        input_text=_rest(prompt, cached, "input_tokens", "cached tokens"),
        input_cached=cached,
        output_text=_rest(output, reasoning, "output_tokens", "reasoning tokens"),
        output_reasoning=reasoning,
    )


def _openai_embeddings(usage: Mapping[str, Any]) -> Usage:
    """Embeddings read only input: ``prompt_tokens`` (a ``completion_tokens`` other than 0 would
    be a dimension embeddings have no price for)."""
    prompt = _count(usage, "prompt_tokens", required=True)
    if _count(usage, "completion_tokens"):
        raise UnreadableUsage("an embeddings answer reported completion tokens")
    _total(usage, prompt)
    return Usage(input_text=prompt)


def _anthropic(usage: Mapping[str, Any]) -> Usage:
    """Anthropic: ``input_tokens`` are the uncached ones; cache reads and writes are counted
    beside them, not inside. Writes split by TTL in ``cache_creation`` when given (else all are
    5-minute writes, the API's default). Server tools (web search, web fetch) and service tiers
    other than standard are priced per request or at other rates: no exact price here."""
    input_text = _count(usage, "input_tokens", required=True)
    output = _count(usage, "output_tokens", required=True)
    cache_read = _count(usage, "cache_read_input_tokens")
    cache_write = _count(usage, "cache_creation_input_tokens")
    split = usage.get("cache_creation")
    if split is None:
        write_5m, write_1h = cache_write, 0
    else:
        split = _details(usage, "cache_creation")
        write_5m = _count(split, "ephemeral_5m_input_tokens")
        write_1h = _count(split, "ephemeral_1h_input_tokens")
        if (
            "cache_creation_input_tokens" in usage
            and usage["cache_creation_input_tokens"] is not None
            and write_5m + write_1h != cache_write
        ):
            raise UnreadableUsage("cache_creation does not add up to cache_creation_input_tokens")
    tools = usage.get("server_tool_use")
    if tools is not None:
        tools = _details(usage, "server_tool_use")
        used = {name: _count(tools, name) for name in tools}
        if any(used.values()):
            raise UnreadableUsage(f"server tool requests have no price here: {used}")
    tier = usage.get("service_tier")
    if tier not in (None, "standard"):
        raise UnreadableUsage(f"service tier {tier!r} has no price here")
    return Usage(
        input_text=input_text,
        input_cached=cache_read,
        input_cache_write_5m=write_5m,
        input_cache_write_1h=write_1h,
        output_text=output,
    )


def _anthropic_stream_merge(start: Mapping[str, Any], delta: Mapping[str, Any]) -> dict[str, Any]:
    """A stream's usage: ``message_start``'s, overridden by ``message_delta``'s fields that are
    not null (the delta's counts are cumulative, its ``output_tokens`` the total)."""
    if "output_tokens" not in delta:
        raise UnreadableUsage("message_delta usage without output_tokens")
    merged = dict(start)
    merged.update({name: value for name, value in delta.items() if value is not None})
    return merged


# --- validation --------------------------------------------------------------------------------


def _json_object(text: str, what: str) -> dict[str, Any]:
    if not isinstance(text, str):
        raise UnreadableUsage(f"{what} is not JSON text")
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as error:
        raise UnreadableUsage(f"{what} is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise UnreadableUsage(f"{what} is not an object")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _count(obj: Mapping[str, Any], name: str, *, required: bool = False) -> int:
    """A token count: a whole JSON number >= 0 (not a bool, not 5.0); absent or null is 0
    unless ``required``."""
    value = obj.get(name)
    if value is None:
        if required:
            raise UnreadableUsage(f"{name} is missing")
        return 0
    if not isinstance(value, int) or isinstance(value, bool):
        raise UnreadableUsage(f"{name} is not a whole number: {value!r}")
    if not 0 <= value <= TOKENS_MAX:
        raise UnreadableUsage(f"{name} is out of range: {value}")
    return value


def _details(obj: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = obj.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UnreadableUsage(f"{name} is not an object")
    return value


def _total(usage: Mapping[str, Any], expected: int) -> None:
    """``total_tokens``, when given, must be the sum: a provider that counts tokens outside the
    breakdown (thinking tokens missing from completion_tokens) cannot be priced exactly."""
    if usage.get("total_tokens") is not None and _count(usage, "total_tokens") != expected:
        raise UnreadableUsage(
            f"total_tokens {usage['total_tokens']} is not the sum of its parts ({expected})"
        )


def _rest(total: int, parts: int, name: str, what: str) -> int:
    if parts > total:
        raise UnreadableUsage(f"{what} ({parts}) exceed {name} ({total})")
    return total - parts
