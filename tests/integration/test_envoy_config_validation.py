"""Envoy itself accepts the rendered bootstrap (`envoy --mode validate`, a real Envoy process),
in every shape the settings give it, and says why when it does not."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from support.envoy_configs import DEMO_BACKEND, GEMINI, cluster, settings

from authz_sidecar import envoy_config
from billingproxy.devstack import envoy_process

pytestmark = pytest.mark.integration

VARIANTS = {
    "default": (settings(), DEMO_BACKEND),
    "gemini": (settings(), GEMINI),
    "other ports": (
        settings(
            bind_host="0.0.0.0",
            gateway_port=18080,
            api_port=18081,
            grpc_port=19001,
            request_body_bytes_max=65536,
            upstream_timeout_s=60,
            backend_api_key="sk-backend",
            upstream_headers=("traceparent", "x-demo-*"),
        ),
        "https://api.openai.com",
    ),
    "anthropic credential": (
        settings(backend_api_key="sk-ant", backend_auth_header="x-api-key"),
        DEMO_BACKEND,
    ),
    "litellm by name": (settings(), "http://litellm.billing.svc:4000"),
    "gRPC Check": (settings(check_transport="grpc"), DEMO_BACKEND),
    "metrics listener": (settings(bind_host="0.0.0.0", metrics_port=9102), DEMO_BACKEND),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_envoy_accepts_the_rendered_config(name: str, tmp_path: Path) -> None:
    configured, backend_url = VARIANTS[name]
    # Envoy opens its access-log file to validate; its folder is made by whoever runs Envoy.
    configured = configured.replace(data_dir=tmp_path)
    configured.access_log_path.parent.mkdir()
    envoy_process.validate(envoy_config.render_yaml(configured, backend_url=backend_url))


@pytest.mark.parametrize("name", VARIANTS)
def test_the_rendered_config_uses_no_deprecated_field(name: str, tmp_path: Path) -> None:
    """A deprecated field works until an Envoy upgrade removes it; Envoy names each one it reads
    in a warning, so none may appear."""
    configured, backend_url = VARIANTS[name]
    configured = configured.replace(data_dir=tmp_path)
    configured.access_log_path.parent.mkdir()
    config = tmp_path / "envoy.yaml"
    config.write_text(envoy_config.render_yaml(configured, backend_url=backend_url))
    result = subprocess.run(
        [str(envoy_process.envoy_binary()), "--mode", "validate", "-c", str(config), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    deprecated = [line for line in (result.stdout + result.stderr).splitlines() if "Deprecated field" in line]
    assert deprecated == []


def test_envoy_refuses_a_config_whose_access_log_folder_is_missing(tmp_path: Path) -> None:
    """The file is the durable record of every request: Envoy must not start without it."""
    configured = settings().replace(data_dir=tmp_path)
    with pytest.raises(envoy_process.EnvoyRejectedConfig, match="access-log"):
        envoy_process.validate(envoy_config.render_yaml(configured, backend_url=DEMO_BACKEND))


def test_validate_reports_envoys_reason() -> None:
    config = envoy_config.render(settings(), backend_url=DEMO_BACKEND)
    cluster(config, envoy_config.SIDECAR_GRPC_CLUSTER)["connect_timeout"] = "soon"
    with pytest.raises(envoy_process.EnvoyRejectedConfig, match="connect_timeout|Duration|soon"):
        envoy_process.validate(yaml.safe_dump(config))
