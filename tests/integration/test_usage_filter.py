"""The Lua usage filter, run for real: aiohttp client → real Envoy (ext_authz + Lua) → demo backend.

Envoy runs the production filters in front of the demo backend (tests/integration/usage_gateway.py:
a fake Check tells the filter each answer's usage format, as check.py does, and a JSON access log
prints what the filter published). The demo answers in every format the gateway admits; each is
read from its documented place only, across chunk boundaries, with the client's text echoed in it,
and an answer cut before its terminal event is never read. The same stack also checks the
gateway behaviour billing relies on (Envoy-minted request ids, path normalization, a verified
https backend) and EnvoyProcess's failure messages.
"""

from __future__ import annotations

import functools
import json
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from authz_sidecar import envoy_config
from billing.usage import Usage
from billingproxy.devstack import demo_backend, envoy_process
from usage_gateway import Gateway, free_port, loopback_settings, read_entry, usage_gateway

pytestmark = pytest.mark.integration

# An answer with nothing read leaves the usage namespace unset: the JSON log shows null.
NO_USAGE = None
ECHO = (
    '"usage": {"prompt_tokens": 0, "completion_tokens": 0, "input_tokens": 0, "output_tokens": 0}'
    '\n\ndata: [DONE]\n\nevent: message_stop\ndata: {"type":"message_stop"}\r\n\r\n\\'
)
ECHO_WORDS = len(ECHO.split())


@pytest.fixture(scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    runner, backend_port = await demo_backend.serve("127.0.0.1", 0)
    try:
        async with usage_gateway(
            tmp_path_factory.mktemp("usage_filter"), f"http://127.0.0.1:{backend_port}"
        ) as gw:
            yield gw
    finally:
        await runner.cleanup()


def chat_body(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


def sse_payloads(text: str) -> list[Any]:
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


async def read_back(
    gateway: Gateway, response: aiohttp.ClientResponse
) -> tuple[dict[str, Any] | None, Usage | None]:
    """(the usage metadata Envoy logged, what settlement reads from it)."""
    entry = await gateway.log_entry(response.headers["x-request-id"])
    return entry["usage"], read_entry(entry)


# --- every format, read from its documented place ---------------------------------------------------


async def test_chat_json_with_cached_tokens_and_n_choices(gateway: Gateway) -> None:
    # 4 words + 3 for the message; max_tokens 5 per choice, 3 choices.
    response, text = await gateway.chat(
        chat_body("one two three four", max_tokens=5, n=3), **{"x-demo-cached-tokens": "2"}
    )
    assert response.status == 200, text
    answer = json.loads(text)
    assert len(answer["choices"]) == 3 and answer["usage"]["completion_tokens"] == 15
    published, charged = await read_back(gateway, response)
    assert published == {"usage": json.dumps(answer["usage"]), "finished": True}
    assert charged == Usage(input_text=5, input_cached=2, output_text=15)


async def test_chat_json_with_audio_and_reasoning(gateway: Gateway) -> None:
    body = {
        "model": "gpt-4o-mini",
        "max_tokens": 4,
        "modalities": ["text", "audio"],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "listen"},
                    {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
                ],
            }
        ],
    }
    response, text = await gateway.chat(body, **{"x-demo-reasoning-tokens": "6"})
    assert response.status == 200, text
    _, charged = await read_back(gateway, response)
    # 1 word + 3 + 10 audio; 4 text + 8 audio + 6 reasoning.
    assert charged == Usage(input_text=4, input_audio=10, output_text=4, output_audio=8, output_reasoning=6)


