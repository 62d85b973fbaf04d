"""What the gateway pod would run, read from the rendered manifest: the init container's command
and environment render an Envoy configuration that Envoy accepts, and the pod's parts agree on
ports, paths and the probes' commands."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import chart

from billingproxy.devstack import envoy_process

DATA_DIR = "/var/lib/billingproxy"


def _env(container: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, str]:
    """The container's environment as the kubelet would resolve it from the rendered Secrets."""
    secrets = {
        d["metadata"]["name"]: d.get("stringData")
        or {k: base64.b64decode(v).decode() for k, v in d.get("data", {}).items()}
        for d in docs
        if d["kind"] == "Secret"
    }
    env = {}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
    return env


@pytest.mark.parametrize("rendering", ["required", "full"])
def test_the_init_container_renders_a_config_envoy_accepts(rendering: str, tmp_path: Path) -> None:
    docs = chart.render(rendering)
    pod = chart.find(docs, "Deployment", "-gateway")["spec"]["template"]["spec"]
    [init] = pod["initContainers"]
    env = _env(init, docs)
    # Mounted paths are folders of tmp_path, as the kubelet would mount them.
    data_dir = tmp_path / "data"
    (data_dir / "run").mkdir(parents=True)
    env = {k: v.replace(DATA_DIR, str(data_dir)) for k, v in env.items()}
    if "BILLINGPROXY_PRICE_OVERRIDES" in env:
        configmap = chart.find(docs, "ConfigMap", "-prices")
        overrides = tmp_path / "prices" / "overrides.yaml"
        overrides.parent.mkdir()
        overrides.write_text(configmap["data"]["overrides.yaml"])
        env["BILLINGPROXY_PRICE_OVERRIDES"] = str(overrides)
    env["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    command = [*init["command"], *(arg.replace(DATA_DIR, str(data_dir)) for arg in init["args"])]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    config = data_dir / "run" / "envoy.yaml"
    assert config.stat().st_mode & 0o077 == 0
    envoy_process.validate(config.read_text())

    envoy = next(c for c in pod["containers"] if c["name"] == "envoy")
    assert envoy["args"][:2] == ["-c", f"{DATA_DIR}/run/envoy.yaml"]
    assert {"name": "run", "mountPath": f"{DATA_DIR}/run"} in envoy["volumeMounts"]
    assert envoy["ports"][0]["containerPort"] == int(env["BILLINGPROXY_GATEWAY_PORT"])


def test_the_sidecar_gets_the_environment_the_config_was_rendered_from() -> None:
    docs = chart.render("full")
    pod = chart.find(docs, "Deployment", "-gateway")["spec"]["template"]["spec"]
    sidecar = next(c for c in pod["containers"] if c["name"] == "sidecar")
    init_env = {item["name"]: item for item in pod["initContainers"][0]["env"]}
    sidecar_env = {item["name"]: item for item in sidecar["env"]}
    assert sidecar_env.pop("DATABASE_URL")
    assert sidecar_env == init_env
    assert sidecar["args"] == ["sidecar"]
    assert sidecar["readinessProbe"]["exec"]["command"] == ["billingproxy", "probe", "readyz", "envoy-ready"]
    assert sidecar["lifecycle"]["preStop"]["exec"]["command"] == [
        "billingproxy",
        "probe",
        "drain",
        "--within",
        "20",
    ]
    assert pod["terminationGracePeriodSeconds"] == 35


def test_the_migration_job_is_a_hook_running_migrate() -> None:
    job = chart.find(chart.render("existing-secrets"), "Job", "-migrate")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["migrate"]
    assert container["env"] == [
        {"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": "pg-app", "key": "uri"}}}
    ]
