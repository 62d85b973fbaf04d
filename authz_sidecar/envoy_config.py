"""The Envoy bootstrap of the gateway, rendered from Settings (the one source of ports and limits).

Why rendered in code: the local stack, the tests and the Helm chart must run the very same Envoy
configuration; a second hand-kept YAML would drift from Settings. ``render()`` returns the v3
bootstrap as a dict (static resources only, no xDS), ``render_yaml()`` the text Envoy reads.

Shape::

    listener bind_host:gateway_port ── HCM ── ext_authz ── Lua (usage_filter.lua)
                                              ── Lua (upstream_headers.lua) ── router
      ext_authz: HTTP Check → billing_sidecar_check (check_port, /check + the client's path),
                 or (check_transport grpc) the gRPC Check → billing_sidecar_grpc
      /v1/*                      → llm_backend           (ext_authz + both Lua filters on)
      /user/ /billing/ /stripe/  → billing_sidecar_http  (all three off: the sidecar
      /openapi.json                                       authenticates these itself)
      anything else              → 404, OpenAI error JSON (no Check)
    listener bind_host:metrics_port (only when metrics_port is set) ── HCM ── router
      GET /metrics               → billing_sidecar_admin (admin_port, the sidecar's /metrics)
      GET /metrics/envoy         → envoy_admin (the admin socket's /stats/prometheus)
      anything else, any method  → 404 (no filter, no access log)
    access logs: gRPC ALS → billing_sidecar_grpc (settlement within milliseconds; carries the
                 access-log secret; off when ``access_log_grpc`` is false), and JSON lines in
                 ``access_log_path`` (the durable record the sidecar follows; operators read it)
    clusters to the sidecar: INTERNAL_HOST (loopback) only
    admin: a Unix socket (mode 0600) in the run dir, never a TCP port

Settings that are not obvious, and why:

- ``generate_request_id`` + ``preserve_external_request_id: false`` and NO
  ``internal_address_config``: the x-request-id is the idempotency key of a request's
  settlement (``usage:<x-request-id>``). Envoy must mint it for every request; a client that
  could choose it could replay one settlement for many requests. Envoy keeps a client's id only
  from an "internal" address; since 1.33 no address is internal unless configured, but an
  explicit empty ``internal_address_config: {}`` falls back to trusting RFC 1918 and loopback.
  The same rule makes Envoy drop client-sent ``x-envoy-*`` headers.
- ``use_remote_address`` + ``xff_num_trusted_hops`` = ``trusted_proxy_hops``: Envoy's trusted
  client address is its peer (0), or the Nth address from the right of the X-Forwarded-For it
  received (N proxies, e.g. a load balancer, in front). Envoy sets ``x-envoy-external-address``
  to it, replacing any the client sent; the sidecar's signup limit counts per that header.
- ``normalize_path`` + ``merge_slashes`` + rejecting escaped slashes: routing is by path
  prefix, and the backend receives our credential, so ``/v1/../key/generate`` must not reach a
  LiteLLM admin endpoint: after normalization it is an unknown path and answers 404.
- ext_authz ``failure_mode_allow: false``: when the sidecar is down, requests fail (503)
  instead of being served unbilled. ``with_request_body`` buffers the body (the Check needs
  the model and max_tokens) up to ``request_body_bytes_max``; the listener's buffer limit is
  raised to match, or Envoy's 1 MiB default would cap it first.
- ``accept-encoding: identity`` towards the backend: the Lua filter reads usage from the plain
  body; a gzip answer would be unreadable and unbillable.
- route ``timeout`` = ``upstream_timeout_s`` (also the idle timeout): a request never outlives
  its hold, whose TTL Settings keeps longer.
- gRPC ALS batching, ``buffer_size_bytes`` 16 KiB and ``buffer_flush_interval`` 10 ms: each of
  Envoy's workers sends what ended in the last 10 ms as one message (or sooner, at 16 KiB), so a
  wallet is charged within that interval of its request, and under load one gRPC message and one
  settlement transaction carry many requests (less sidecar and PostgreSQL CPU per request than
  one message per entry: docs/benchmarks.md).
- ext_authz is the HTTP flavour (``http_service``) unless ``check_transport`` is "grpc" (why:
  docs/architecture.md, "The Check"). HTTP passes only a few headers unless told:
  ``x-request-id`` (the settlement's key), ``content-type`` and ``x-api-key`` (where Anthropic
  clients put their key) are added. No header of the Check's answer goes upstream; its
  ``x-billingproxy-*`` headers become dynamic metadata, never request headers. The backend
  credential is not the Check's to give: the backend route sets it (``backend_auth_header``),
  so it never crosses the loopback Check port, where any local process holding a client key
  could read it. The gRPC flavour
  needs ``pack_as_bytes`` (a body that is not UTF-8 would otherwise be mangled).
- Only allow-listed headers reach the backend (docs/decisions/0003-upstream-headers.md): Envoy
  has no "keep only these" option, so a second, small Lua filter (upstream_headers.lua), last
  before the router, removes every request header not in :data:`UPSTREAM_HEADERS`,
  ``upstream_headers`` — credentials included, whatever their name. After it the router sets only
  ``host``, ``accept-encoding: identity`` and the backend credential: ``suppress_envoy_headers``
  keeps its x-envoy-* headers (the original host, the timeout hint) from the backend, and the
  client's x-envoy-upstream-service-time from the client.
- The sidecar clusters are on loopback (same pod). The gRPC one must speak HTTP/2, declared
  with ``HttpProtocolOptions.explicit_http_config``; the Check's is HTTP/1.1.
- The gRPC access log sends ``access_log_secret`` in its stream's initial metadata
  (``contract.ACCESS_LOG_SECRET_HEADER``); the sidecar settles nothing from a stream without it. The
  rendered file therefore holds a secret: EnvoyProcess writes it mode 0600.
- The admin interface is a Unix socket (``admin_socket``, mode 0600), not a TCP port: on a TCP
  port any local user could read stats or, worse, POST /quitquitquit or change log levels.
- The metrics listener (``metrics_port``, off by default) is how Prometheus reaches the
  sidecar's /metrics, which stays on loopback (docs/decisions/0028-metrics-listener.md). It is a
  listener of its own, so nothing of the gateway's applies to it and nothing of it reaches the
  gateway's routes: two exact GET routes, read-only, and a 404 for every other request. It has
  no ext_authz (there is nothing to bill), and no access log at all: its requests must never
  reach settlement, nor `billingproxy reconcile` through the JSON log. Envoy's own statistics
  come from its admin socket through a cluster with a ``pipe`` address, with the path rewritten
  to /stats/prometheus; no other admin path can be asked for.
- Dynamic metadata reaches the sidecar without extra settings: the ALS entry's
  ``common_properties.metadata`` holds all of the stream's dynamic metadata, i.e. namespace
  ``envoy.filters.http.ext_authz`` (what the Check returned) and ``billingproxy.usage`` (the
  Lua filter: the raw text of the final usage object as strings, ``finished`` as a bool).
  Those names, and every other one Envoy and the sidecar share, are contract.py's; the usage
  filter gets them rendered into its source (:func:`usage_filter_lua`), never copied.
- Local replies Envoy makes itself (upstream down or timed out, body too large, sidecar
  unreachable) are rewritten to OpenAI's error shape; ext_authz denials are left as the sidecar
  wrote them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from authz_sidecar import api_errors, contract
from billing import errors
from billing.settings import INTERNAL_HOST, Settings

BACKEND_CLUSTER = "llm_backend"
SIDECAR_CHECK_CLUSTER = "billing_sidecar_check"
SIDECAR_GRPC_CLUSTER = "billing_sidecar_grpc"
SIDECAR_HTTP_CLUSTER = "billing_sidecar_http"
SIDECAR_ADMIN_CLUSTER = "billing_sidecar_admin"
ENVOY_ADMIN_CLUSTER = "envoy_admin"
# The metrics listener's only two routes (GET), and the admin path the second one asks for.
METRICS_PATH = "/metrics"
ENVOY_METRICS_PATH = "/metrics/envoy"
ENVOY_ADMIN_METRICS_PATH = "/stats/prometheus"
# ext_authz files the Check's metadata under the filter's name, so the name is the contract's.
EXT_AUTHZ_FILTER = contract.AUTHZ_NAMESPACE
LUA_FILTER = "envoy.filters.http.lua"
# The second Lua filter (a filter's name keys its per-route config, so it needs its own).
UPSTREAM_HEADERS_FILTER = "billingproxy.upstream_headers"
ACCESS_LOG_NAME = "billingproxy"
# Envoy writes its access-log file at least this often (``--file-flush-interval-msec``; Envoy's
# own default is 10 s): what a crashed Envoy loses from the file is at most this much.
FILE_FLUSH_INTERVAL_MS = 200
SIDECAR_PREFIXES = ("/user/", "/billing/", "/stripe/", "/account/")
SIDECAR_PATHS = ("/openapi.json", "/account")
LUA_SOURCE = Path(__file__).with_name("usage_filter.lua")
UPSTREAM_HEADERS_SOURCE = Path(__file__).with_name("upstream_headers.lua")
# Request headers a client may send to the backend (docs/decisions/0003-upstream-headers.md):
# the body's type and size, what the client accepts, who it is, and the provider API version.
# Not forwarded, among others: anthropic-beta (a beta may change what a request costs: the
# 1M-token context window is priced nowhere in the map, the Files API reads stored objects;
# an operator who wants one adds it with BILLINGPROXY_UPSTREAM_HEADERS), every credential (authorization,
# x-api-key, api-key, x-goog-api-key, proxy-authorization), cookies, openai-organization and
# openai-project (they choose which of the gateway's accounts pays), x-forwarded-for (the
# client's address is not the backend's business) and our own x-billingproxy-*.
UPSTREAM_HEADERS = (
    "content-type",
    "content-length",
    "accept",
    "user-agent",
    "openai-beta",
    "anthropic-version",
    "x-request-id",  # Envoy's own (a client's is replaced), for correlating with the backend's logs
)
# The longest Unix socket path (sockaddr_un.sun_path is 108 bytes with the NUL).
UNIX_SOCKET_PATH_MAX = 107

ACCESS_LOG_BUFFER_BYTES = 16 * 1024
ACCESS_LOG_FLUSH_INTERVAL_MS = 10
SIDECAR_ROUTE_TIMEOUT_S = 30
METRICS_ROUTE_TIMEOUT_S = 10
CONNECT_TIMEOUT_S = 5
DOWNSTREAM_CONNECTIONS_MAX = 10_000

_TYPE = "type.googleapis.com/"
_HCM = _TYPE + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_EXT_AUTHZ = _TYPE + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
_EXT_AUTHZ_PER_ROUTE = _TYPE + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"
_LUA = _TYPE + "envoy.extensions.filters.http.lua.v3.Lua"
_LUA_PER_ROUTE = _TYPE + "envoy.extensions.filters.http.lua.v3.LuaPerRoute"
_ROUTER = _TYPE + "envoy.extensions.filters.http.router.v3.Router"
_HTTP_OPTIONS = _TYPE + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_UPSTREAM_TLS = _TYPE + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_CEL_FILTER = _TYPE + "envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter"
_GRPC_ALS = _TYPE + "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig"
_FILE_LOG = _TYPE + "envoy.extensions.access_loggers.file.v3.FileAccessLog"
_DOWNSTREAM_CONNECTIONS = (
    _TYPE + "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig"
)

# Envoy's own failures; ext_authz denials (flag UAEX) keep the sidecar's body untouched.
_ENVOY_FAILURE_FLAGS = ("UH", "UF", "UO", "NR", "URX", "NC", "UC", "UT", "UPE", "UMSDR", "DPE", "OM")


class EnvoyRenderError(errors.UserFacingError, ValueError):
    """The configuration cannot be rendered (bad backend URL, no CA bundle for https)."""


@dataclasses.dataclass(frozen=True)
class Backend:
    """Where /v1/* goes, parsed from an OpenAI-compatible base URL.

    The URL's path is where the API's ``/v1`` lives: ``http://litellm:4000`` keeps ``/v1/…``,
    ``https://generativelanguage.googleapis.com/v1beta/openai`` turns ``/v1/chat/completions``
    into ``/v1beta/openai/chat/completions``.
    """

    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def from_url(cls, url: str) -> Backend:
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EnvoyRenderError(f"backend URL must be http(s)://host[:port][/path], not {url!r}")
        if parts.query or parts.fragment or parts.username:
            raise EnvoyRenderError(f"backend URL must not carry a query, fragment or user: {url!r}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise EnvoyRenderError(f"backend URL has a bad port: {url!r}") from None
        return cls(scheme=parts.scheme, host=parts.hostname, port=port, path=parts.path.rstrip("/"))

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    @property
    def authority(self) -> str:
        default_port = 443 if self.tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default_port else f"{host}:{self.port}"


def render(
    settings: Settings, *, backend_url: str, ca_bundle: Path | None = None, admin_socket: Path | None = None
) -> dict[str, Any]:
    """The Envoy v3 bootstrap for these settings, sending /v1/* to ``backend_url``.

    ``ca_bundle`` verifies an https backend; by default the system's bundle (``SSL_CERT_FILE``,
    then OpenSSL's default file, then certifi's). ``admin_socket``: where Envoy's admin listens
    (``settings.envoy_admin_socket`` by default); each Envoy on a machine needs its own.
    """
    if not settings.access_log_secret:
        raise EnvoyRenderError(
            "BILLINGPROXY_ACCESS_LOG_SECRET is not set: Envoy must send it with the access log, or "
            "the sidecar settles nothing (`billingproxy up` makes one; see docs/configuration.md)"
        )
    backend = Backend.from_url(backend_url)
    trusted_ca = _ca_bundle(ca_bundle) if backend.tls else None
    admin_path = Path(admin_socket) if admin_socket is not None else settings.envoy_admin_socket
    if not admin_path.is_absolute() or len(os.fsencode(admin_path)) > UNIX_SOCKET_PATH_MAX:
        raise EnvoyRenderError(
            f"Envoy's admin socket must be an absolute path of at most {UNIX_SOCKET_PATH_MAX} bytes, "
            f"not {str(admin_path)!r}: choose a shorter BILLINGPROXY_DATA_DIR"
        )
    listeners = [_listener(settings, backend)]
    clusters = [
        _backend_cluster(backend, trusted_ca),
        _loopback_cluster(SIDECAR_CHECK_CLUSTER, settings.check_port, http2=False),
        _loopback_cluster(SIDECAR_GRPC_CLUSTER, settings.grpc_port, http2=True),
        _loopback_cluster(SIDECAR_HTTP_CLUSTER, settings.api_port, http2=False),
    ]
    if settings.metrics_port:
        listeners.append(_metrics_listener(settings))
        clusters += [
            _loopback_cluster(SIDECAR_ADMIN_CLUSTER, settings.admin_port, http2=False),
            _envoy_admin_cluster(admin_path),
        ]
    return {
        # Owner only (0600): the admin can stop Envoy and read every counter.
        "admin": {"address": {"pipe": {"path": str(admin_path), "mode": 0o600}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": _DOWNSTREAM_CONNECTIONS,
                        "max_active_downstream_connections": DOWNSTREAM_CONNECTIONS_MAX,
                    },
                }
            ]
        },
    }


def render_yaml(
    settings: Settings, *, backend_url: str, ca_bundle: Path | None = None, admin_socket: Path | None = None
) -> str:
    """``render()`` as YAML, the form ``envoy -c`` reads. It holds the access-log secret."""
    config = render(settings, backend_url=backend_url, ca_bundle=ca_bundle, admin_socket=admin_socket)
    return yaml.safe_dump(config, sort_keys=False, width=100)


# --- listener ------------------------------------------------------------------------------------


def _listener(settings: Settings, backend: Backend) -> dict[str, Any]:
    return {
        "name": "gateway",
        "address": _socket_address(settings.bind_host, settings.gateway_port),
        "per_connection_buffer_limit_bytes": settings.request_body_bytes_max,
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": _connection_manager(settings, backend),
                    }
                ]
            }
        ],
    }


def _connection_manager(settings: Settings, backend: Backend) -> dict[str, Any]:
    return {
        "@type": _HCM,
        "stat_prefix": "gateway",
        "codec_type": "AUTO",
        "use_remote_address": True,
        "xff_num_trusted_hops": settings.trusted_proxy_hops,
        "generate_request_id": True,
        "preserve_external_request_id": False,
        "always_set_request_id_in_response": True,
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "REJECT_REQUEST",
        "route_config": _route_config(settings, backend),
        "http_filters": [
            _ext_authz_filter(settings),
            _lua_filter(),
            _upstream_headers_filter(settings),
            _router_filter(),
        ],
        "access_log": [
            *([_grpc_access_log(settings)] if settings.access_log_grpc else []),
            _file_access_log(settings),
        ],
        "local_reply_config": _local_reply_config(),
    }


def _metrics_listener(settings: Settings) -> dict[str, Any]:
    manager = {
        "@type": _HCM,
        "stat_prefix": "metrics",
        "codec_type": "AUTO",
        "use_remote_address": True,
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "REJECT_REQUEST",
        "route_config": {
            "name": "metrics",
            "virtual_hosts": [
                {
                    "name": "metrics",
                    "domains": ["*"],
                    "routes": [
                        _metrics_route(METRICS_PATH, SIDECAR_ADMIN_CLUSTER),
                        _metrics_route(ENVOY_METRICS_PATH, ENVOY_ADMIN_CLUSTER, ENVOY_ADMIN_METRICS_PATH),
                        _not_found_route(per_filter_config=False),
                    ],
                }
            ],
        },
        "http_filters": [_router_filter()],
    }
    return {
        "name": "metrics",
        "address": _socket_address(settings.bind_host, settings.metrics_port),
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
        ],
    }


def _metrics_route(path: str, cluster: str, rewrite: str | None = None) -> dict[str, Any]:
    route: dict[str, Any] = {"cluster": cluster, "timeout": f"{METRICS_ROUTE_TIMEOUT_S}s"}
    if rewrite is not None:
        route["prefix_rewrite"] = rewrite  # with an exact path match, the whole path is replaced
    return {
        "name": "metrics " + path,
        "match": {"path": path, "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
        "route": route,
    }


# --- routes --------------------------------------------------------------------------------------


def _route_config(settings: Settings, backend: Backend) -> dict[str, Any]:
    sidecar_routes = [_sidecar_route({"prefix": prefix}) for prefix in SIDECAR_PREFIXES] + [
        _sidecar_route({"path": path}) for path in SIDECAR_PATHS
    ]
    return {
        "name": "gateway",
        "virtual_hosts": [
            {
                "name": "gateway",
                "domains": ["*"],
                "routes": [_backend_route(settings, backend), *sidecar_routes, _not_found_route()],
            }
        ],
    }


def _backend_route(settings: Settings, backend: Backend) -> dict[str, Any]:
    route: dict[str, Any] = {
        "cluster": BACKEND_CLUSTER,
        "host_rewrite_literal": backend.authority,
        "timeout": f"{settings.upstream_timeout_s}s",
        "idle_timeout": f"{settings.upstream_timeout_s}s",
    }
    if backend.path and backend.path != "/v1":
        route["prefix_rewrite"] = backend.path + "/"
    return {
        "name": "llm",
        "match": {"prefix": "/v1/"},
        "route": route,
        "request_headers_to_add": [
            {
                "header": {"key": "accept-encoding", "value": "identity"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            },
            *_credential_header(settings),
        ],
    }


def _credential_header(settings: Settings) -> list[dict[str, Any]]:
    """The backend credential, set by the route (after every filter, the client's key already
    removed by the allow-list): it lives in this config (mode 0600) and never travels in the
    Check's answer, which any local process holding a client key could read."""
    credential = backend_credential(settings.backend_auth_header, settings.backend_api_key)
    if credential is None:
        return []
    return [
        {
            "header": {"key": credential[0], "value": credential[1]},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    ]


def _sidecar_route(match: dict[str, str]) -> dict[str, Any]:
    return {
        "name": "sidecar " + next(iter(match.values())),
        "match": match,
        "route": {"cluster": SIDECAR_HTTP_CLUSTER, "timeout": f"{SIDECAR_ROUTE_TIMEOUT_S}s"},
        "typed_per_filter_config": _filters_disabled(),
    }


def _not_found_route(*, per_filter_config: bool = True) -> dict[str, Any]:
    route: dict[str, Any] = {
        "name": "not found",
        "match": {"prefix": "/"},
        "direct_response": {
            "status": 404,
            "body": {"inline_string": _openai_error_json("Unknown path.", "not_found")},
        },
        "response_headers_to_add": [
            {
                "header": {"key": "content-type", "value": "application/json"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ],
    }
    if per_filter_config:
        route["typed_per_filter_config"] = _filters_disabled()
    return route


def _filters_disabled() -> dict[str, Any]:
    return {
        EXT_AUTHZ_FILTER: {"@type": _EXT_AUTHZ_PER_ROUTE, "disabled": True},
        LUA_FILTER: {"@type": _LUA_PER_ROUTE, "disabled": True},
        UPSTREAM_HEADERS_FILTER: {"@type": _LUA_PER_ROUTE, "disabled": True},
    }


def _openai_error_json(message: str, code: str) -> str:
    error = {"message": message, "type": "invalid_request_error", "code": code}
    return json.dumps({"error": error}, separators=(",", ":"))


# --- HTTP filters --------------------------------------------------------------------------------


def _ext_authz_filter(settings: Settings) -> dict[str, Any]:
    config: dict[str, Any] = {
        "@type": _EXT_AUTHZ,
        "transport_api_version": "V3",
        "failure_mode_allow": False,
        "status_on_error": {"code": contract.CHECK_FAILED_STATUS},
        "include_peer_certificate": False,
        "with_request_body": {
            "max_request_bytes": settings.request_body_bytes_max,
            "allow_partial_message": False,
        },
    }
    if settings.check_transport == "grpc":
        config["grpc_service"] = {
            "envoy_grpc": {"cluster_name": SIDECAR_GRPC_CLUSTER},
            "timeout": f"{settings.check_timeout_ms / 1000:g}s",
        }
        config["with_request_body"]["pack_as_bytes"] = True  # the body as bytes, not a UTF-8 string
    else:
        # On top of Envoy's defaults (method, path, host, content-length, authorization): the
        # settlement's key, the body's type, and where Anthropic clients send their key. (The
        # filter's own field; the one inside http_service's authorization_request is deprecated.)
        config["allowed_headers"] = {
            "patterns": [{"exact": "x-request-id"}, {"exact": "content-type"}, {"exact": "x-api-key"}]
        }
        config["http_service"] = {
            "server_uri": {
                "uri": f"http://{INTERNAL_HOST}:{settings.check_port}",
                "cluster": SIDECAR_CHECK_CLUSTER,
                "timeout": f"{settings.check_timeout_ms / 1000:g}s",
            },
            "path_prefix": contract.CHECK_PATH_PREFIX,
            "authorization_response": {
                # Admitted: nothing goes upstream (the route sets the backend credential); the
                # Check's facts become dynamic metadata, never request headers.
                "dynamic_metadata_from_headers": {"patterns": [{"prefix": contract.METADATA_HEADER_PREFIX}]},
                # Denied: what the client sees besides the status and body.
                "allowed_client_headers": {"patterns": [{"exact": "content-type"}, {"exact": "retry-after"}]},
            },
        }
    return {"name": EXT_AUTHZ_FILTER, "typed_config": config}


def _lua_filter() -> dict[str, Any]:
    return {
        "name": LUA_FILTER,
        "typed_config": {
            "@type": _LUA,
            "default_source_code": {"inline_string": usage_filter_lua()},
        },
    }


def _upstream_headers_filter(settings: Settings) -> dict[str, Any]:
    """The allow-list of request headers (upstream_headers.lua), with the names rendered in."""
    # No credential header is allowed: the client's key goes here, and the route adds the backend's.
    allowed = [*UPSTREAM_HEADERS, *(name for name in settings.upstream_headers if not name.endswith("*"))]
    prefixes = [name[:-1] for name in settings.upstream_headers if name.endswith("*")]
    return {
        "name": UPSTREAM_HEADERS_FILTER,
        "typed_config": {
            "@type": _LUA,
            "default_source_code": {"inline_string": upstream_headers_lua(allowed, prefixes)},
            # The route was chosen on the client's request; removing headers must not re-choose it
            # (and re-matching without x-forwarded-proto finds no route at all).
            "clear_route_cache": False,
        },
    }


def upstream_headers_lua(names: list[str], prefixes: list[str]) -> str:
    """upstream_headers.lua with its two tables filled in (its lines marked ``-- rendered``)."""

    def table(items: list[str]) -> str:
        return "{" + ", ".join(f'["{item}"] = true' for item in sorted(set(items))) + "}"

    def prefix_list(items: list[str]) -> str:
        return "{" + ", ".join(f'"{item}"' for item in sorted(set(items))) + "}"

    for item in (*names, *prefixes):
        # Settings checks the names; this only keeps the Lua well-formed whatever it is given.
        if not item or not all(c.isalnum() or c == "-" for c in item) or item != item.lower():
            raise EnvoyRenderError(f"not a lower-case header name: {item!r}")
    return _rendered_lua(
        UPSTREAM_HEADERS_SOURCE,
        {
            "local ALLOWED = {}  -- rendered: exact names": f"local ALLOWED = {table(names)}",
            "local ALLOWED_PREFIXES = {}  -- rendered: "
            "prefixes": f"local ALLOWED_PREFIXES = {prefix_list(prefixes)}",
        },
    )


def usage_filter_lua() -> str:
    """usage_filter.lua with the contract's values in its lines marked ``-- rendered: contract``."""
    rendered = {}
    for name, value in contract.LUA_CONSTANTS.items():
        # Lua reads "..." as Python would only for plain characters; the contract's are.
        if not all(c.isascii() and c.isprintable() and c not in '"\\' for c in value):
            raise EnvoyRenderError(f"not a plain Lua string: {value!r}")
        rendered[f"local {name} = nil  -- rendered: contract"] = f'local {name} = "{value}"'
    source = _rendered_lua(LUA_SOURCE, rendered)
    unknown = re.findall(r"^local (\w+) = nil  -- rendered: contract$", source, re.MULTILINE)
    if unknown:
        raise EnvoyRenderError(
            f"{LUA_SOURCE.name} marks {unknown}, which contract.LUA_CONSTANTS does not define"
        )
    return source


def _rendered_lua(path: Path, lines: dict[str, str]) -> str:
    """The Lua file at ``path`` with each marker line (a key of ``lines``) replaced by its value:
    one line for one, so Envoy's Lua errors name the file's own line numbers."""
    source = path.read_text(encoding="utf-8")
    for marker, line in lines.items():
        if source.count(marker) != 1:
            raise EnvoyRenderError(f"{path.name} must contain the line {marker!r} once")
        source = source.replace(marker, line)
    return source


def _router_filter() -> dict[str, Any]:
    # No x-envoy-* headers of the router's own (x-envoy-original-host, the timeout hint) go to
    # the backend, so that what reaches it is the allow-list, the host and accept-encoding only.
    return {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": _ROUTER, "suppress_envoy_headers": True},
    }


# --- access logs and local replies ---------------------------------------------------------------


def _grpc_access_log(settings: Settings) -> dict[str, Any]:
    return {
        "name": "envoy.access_loggers.http_grpc",
        "typed_config": {
            "@type": _GRPC_ALS,
            "common_config": {
                "log_name": ACCESS_LOG_NAME,
                "grpc_service": {
                    "envoy_grpc": {"cluster_name": SIDECAR_GRPC_CLUSTER},
                    # Sent once per stream; the sidecar refuses a stream without it.
                    "initial_metadata": [
                        {"key": contract.ACCESS_LOG_SECRET_HEADER, "value": settings.access_log_secret}
                    ],
                },
                "transport_api_version": "V3",
                "buffer_size_bytes": ACCESS_LOG_BUFFER_BYTES,
                "buffer_flush_interval": f"{ACCESS_LOG_FLUSH_INTERVAL_MS / 1000}s",
            },
        },
    }


def _file_access_log(settings: Settings) -> dict[str, Any]:
    """One JSON line per request in ``settings.access_log_path``: the durable record the sidecar
    settles from whatever the gRPC log did not deliver (authz_sidecar/access_log_file.py), and
    what ``billingproxy reconcile`` reads. Envoy appends (and creates the file, not its folder);
    the sidecar rotates it and asks Envoy to reopen it."""
    return {
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": _FILE_LOG,
            "path": str(settings.access_log_path),
            "log_format": {
                "json_format": {
                    "time": "%START_TIME%",
                    "request_id": "%REQ(X-REQUEST-ID)%",
                    "method": "%REQ(:METHOD)%",
                    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
                    "status": "%RESPONSE_CODE%",
                    "flags": "%RESPONSE_FLAGS%",
                    "details": "%RESPONSE_CODE_DETAILS%",
                    "duration_ms": "%DURATION%",
                    "bytes_received": "%BYTES_RECEIVED%",
                    "bytes_sent": "%BYTES_SENT%",
                    "upstream": "%UPSTREAM_HOST%",
                    "authz": f"%DYNAMIC_METADATA({contract.AUTHZ_NAMESPACE})%",
                    "usage": f"%DYNAMIC_METADATA({contract.USAGE_NAMESPACE})%",
                }
            },
        },
    }


def _local_reply_config() -> dict[str, Any]:
    def json_body(message: str, error_type: str, code: str) -> dict[str, Any]:
        error = {"message": message, "type": error_type, "code": code}
        return {"json_format": {"error": error}, "content_type": "application/json"}

    def status_is(code: int) -> dict[str, Any]:
        # runtime_key is required by the schema; nothing sets it.
        value = {"default_value": code, "runtime_key": "billingproxy.local_reply_status"}
        return {"status_code_filter": {"comparison": {"op": "EQ", "value": value}}}

    uaex = {"response_flag_filter": {"flags": ["UAEX"]}}
    return {
        "mappers": [
            {
                "filter": {"response_flag_filter": {"flags": list(_ENVOY_FAILURE_FLAGS)}},
                "body_format_override": json_body(
                    "%LOCAL_REPLY_BODY%", "server_error", "%RESPONSE_CODE_DETAILS%"
                ),
            },
            {
                # ext_authz flags denials and an unreachable sidecar alike (UAEX); only the
                # latter answers status_on_error (503) with an empty body.
                "filter": {"and_filter": {"filters": [uaex, status_is(contract.CHECK_FAILED_STATUS)]}},
                "body_format_override": json_body(
                    api_errors.BILLING_UNAVAILABLE.message,
                    api_errors.BILLING_UNAVAILABLE.type,
                    api_errors.BILLING_UNAVAILABLE.code,
                ),
            },
            {
                # Envoy refuses an escaped slash or backslash in the path itself, with an empty
                # body; its response details name the cause.
                "filter": {
                    "extension_filter": {
                        "name": "envoy.access_loggers.extension_filters.cel",
                        "typed_config": {
                            "@type": _CEL_FILTER,
                            "expression": "response.code_details == 'path_normalization_failed'",
                        },
                    }
                },
                "body_format_override": json_body(
                    # No percent sign: the text is an Envoy format string.
                    "The request path is not valid: it has an encoded slash or backslash."
                    " Write the path with plain slashes.",
                    "invalid_request_error",
                    "invalid_path",
                ),
            },
            {
                "filter": status_is(413),
                "body_format_override": json_body(
                    "Request body too large.", "invalid_request_error", "request_too_large"
                ),
            },
        ],
    }


# --- clusters ------------------------------------------------------------------------------------


def _backend_cluster(backend: Backend, trusted_ca: Path | None) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": BACKEND_CLUSTER,
        "type": "STATIC" if backend.is_ip else "LOGICAL_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": f"{CONNECT_TIMEOUT_S}s",
        "load_assignment": _endpoints(BACKEND_CLUSTER, backend.host, backend.port),
    }
    if backend.tls:
        assert trusted_ca is not None
        san_type = "IP_ADDRESS" if backend.is_ip else "DNS"
        tls: dict[str, Any] = {
            "@type": _UPSTREAM_TLS,
            "common_tls_context": {
                "validation_context": {
                    "trusted_ca": {"filename": str(trusted_ca)},
                    # Envoy checks the chain only; the name must be matched explicitly.
                    "match_typed_subject_alt_names": [
                        {"san_type": san_type, "matcher": {"exact": backend.host}}
                    ],
                }
            },
        }
        if not backend.is_ip:
            tls["sni"] = backend.host
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": tls}
    return cluster


def _loopback_cluster(name: str, port: int, *, http2: bool) -> dict[str, Any]:
    protocol: dict[str, dict[str, Any]] = (
        {"http2_protocol_options": {}} if http2 else {"http_protocol_options": {}}
    )
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": _endpoints(name, INTERNAL_HOST, port),
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTIONS,
                "explicit_http_config": protocol,
            }
        },
    }


def _envoy_admin_cluster(admin_path: Path) -> dict[str, Any]:
    """Envoy's own admin, reached through its Unix socket (no TCP admin port exists)."""
    address = {"pipe": {"path": str(admin_path)}}
    return {
        "name": ENVOY_ADMIN_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": ENVOY_ADMIN_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
    }


def _endpoints(cluster: str, host: str, port: int) -> dict[str, Any]:
    return {
        "cluster_name": cluster,
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket_address(host, port)}}]}],
    }


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _ca_bundle(explicit: Path | None) -> Path:
    candidates: list[Path] = []
    if explicit is not None:
        candidates.append(explicit)
    else:
        paths = ssl.get_default_verify_paths()
        for raw in (os.environ.get(paths.openssl_cafile_env), paths.cafile, paths.openssl_cafile):
            if raw:
                candidates.append(Path(raw))
        try:
            import certifi  # noqa: PLC0415 (optional: used when installed)
        except ImportError:
            pass
        else:
            candidates.append(Path(certifi.where()))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise EnvoyRenderError(
        "an https backend needs a CA bundle to verify it: set SSL_CERT_FILE to a PEM file "
        f"(looked at: {', '.join(map(str, candidates)) or 'nothing'})"
    )


def backend_credential(header: str, api_key: str) -> tuple[str, str] | None:
    """The header the backend route sets on every request, or None with no credential:
    ``authorization: Bearer <key>`` (OpenAI, Gemini, LiteLLM) or ``x-api-key: <key>`` (Anthropic)."""
    if not api_key:
        return None
    return header, f"Bearer {api_key}" if header == "authorization" else api_key