@pytest.mark.parametrize(
    "stream_options",
    [
        pytest.param("absent", id="absent"),
        pytest.param({"include_usage": False}, id="include_usage-false"),
        pytest.param({}, id="empty-object"),
        pytest.param({"other": 1}, id="other-member"),
        pytest.param(None, id="null"),
        pytest.param({"include_usage": True}, id="already-true"),
    ],
)
async def test_chat_stream_is_asked_for_usage_and_read_from_its_final_chunk(
    gateway: Gateway, stream_options: Any
) -> None:
    body = chat_body("a b c d e f", max_tokens=3, stream=True)
    if stream_options != "absent":
        body["stream_options"] = stream_options
    response, text = await gateway.chat(body)
    assert response.status == 200, text
    assert response.headers["content-type"].startswith("text/event-stream")

    sent = (await gateway.backend_saw())["body"]
    expected_options = {**(stream_options if isinstance(stream_options, dict) else {}), "include_usage": True}
    assert sent == {**body, "stream_options": expected_options}

    payloads = sse_payloads(text)
    content = "".join(p["choices"][0]["delta"].get("content", "") for p in payloads if p["choices"])
    assert content == "token token token"
    assert all(p["usage"] is None for p in payloads[:-1])
    published, charged = await read_back(gateway, response)
    assert published == {"usage": json.dumps(payloads[-1]["usage"]), "finished": True}
    assert charged == Usage(input_text=9, output_text=3)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_legacy_completions(gateway: Gateway, stream: bool) -> None:
    body = {
        "model": "gpt-3.5-turbo-instruct",
        "prompt": ["one two", "three"],
        "max_tokens": 4,
        "n": 2,
        "stream": stream,
    }
    response, text = await gateway.post("/v1/completions", body)
    assert response.status == 200, text
    # 3 words; 2 prompts × n 2 × 4 tokens.
    assert (await read_back(gateway, response))[1] == Usage(input_text=3, output_text=16)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_responses_api_echoing_the_clients_instructions_tools_and_metadata(
    gateway: Gateway, stream: bool
) -> None:
    # The response object carries the request's instructions, tools and metadata as given, with
    # numbers where a pattern would look; only response.usage of the final event counts.
    fake = {"usage": {"input_tokens": 0, "output_tokens": 0}, "input_tokens": 0, "output_tokens": 0}
    body = {
        "model": "gpt-4o-mini",
        "instructions": fake,
        "input": ECHO,
        "max_output_tokens": 7,
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object", **fake}}],
        "metadata": {"usage": ECHO},
        "stream": stream,
    }
    response, text = await gateway.post(
        "/v1/responses", body, **{"x-demo-cached-tokens": "3", "x-demo-reply": "echo"}
    )
    assert response.status == 200, text
    if stream:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert '"usage": null' in text and '"input_tokens": 0' in text
        assert (await gateway.backend_saw())["body"] == body  # no stream_options: this API rejects it
    published, charged = await read_back(gateway, response)
    assert published["finished"] is True
    # The instructions are an object here, so not counted: the input is ECHO_WORDS + 3, 3 of them cached.
    assert charged == Usage(input_text=ECHO_WORDS, input_cached=3, output_text=7)


async def test_embeddings(gateway: Gateway) -> None:
    response, text = await gateway.post(
        "/v1/embeddings", {"model": "demo-model", "input": ["one two", "three"]}
    )
    assert response.status == 200, text
    assert (await read_back(gateway, response))[1] == Usage(input_text=3)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_anthropic_messages_with_cache_reads_and_writes(gateway: Gateway, stream: bool) -> None:
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 9,
        "system": "be brief",
        "messages": [{"role": "user", "content": [{"type": "text", "text": ECHO}]}],
        "stream": stream,
    }
    headers = {
        "x-demo-cached-tokens": "4",
        "x-demo-cache-write-tokens": "5",
        "x-demo-cache-write-1h-tokens": "6",
        "x-demo-reply": "echo",
    }
    response, text = await gateway.post("/v1/messages", body, **headers)
    assert response.status == 200, text
    published, charged = await read_back(gateway, response)
    if stream:
        assert set(published) == {"usage", "usage_start", "finished"}
        assert json.loads(published["usage"]) == {"output_tokens": 9}  # the classic delta: output only
    prompt = ECHO_WORDS + 3 + 2 + 3
    assert charged == Usage(
        input_text=prompt - 15, input_cached=4, input_cache_write_5m=5, input_cache_write_1h=6, output_text=9
    )


