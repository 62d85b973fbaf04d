"""Issue 10, findings 3, 4, 6 and 7, tried as an attacker with one cheap key, through real Envoy:
unpriced dimensions, confused output fields and multipliers, unmetered endpoints, and bodies the
Check and the backend would read differently. Each answer is a specific 4xx (never a 503 and a
traceback), nothing reaches the backend, and nothing is written."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from billing import money, pricing, wallets
from billing.endpoints import ENDPOINT_NAMES

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
async def stack(launch_stack) -> AsyncIterator[Any]:
    async with launch_stack() as running:
        yield running


@pytest.fixture(scope="module")
def prices() -> pricing.PriceBook:
    return pricing.load()


async def new_key(stack, balance_usd: str) -> str:
    async with stack.db.engine.begin() as conn:
        account = await wallets.signup(
            conn,
            email=f"attacker-{uuid.uuid4().hex[:12]}@example.com",
            grant_nano=money.parse_usd(balance_usd),
        )
    return account.key.plaintext


async def post(stack, key: str, path: str, body: bytes | dict, **headers: str) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}", **headers}
    async with stack.http.post(stack.gateway + path, data=data, headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def backend_requests(stack) -> str:
    """A fingerprint of the last request the demo backend saw (changes when another arrives)."""
    return json.dumps(await stack.backend_last_request(), sort_keys=True)


async def refused_untouched(
    stack,
    key: str,
    path: str,
    body: bytes | dict,
    status: int,
    code: str,
    method: str = "POST",
    **headers: str,
) -> dict[str, Any]:
    """Send; expect ``status``/``code``; and check nothing was written nor reached the backend."""
    counts, seen = await stack.db.row_counts(), await backend_requests(stack)
    if method == "POST":
        got, answer = await post(stack, key, path, body, **headers)
    else:
        async with stack.http.request(
            method, stack.gateway + path, headers={"authorization": f"Bearer {key}"}
        ) as r:
            got, answer = r.status, await r.json(content_type=None)
    assert (got, answer["error"]["code"]) == (status, code), answer
    assert await stack.db.row_counts() == counts
    assert await backend_requests(stack) == seen, "the backend was reached"
    return answer["error"]


# --- finding 6: only metered endpoints reach the backend ------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/files"),
        ("GET", "/v1/chat/completions"),
        ("GET", "/v1/responses/resp_123"),
        ("GET", "/v1/batches"),
        ("DELETE", "/v1/models/ft:gpt-4o-mini:other-tenant"),
        ("POST", "/v1/batches"),
        ("POST", "/v1/files"),
        ("POST", "/v1/images/generations"),
        ("PUT", "/v1/chat/completions"),
        ("PATCH", "/v1/chat/completions"),
    ],
)
async def test_unmetered_endpoints_never_reach_the_backend(stack, method: str, path: str) -> None:
    key = await new_key(stack, "1.00")
    if method == "POST":
        await refused_untouched(stack, key, path, {"model": "gpt-4o-mini"}, 404, "endpoint_not_supported")
    else:
        await refused_untouched(stack, key, path, b"", 404, "endpoint_not_supported", method=method)


async def test_listing_models_is_still_served_free(stack) -> None:
    key = await new_key(stack, "1.00")
    async with stack.http.get(stack.gateway + "/v1/models", headers={"authorization": f"Bearer {key}"}) as r:
        assert r.status == 200
    assert (await stack.backend_last_request())["path"] == "/v1/models"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/responses", {"model": "gpt-4o-mini", "input": "hi", "background": True}, "background"),
        (
            "/v1/responses",
            {"model": "gpt-4o-mini", "input": "hi", "previous_response_id": "resp_other"},
            "previous_response_id",
        ),
        (
            "/v1/responses",
            {"model": "gpt-4o-mini", "input": "hi", "tools": [{"type": "web_search"}]},
            "tools",
        ),
        (
            CHAT,
            {"model": "gpt-4o-mini", "messages": MESSAGES, "web_search_options": {}},
            "web_search_options",
        ),
        (CHAT, {"model": "gpt-4o-mini", "messages": MESSAGES, "service_tier": "priority"}, "service_tier"),
    ],
)
async def test_unmetered_work_is_refused(stack, path: str, body: dict, param: str) -> None:
    key = await new_key(stack, "1.00")
    code = "model_not_priced" if param in ("tools", "service_tier") else "parameter_not_supported"
    error = await refused_untouched(stack, key, path, body, 400, code)
    assert error["param"] == param


def test_the_default_allow_list_is_the_documented_one() -> None:
    assert set(ENDPOINT_NAMES) == {
        "chat_completions",
        "completions",
        "embeddings",
        "responses",
        "messages",
        "models",
    }


# --- finding 3: a dimension the gateway does not price is refused, never billed $0 ---------------


async def test_image_tokens_are_not_billed_zero(stack) -> None:
    key = await new_key(stack, "5.00")
    error = await refused_untouched(
        stack, key, CHAT, {"model": "gpt-image-1", "messages": MESSAGES}, 400, "model_not_priced"
    )
    assert "image" in error["dimension"]


async def test_audio_output_without_an_audio_price_is_refused(stack) -> None:
    key = await new_key(stack, "5.00")
    body = {
        "model": "gpt-4o-mini",
        "messages": MESSAGES,
        "modalities": ["text", "audio"],
        "audio": {"voice": "alloy", "format": "wav"},
    }
    error = await refused_untouched(stack, key, CHAT, body, 400, "model_not_priced")
    assert error["dimension"] == "output_cost_per_audio_token"


# --- finding 4: the hold is the true worst case; bad values are 400s, not 503s ---------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", True),
        ("max_tokens", 1.5),
        ("max_tokens", "10"),
        ("max_tokens", -1),
        ("max_completion_tokens", False),
        ("n", True),
        ("n", 0),
        ("n", 1000),
    ],
)
async def test_bad_numbers_are_refused_before_any_hold(stack, field: str, value: object) -> None:
    key = await new_key(stack, "1.00")
    error = await refused_untouched(
        stack,
        key,
        CHAT,
        {"model": "gpt-4o-mini", "messages": MESSAGES, field: value},
        400,
        "invalid_parameter",
    )
    assert error["param"] == field


async def test_deeply_nested_json_is_a_400_not_a_traceback(stack) -> None:
    key = await new_key(stack, "1.00")
    deep = b'{"model": "gpt-4o-mini", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    await refused_untouched(stack, key, CHAT, deep, 400, "invalid_json")
    shallow_enough = {"model": "gpt-4o-mini", "messages": MESSAGES, "metadata": {}}
    node = shallow_enough["metadata"]
    for _ in range(70):
        node["x"] = {}
        node = node["x"]
    await refused_untouched(stack, key, CHAT, shallow_enough, 400, "invalid_json")
    assert await stack.metric("billingproxy_check_decisions_total", decision="internal_error") == 0


async def test_a_field_the_endpoint_does_not_read_is_refused(stack) -> None:
    """Chat completions read max_completion_tokens/max_tokens, not the Responses API's
    max_output_tokens: naming the wrong one is refused, never taken for a smaller hold."""
    key = await new_key(stack, "1.00")
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_output_tokens": 1}
    error = await refused_untouched(stack, key, CHAT, body, 400, "parameter_not_supported")
    assert error["param"] == "max_output_tokens"


async def test_without_an_output_limit_the_hold_is_the_models_and_the_403_says_what_fits(
    stack, prices
) -> None:
    key = await new_key(stack, "0.005")
    body = {"model": "gpt-4o-mini", "messages": MESSAGES}
    error = await refused_untouched(stack, key, CHAT, body, 403, "insufficient_funds")
    mini = prices.price("gpt-4o-mini")
    assert mini is not None and mini.max_output_tokens == 16384
    worst = money.parse_usd(error["worst_case_usd"])
    assert worst >= prices.hold_nano(mini, prompt_tokens=0, max_output_tokens=16384)
    assert error["reason"] == "request_too_large"
    # The largest max_tokens that fits is given, and it is served.
    fits = error["max_tokens_that_fit"]
    assert 0 < fits < 16384
    status, answer = await post(
        stack, key, CHAT, {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": fits}
    )
    assert status == 200, answer


async def test_n_multiplies_the_hold(stack, prices) -> None:
    key = await new_key(stack, "0.01")
    one = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 1000}
    status, answer = await post(stack, key, CHAT, one)
    assert status == 200, answer
    await stack.db.settled()
    error = await refused_untouched(stack, key, CHAT, {**one, "n": 20}, 403, "insufficient_funds")
    mini = prices.price("gpt-4o-mini")
    assert mini is not None
    assert money.parse_usd(error["worst_case_usd"]) >= prices.hold_nano(
        mini, prompt_tokens=0, max_output_tokens=20_000
    )
    assert error["max_tokens_that_fit"] < 1000


# --- finding 7: one reading of the body ------------------------------------------------------------

STREAM = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}


@pytest.mark.parametrize(
    ("content_type", "data", "status", "code"),
    [
        ("text/plain", json.dumps(STREAM).encode(), 415, "unsupported_media_type"),
        ("application/x-www-form-urlencoded", json.dumps(STREAM).encode(), 415, "unsupported_media_type"),
        (
            "application/json; charset=utf-16",
            json.dumps(STREAM).encode("utf-16"),
            415,
            "unsupported_media_type",
        ),
        ("application/json", json.dumps(STREAM).encode("utf-16"), 400, "invalid_json"),
        ("application/json", b"\xef\xbb\xbf" + json.dumps(STREAM).encode(), 400, "invalid_json"),
        (
            "application/json",
            b'{"model": "gpt-4o-mini", "model": "o1-pro", "messages": []}',
            400,
            "duplicate_key",
        ),
        (
            "application/json",
            b'{"model": "gpt-4o-mini", "messages": [], "temperature": NaN}',
            400,
            "invalid_json",
        ),
    ],
)
async def test_a_body_the_check_and_the_filter_cannot_both_read_is_refused(
    stack, content_type: str, data: bytes, status: int, code: str
) -> None:
    key = await new_key(stack, "1.00")
    await refused_untouched(stack, key, CHAT, data, status, code, **{"content-type": content_type})


async def test_a_json_content_type_with_utf8_charset_is_served(stack) -> None:
    key = await new_key(stack, "1.00")
    status, answer = await post(
        stack,
        key,
        CHAT,
        {"model": "gpt-4o-mini", "messages": MESSAGES},
        **{"content-type": "application/json; charset=utf-8"},
    )
    assert status == 200, answer


# --- a model whose output limit the price map does not know (docs/decisions/0020) ---------------
# The attacker asks it for far more output than any guessed cap, hoping to be held, and so charged,
# for less. A price override declares no max_output_tokens. The demo backend never writes more than
# 256 words, so the tests read the hold: a wallet that cannot cover what the request asks for is
# refused before the backend is reached.

HOUSE_MODEL = "house-model"
OUTPUT_USD_PER_TOKEN = "0.0000012"


@pytest.fixture(scope="module")
async def house_stack(launch_stack, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    overrides = Path(tmp_path_factory.mktemp("prices")) / "prices.yaml"
    overrides.write_text(
        f'models:\n  {HOUSE_MODEL}:\n    input_per_million_usd: "0.30"\n    output_per_million_usd: "1.20"\n'
    )
    async with launch_stack(BILLINGPROXY_PRICE_OVERRIDES=str(overrides)) as running:
        yield running


async def test_asking_past_any_guessed_cap_is_held_for_all_of_it(house_stack) -> None:
    stack = house_stack
    # $0.10 covers 4 096 output tokens many times over, but not the 100 000 asked for ($0.12).
    key = await new_key(stack, "0.10")
    body = {"model": HOUSE_MODEL, "max_tokens": 100_000, "messages": MESSAGES}
    error = await refused_untouched(stack, key, CHAT, body, 403, "insufficient_funds")
    assert error["reason"] == "request_too_large"
    assert Decimal(error["worst_case_usd"]) >= 100_000 * Decimal(OUTPUT_USD_PER_TOKEN)


async def test_a_request_without_an_output_bound_is_refused(house_stack) -> None:
    stack = house_stack
    key = await new_key(stack, "5.00")
    error = await refused_untouched(
        stack, key, CHAT, {"model": HOUSE_MODEL, "messages": MESSAGES}, 400, "output_limit_required"
    )
    assert error["param"] == "max_completion_tokens"


async def test_a_bounded_request_is_served_and_charged(house_stack) -> None:
    stack = house_stack
    key = await new_key(stack, "5.00")
    async with stack.http.post(
        stack.gateway + CHAT,
        json={"model": HOUSE_MODEL, "max_tokens": 20, "messages": MESSAGES},
        headers={"authorization": f"Bearer {key}"},
    ) as response:
        assert response.status == 200, await response.text()
