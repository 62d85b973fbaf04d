"""billing.endpoints: each admitted endpoint's worst case, read from the field that endpoint reads,
and the refusal of what cannot be metered (issue 10, findings 4 and 6)."""

from __future__ import annotations

import pytest

from billing import endpoints
from billing.usage import Format

LIMIT = 16_384  # the model's output limit in these tests
TABLE = endpoints.EndpointTable()


def worst(path: str, request: dict, limit: int | None = LIMIT) -> endpoints.WorstCase:
    endpoint = TABLE.find("POST", path)
    assert endpoint is not None and endpoint.read is not None
    return endpoint.read(request, limit)


def refused(path: str, request: dict, limit: int | None = LIMIT) -> endpoints.RequestRefused:
    with pytest.raises(endpoints.RequestRefused) as caught:
        worst(path, request, limit)
    return caught.value


# --- the table -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/v1/chat/completions", Format.OPENAI_CHAT),
        ("POST", "/v1/completions", Format.OPENAI_CHAT),
        ("POST", "/v1/embeddings", Format.OPENAI_EMBEDDINGS),
        ("POST", "/v1/responses", Format.OPENAI_RESPONSES),
        ("POST", "/v1/messages", Format.ANTHROPIC_MESSAGES),
        ("POST", "/v1/chat/completions?x=1", Format.OPENAI_CHAT),
    ],
)
def test_metered_endpoints_have_a_usage_format(method: str, path: str, expected: Format) -> None:
    endpoint = TABLE.find(method, path)
    assert endpoint is not None and endpoint.usage_format is expected


@pytest.mark.parametrize(
    "path", ["/v1/models", "/v1/models/gpt-4o-mini", "/v1/models/gemini/gemini-2.5-flash"]
)
def test_listing_models_is_free(path: str) -> None:
    endpoint = TABLE.find("GET", path)
    assert endpoint is not None and endpoint.usage_format is None


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/files"),  # another tenant's files on the shared account
        ("GET", "/v1/chat/completions"),  # stored completions
        ("GET", "/v1/chat/completions/chatcmpl-1"),
        ("GET", "/v1/responses/resp_1"),
        ("POST", "/v1/batches"),  # charged only its creating call
        ("POST", "/v1/files"),
        ("POST", "/v1/images/generations"),
        ("POST", "/v1/audio/speech"),
        ("DELETE", "/v1/models/ft:gpt-4o-mini:acme"),
        ("PUT", "/v1/chat/completions"),
        ("PATCH", "/v1/responses"),
        ("POST", "/v1/chat/completions/extra"),
        ("POST", "/v1/modelsx"),
        ("GET", "/v1/modelsx"),
    ],
)
def test_everything_else_is_not_admitted(method: str, path: str) -> None:
    assert TABLE.find(method, path) is None


def test_the_allow_list_is_configurable() -> None:
    table = endpoints.EndpointTable(["chat_completions"])
    assert table.find("POST", "/v1/chat/completions") is not None
    assert table.find("POST", "/v1/embeddings") is None
    assert table.find("GET", "/v1/models") is None
    with pytest.raises(ValueError, match="images"):
        endpoints.EndpointTable(["images"])


# --- the output field each endpoint reads --------------------------------------------------------


def test_chat_reads_max_completion_tokens_and_max_tokens_whichever_is_larger() -> None:
    assert worst("/v1/chat/completions", {"max_completion_tokens": 10}).output_tokens == 10
    assert worst("/v1/chat/completions", {"max_tokens": 10}).output_tokens == 10
    # A backend may honour either when both are sent: the hold takes the larger.
    assert worst("/v1/chat/completions", {"max_completion_tokens": 1, "max_tokens": 900}).output_tokens == 900
    # A field another endpoint reads is not this one's: refused, never taken for a smaller hold.
    assert refused("/v1/chat/completions", {"max_output_tokens": 1}).param == "max_output_tokens"


def test_chat_multiplies_by_n() -> None:
    case = worst("/v1/chat/completions", {"max_tokens": 100, "n": 10})
    assert (case.output_per_choice, case.choices, case.output_tokens) == (100, 10, 1000)


def test_output_is_capped_by_the_model_limit_and_defaults_to_it() -> None:
    assert worst("/v1/chat/completions", {"max_tokens": 10**9}).output_tokens == LIMIT
    assert worst("/v1/chat/completions", {}).output_tokens == LIMIT
    assert worst("/v1/responses", {}).output_tokens == LIMIT
    assert worst("/v1/completions", {}).output_tokens == LIMIT