async def test_a_request_without_a_usage_format_is_not_read(gateway: Gateway) -> None:
    async with gateway.session.get(f"{gateway.url}/v1/models") as response:
        assert response.status == 200
    assert (await gateway.log_entry(response.headers["x-request-id"]))["usage"] == NO_USAGE


# --- chunk boundaries, echoes, cuts ----------------------------------------------------------------

ANSWERS = [
    pytest.param(
        "/v1/chat/completions",
        chat_body(ECHO, max_tokens=5, metadata={"usage": {"prompt_tokens": 0}}),
        Usage(input_text=ECHO_WORDS + 3, output_text=5),
        id="chat-json",
    ),
    pytest.param(
        "/v1/chat/completions",
        chat_body(ECHO, max_tokens=5, stream=True, n=2),
        Usage(input_text=ECHO_WORDS + 3, output_text=10),
        id="chat-sse",
    ),
    pytest.param(
        "/v1/responses",
        {
            "model": "gpt-4o-mini",
            "input": ECHO,
            "max_output_tokens": 5,
            "stream": True,
            "instructions": {"usage": {"input_tokens": 0}},
        },
        Usage(input_text=ECHO_WORDS + 3, output_text=5),
        id="responses-sse",
    ),
    pytest.param(
        "/v1/messages",
        {
            "model": "claude-sonnet-4-5",
            "max_tokens": 5,
            "stream": True,
            "messages": [{"role": "user", "content": ECHO}],
        },
        Usage(input_text=ECHO_WORDS + 3, output_text=5),
        id="messages-sse",
    ),
    pytest.param(
        "/v1/messages",
        {"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": ECHO}]},
        Usage(input_text=ECHO_WORDS + 3, output_text=5),
        id="messages-json",
    ),
]


@pytest.mark.parametrize(("path", "body", "expected"), ANSWERS)
async def test_answers_in_small_pieces_with_the_clients_text_echoed(
    gateway: Gateway, path: str, body: dict[str, Any], expected: Usage
) -> None:
    # 5-byte pieces cut keys, strings, escapes, numbers and line ends in two; the reply echoes
    # text that spells usage, [DONE] and message_stop. (Arbitrary boundaries, echoes and cuts:
    # tests/integration/test_usage_properties.py.)
    response, text = await gateway.post(path, body, **{"x-demo-reply": "echo", "x-demo-chunk-bytes": "5"})
    assert response.status == 200, text
    assert json.dumps(ECHO)[1:-1] in text
    assert (await read_back(gateway, response))[1] == expected


