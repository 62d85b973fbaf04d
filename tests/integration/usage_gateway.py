"""A real Envoy running the gateway's own ext_authz and Lua usage filter, for the usage tests.

The Envoy configuration is the production one from ``envoy_config.render()`` with only the
billing HTTP filters (ext_authz → usage_filter.lua → router) and, instead of the gRPC access
log, a JSON file access log that prints each request's ``billingproxy.usage`` metadata and the
usage format the Check gave: that log is what the tests read back. ext_authz calls a fake Check
that admits everything and tells the filter the answer's usage format as ``check.py`` does
(``x-billingproxy-format``, and ``x-billingproxy-stream-usage: 1`` for an OpenAI
chat/completions stream), so the filter runs exactly as behind the real sidecar.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from support.waiting import wait_until

from authz_sidecar import contract, envoy_config
from billing import usage as usage_mod
from billing.settings import Settings
from billingproxy.devstack import envoy_process
from billingproxy.devstack.local_stack import free_port

ACCESS_LOG_WAIT_S = 10.0
# Where each endpoint's answer carries its usage (billing/usage.py), as the Check says it.
FORMATS = {
    "/v1/chat/completions": usage_mod.Format.OPENAI_CHAT,
    "/v1/completions": usage_mod.Format.OPENAI_CHAT,
    "/v1/responses": usage_mod.Format.OPENAI_RESPONSES,
    "/v1/embeddings": usage_mod.Format.OPENAI_EMBEDDINGS,
    "/v1/messages": usage_mod.Format.ANTHROPIC_MESSAGES,
}


def loopback_settings(**changes: Any) -> Settings:
    ports = {name: free_port() for name in ("gateway_port", "grpc_port", "check_port", "api_port")}
    fixed = {
        "access_log_secret": "access-log-secret-of-the-usage-filter-tests",
        "upstream_headers": ("x-demo-*",),
    }
    return Settings(**{**ports, **fixed, **changes})


def usage_facts(path: str, body: bytes) -> dict[str, str]:
    """What the Check tells the filter about a request (as ``check.Decider._admit_or_raise`` does)."""
    usage_format = FORMATS.get(path.split("?", 1)[0])
    if usage_format is None:
        return {}
    facts = {contract.FORMAT: usage_format.value}
    try:
        request = json.loads(body) if body else None
    except ValueError:
        request = None
    if (
        usage_format is usage_mod.Format.OPENAI_CHAT
        and isinstance(request, dict)
        and request.get("stream") is True
    ):
        facts[contract.STREAM_USAGE] = "1"
    return facts


async def _fake_check(request: web.Request) -> web.Response:
    path = request.path.removeprefix(contract.CHECK_PATH_PREFIX)
    return web.Response(status=200, headers=usage_facts(path, await request.read()))


def billing_filters_config(
    settings: Settings, backend_url: str, access_log: Path, ca_bundle: Path | None = None
) -> str:
    config = envoy_config.render(
        settings,
        backend_url=backend_url,
        ca_bundle=ca_bundle,
        admin_socket=access_log.with_name("envoy-admin.sock"),
    )
    listener = config["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    keep = (envoy_config.EXT_AUTHZ_FILTER, envoy_config.LUA_FILTER, "envoy.filters.http.router")
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] in keep]
    log_format = {
        "request_id": "%REQ(X-REQUEST-ID)%",
        "status": "%RESPONSE_CODE%",
        "flags": "%RESPONSE_FLAGS%",
        "format": f"%DYNAMIC_METADATA({contract.AUTHZ_NAMESPACE}:{contract.FORMAT})%",
        "usage": f"%DYNAMIC_METADATA({contract.USAGE_NAMESPACE})%",
    }
    hcm["access_log"] = [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": str(access_log),
                "log_format": {"json_format": log_format},
            },
        }
    ]
    return yaml.safe_dump(config)


class Gateway:
    """A running Envoy in front of a backend, and a client session for both."""

    def __init__(
        self,
        envoy: envoy_process.EnvoyProcess,
        port: int,
        backend_url: str,
        access_log: Path,
        session: aiohttp.ClientSession,
    ) -> None:
        self.envoy = envoy
        self.url = f"http://127.0.0.1:{port}"
        self.backend_url = backend_url
        self.access_log = access_log
        self.session = session
        self._seen: dict[str, dict[str, Any]] = {}
        self._read_bytes = 0

    async def post(
        self, path: str, body: dict[str, Any] | bytes, **headers: str
    ) -> tuple[aiohttp.ClientResponse, str]:
        # BytesIO: aiohttp warns (an error here) about large bodies given as bytes.
        data = io.BytesIO(body if isinstance(body, bytes) else json.dumps(body).encode())
        headers = {"content-type": "application/json", **headers}
        async with self.session.post(f"{self.url}{path}", data=data, headers=headers) as response:
            return response, await response.text()

    async def chat(self, body: dict[str, Any], **headers: str) -> tuple[aiohttp.ClientResponse, str]:
        return await self.post("/v1/chat/completions", body, **headers)

    async def backend_saw(self) -> dict[str, Any]:
        async with self.session.get(f"{self.backend_url}/_demo/last_request", ssl=False) as response:
            return await response.json()

    async def log_entry(self, request_id: str) -> dict[str, Any]:
        """Envoy's access-log entry for this request (waited for: file logs flush on a timer)."""

        async def logged() -> dict[str, Any] | None:
            if request_id not in self._seen and self.access_log.exists():
                with self.access_log.open("rb") as log:
                    log.seek(self._read_bytes)
                    text = log.read()
                complete = text[: text.rfind(b"\n") + 1]  # a line Envoy is still writing waits
                self._read_bytes += len(complete)
                for line in complete.splitlines():
                    entry = json.loads(line)
                    self._seen[entry["request_id"]] = entry
            return self._seen.pop(request_id, None)

        return await wait_until(
            logged, ACCESS_LOG_WAIT_S, f"the access-log entry of {request_id}", interval=0.01
        )

    async def usage(self, request_id: str) -> dict[str, Any] | None:
        """The ``billingproxy.usage`` metadata Envoy logged for this request (None: unset)."""
        return (await self.log_entry(request_id))["usage"]

    async def charged(self, request_id: str) -> usage_mod.Usage | None:
        """What settlement reads from it: the exact usage, or None (the hold is charged)."""
        entry = await self.log_entry(request_id)
        return read_entry(entry)


