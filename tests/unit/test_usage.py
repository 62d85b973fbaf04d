"""billing.usage.read: the provider's final usage object, parsed as JSON and mapped to disjoint
priced dimensions — or None (charge the hold) when the answer did not finish or the object is
not a valid usage object of its format. The shapes are OpenAI's and Anthropic's documented ones."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from billing.usage import TOKENS_MAX, Format, UnreadableUsage, Usage, parse, read

CHAT, RESPONSES, EMBEDDINGS, ANTHROPIC = (
    Format.OPENAI_CHAT,
    Format.OPENAI_RESPONSES,
    Format.OPENAI_EMBEDDINGS,
    Format.ANTHROPIC_MESSAGES,
)


def text(obj: Any) -> str:
    return json.dumps(obj)


# --- the documented shapes --------------------------------------------------------------------


def test_gemini_counts_thinking_outside_completion_tokens_and_says_so_in_the_total() -> None:
    """Gemini's OpenAI-compatible usage: completion_tokens without the thoughts, total_tokens with
    them. Every thought token is billed, as reasoning, on top of the answer."""
    gemini = (
        '{"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 67, '
        '"completion_tokens_details": {"reasoning_tokens": 60}}'
    )
    assert read(CHAT, gemini, None, True) == Usage(input_text=5, output_text=2, output_reasoning=60)
    # OpenAI's: reasoning inside completion_tokens, the total without it.
    openai = (
        '{"prompt_tokens": 5, "completion_tokens": 62, "total_tokens": 67, '
        '"completion_tokens_details": {"reasoning_tokens": 60}}'
    )
    assert read(CHAT, openai, None, True) == Usage(input_text=5, output_text=2, output_reasoning=60)


def test_openai_chat_every_dimension() -> None:
    # OpenAI's chat.completion usage, every detail present (audio model, reasoning model).
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 500,
        "total_tokens": 1500,
        "prompt_tokens_details": {"cached_tokens": 300, "audio_tokens": 100},
        "completion_tokens_details": {
            "reasoning_tokens": 200,
            "audio_tokens": 50,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 7,
        },
    }
    assert read(CHAT, text(usage), None, True) == Usage(
        input_text=600,
        input_cached=300,
        input_audio=100,
        output_text=250,
        output_reasoning=200,
        output_audio=50,
    )


def test_openai_chat_plain_and_legacy_completions() -> None:
    # Legacy /v1/completions and older backends: no details at all; LiteLLM sends nulls.
    assert read(
        CHAT, '{"prompt_tokens": 9, "completion_tokens": 16, "total_tokens": 25}', None, True
    ) == Usage(input_text=9, output_text=16)
    nulls = {
        "prompt_tokens": 9,
        "completion_tokens": 16,
        "prompt_tokens_details": None,
        "completion_tokens_details": {"reasoning_tokens": None, "audio_tokens": None},
    }
    assert read(CHAT, text(nulls), None, True) == Usage(input_text=9, output_text=16)


def test_openai_responses() -> None:
    usage = {
        "input_tokens": 328,
        "input_tokens_details": {"cached_tokens": 28},
        "output_tokens": 52,
        "output_tokens_details": {"reasoning_tokens": 12},
        "total_tokens": 380,
    }
    assert read(RESPONSES, text(usage), None, True) == Usage(
        input_text=300, input_cached=28, output_text=40, output_reasoning=12
    )


def test_openai_embeddings() -> None:
    assert read(EMBEDDINGS, '{"prompt_tokens": 8, "total_tokens": 8}', None, True) == Usage(input_text=8)
    assert read(
        EMBEDDINGS, '{"prompt_tokens": 8, "completion_tokens": 0, "total_tokens": 8}', None, True
    ) == Usage(input_text=8)


def test_anthropic_json_with_cache_reads_and_writes_by_ttl() -> None:
    usage = {
        "input_tokens": 50,
        "cache_creation_input_tokens": 300,
        "cache_read_input_tokens": 1000,
        "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
        "output_tokens": 70,
        "server_tool_use": {"web_search_requests": 0},
        "service_tier": "standard",
    }
    assert read(ANTHROPIC, text(usage), None, True) == Usage(
        input_text=50, input_cached=1000, input_cache_write_5m=100, input_cache_write_1h=200, output_text=70
    )


def test_anthropic_cache_writes_without_a_split_are_five_minute_writes() -> None:
    usage = {
        "input_tokens": 5,
        "cache_creation_input_tokens": 40,
        "cache_read_input_tokens": None,
        "output_tokens": 3,
    }
    assert read(ANTHROPIC, text(usage), None, True) == Usage(
        input_text=5, input_cache_write_5m=40, output_text=3
    )


def test_anthropic_stream_merges_message_start_with_message_delta() -> None:
    # Anthropic's documented stream: message_start carries the input side and output_tokens 1;
    # message_delta's output_tokens is the cumulative total.
    start = {
        "input_tokens": 25,
        "cache_creation_input_tokens": 10,
        "cache_read_input_tokens": 30,
        "output_tokens": 1,
    }
    assert read(ANTHROPIC, '{"output_tokens": 15}', text(start), True) == Usage(
        input_text=25, input_cached=30, input_cache_write_5m=10, output_text=15
    )
    # Newer deltas repeat the input side, cumulatively (and may be null): the delta wins.
    delta = {
        "input_tokens": 26,
        "cache_creation_input_tokens": None,
        "cache_read_input_tokens": 31,
        "output_tokens": 15,
    }
    assert read(ANTHROPIC, text(delta), text(start), True) == Usage(
        input_text=26, input_cached=31, input_cache_write_5m=10, output_text=15
    )


# --- what is charged the hold ------------------------------------------------------------------


@pytest.mark.parametrize("usage_format", list(Format))
def test_an_unfinished_answer_is_never_read(usage_format: Format) -> None:
    complete = {"prompt_tokens": 1, "completion_tokens": 1, "input_tokens": 1, "output_tokens": 1}
    assert read(usage_format, text(complete), None, False) is None
    assert read(usage_format, None, None, True) is None


@pytest.mark.parametrize(
    ("usage_format", "usage", "why"),
    [
        (CHAT, "not json", "not JSON"),
        (CHAT, "null", "not an object"),
        (CHAT, "[1, 2]", "not an object"),
        (CHAT, "", "not JSON"),
        (CHAT, '{"prompt_tokens": 1}', "completion_tokens is missing"),
        (CHAT, '{"completion_tokens": 1}', "prompt_tokens is missing"),
        (CHAT, '{"prompt_tokens": true, "completion_tokens": 1}', "not a whole number"),
        (CHAT, '{"prompt_tokens": 1.0, "completion_tokens": 1}', "not a whole number"),
        (CHAT, '{"prompt_tokens": "1", "completion_tokens": 1}', "not a whole number"),
        (CHAT, '{"prompt_tokens": -1, "completion_tokens": 1}', "out of range"),
        (CHAT, '{"prompt_tokens": NaN, "completion_tokens": 1}', "not JSON"),
        (CHAT, '{"prompt_tokens": 1e3, "completion_tokens": 1}', "not a whole number"),
        (CHAT, f'{{"prompt_tokens": {TOKENS_MAX + 1}, "completion_tokens": 1}}', "out of range"),
        (
            CHAT,
            '{"prompt_tokens": 5, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 6}}',
            "exceed prompt_tokens",
        ),
        (
            CHAT,
            '{"prompt_tokens": 5, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 3, '
            '"audio_tokens": 3}}',
            "exceed prompt_tokens",
        ),
        (
            CHAT,
            '{"prompt_tokens": 5, "completion_tokens": 0, "completion_tokens_details": {"reasoning_tokens": '
            "60}}",
            "exceed completion_tokens",
        ),  # thinking left out of completion_tokens, and no total to say so
        (
            CHAT,
            '{"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 90, '
            '"completion_tokens_details": {"reasoning_tokens": 60}}',
            "not the sum",
        ),  # neither sum
        (CHAT, '{"prompt_tokens": 21, "completion_tokens": 0, "total_tokens": 81}', "not the sum"),
        (CHAT, '{"prompt_tokens": 5, "completion_tokens": 1, "prompt_tokens_details": 3}', "not an object"),
        (RESPONSES, '{"prompt_tokens": 5, "completion_tokens": 1}', "input_tokens is missing"),
        (
            RESPONSES,
            '{"input_tokens": 5, "output_tokens": 1, "input_tokens_details": {"cached_tokens": 9}}',
            "exceed input_tokens",
        ),
        (
            RESPONSES,
            '{"input_tokens": 5, "output_tokens": 1, "output_tokens_details": {"reasoning_tokens": 2}}',
            "exceed output_tokens",
        ),
        (EMBEDDINGS, '{"input_tokens": 5}', "prompt_tokens is missing"),
        (EMBEDDINGS, '{"prompt_tokens": 5, "completion_tokens": 3}', "completion tokens"),
        (EMBEDDINGS, '{"prompt_tokens": 5, "total_tokens": 4}', "not the sum"),
        (ANTHROPIC, '{"output_tokens": 5}', "input_tokens is missing"),
        (
            ANTHROPIC,
            '{"input_tokens": 5, "output_tokens": 1, "cache_creation_input_tokens": 10, '
            '"cache_creation": {"ephemeral_5m_input_tokens": 3, "ephemeral_1h_input_tokens": 3}}',
            "add up",
        ),
        (
            ANTHROPIC,
            '{"input_tokens": 5, "output_tokens": 1, "server_tool_use": {"web_search_requests": 2}}',
            "server tool",
        ),
        (ANTHROPIC, '{"input_tokens": 5, "output_tokens": 1, "service_tier": "priority"}', "service tier"),
    ],
)
def test_an_invalid_usage_object_is_charged_the_hold(usage_format: Format, usage: str, why: str) -> None:
    assert read(usage_format, usage, None, True) is None
    with pytest.raises(UnreadableUsage, match=why):
        parse(usage_format, usage, None, True)


def test_a_message_start_usage_belongs_to_anthropic_alone() -> None:
    assert read(CHAT, '{"prompt_tokens": 1, "completion_tokens": 1}', '{"input_tokens": 1}', True) is None


def test_an_anthropic_stream_whose_delta_lacks_output_tokens() -> None:
    assert read(ANTHROPIC, '{"input_tokens": 3}', '{"input_tokens": 3, "output_tokens": 1}', True) is None
    assert read(ANTHROPIC, '{"output_tokens": 3}', "null", True) is None


# --- properties --------------------------------------------------------------------------------

counts = st.integers(min_value=0, max_value=10**9)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=20,
)
usage_keys = st.sampled_from(
    [
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "input_tokens",
        "output_tokens",
        "prompt_tokens_details",
        "completion_tokens_details",
        "input_tokens_details",
        "output_tokens_details",
        "cached_tokens",
        "audio_tokens",
        "reasoning_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
        "cache_creation",
        "ephemeral_5m_input_tokens",
        "server_tool_use",
    ]
)
usage_like = st.recursive(
    st.none() | st.booleans() | counts | st.integers() | st.floats() | st.text(max_size=4),
    lambda children: st.dictionaries(usage_keys, children, max_size=6),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None, database=None)
@given(
    usage_format=st.sampled_from(list(Format)),
    usage=st.one_of(json_values, usage_like),
    start=st.none() | usage_like,
    finished=st.booleans(),
)
def test_read_never_raises_and_never_invents_tokens(
    usage_format: Format, usage: Any, start: Any, finished: bool
) -> None:
    """Whatever the object says, read() returns None or a Usage whose totals are the provider's."""
    start_text = None if start is None else json.dumps(start)
    result = read(usage_format, json.dumps(usage), start_text, finished)
    if result is None:
        return
    assert finished
    merged = {**(start or {}), **{k: v for k, v in usage.items() if v is not None}} if start else usage
    if usage_format is Format.OPENAI_CHAT:
        assert (result.input_total, result.output_total) == (
            merged["prompt_tokens"],
            merged["completion_tokens"],
        )
    elif usage_format is Format.OPENAI_RESPONSES:
        assert (result.input_total, result.output_total) == (merged["input_tokens"], merged["output_tokens"])
    elif usage_format is Format.OPENAI_EMBEDDINGS:
        assert (result.input_total, result.output_total) == (merged["prompt_tokens"], 0)
    else:
        written = merged.get("cache_creation_input_tokens") or 0
        if merged.get("cache_creation"):
            split = merged["cache_creation"]
            written = (split.get("ephemeral_5m_input_tokens") or 0) + (
                split.get("ephemeral_1h_input_tokens") or 0
            )
        assert (
            result.input_total
            == merged["input_tokens"] + (merged.get("cache_read_input_tokens") or 0) + written
        )
        assert result.output_total == merged["output_tokens"]


@settings(max_examples=200, deadline=None, database=None)
@given(prompt=counts, completion=counts, cached=counts, audio_in=counts, reasoning=counts, audio_out=counts)
def test_openai_chat_dimensions_are_disjoint(
    prompt, completion, cached, audio_in, reasoning, audio_out
) -> None:
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": audio_in},
        "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": audio_out},
    }
    result = read(CHAT, text(usage), None, True)
    consistent = cached + audio_in <= prompt and reasoning + audio_out <= completion
    assert (result is not None) == consistent
    if result is not None:
        assert sum(result.details().values()) == prompt + completion
        assert (result.input_cached, result.input_audio, result.output_reasoning, result.output_audio) == (
            cached,
            audio_in,
            reasoning,
            audio_out,
        )
