"""Issue 10, finding 8: only allow-listed headers reach the backend.

The backend credential is shared by every tenant, and the backend may act on what a client sends
beside it: ``x-api-key`` / ``api-key`` (another way to authenticate), ``openai-organization``
(which account is billed), cookies, or ``x-billingproxy-*`` (our own names). Envoy used to forward
everything but ``authorization``. Now the ``/v1/`` route forwards an allow-list, the backend
credential goes in the header the backend expects (``BILLINGPROXY_BACKEND_AUTH_HEADER``), and the
client's own key reaches the backend under no name at all. The demo backend records the headers
of the last request it served.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from billingproxy.devstack import demo_backend

pytestmark = pytest.mark.integration

MODEL = "gpt-4o-mini"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "which headers arrive"}], "max_tokens": 2}
# What a client may say to the backend, sent with recognisable values.
ALLOWED_FROM_CLIENT = {
    "user-agent": "adversarial-test/1.0",
    "accept": "application/json",
    "openai-beta": "assistants=v2",
    "anthropic-version": "2023-06-01",
}
# Headers Envoy itself sets on the way out (the request id is Envoy's own, never the client's).
SET_BY_ENVOY = {"host", "content-length", "content-type", "x-request-id", "accept-encoding"}


def refused_from_client(api_key: str) -> dict[str, str]:
    """Headers that must never reach the backend, several carrying the client's own key."""
    return {
        "x-api-key": api_key,
        "api-key": api_key,
        "x-goog-api-key": api_key,
        "proxy-authorization": f"Bearer {api_key}",
        "cookie": f"session={api_key}",
        "x-billingproxy-hold-id": "someone-elses-hold",
        "x-billingproxy-wallet-id": "wal_someone_else",
        "openai-organization": "org-of-the-gateway-owner",
        "openai-project": "proj-of-the-gateway-owner",
        "x-forwarded-for": "203.0.113.9",
        "x-custom-anything": api_key,
        # A beta may change the price: the 1M-token context window (priced nowhere in the map).
        "anthropic-beta": "context-1m-2025-08-07",
    }


async def post_chat(stack, api_key: str, extra: dict[str, str]) -> str:
    headers = {"authorization": f"Bearer {api_key}", "content-type": "application/json", **extra}
    async with stack.http.post(
        stack.gateway + "/v1/chat/completions", json=BODY, headers=headers
    ) as response:
        assert response.status == 200, await response.text()
        return response.headers["x-request-id"]


@pytest.fixture(scope="module")
async def stack(launch_stack) -> AsyncIterator[Any]:
    async with launch_stack() as running:
        yield running


async def test_only_allow_listed_headers_reach_the_backend(stack) -> None:
    user = await stack.signup()
    refused = refused_from_client(user["api_key"])
    request_id = await post_chat(stack, user["api_key"], {**ALLOWED_FROM_CLIENT, **refused})
    seen = (await stack.backend_last_request())["headers"]

    assert not set(refused) & set(seen), sorted(set(refused) & set(seen))
    assert seen["authorization"] == f"Bearer {stack.settings.backend_api_key}"
    for name, value in ALLOWED_FROM_CLIENT.items():
        assert seen[name] == value, name
    assert seen["x-request-id"] == request_id
    assert set(seen) <= set(ALLOWED_FROM_CLIENT) | SET_BY_ENVOY | {"authorization"}, sorted(seen)
    assert user["api_key"] not in repr(seen)
    await stack.db.settled(user["wallet_id"])


@pytest.mark.parametrize("transport", ["http", "grpc"])
async def test_the_credential_goes_in_the_header_the_backend_expects(launch_stack, transport) -> None:
    """An Anthropic-style backend (``x-api-key``), through either Check flavour: the gateway's
    credential is sent there, and the client's ``authorization`` — its own key — is not forwarded."""
    runner, port = await demo_backend.serve("127.0.0.1", 0)  # checks no credential: we look ourselves
    try:
        async with launch_stack(
            BILLINGPROXY_BACKEND_URL=f"http://127.0.0.1:{port}",
            BILLINGPROXY_BACKEND_AUTH_HEADER="x-api-key",
            BILLINGPROXY_CHECK_TRANSPORT=transport,
        ) as anthropic_style:
            user = await anthropic_style.signup()
            await post_chat(anthropic_style, user["api_key"], {"x-api-key": user["api_key"]})
            async with anthropic_style.http.get(f"http://127.0.0.1:{port}/_demo/last_request") as response:
                seen = (await response.json())["headers"]
            assert seen["x-api-key"] == anthropic_style.settings.backend_api_key
            assert "authorization" not in seen
            assert user["api_key"] not in repr(seen)
            await anthropic_style.db.settled(user["wallet_id"])
    finally:
        await runner.cleanup()