def read_entry(entry: dict[str, Any]) -> usage_mod.Usage | None:
    """billing.usage.read of a logged entry, as the sidecar reads its access-log entry."""
    usage = entry["usage"] or {}
    if not entry.get("format"):
        return None
    return usage_mod.read(
        usage_mod.Format(entry["format"]),
        usage.get("usage"),
        usage.get("usage_start"),
        usage.get("finished") is True,
    )


@contextlib.asynccontextmanager
async def usage_gateway(
    folder: Path, backend_url: str, ca_bundle: Path | None = None
) -> AsyncIterator[Gateway]:
    """Envoy with the billing filters in front of ``backend_url``, its fake Check, a session."""
    check = web.AppRunner(web.Application(client_max_size=64 * 1024 * 1024), access_log=None)
    check.app.router.add_route("*", "/{tail:.*}", _fake_check)
    await check.setup()
    check_port = free_port()
    await web.TCPSite(check, "127.0.0.1", check_port).start()
    settings = loopback_settings(check_port=check_port)
    access_log = folder / "access.jsonl"
    envoy = envoy_process.EnvoyProcess(
        billing_filters_config(settings, backend_url, access_log, ca_bundle),
        base_id=settings.gateway_port,  # unique while the port is ours
        log_path=folder / "envoy.log",
        concurrency=1,
        file_flush_interval_ms=10,
    )
    try:
        async with envoy, aiohttp.ClientSession() as session:
            yield Gateway(envoy, settings.gateway_port, backend_url, access_log, session)
    finally:
        await check.cleanup()
