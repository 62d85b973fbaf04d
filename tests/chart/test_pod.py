"""What the gateway pod would run, read from the rendered manifest: the init container's command
and environment render an Envoy configuration that Envoy accepts, and the pod's parts agree on
ports, paths and the probes' commands."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import chart, kubelet

from authz_sidecar import envoy_config
from billing import settings as settings_mod
from billingproxy.devstack import envoy_process

DATA_DIR = "/var/lib/billingproxy"


@pytest.mark.parametrize("rendering", ["required", "full"])
def test_the_init_container_renders_a_config_envoy_accepts(rendering: str, tmp_path: Path) -> None:
    docs = chart.render(rendering)
    pod = chart.find(docs, "Deployment", "-gateway")["spec"]["template"]["spec"]
    [init] = pod["initContainers"]
    local = kubelet.Pod(pod, docs, tmp_path, chart.local_images())
    done = local.run(init["name"])
    assert done.returncode == 0, done.stderr
    assert local.root_writes() == [], "the init container wrote on its read-only root filesystem"
    config = local.local_path(f"{DATA_DIR}/run/envoy.yaml")
    assert config.stat().st_mode & 0o077 == 0
    envoy_process.validate(config.read_text())

    envoy = next(c for c in pod["containers"] if c["name"] == "envoy")
    assert envoy["args"][:2] == ["-c", f"{DATA_DIR}/run/envoy.yaml"]
    # The config and the admin socket are where each container of the pod looks for them.
    for container in [init, *pod["containers"]]:
        assert {"name": "run", "mountPath": f"{DATA_DIR}/run"} in container["volumeMounts"], container["name"]
    assert envoy["ports"][0]["containerPort"] == int(local.env(init)["BILLINGPROXY_GATEWAY_PORT"])


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


@pytest.mark.parametrize("rendering", ["required", "full"])
def test_envoy_and_the_sidecar_share_the_access_log_volume(rendering: str) -> None:
    """Envoy appends its JSON access log where the sidecar's settings say it is, on a volume
    both containers mount, flushed as often as the local stack's Envoy."""
    docs = chart.render(rendering)
    pod = chart.find(docs, "Deployment", "-gateway")["spec"]["template"]["spec"]
    envoy = next(c for c in pod["containers"] if c["name"] == "envoy")
    sidecar = next(c for c in pod["containers"] if c["name"] == "sidecar")
    env = {item["name"]: item["value"] for item in sidecar["env"] if "value" in item}
    env.pop("BILLINGPROXY_PRICE_OVERRIDES", None)  # a file in the pod, not here
    settings = settings_mod.from_env(env)
    folder = str(settings.access_log_path.parent)
    assert folder == f"{DATA_DIR}/access-log"
    for container in (envoy, sidecar):
        assert {"name": "access-log", "mountPath": folder} in container["volumeMounts"], container["name"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "access-log"]
    assert volume["emptyDir"]["sizeLimit"]  # a bound on the disk it may take
    flush = envoy["args"].index("--file-flush-interval-msec")
    assert envoy["args"][flush + 1] == str(envoy_config.FILE_FLUSH_INTERVAL_MS)
    assert settings.access_log_rotate_bytes == 64 * 1024 * 1024


def test_the_migration_job_is_a_hook_running_migrate() -> None:
    job = chart.find(chart.render("existing-secrets"), "Job", "-migrate")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["migrate"]
    assert container["env"] == [
        {"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": "pg-app", "key": "uri"}}}
    ]


def test_the_stand_in_kubelet_sees_writes_outside_the_volume_mounts(tmp_path: Path) -> None:
    """The chart's containers have a read-only root filesystem; the local pod sees what a
    container wrote outside its volumes (in its working directory, its HOME, its TMPDIR), so the
    rendered pods' runs can assert that nothing was."""
    spec = {
        "containers": [
            {
                "name": "writer",
                "image": "example.org/shell:1",
                "command": ["sh", "-c", 'echo > /data/kept; echo > here; echo > "$HOME/.cache"; mktemp'],
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            }
        ],
        "volumes": [{"name": "data", "emptyDir": {}}],
    }
    shell = kubelet.Image(env={"PATH": os.environ["PATH"]})
    local = kubelet.Pod(spec, [], tmp_path, {"shell": shell})
    assert local.root_writes() == []
    done = local.run("writer")
    assert done.returncode == 0, done.stderr
    temporary = "/" + str(Path(done.stdout.strip()).relative_to(tmp_path))
    assert local.root_writes() == sorted(["/here", "/.cache", temporary])
    assert temporary.startswith("/tmp/")
    assert local.local_path("/data/kept").is_file()
