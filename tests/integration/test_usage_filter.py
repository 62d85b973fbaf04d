"""The Lua usage filter, run for real: aiohttp client → real Envoy → demo backend.

The Envoy configuration is the production one from ``envoy_config.render()`` minus ext_authz
and the gRPC access log (no sidecar here), plus a JSON file access log that prints the
``billingproxy.usage`` metadata: that log is what the tests read back. The same stack also checks
the gateway behaviour billing relies on (Envoy-minted request ids, path normalization, a
verified https backend) and EnvoyProcess's failure messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from yarl import URL

from authz_sidecar import envoy_config
from billing.settings import Settings
from billingproxy import demo_backend, envoy_process

pytestmark = pytest.mark.integration

ACCESS_LOG_WAIT_S = 10.0
# An answer with no counts leaves the usage namespace unset: the JSON log shows null.
NO_USAGE = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loopback_settings(**changes: Any) -> Settings:
    ports = {name: free_port() for name in ("gateway_port", "grpc_port", "check_port", "http_port")}
    # The demo backend's test controls (x-demo-*) must pass the upstream header allow-list.
    fixed = {"access_log_secret": "access-log-secret-of-the-usage-filter-tests", "upstream_headers": ("x-demo-*",)}
    return Settings(**{**ports, **fixed, **changes})


def lua_only_config(settings: Settings, backend_url: str, access_log: Path, ca_bundle: Path | None = None) -> str:
    config = envoy_config.render(settings, backend_url=backend_url, ca_bundle=ca_bundle,
                                 admin_socket=access_log.with_name("envoy-admin.sock"))
    listener = config["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != envoy_config.EXT_AUTHZ_FILTER]
    usage_format = {
        "request_id": "%REQ(X-REQUEST-ID)%",
        "status": "%RESPONSE_CODE%",
        "usage": f"%DYNAMIC_METADATA({envoy_config.USAGE_NAMESPACE})%",
    }
    hcm["access_log"] = [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": str(access_log),
                "log_format": {"json_format": usage_format},
            },
        }
    ]
    return yaml.safe_dump(config)


class Gateway:
    """A running Envoy in front of a demo backend, and a client session for both."""

    def __init__(self, envoy: envoy_process.EnvoyProcess, port: int, backend_url: str, access_log: Path,
                 session: aiohttp.ClientSession) -> None:
        self.envoy = envoy
        self.url = f"http://127.0.0.1:{port}"
        self.backend_url = backend_url
        self.access_log = access_log
        self.session = session

    async def chat(self, body: dict[str, Any], **headers: str) -> tuple[aiohttp.ClientResponse, str]:
        # BytesIO: aiohttp warns (an error here) about large bodies given as bytes.
        data = io.BytesIO(json.dumps(body).encode())
        headers = {"content-type": "application/json", **headers}
        async with self.session.post(f"{self.url}/v1/chat/completions", data=data, headers=headers) as response:
            return response, await response.text()

    async def post(self, path: str, body: dict[str, Any], **headers: str) -> tuple[aiohttp.ClientResponse, str]:
        data = io.BytesIO(json.dumps(body).encode())
        headers = {"content-type": "application/json", **headers}
        async with self.session.post(f"{self.url}{path}", data=data, headers=headers) as response:
            return response, await response.text()

    async def backend_saw(self) -> dict[str, Any]:
        async with self.session.get(f"{self.backend_url}/_demo/last_request", ssl=False) as response:
            return await response.json()

    async def usage(self, request_id: str) -> dict[str, Any] | None:
        """The usage metadata Envoy logged for this request (polled: file logs flush on a timer)."""
        deadline = time.monotonic() + ACCESS_LOG_WAIT_S
        while time.monotonic() < deadline:
            lines = self.access_log.read_text().splitlines() if self.access_log.exists() else []
            for line in lines:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line Envoy is still writing
                if entry["request_id"] == request_id:
                    return entry["usage"]
            await asyncio.sleep(0.02)
        raise AssertionError(f"no access log entry for {request_id} within {ACCESS_LOG_WAIT_S:.0f} s")


@contextlib.asynccontextmanager
async def lua_gateway(folder: Path, backend_url: str, ca_bundle: Path | None = None) -> AsyncIterator[Gateway]:
    settings = loopback_settings()
    access_log = folder / "access.jsonl"
    envoy = envoy_process.EnvoyProcess(
        lua_only_config(settings, backend_url, access_log, ca_bundle),
        base_id=settings.gateway_port,  # unique while the port is ours
        log_path=folder / "envoy.log",
        concurrency=1,
        file_flush_interval_ms=20,
    )
    async with envoy, aiohttp.ClientSession() as session:
        yield Gateway(envoy, settings.gateway_port, backend_url, access_log, session)


@pytest.fixture(scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    runner, backend_port = await demo_backend.serve("127.0.0.1", 0)
    try:
        async with lua_gateway(tmp_path_factory.mktemp("usage_filter"), f"http://127.0.0.1:{backend_port}") as gw:
            yield gw
    finally:
        await runner.cleanup()


def chat_body(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


def usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "cached_tokens": cached, "usage_seen": True}


def sse_payloads(text: str) -> list[Any]:
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# --- usage from answers ---------------------------------------------------------------------------


async def test_json_answer_usage_is_exact(gateway: Gateway) -> None:
    # 4 words + 3 for the message; max_tokens 5 → 5 completion tokens.
    body = chat_body("one two three four", max_tokens=5)
    response, text = await gateway.chat(body, **{"x-demo-cached-tokens": "2"})
    assert response.status == 200, text
    assert json.loads(text)["usage"]["prompt_tokens"] == 7
    assert await gateway.usage(response.headers["x-request-id"]) == usage(7, 5, cached=2)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_responses_api_usage_is_read_under_its_own_names(gateway: Gateway, stream: bool) -> None:
    # /v1/responses reports input_tokens / output_tokens (and input_tokens_details.cached_tokens);
    # a stream carries them only in its final response.completed event. 2 words + 3, and the
    # instructions' 3 words + 3.
    body = {"model": "gpt-4o-mini", "instructions": "be very brief", "input": "hello there",
            "max_output_tokens": 7, "stream": stream}
    response, text = await gateway.post("/v1/responses", body, **{"x-demo-cached-tokens": "3"})
    assert response.status == 200, text
    if stream:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert '"usage": null' in text and text.count('"input_tokens"') == 1
        assert (await gateway.backend_saw())["body"] == body  # no stream_options: this API rejects it
    else:
        assert json.loads(text)["usage"]["input_tokens"] == 11
    assert await gateway.usage(response.headers["x-request-id"]) == usage(11, 7, cached=3)


async def test_json_answer_in_many_small_chunks(gateway: Gateway) -> None:
    # 7-byte pieces cut keys and numbers in two; only the carried-over tail reads them whole.
    body = chat_body("alpha beta gamma", max_tokens=123)
    response, text = await gateway.chat(body, **{"x-demo-chunk-bytes": "7", "x-demo-cached-tokens": "4"})
    assert response.status == 200, text
    assert json.loads(text)["usage"]["completion_tokens"] == 123
    assert await gateway.usage(response.headers["x-request-id"]) == usage(6, 123, cached=4)


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
async def test_stream_is_asked_for_usage(gateway: Gateway, stream_options: Any) -> None:
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
    assert payloads[-1]["usage"]["prompt_tokens"] == 9
    assert await gateway.usage(response.headers["x-request-id"]) == usage(9, 3)


async def test_stream_events_arriving_one_by_one(gateway: Gateway) -> None:
    response, text = await gateway.chat(chat_body("x y", max_tokens=40, stream=True), **{"x-demo-chunk-delay-ms": "1"})
    assert response.status == 200, text
    assert await gateway.usage(response.headers["x-request-id"]) == usage(5, 40)


async def test_chunked_request_is_rewritten(gateway: Gateway) -> None:
    # No content-length from the client: setBytes() must leave a framing the backend can read.
    payload = json.dumps(chat_body("one two", max_tokens=2, stream=True)).encode()

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 10):
            yield payload[start : start + 10]

    headers = {"content-type": "application/json"}
    async with gateway.session.post(f"{gateway.url}/v1/chat/completions", data=pieces(), headers=headers) as response:
        assert response.status == 200, await response.text()
        request_id = response.headers["x-request-id"]
    assert (await gateway.backend_saw())["body"]["stream_options"] == {"include_usage": True}
    assert await gateway.usage(request_id) == usage(5, 2)


async def test_stream_key_spelled_with_an_escape_is_still_asked_for_usage(gateway: Gateway) -> None:
    # "str\u0065am" is "stream" to the backend's JSON parser; the filter's quick pre-check for
    # the word must not skip it.
    raw = '{"model": "gpt-4o-mini", "max_tokens": 2, "str\\u0065am": true, ' \
          '"messages": [{"role": "user", "content": "one two"}]}'
    headers = {"content-type": "application/json"}
    async with gateway.session.post(f"{gateway.url}/v1/chat/completions", data=raw.encode(), headers=headers) as response:
        assert response.status == 200, await response.text()
        request_id = response.headers["x-request-id"]
    assert (await gateway.backend_saw())["body"]["stream_options"] == {"include_usage": True}
    assert await gateway.usage(request_id) == usage(5, 2)


async def test_request_not_streamed_is_left_alone(gateway: Gateway) -> None:
    # "stream": true below the top level must not make the filter add stream_options (OpenAI
    # answers 400 to stream_options without streaming).
    body = chat_body("hello", stream=False, metadata={"stream": True}, tools=[{"stream": True}])
    response, text = await gateway.chat(body)
    assert response.status == 200, text
    assert (await gateway.backend_saw())["body"] == body


async def test_large_streamed_request_is_rewritten(gateway: Gateway) -> None:
    # 1.4 MB, above Envoy's default 1 MiB buffer: the listener limit follows request_body_max_bytes.
    words = 700_000
    response, text = await gateway.chat(chat_body("w " * words, max_tokens=1, stream=True))
    assert response.status == 200, text[:300]
    assert await gateway.usage(response.headers["x-request-id"]) == usage(words + 3, 1)


@pytest.mark.parametrize("status", [400, 429, 500])
async def test_error_answer_has_no_usage(gateway: Gateway, status: int) -> None:
    response, text = await gateway.chat(chat_body("hello", max_tokens=5), **{"x-demo-status": str(status)})
    assert response.status == status
    assert json.loads(text)["error"]["code"]
    assert await gateway.usage(response.headers["x-request-id"]) == NO_USAGE


async def test_embeddings_usage(gateway: Gateway) -> None:
    body = {"model": "demo-model", "input": ["one two", "three"]}
    async with gateway.session.post(f"{gateway.url}/v1/embeddings", json=body) as response:
        assert response.status == 200
        request_id = response.headers["x-request-id"]
    assert await gateway.usage(request_id) == usage(3, 0)


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
    ],
)
async def test_paths_outside_v1_never_reach_the_backend(gateway: Gateway, path: str, status: int) -> None:
    # encoded=True sends the path as written; the client would otherwise resolve the dots itself.
    async with gateway.session.get(URL(gateway.url + path, encoded=True), allow_redirects=False) as response:
        body = await response.text()
    assert response.status == status, body
    if status == 404:
        assert response.headers["content-type"] == "application/json"
        assert json.loads(body)["error"]["code"] == "not_found"


async def test_unreachable_backend_answers_openai_error(tmp_path: Path) -> None:
    async with lua_gateway(tmp_path, f"http://127.0.0.1:{free_port()}") as gw:
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
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    extensions = folder / "server.ext"
    extensions.write_text("subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n")
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = functools.partial(subprocess.run, check=True, capture_output=True)
    run(["openssl", "req", "-x509", *new_key, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=test CA",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"])
    run(["openssl", "req", *new_key, "-keyout", key, "-out", csr, "-subj", "/CN=localhost"])
    run(["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "2", "-extfile", extensions])
    return ca, cert, key


@pytest.mark.parametrize(
    ("host", "trusted", "refusal"),
    [
        pytest.param("localhost", True, None, id="verified"),
        pytest.param("127.0.0.1", True, "fail_verify_san", id="name-mismatch"),
        pytest.param("localhost", False, "fail_verify_error", id="unknown-ca"),
    ],
)
async def test_https_backend_is_verified(tmp_path: Path, host: str, trusted: bool, refusal: str | None) -> None:
    ca, cert, key = make_certificates(tmp_path / "backend")
    other_ca, _, _ = make_certificates(tmp_path / "other")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    runner, port = await demo_backend.serve("127.0.0.1", 0, ssl_context=context)
    backend_url = f"https://{host}:{port}"
    try:
        async with lua_gateway(tmp_path, backend_url, ca_bundle=ca if trusted else other_ca) as gw:
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
        config = envoy_config.render_yaml(loopback_settings(gateway_port=port), backend_url="http://127.0.0.1:9",
                                          admin_socket=tmp_path / "envoy-admin.sock")
        envoy = envoy_process.EnvoyProcess(config, free_port(), tmp_path / "envoy.log")
        with pytest.raises(envoy_process.EnvoyError) as failure:
            await envoy.start()
    assert f"127.0.0.1:{port}" in str(failure.value)
    assert not envoy.running


async def test_readiness_timeout_stops_envoy(tmp_path: Path) -> None:
    config = envoy_config.render_yaml(loopback_settings(), backend_url="http://127.0.0.1:9",
                                      admin_socket=tmp_path / "envoy-admin.sock")
    envoy = envoy_process.EnvoyProcess(config, free_port(), tmp_path / "envoy.log", ready_timeout_s=0)
    with pytest.raises(envoy_process.EnvoyError, match="not ready within"):
        await envoy.start()
    assert not envoy.running