CUT_ANSWERS = [
    # (path, body, cut before, whether the usage object was complete before the cut)
    pytest.param(
        "/v1/chat/completions", chat_body("hi", max_tokens=4), '"system_fingerprint"', id="chat-json-closing"
    ),
    pytest.param(
        "/v1/chat/completions",
        chat_body("hi", max_tokens=4),
        '"completion_tokens_details"',
        id="chat-json-usage",
    ),
    pytest.param(
        "/v1/chat/completions", chat_body("hi", max_tokens=4, stream=True), "data: [DONE]", id="chat-sse-done"
    ),
    pytest.param(
        "/v1/chat/completions",
        chat_body("hi", max_tokens=4, stream=True),
        '"choices": [], "usage"',
        id="chat-sse-usage",
    ),
    pytest.param(
        "/v1/completions",
        {"model": "m", "prompt": "hi", "max_tokens": 4, "stream": True},
        "data: [DONE]",
        id="completions-sse-done",
    ),
    pytest.param(
        "/v1/responses",
        {"model": "m", "input": "hi", "max_output_tokens": 4, "stream": True},
        "event: response.completed",
        id="responses-sse-completed",
    ),
    pytest.param(
        "/v1/responses",
        {"model": "m", "input": "hi", "max_output_tokens": 4, "stream": True},
        '"type": "response.completed"',
        id="responses-sse-inside-completed",
    ),
    pytest.param(
        "/v1/responses", {"model": "m", "input": "hi", "max_output_tokens": 4}, '"user"', id="responses-json"
    ),
    pytest.param("/v1/embeddings", {"model": "m", "input": "hi"}, '"total_tokens"', id="embeddings"),
    pytest.param(
        "/v1/messages",
        {"model": "m", "max_tokens": 4, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        "event: message_stop",
        id="messages-sse-stop",
    ),
    pytest.param(
        "/v1/messages",
        {"model": "m", "max_tokens": 4, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        "event: message_delta",
        id="messages-sse-delta",
    ),
    pytest.param(
        "/v1/messages",
        {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
        '"service_tier"',
        id="messages-json",
    ),
]


@pytest.mark.parametrize(("path", "body", "cut"), CUT_ANSWERS)
@pytest.mark.parametrize("mode", ["close", "reset"])
async def test_an_answer_cut_before_its_terminal_event_is_never_read(
    gateway: Gateway, path: str, body: dict[str, Any], cut: str, mode: str
) -> None:
    headers = {"content-type": "application/json", "x-demo-cut-before": cut, "x-demo-cut-mode": mode}
    async with gateway.session.post(
        f"{gateway.url}{path}", data=json.dumps(body).encode(), headers=headers
    ) as response:
        assert response.status == 200
        if mode == "reset":
            # Envoy ends the request at the backend's abort, and closes the client's connection
            # after its delayed-close timeout (1 s): the log entry is not waiting for that.
            entry = await gateway.log_entry(response.headers["x-request-id"])
            assert entry["flags"] == "UPE", entry  # upstream protocol error: the answer broke off
        else:
            await response.read()
            entry = await gateway.log_entry(response.headers["x-request-id"])
    assert (entry["usage"] or {}).get("finished") is not True, entry
    assert read_entry(entry) is None


async def test_a_usage_object_larger_than_the_filter_keeps_is_unreadable(gateway: Gateway) -> None:
    huge = {"prompt_tokens": 1, "completion_tokens": 1, "padding": "x" * 20_000}
    response, text = await gateway.chat(chat_body("hi"), **{"x-demo-usage": json.dumps(huge)})
    assert response.status == 200, text
    published, charged = await read_back(gateway, response)
    assert published == {"usage": "", "finished": True}
    assert charged is None


@pytest.mark.parametrize(
    "reported",
    [
        {"prompt_tokens": 5, "completion_tokens": -1},
        {"prompt_tokens": 5, "completion_tokens": 1.5},
        {"prompt_tokens": 5},
        None,
    ],
    ids=["negative", "float", "missing", "null"],
)
async def test_an_invalid_usage_object_is_published_as_given_and_charged_the_hold(
    gateway: Gateway, reported
) -> None:
    response, text = await gateway.chat(chat_body("hi"), **{"x-demo-usage": json.dumps(reported)})
    assert response.status == 200, text
    published, charged = await read_back(gateway, response)
    assert published == {"usage": json.dumps(reported), "finished": True}
    assert charged is None


# --- the request side --------------------------------------------------------------------------------


async def test_chunked_request_is_rewritten(gateway: Gateway) -> None:
    # No content-length from the client: setBytes() must leave a framing the backend can read.
    payload = json.dumps(chat_body("one two", max_tokens=2, stream=True)).encode()

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 10):
            yield payload[start : start + 10]

    headers = {"content-type": "application/json"}
    async with gateway.session.post(
        f"{gateway.url}/v1/chat/completions", data=pieces(), headers=headers
    ) as response:
        assert response.status == 200, await response.text()
    assert (await gateway.backend_saw())["body"]["stream_options"] == {"include_usage": True}
    assert (await read_back(gateway, response))[1] == Usage(input_text=5, output_text=2)


async def test_stream_key_spelled_with_an_escape_is_still_asked_for_usage(gateway: Gateway) -> None:
    # "str\u0065am" is "stream" to a JSON parser (the Check's too).
    raw = (
        '{"model": "gpt-4o-mini", "max_tokens": 2, "str\\u0065am": true, '
        '"messages": [{"role": "user", "content": "one two"}]}'
    )
    response, text = await gateway.post("/v1/chat/completions", raw.encode())
    assert response.status == 200, text
    assert (await gateway.backend_saw())["body"]["stream_options"] == {"include_usage": True}
    assert (await read_back(gateway, response))[1] == Usage(input_text=5, output_text=2)


async def test_request_not_streamed_is_left_alone(gateway: Gateway) -> None:
    # "stream": true below the top level is not a stream (OpenAI answers 400 to stream_options
    # without streaming).
    body = chat_body("hello", stream=False, metadata={"stream": True}, tools=[{"stream": True}])
    response, text = await gateway.chat(body)
    assert response.status == 200, text
    assert (await gateway.backend_saw())["body"] == body


@pytest.mark.parametrize("options", [5, "yes", [True], True])
async def test_a_stream_that_cannot_be_asked_for_usage_is_refused_at_the_gateway(
    gateway: Gateway, options: Any
) -> None:
    before = await gateway.backend_saw()
    response, text = await gateway.chat(chat_body("hello", stream=True, stream_options=options))
    assert response.status == 400, text
    assert json.loads(text)["error"]["code"] == "invalid_stream_options"
    assert await gateway.backend_saw() == before, "the backend was called"


async def test_large_streamed_request_is_rewritten(gateway: Gateway) -> None:
    # 1.4 MB, above Envoy's default 1 MiB buffer: the listener limit follows request_body_bytes_max.
    words = 700_000
    response, text = await gateway.chat(chat_body("w " * words, max_tokens=1, stream=True))
    assert response.status == 200, text[:300]
    assert (await read_back(gateway, response))[1] == Usage(input_text=words + 3, output_text=1)


@pytest.mark.parametrize("status", [400, 429, 500])
async def test_error_answer_has_no_usage(gateway: Gateway, status: int) -> None:
    response, text = await gateway.chat(chat_body("hello", max_tokens=5), **{"x-demo-status": str(status)})
    assert response.status == status
    assert json.loads(text)["error"]["code"]
    assert await gateway.usage(response.headers["x-request-id"]) == NO_USAGE


# --- gateway behaviour billing relies on -----------------------------------------------------------


async def test_client_cannot_choose_the_request_id(gateway: Gateway) -> None:
    response, _ = await gateway.chat(chat_body("hi"), **{"x-request-id": "chosen-by-client"})
    minted = response.headers["x-request-id"]
    assert minted != "chosen-by-client"
    saw = await gateway.backend_saw()
    assert saw["headers"]["x-request-id"] == minted
    assert "x-envoy-internal" not in saw["headers"]


async def test_backend_is_asked_for_identity_encoding(gateway: Gateway) -> None:
    response, _ = await gateway.chat(chat_body("hi"), **{"accept-encoding": "gzip, br"})
    assert response.status == 200
    assert (await gateway.backend_saw())["headers"]["accept-encoding"] == "identity"


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v1/../_demo/last_request", 404),
        ("/v1/%2e%2e/_demo/last_request", 404),
        ("/v1/models/../../_demo/last_request", 404),
        ("//_demo/last_request", 404),
        ("/v2/models", 404),
        ("/v1/..%2f_demo/last_request", 400),
        ("/v1%2Fchat/completions", 400),
        ("/v1/chat%5Ccompletions", 400),
    ],
)
async def test_paths_outside_v1_never_reach_the_backend(gateway: Gateway, path: str, status: int) -> None:
    # encoded=True sends the path as written; the client would otherwise resolve the dots itself.
    async with gateway.session.get(URL(gateway.url + path, encoded=True), allow_redirects=False) as response:
        body = await response.text()
    assert response.status == status, body
    assert response.headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == {404: "not_found", 400: "invalid_path"}[status]


