"""The OpenAPI document in the repo is the API: its paths and methods are exactly the routes the
sidecar registers, Envoy serves it unchanged at /openapi.json, and real answers fit its schemas."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from authz_sidecar import envoy_config, http_api
from authz_sidecar.key_lookup import KeyLookup
from billing import database
from billing.settings import Settings

pytestmark = pytest.mark.integration

DOCUMENT_URI = "urn:billingproxy:openapi"
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def repo_document() -> dict[str, Any]:
    return yaml.safe_load(http_api.OPENAPI_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
async def stack(launch_stack) -> AsyncIterator[Any]:
    async with launch_stack() as running:
        yield running


async def test_the_document_and_the_registered_routes_agree() -> None:
    engine = database.create_engine("postgresql://nobody@127.0.0.1:1/never_connected")
    try:
        app = http_api.make_app(Settings(), engine, KeyLookup(engine, 500))
        registered = {(r.resource.canonical, r.method.lower()) for r in app.router.routes()}
    finally:
        await engine.dispose()
    # aiohttp adds HEAD beside every GET by itself; the document describes the GET.
    heads = {(path, m) for path, m in registered if m == "head"}
    assert all((path, "get") in registered for path, _ in heads)
    # The account page is HTML for browsers (docs/account.md), not part of the API the document describes.
    routes = {(path, m) for path, m in registered - heads if not path.startswith("/account")}

    document = repo_document()
    assert document["openapi"].startswith("3.1")
    described = {
        (path, method)
        for path, item in document["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }
    assert routes == described, (
        f"routed but not described: {sorted(routes - described)}; "
        f"described but not routed: {sorted(described - routes)}"
    )
    # Envoy sends every documented path to the sidecar (and not to the LLM backend).
    for path in document["paths"]:
        assert path in envoy_config.SIDECAR_PATHS or path.startswith(envoy_config.SIDECAR_PREFIXES), path
    for schema in document["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)


async def test_the_gateway_serves_the_document(stack) -> None:
    async with stack.http.get(stack.gateway + "/openapi.json") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        served = await response.json()
    assert served == repo_document()


class Contract:
    """Validates answers against the response schemas of the document, $refs resolved."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.registry = Registry().with_resource(
            DOCUMENT_URI, Resource.from_contents(document, default_specification=DRAFT202012)
        )

    def check(self, path: str, method: str, status: int, content_type: str, body: Any) -> None:
        responses = self.document["paths"][path][method]["responses"]
        assert str(status) in responses, f"{method.upper()} {path} answered {status}, which is not documented"
        pointer = f"/paths/{path.replace('~', '~0').replace('/', '~1')}/{method}/responses/{status}"
        response = responses[str(status)]
        if "$ref" in response:  # a shared response object, e.g. #/components/responses/Error
            pointer = response["$ref"].removeprefix("#")
            response = self.registry.resolver().lookup(DOCUMENT_URI + response["$ref"]).contents
        assert content_type in response["content"], (path, status, content_type)
        schema_pointer = f"{pointer}/content/{content_type.replace('/', '~1')}/schema"
        validator = Draft202012Validator(
            {"$ref": f"{DOCUMENT_URI}#{schema_pointer}"},
            registry=self.registry,
            format_checker=Draft202012Validator.FORMAT_CHECKER,
        )
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(body)]
        assert not errors, f"{method.upper()} {path} {status} does not fit the document: {errors}"


async def test_real_answers_fit_the_document(stack) -> None:
    contract = Contract(repo_document())

    async def call(
        method: str,
        path: str,
        *,
        status: int,
        key: str | None = None,
        template: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """``template``: the document's path for ``path`` when it has parameters."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with stack.http.request(
            method, stack.gateway + path, headers=headers, allow_redirects=False, **kwargs
        ) as response:
            html = response.content_type == "text/html"
            body = await (response.text() if html else response.json())
            assert response.status == status, body
            described = template or path.split("?", maxsplit=1)[0]
            contract.check(described, method.lower(), status, response.content_type, body)
            return body

    user = await call("POST", "/user/signup", status=201, json={"email": "contract@example.com"})
    key = user["api_key"]
    with stack.openai(key) as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    await stack.db.settled(user["wallet_id"])

    balance = await call("GET", "/billing/balance", status=200, key=key)
    assert balance["state"] == "active"
    page = await call("GET", "/billing/usage?limit=1", status=200, key=key)
    assert [e["kind"] for e in page["data"]] == ["usage"] and page["has_more"] is True
    rest = await call("GET", f"/billing/usage?before={page['next_before']}", status=200, key=key)
    assert [e["kind"] for e in rest["data"]] == ["grant"] and rest["next_before"] is None

    await call("POST", "/user/signup", status=400, json={"email": "nope"})
    await call("POST", "/user/signup", status=409, json={"email": "contract@example.com"})
    await call("GET", "/billing/balance", status=401)
    await call("GET", "/billing/usage?limit=0", status=400, key=key)
    await call("GET", "/billing/usage", status=401, key="sk-litellm-bad")
    # The top-up page's form is refused with the page again (HTML), the JSON call with an Error.
    form = {"api_key": "sk-litellm-bad", "amount_usd": "10.00"}
    assert "Incorrect API key" in await call("POST", "/billing/topup", status=401, data=form)
    await call("POST", "/billing/topup", status=401, key="sk-litellm-bad", json={"amount_usd": "10.00"})
    await call("POST", "/billing/topup", status=400, data={"api_key": key, "amount_usd": ""})

    # The wallet's keys: list, create, revoke, and their refusals.
    one_key = "/billing/keys/{key_id}"
    listing = await call("GET", "/billing/keys", status=200, key=key)
    assert listing["data"][0]["spend_usd"] != "0.000000" and listing["data"][0]["last_used_at"]
    created = await call("POST", "/billing/keys", status=201, key=key)
    await call("POST", "/billing/keys", status=400, key=key, json={"name": "ci"})
    await call("DELETE", "/billing/keys/nope", status=400, key=key, template=one_key)
    await call("DELETE", "/billing/keys/key_unknown", status=404, key=key, template=one_key)
    await call("DELETE", f"/billing/keys/{created['id']}", status=200, key=key, template=one_key)
    await call("DELETE", f"/billing/keys/{user['key_id']}", status=409, key=key, template=one_key)
    await call("GET", "/billing/keys", status=401)
    await call("GET", "/billing/alerts", status=404, key=key)
    await call("POST", "/billing/alerts/test", status=404, key=key)
    await call("PUT", "/billing/alerts", status=400, key=key, json={"url": "https://127.0.0.1/hook"})
    await call("PUT", "/billing/alerts", status=401, json={"url": "https://93.184.215.14/hook"})
    # A public address that nothing here ever posts to: no threshold is crossed and no test is sent.
    hook = {"url": "https://93.184.215.14/hook", "thresholds_usd": ["0.01"]}
    registered = await call("PUT", "/billing/alerts", status=200, key=key, json=hook)
    assert registered["signing_secret"].startswith("whsec_")
    shown = await call("GET", "/billing/alerts", status=200, key=key)
    assert shown["thresholds_usd"] == ["0.010000"] and shown["recent_events"] == []
    assert (await call("DELETE", "/billing/alerts", status=200, key=key))["deleted"] is True
    await call("DELETE", "/billing/alerts", status=404, key=key)
