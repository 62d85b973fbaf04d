"""Rendered Envoy configurations in tests: the settings they are rendered with, and readers of
the parts the tests look at (the one listener's HTTP connection manager, its routes, clusters)."""

from __future__ import annotations

from typing import Any

from billing.settings import Settings

DEMO_BACKEND = "http://127.0.0.1:4000"
SECRET = "s3cret-for-the-access-log-0123456789abcdef"
GEMINI = "https://generativelanguage.googleapis.com/v1beta/openai"


def settings(**changes: Any) -> Settings:
    """Settings as the sidecar and Envoy are started with: an access-log secret is required."""
    return Settings(**{"access_log_secret": SECRET, **changes})


def hcm(config: dict[str, Any]) -> dict[str, Any]:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    return hcm(config)["route_config"]["virtual_hosts"][0]["routes"]


def route_for(config: dict[str, Any], path: str) -> dict[str, Any]:
    """The first route whose match takes ``path`` (prefix or exact path), as Envoy picks."""
    for route in routes(config):
        match = route["match"]
        if match.get("path") == path or ("prefix" in match and path.startswith(match["prefix"])):
            return route
    raise AssertionError(f"no route for {path}")


def cluster(config: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in config["static_resources"]["clusters"] if c["name"] == name]
    return found


def endpoint(cluster_config: dict[str, Any]) -> dict[str, Any]:
    lb = cluster_config["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    return lb["endpoint"]["address"]["socket_address"]