def test_responses_reads_max_output_tokens_only() -> None:
    assert worst("/v1/responses", {"max_output_tokens": 50}).output_tokens == 50
    assert refused("/v1/responses", {"max_tokens": 1}).param == "max_tokens"


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/chat/completions", "fallbacks"),  # LiteLLM would serve another model
        ("/v1/chat/completions", "api_base"),
        ("/v1/chat/completions", "mock_response"),
        ("/v1/chat/completions", "extra_body"),
        ("/v1/embeddings", "max_tokens"),
        ("/v1/messages", "n"),
        ("/v1/completions", "messages"),
    ],
)
def test_fields_the_endpoint_does_not_document_are_refused(path: str, field: str) -> None:
    request = {"max_tokens": 1, field: ["x"]} if path == "/v1/messages" else {field: ["x"]}
    error = refused(path, request)
    assert (error.code, error.param) == ("parameter_not_supported", field)


@pytest.mark.parametrize(
    ("path", "request_body", "param"),
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "f"}}]}]},
            "file_id",
        ),
        (
            "/v1/responses",
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "file_id",
        ),
        (
            "/v1/messages",
            {
                "max_tokens": 1,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "document", "source": {"type": "file", "file_id": "f"}}],
                    }
                ],
            },
            "file_id",
        ),
    ],
)
def test_objects_stored_at_the_provider_are_refused(path: str, request_body: dict, param: str) -> None:
    assert refused(path, request_body).param == param


def test_tools_add_the_prompt_the_provider_writes_for_them() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert worst("/v1/chat/completions", {"tools": tools}).prompt_overhead == endpoints.TOOLS_PROMPT_TOKENS
    assert worst("/v1/chat/completions", {}).prompt_overhead == 0
    computer = [
        {"type": "computer_20250124", "name": "computer", "display_width_px": 1, "display_height_px": 1}
    ]
    assert worst("/v1/messages", {"max_tokens": 1, "tools": computer}).prompt_overhead == (
        endpoints.TOOLS_PROMPT_TOKENS + endpoints.PROVIDER_TOOL_PROMPT_TOKENS
    )


def test_completions_multiply_by_prompts_and_best_of() -> None:
    assert worst("/v1/completions", {"prompt": ["a", "b", "c"], "max_tokens": 10, "n": 2}).output_tokens == 60
    assert (
        worst("/v1/completions", {"prompt": "a", "max_tokens": 10, "n": 2, "best_of": 5}).output_tokens == 50
    )
    assert (
        worst("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 10}).output_tokens == 10
    )  # one token list
    assert worst("/v1/completions", {"prompt": [[1], [2]], "max_tokens": 10}).output_tokens == 20


def test_embeddings_have_no_output() -> None:
    case = worst("/v1/embeddings", {"input": "x"})
    assert case.output_tokens == 0 and case.dimensions == {"input_text"}


def test_anthropic_messages_require_max_tokens() -> None:
    assert worst("/v1/messages", {"max_tokens": 100}).output_tokens == 100
    assert refused("/v1/messages", {}).param == "max_tokens"
    assert {"input_cache_write_5m", "input_cache_write_1h"} <= worst(
        "/v1/messages", {"max_tokens": 1}
    ).dimensions


def test_predicted_output_is_added_to_the_output_bound() -> None:
    prediction = {"type": "content", "content": "x" * 100}
    assert worst("/v1/chat/completions", {"max_tokens": 10, "prediction": prediction}).output_tokens > 110


@pytest.mark.parametrize("bad", [True, False, 1.5, "100", -1, 0, [100], {"n": 1}])
@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/chat/completions", "max_tokens"),
        ("/v1/chat/completions", "max_completion_tokens"),
        ("/v1/chat/completions", "n"),
        ("/v1/responses", "max_output_tokens"),
        ("/v1/completions", "best_of"),
        ("/v1/messages", "max_tokens"),
    ],
)
def test_bad_values_are_refused_not_defaulted(path: str, field: str, bad: object) -> None:
    request = {"max_tokens": 10, field: bad} if path == "/v1/messages" else {field: bad}
    if path == "/v1/completions" and field == "best_of":
        request["prompt"] = "x"
    error = refused(path, request)
    assert error.code == "invalid_parameter" and error.param == field


def test_n_above_the_provider_cap_is_refused() -> None:
    assert refused("/v1/chat/completions", {"n": 129}).param == "n"


@pytest.mark.parametrize("stream", ["true", 1, "yes"])
def test_stream_must_be_a_boolean(stream: object) -> None:
    assert refused("/v1/chat/completions", {"stream": stream}).param == "stream"


def test_only_openai_streams_are_asked_for_usage() -> None:
    assert worst("/v1/chat/completions", {"stream": True}).stream_usage
    assert worst("/v1/completions", {"stream": True}).stream_usage
    assert not worst("/v1/chat/completions", {"stream": False}).stream_usage
    assert not worst("/v1/responses", {"stream": True}).stream_usage


