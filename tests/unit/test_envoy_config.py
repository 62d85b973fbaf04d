"""The rendered Envoy bootstrap: the facts that keep money right hold (fail-closed authz,
Envoy-minted request ids, sidecar routes unguarded by the Check, HTTP/2 to the gRPC sidecar, the
access-log secret, only allow-listed headers upstream, the sidecar on loopback whatever the bind
host, the admin on a private Unix socket). That Envoy itself accepts it is
tests/integration/test_envoy_config_validation.py (it runs Envoy)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.envoy_configs import (
    DEMO_BACKEND,
    GEMINI,
    SECRET,
    cluster,
    endpoint,
    hcm,
    route_for,
    settings,
)

from authz_sidecar import api_errors, contract, envoy_config
from billing.settings import Settings
from billingproxy.devstack import envoy_process


def test_render_yaml_is_render() -> None:
    configured = settings()
    assert yaml.safe_load(envoy_config.render_yaml(configured, backend_url=GEMINI)) == envoy_config.render(
        configured, backend_url=GEMINI
    )


def test_ports_and_limits_come_from_settings() -> None:
    configured = settings(
        bind_host="0.0.0.0",
        gateway_port=18080,
        api_port=18081,
        grpc_port=19001,
        check_port=19002,
        request_body_bytes_max=65536,
        upstream_timeout_s=60,
    )
    config = envoy_config.render(configured, backend_url=DEMO_BACKEND)
    listener = config["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 18080}
    assert listener["per_connection_buffer_limit_bytes"] == 65536
    # Only the public listener follows bind_host: the sidecar is reached on loopback.
    assert endpoint(cluster(config, envoy_config.SIDECAR_HTTP_CLUSTER)) == {
        "address": "127.0.0.1",
        "port_value": 18081,
    }
    assert endpoint(cluster(config, envoy_config.SIDECAR_GRPC_CLUSTER)) == {
        "address": "127.0.0.1",
        "port_value": 19001,
    }
    assert endpoint(cluster(config, envoy_config.SIDECAR_CHECK_CLUSTER)) == {
        "address": "127.0.0.1",
        "port_value": 19002,
    }
    llm = route_for(config, "/v1/chat/completions")["route"]
    assert llm["timeout"] == "60s"
    (authz,) = [f for f in hcm(config)["http_filters"] if f["name"] == envoy_config.EXT_AUTHZ_FILTER]
    assert authz["typed_config"]["with_request_body"]["max_request_bytes"] == 65536


def test_ext_authz_fails_closed_and_sees_the_body() -> None:
    config = envoy_config.render(settings(), backend_url=DEMO_BACKEND)
    filters = hcm(config)["http_filters"]
    assert [f["name"] for f in filters] == [
        envoy_config.EXT_AUTHZ_FILTER,
        envoy_config.LUA_FILTER,
        envoy_config.UPSTREAM_HEADERS_FILTER,
        "envoy.filters.http.router",
    ]
    authz = filters[0]["typed_config"]
    assert authz["failure_mode_allow"] is False
    assert authz["transport_api_version"] == "V3"
    service = authz["http_service"]
    assert service["server_uri"]["cluster"] == envoy_config.SIDECAR_CHECK_CLUSTER
    assert service["path_prefix"] == contract.CHECK_PATH_PREFIX
    # The settlement's key must reach the Check: Envoy passes only a few headers by default.
    passed = {p["exact"] for p in authz["allowed_headers"]["patterns"]}
    assert {"x-request-id", "content-type", "x-api-key"} <= passed
    answer = service["authorization_response"]
    # Nothing of the Check's answer goes upstream; its facts become metadata only.
    assert "allowed_upstream_headers" not in answer
    assert answer["dynamic_metadata_from_headers"]["patterns"] == [{"prefix": "x-billingproxy-"}]
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    check_cluster = clusters[envoy_config.SIDECAR_CHECK_CLUSTER]
    assert (
        check_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
            "socket_address"
        ]["port_value"]
        == settings().check_port
    )
    assert authz["with_request_body"]["allow_partial_message"] is False
    lua = filters[1]["typed_config"]["default_source_code"]["inline_string"]
    assert "bodyChunks()" in lua and "billingproxy.usage" in lua


def test_request_ids_are_minted_by_envoy() -> None:
    manager = hcm(envoy_config.render(settings(), backend_url=DEMO_BACKEND))
    assert manager["use_remote_address"] is True
    assert manager["generate_request_id"] is True
    assert manager["preserve_external_request_id"] is False
    # An explicit internal_address_config, even empty, trusts RFC 1918 and loopback clients'
    # x-request-id; without one, no client is trusted.
    assert "internal_address_config" not in manager


@pytest.mark.parametrize("path", ["/user/signup", "/billing/balance", "/stripe/webhook", "/openapi.json"])
def test_sidecar_routes_skip_the_check_and_the_lua_filters(path: str) -> None:
    route = route_for(envoy_config.render(settings(), backend_url=DEMO_BACKEND), path)
    assert route["route"]["cluster"] == envoy_config.SIDECAR_HTTP_CLUSTER
    per_filter = route["typed_per_filter_config"]
    assert per_filter[envoy_config.EXT_AUTHZ_FILTER]["disabled"] is True
    assert per_filter[envoy_config.LUA_FILTER]["disabled"] is True
    # The HTTP API reads the client's own authorization header: the allow-list is /v1/'s only.
    assert per_filter[envoy_config.UPSTREAM_HEADERS_FILTER]["disabled"] is True


def test_v1_goes_to_the_backend_through_the_check() -> None:
    route = route_for(envoy_config.render(settings(), backend_url=DEMO_BACKEND), "/v1/chat/completions")
    assert route["route"]["cluster"] == envoy_config.BACKEND_CLUSTER
    assert "typed_per_filter_config" not in route
    assert "prefix_rewrite" not in route["route"]


def test_unknown_paths_get_an_openai_404_without_a_check() -> None:
    route = route_for(envoy_config.render(settings(), backend_url=DEMO_BACKEND), "/admin")
    assert route["direct_response"]["status"] == 404
    body = yaml.safe_load(route["direct_response"]["body"]["inline_string"])
    assert body["error"]["code"] == "not_found"
    assert route["typed_per_filter_config"][envoy_config.EXT_AUTHZ_FILTER]["disabled"] is True


def test_grpc_sidecar_cluster_speaks_http2_and_http_one_does_not() -> None:
    config = envoy_config.render(settings(), backend_url=DEMO_BACKEND)
    options_key = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    grpc = cluster(config, envoy_config.SIDECAR_GRPC_CLUSTER)["typed_extension_protocol_options"][options_key]
    assert grpc["explicit_http_config"] == {"http2_protocol_options": {}}
    http = cluster(config, envoy_config.SIDECAR_HTTP_CLUSTER)["typed_extension_protocol_options"][options_key]
    assert "http2_protocol_options" not in http["explicit_http_config"]


def test_grpc_access_log_goes_to_the_sidecar_in_small_batches() -> None:
    logs = hcm(envoy_config.render(settings(), backend_url=DEMO_BACKEND))["access_log"]
    (grpc,) = [log for log in logs if log["name"] == "envoy.access_loggers.http_grpc"]
    common = grpc["typed_config"]["common_config"]
    assert common["log_name"] == envoy_config.ACCESS_LOG_NAME
    assert common["grpc_service"]["envoy_grpc"]["cluster_name"] == envoy_config.SIDECAR_GRPC_CLUSTER
    assert common["transport_api_version"] == "V3"
    # Batched (one message per flush, not per entry), but a request is settled within ~10 ms.
    assert common["buffer_size_bytes"] == envoy_config.ACCESS_LOG_BUFFER_BYTES > 0
    assert common["buffer_flush_interval"] == "0.01s"
    (file,) = [log for log in logs if log["name"] == "envoy.access_loggers.file"]
    fields = file["typed_config"]["log_format"]["json_format"]
    assert f"%DYNAMIC_METADATA({contract.USAGE_NAMESPACE})%" in fields.values()
    assert f"%DYNAMIC_METADATA({contract.AUTHZ_NAMESPACE})%" in fields.values()


def test_the_access_log_file_is_in_the_data_dir_and_grpc_can_be_turned_off(tmp_path: Path) -> None:
    """The file the sidecar follows is the one Envoy writes; without the gRPC log the file is the
    only access log, and no other logger (stdout) competes for the record."""
    on = settings().replace(data_dir=tmp_path)
    logs = hcm(envoy_config.render(on, backend_url=DEMO_BACKEND))["access_log"]
    assert [log["name"] for log in logs] == ["envoy.access_loggers.http_grpc", "envoy.access_loggers.file"]
    assert logs[1]["typed_config"]["path"] == str(tmp_path.absolute() / "access-log" / "access.log")
    assert logs[1]["typed_config"]["path"] == str(on.access_log_path)
    off = hcm(envoy_config.render(on.replace(access_log_grpc=False), backend_url=DEMO_BACKEND))["access_log"]
    assert [log["name"] for log in off] == ["envoy.access_loggers.file"]


def test_https_backend_with_a_path_is_rewritten_and_verified() -> None:
    config = envoy_config.render(settings(), backend_url=GEMINI)
    route = route_for(config, "/v1/chat/completions")["route"]
    assert route["prefix_rewrite"] == "/v1beta/openai/"
    assert route["host_rewrite_literal"] == "generativelanguage.googleapis.com"
    backend = cluster(config, envoy_config.BACKEND_CLUSTER)
    assert backend["type"] == "LOGICAL_DNS"
    assert endpoint(backend) == {"address": "generativelanguage.googleapis.com", "port_value": 443}
    tls = backend["transport_socket"]["typed_config"]
    assert tls["sni"] == "generativelanguage.googleapis.com"
    validation = tls["common_tls_context"]["validation_context"]
    assert Path(validation["trusted_ca"]["filename"]).is_file()
    assert validation["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "generativelanguage.googleapis.com"}}
    ]


def test_plain_http_backend_keeps_its_port_in_the_host_header() -> None:
    config = envoy_config.render(settings(), backend_url="http://litellm:4000/")
    assert route_for(config, "/v1/models")["route"]["host_rewrite_literal"] == "litellm:4000"
    assert "transport_socket" not in cluster(config, envoy_config.BACKEND_CLUSTER)


def test_backend_url_v1_suffix_changes_nothing() -> None:
    config = envoy_config.render(settings(), backend_url="https://api.openai.com/v1")
    assert "prefix_rewrite" not in route_for(config, "/v1/models")["route"]


@pytest.mark.parametrize("url", ["ftp://x", "http://", "https://host/path?x=1", "http://host:port"])
def test_bad_backend_urls_are_refused(url: str) -> None:
    with pytest.raises(envoy_config.EnvoyRenderError):
        envoy_config.render(settings(), backend_url=url)


def test_missing_ca_bundle_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(envoy_config.EnvoyRenderError, match="nope.pem"):
        envoy_config.render(settings(), backend_url=GEMINI, ca_bundle=missing)


def test_envoy_binary_is_found_without_importing_envoy() -> None:
    binary = envoy_process.envoy_binary()
    assert binary.is_file()
    spec = importlib.util.find_spec("envoy")
    assert spec is not None and spec.submodule_search_locations
    assert binary.parent.parent in [Path(p) for p in spec.submodule_search_locations]


def test_the_grpc_check_flavour_sends_the_body_as_bytes_to_the_grpc_port() -> None:
    config = envoy_config.render(settings(check_transport="grpc"), backend_url=DEMO_BACKEND)
    authz = hcm(config)["http_filters"][0]["typed_config"]
    assert "http_service" not in authz
    assert authz["grpc_service"]["envoy_grpc"]["cluster_name"] == envoy_config.SIDECAR_GRPC_CLUSTER
    assert authz["with_request_body"]["pack_as_bytes"] is True
    assert authz["failure_mode_allow"] is False


# --- trust (issue 10): the access-log secret, loopback, the admin socket, the header allow-list ---


def test_the_access_log_carries_the_secret_and_rendering_needs_one() -> None:
    logs = hcm(envoy_config.render(settings(), backend_url=DEMO_BACKEND))["access_log"]
    (grpc,) = [log for log in logs if log["name"] == "envoy.access_loggers.http_grpc"]
    service = grpc["typed_config"]["common_config"]["grpc_service"]
    assert service["initial_metadata"] == [{"key": contract.ACCESS_LOG_SECRET_HEADER, "value": SECRET}]
    assert contract.ACCESS_LOG_SECRET_HEADER == "x-billingproxy-access-log-secret"
    with pytest.raises(envoy_config.EnvoyRenderError, match="BILLINGPROXY_ACCESS_LOG_SECRET"):
        envoy_config.render(Settings(), backend_url=DEMO_BACKEND)


def test_the_admin_is_a_unix_socket_its_owner_alone_may_open(tmp_path: Path) -> None:
    config = envoy_config.render(settings(data_dir=Path("relative-data")), backend_url=DEMO_BACKEND)
    pipe = config["admin"]["address"]["pipe"]
    assert pipe == {"path": str(Path("relative-data").absolute() / "run" / "envoy-admin.sock"), "mode": 0o600}
    assert "socket_address" not in config["admin"]["address"]
    chosen = tmp_path / "admin.sock"
    config = envoy_config.render(settings(), backend_url=DEMO_BACKEND, admin_socket=chosen)
    assert config["admin"]["address"]["pipe"]["path"] == str(chosen)
    assert envoy_process.admin_socket(yaml.safe_dump(config)) == chosen
    for bad in (Path("relative.sock"), Path("/" + "x" * 120 + ".sock")):
        with pytest.raises(envoy_config.EnvoyRenderError, match="admin socket"):
            envoy_config.render(settings(), backend_url=DEMO_BACKEND, admin_socket=bad)


def upstream_lua(config: dict[str, Any]) -> str:
    (headers,) = [f for f in hcm(config)["http_filters"] if f["name"] == envoy_config.UPSTREAM_HEADERS_FILTER]
    return headers["typed_config"]["default_source_code"]["inline_string"]


def test_the_upstream_allow_list_is_rendered_into_its_lua_filter() -> None:
    lua = upstream_lua(envoy_config.render(settings(backend_api_key="sk-b"), backend_url=DEMO_BACKEND))
    assert (
        'local ALLOWED = {["accept"] = true, ["anthropic-version"] = true, '
        '["content-length"] = true, ["content-type"] = true, '
        '["openai-beta"] = true, ["user-agent"] = true, ["x-request-id"] = true}' in lua
    )
    assert "local ALLOWED_PREFIXES = {}" in lua
    assert "envoy_on_request" in lua and "rendered:" not in lua

    # No credential header passes the filter, whatever the backend expects: the client's key goes,
    # and the backend route sets the backend's after every filter.
    anthropic = settings(
        backend_api_key="sk-b", backend_auth_header="x-api-key", upstream_headers=("x-demo-*", "traceparent")
    )
    config = envoy_config.render(anthropic, backend_url=DEMO_BACKEND)
    lua = upstream_lua(config)
    assert '["x-api-key"]' not in lua and '["authorization"]' not in lua and '["traceparent"] = true' in lua
    assert 'local ALLOWED_PREFIXES = {"x-demo-"}' in lua
    (llm,) = [
        r
        for r in config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
            "route_config"
        ]["virtual_hosts"][0]["routes"]
        if r.get("name") == "llm"
    ]
    added = {h["header"]["key"]: h["header"]["value"] for h in llm["request_headers_to_add"]}
    assert added["x-api-key"] == "sk-b"
    bare = envoy_config.render(settings(), backend_url=DEMO_BACKEND)
    (llm,) = [
        r
        for r in bare["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
            "route_config"
        ]["virtual_hosts"][0]["routes"]
        if r.get("name") == "llm"
    ]
    assert {h["header"]["key"] for h in llm["request_headers_to_add"]} == {"accept-encoding"}


def test_every_name_the_allow_list_can_never_forward_is_absent() -> None:
    for never in (
        "anthropic-beta",
        "x-api-key",
        "api-key",
        "x-goog-api-key",
        "proxy-authorization",
        "cookie",
        "openai-organization",
        "openai-project",
        "x-forwarded-for",
    ):
        assert never not in envoy_config.UPSTREAM_HEADERS
    assert not [name for name in envoy_config.UPSTREAM_HEADERS if name.startswith("x-billingproxy-")]


def test_the_lua_tables_take_only_header_names() -> None:
    with pytest.raises(envoy_config.EnvoyRenderError, match="header name"):
        envoy_config.upstream_headers_lua(['x"] = true, ["cookie'], [])


def test_the_backend_credential_goes_in_the_header_the_backend_expects() -> None:
    assert envoy_config.backend_credential("authorization", "sk-b") == ("authorization", "Bearer sk-b")
    assert envoy_config.backend_credential("x-api-key", "sk-ant") == ("x-api-key", "sk-ant")
    assert envoy_config.backend_credential("authorization", "") is None


def test_envoy_answers_an_unreachable_sidecar_as_the_api_does() -> None:
    replies = hcm(envoy_config.render(settings(), backend_url=DEMO_BACKEND))["local_reply_config"]["mappers"]
    unreachable = [
        mapper
        for mapper in replies
        if {"response_flag_filter": {"flags": ["UAEX"]}}
        in mapper["filter"].get("and_filter", {}).get("filters", [])
    ]
    (mapper,) = unreachable
    (status,) = [f for f in mapper["filter"]["and_filter"]["filters"] if "status_code_filter" in f]
    assert (
        status["status_code_filter"]["comparison"]["value"]["default_value"]
        == api_errors.BILLING_UNAVAILABLE.status
    )
    body = mapper["body_format_override"]
    assert body["json_format"] == json.loads(api_errors.BILLING_UNAVAILABLE.body())
    assert body["content_type"] == "application/json"


# --- the metrics listener: Prometheus' way to the sidecar's /metrics, nothing else ---------------


def metrics_listener(config: dict[str, Any]) -> dict[str, Any] | None:
    found = [item for item in config["static_resources"]["listeners"] if item["name"] == "metrics"]
    assert len(found) <= 1
    return found[0] if found else None


def test_the_metrics_listener_exists_only_when_its_port_is_set() -> None:
    off = envoy_config.render(settings(bind_host="0.0.0.0"), backend_url=DEMO_BACKEND)
    assert [item["name"] for item in off["static_resources"]["listeners"]] == ["gateway"]
    clusters = {c["name"] for c in off["static_resources"]["clusters"]}
    assert not clusters & {envoy_config.SIDECAR_ADMIN_CLUSTER, envoy_config.ENVOY_ADMIN_CLUSTER}

    on = envoy_config.render(settings(bind_host="0.0.0.0", metrics_port=19102), backend_url=DEMO_BACKEND)
    listener = metrics_listener(on)
    assert listener is not None
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 19102}
    # The gateway listener is unchanged, and still the first.
    assert on["static_resources"]["listeners"][0] == off["static_resources"]["listeners"][0]


def test_the_metrics_listener_routes_two_gets_and_refuses_the_rest(tmp_path: Path) -> None:
    admin = tmp_path / "admin.sock"
    config = envoy_config.render(
        settings(metrics_port=19102, admin_port=19090), backend_url=DEMO_BACKEND, admin_socket=admin
    )
    listener = metrics_listener(config)
    assert listener is not None
    [chain] = listener["filter_chains"]
    [network_filter] = chain["filters"]
    manager = network_filter["typed_config"]
    [host] = manager["route_config"]["virtual_hosts"]
    get = [{"name": ":method", "string_match": {"exact": "GET"}}]
    sidecar, envoy, rest = host["routes"]
    assert sidecar["match"] == {"path": "/metrics", "headers": get}
    assert sidecar["route"]["cluster"] == envoy_config.SIDECAR_ADMIN_CLUSTER
    assert "prefix_rewrite" not in sidecar["route"]
    assert envoy["match"] == {"path": "/metrics/envoy", "headers": get}
    assert envoy["route"]["cluster"] == envoy_config.ENVOY_ADMIN_CLUSTER
    assert envoy["route"]["prefix_rewrite"] == "/stats/prometheus"
    assert rest["match"] == {"prefix": "/"}
    assert rest["direct_response"]["status"] == 404
    # Nothing to bill and nothing to settle: no Check, no Lua, no access log of either kind.
    assert [f["name"] for f in manager["http_filters"]] == ["envoy.filters.http.router"]
    assert "access_log" not in manager
    assert manager["normalize_path"] is True
    assert manager["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
    # The sidecar's admin on loopback; Envoy's own through its admin socket.
    assert endpoint(cluster(config, envoy_config.SIDECAR_ADMIN_CLUSTER)) == {
        "address": "127.0.0.1",
        "port_value": 19090,
    }
    admin_cluster = cluster(config, envoy_config.ENVOY_ADMIN_CLUSTER)
    lb = admin_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert lb["endpoint"]["address"] == {"pipe": {"path": str(admin)}}
    # The gateway's routes know nothing of it.
    assert route_for(config, "/metrics")["direct_response"]["status"] == 404