async def test_unreachable_backend_answers_openai_error(tmp_path: Path) -> None:
    async with usage_gateway(tmp_path, f"http://127.0.0.1:{free_port()}") as gw:
        response, text = await gw.chat(chat_body("hi"))
    assert response.status == 503
    error = json.loads(text)["error"]
    assert error["type"] == "server_error"
    assert error["message"].startswith("upstream connect error")


# --- https backend ---------------------------------------------------------------------------------


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA, and a certificate for DNS:localhost it signed: (ca, cert, key)."""
    # A failure, not a skip: the https path must be tested wherever the suite runs.
    assert shutil.which("openssl"), "the openssl command is needed to make test certificates"
    folder.mkdir(exist_ok=True)
    ca_key, ca, key, csr, cert = (
        folder / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem")
    )
    extensions = folder / "server.ext"
    extensions.write_text("subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n")
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = functools.partial(subprocess.run, check=True, capture_output=True)
    run(
        [
            "openssl",
            "req",
            "-x509",
            *new_key,
            "-keyout",
            ca_key,
            "-out",
            ca,
            "-days",
            "2",
            "-subj",
            "/CN=test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ]
    )
    run(["openssl", "req", *new_key, "-keyout", key, "-out", csr, "-subj", "/CN=localhost"])
    run(
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            ca,
            "-CAkey",
            ca_key,
            "-CAcreateserial",
            "-out",
            cert,
            "-days",
            "2",
            "-extfile",
            extensions,
        ]
    )
    return ca, cert, key


@pytest.mark.parametrize(
    ("host", "trusted", "refusal"),
    [
        pytest.param("localhost", True, None, id="verified"),
        pytest.param("127.0.0.1", True, "fail_verify_san", id="name-mismatch"),
        pytest.param("localhost", False, "fail_verify_error", id="unknown-ca"),
    ],
)
async def test_https_backend_is_verified(
    tmp_path: Path, host: str, trusted: bool, refusal: str | None
) -> None:
    ca, cert, key = make_certificates(tmp_path / "backend")
    other_ca, _, _ = make_certificates(tmp_path / "other")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    runner, port = await demo_backend.serve("127.0.0.1", 0, ssl_context=context)
    backend_url = f"https://{host}:{port}"
    try:
        async with usage_gateway(tmp_path, backend_url, ca_bundle=ca if trusted else other_ca) as gw:
            response, text = await gw.chat(chat_body("hi"))
            if refusal is None:
                assert response.status == 200, text
                assert (await gw.backend_saw())["headers"]["host"] == f"localhost:{port}"
            else:
                assert response.status == 503, text
                stat = f"cluster.{envoy_config.BACKEND_CLUSTER}.ssl.{refusal}"
                stats = await gw.envoy.admin_get("/stats", {"filter": f"^{stat}$"})
                assert stats.strip() == f"{stat}: 1"
    finally:
        await runner.cleanup()


# --- EnvoyProcess failures --------------------------------------------------------------------------


async def test_port_in_use_is_named(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        configured = loopback_settings(gateway_port=port, data_dir=tmp_path)
        configured.access_log_path.parent.mkdir()
        config = envoy_config.render_yaml(
            configured,
            backend_url="http://127.0.0.1:9",
            admin_socket=tmp_path / "envoy-admin.sock",
        )
        envoy = envoy_process.EnvoyProcess(config, free_port(), tmp_path / "envoy.log")
        with pytest.raises(envoy_process.EnvoyError) as failure:
            await envoy.start()
    assert f"127.0.0.1:{port}" in str(failure.value)
    assert not envoy.running


async def test_readiness_timeout_stops_envoy(tmp_path: Path) -> None:
    configured = loopback_settings(data_dir=tmp_path)
    configured.access_log_path.parent.mkdir()
    config = envoy_config.render_yaml(
        configured, backend_url="http://127.0.0.1:9", admin_socket=tmp_path / "envoy-admin.sock"
    )
    envoy = envoy_process.EnvoyProcess(config, free_port(), tmp_path / "envoy.log", ready_timeout_s=0)
    with pytest.raises(envoy_process.EnvoyError, match="not ready within"):
        await envoy.start()
    assert not envoy.running