# --- what cannot be metered is refused -----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "request_body", "param"),
    [
        ("/v1/chat/completions", {"service_tier": "priority"}, "service_tier"),
        ("/v1/chat/completions", {"service_tier": "flex"}, "service_tier"),
        ("/v1/chat/completions", {"web_search_options": {}}, "web_search_options"),
        ("/v1/chat/completions", {"tools": [{"type": "web_search_preview"}]}, "tools"),
        ("/v1/responses", {"background": True}, "background"),
        ("/v1/responses", {"previous_response_id": "resp_1"}, "previous_response_id"),
        ("/v1/responses", {"conversation": "conv_1"}, "conversation"),
        ("/v1/responses", {"prompt": {"id": "pmpt_1"}}, "prompt"),
        ("/v1/responses", {"tools": [{"type": "web_search"}]}, "tools"),
        ("/v1/responses", {"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools"),
        ("/v1/responses", {"tools": [{"type": "code_interpreter"}]}, "tools"),
        ("/v1/responses", {"input": [{"type": "item_reference", "id": "msg_1"}]}, "input"),
        (
            "/v1/messages",
            {"max_tokens": 1, "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
            "tools",
        ),
        ("/v1/messages", {"max_tokens": 1, "mcp_servers": [{"url": "https://x"}]}, "mcp_servers"),
    ],
)
def test_unmetered_features_are_refused(path: str, request_body: dict, param: str) -> None:
    assert refused(path, request_body).param == param


def test_default_service_tiers_and_function_tools_pass() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert worst("/v1/chat/completions", {"service_tier": "auto", "tools": tools}).output_tokens == LIMIT
    assert worst("/v1/messages", {"max_tokens": 1, "tools": [{"name": "f", "input_schema": {}}]})
    assert worst("/v1/messages", {"max_tokens": 1, "tools": [{"type": "bash_20250124", "name": "bash"}]})


# --- the prompt bound -----------------------------------------------------------------------------


def test_text_prompts_are_bounded_by_the_body() -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert worst("/v1/chat/completions", {"messages": messages}).prompt_in_body
    assert worst("/v1/responses", {"input": "hi"}).prompt_in_body


@pytest.mark.parametrize(
    ("path", "request_body"),
    [
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}],
                    }
                ]
            },
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_data": "x"}}]}]},
        ),
        (
            "/v1/responses",
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x"}]}]},
        ),
        # An image nested in a tool result still costs its pixels, not its bytes.
        (
            "/v1/messages",
            {
                "max_tokens": 1,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "content": [{"type": "image", "source": {"type": "url", "url": "https://x"}}],
                            }
                        ],
                    }
                ],
            },
        ),
    ],
)
def test_images_and_files_make_the_context_window_the_bound(path: str, request_body: dict) -> None:
    assert not worst(path, request_body).prompt_in_body


def test_audio_input_and_output_add_their_dimensions() -> None:
    messages = [
        {
            "role": "user",
            "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}],
        }
    ]
    case = worst("/v1/chat/completions", {"messages": messages, "modalities": ["text", "audio"]})
    assert {"input_audio", "output_audio"} <= case.dimensions
    assert "input_audio" not in worst("/v1/chat/completions", {"messages": []}).dimensions


# --- a model whose output limit the price map does not know --------------------------------------

# Without a known limit there is nothing to cap by: a hold capped by a guess below what the backend
# may produce would be the most the answer is ever charged (a settlement never exceeds its hold).


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/chat/completions", "max_tokens"),
        ("/v1/chat/completions", "max_completion_tokens"),
        ("/v1/completions", "max_tokens"),
        ("/v1/responses", "max_output_tokens"),
        ("/v1/messages", "max_tokens"),
    ],
)
def test_without_a_known_limit_the_hold_covers_all_the_request_asks_for(path: str, field: str) -> None:
    request = {field: 100_000, "messages": []} if path == "/v1/messages" else {field: 100_000}
    assert worst(path, request, limit=None).output_tokens == 100_000


@pytest.mark.parametrize(
    ("path", "param"),
    [
        ("/v1/chat/completions", "max_completion_tokens"),
        ("/v1/completions", "max_tokens"),
        ("/v1/responses", "max_output_tokens"),
    ],
)
def test_without_a_known_limit_a_request_must_bound_its_output(path: str, param: str) -> None:
    unbounded = worst(path, {}, limit=None)
    assert (unbounded.output_unbounded, unbounded.output_tokens) == (param, 0)
    assert worst(path, {}).output_unbounded is None  # a known limit bounds it
