"""What one answer consumed, in disjoint priced dimensions, and how each provider format says it.

Why a type of its own: a provider reports usage in its own shape (OpenAI's ``prompt_tokens`` with
``*_details``, the Responses API's ``input_tokens``, Anthropic's cache reads and writes beside
``input_tokens``), and each shape hides dimensions that cost differently (cache writes cost more
than input, audio tokens 16× text). :class:`Usage` splits an answer's tokens so that every token
is in exactly one dimension, and :mod:`billing.pricing` prices each dimension on its own.

The usage formats name where an answer carries its final usage (docs/security-model.md):

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
        for name, value in (("prompt_tokens", prompt_tokens), ("completion_tokens", completion_tokens),
                            ("cached_tokens", cached_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a whole number >= 0, not {value!r}")
        if cached_tokens > prompt_tokens:
            raise ValueError("cached_tokens cannot exceed prompt_tokens")
        return cls(
            input_text=prompt_tokens - cached_tokens, input_cached=cached_tokens, output_text=completion_tokens
        )

    @property
    def input_total(self) -> int:
        """Every prompt token, whatever its price (what a long-context price tier is chosen by)."""
        return (
            self.input_text + self.input_cached + self.input_cache_write_5m + self.input_cache_write_1h
            + self.input_audio
        )

    @property
    def output_total(self) -> int:
        return self.output_text + self.output_reasoning + self.output_audio

    def details(self) -> dict[str, int]:
        """The non-zero dimensions, for the ledger entry's details."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self) if getattr(self, field.name)}
